"""ML³ inverse dynamics with a physics prior (Bechtle et al., Sec. IV-B 2, Fig. 5c-d).

An inverse-dynamics model û = M_θ(q) q̈ + F(q, q̇) learns only the inertia matrix, as a
Deep Lagrangian Network (`metalearn.models.inertia`: M_θ = S(L Lᵀ + εI)S, positive
definite by construction, S a fixed per-joint scale estimated from training torques and
accelerations); the bias forces F are the simulator's analytical ones. Data are smooth
random joint trajectories (sums of sinusoids, so q, q̇ and q̈ are exact:
`metalearn.tasks.trajectories`) of two simulated arms, the 2-link ReacherGoal arm and a
7-link Sawyer stand-in (`metalearn.tasks.dynamics`), with torques u from the simulator's
inverse dynamics. Each task is one trajectory: a small
training set of `data.num_train` points (the paper's point is sample efficiency) and
held-out points of the same trajectory. Torques are z-scored per joint with statistics
of meta-train trajectories wherever a loss sees them.

Three ways of training M_θ, on the same data from the same θ₀:

- ``mse``: the torque MSE itself.
- ``ml3_mse``: a learned loss ℓ_φ(u, û), output-wise over joints, meta-trained with the
  torque MSE on held-out points of the trajectory as task loss.
- ``ml3_shaped``: the same learned loss meta-trained with the shaping loss
  ‖M_θ(q) − M(q)‖² against the simulator's inertia matrix (in units of S, on the
  held-out points): information that exists only at meta-train time.

Meta-train follows Algorithm 3 with the public ML³ protocol: every meta iteration is an
episode from freshly initialised θ on `data.num_tasks` trajectories drawn from a pool of
meta-train trajectories (random training and held-out points each time),
`inner.episode_length` steps of the inner optimizer on ℓ_φ, with a meta update after
every inner step (the truncated estimator with a window of 1), so each update asks "does
one step on ℓ_φ reduce the task loss?" and the episode covers the whole meta-test
horizon. The inner optimizer is Adam (differentiated through, `eps_root` > 0): with SGD
the Sawyer's ill-conditioned torque MSE diverges at any step size that makes progress
on the reacher, and Adam is also the fair baseline (a learned loss cannot win by merely
rescaling the step). At meta-test, fresh θ are trained on NEW trajectories (never in the
pool) for `eval.test_steps` steps with each frozen loss (the ML³ losses never see M(q)
there); the traces are the torque MSE on held-out points of those trajectories (Fig. 5c
reacher, 5d Sawyer) and the relative inertia error ‖M_θ − M‖²_F / ‖M‖²_F.

The state holds one `MetaState` per arm (the arms differ in size), each with [variant,
seed] along two leading axes; one episode (of one variant and seed) steps both arms, so
both train in the same compiled step.
"""

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalearn import bilevel, plots
from metalearn.algorithms import ml3
from metalearn.losses import learned as learned_losses
from metalearn.models.inertia import InertiaNet, predicted_torque
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import ML3Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import init_inner_state, init_meta_state
from metalearn.streams import Ml3InverseDynamicsEpisodeTasks as Tasks
from metalearn.streams import Ml3InverseDynamicsSeed as Seed
from metalearn.streams import Ml3InverseDynamicsStep as Step
from metalearn.tasks import dynamics, trajectories
from metalearn.types import Array, PRNGKey

ARMS = {"reacher": dynamics.reacher_arm, "sawyer": dynamics.sawyer_arm}
VARIANTS = ("ml3_mse", "ml3_shaped")  # meta-trained learned losses
METHODS = ("mse", *VARIANTS)  # what θ is trained with at meta-test
LABELS = {"mse": "MSE", "ml3_mse": "ML³ (MSE task loss)", "ml3_shaped": "ML³ shaped (M prior)"}
FIGURES = {"reacher": "fig5c", "sawyer": "fig5d"}
PLOT_ORDER = ("ml3_mse", "mse", "ml3_shaped")  # the paper's colours: blue, orange, green


def shaping_loss(inertia_tilde: Array, inertia: Array, scale: Array) -> Array:
    """The physics prior ‖M_θ − M‖² in units of S: mean of (M̃_θ − S⁻¹MS⁻¹)².

    Args:
      inertia_tilde: M̃_θ(q) [B, n, n], where M_θ = S M̃_θ S.
      inertia: the true M(q) [B, n, n].
      scale: the diagonal of S [n].
    """
    return jnp.mean((inertia_tilde - inertia / _outer(scale)) ** 2)


def _outer(scale: Array) -> Array:
    """S·1·S as a [1, n, n] array, to scale a batch of matrices [B, n, n]."""
    return (scale[:, None] * scale[None, :])[None]


def relative_inertia_error(predicted: Array, inertia: Array) -> Array:
    """Mean over points of ‖M_θ − M‖²_F / ‖M‖²_F. predicted, inertia: [B, n, n]."""
    diff = jnp.sum((predicted - inertia) ** 2, axis=(-2, -1))
    return jnp.mean(diff / jnp.sum(inertia**2, axis=(-2, -1)))


class ArmProblem:
    """One arm's inverse-dynamics problem: data, normalisation, model and losses.

    Data are drawn once: a pool of `data.pool_trajectories` meta-train trajectories
    (episodes draw tasks from it) and `eval.num_tasks` new meta-test trajectories per
    seed, each of `data.points_per_trajectory` points. From the meta-train pool come the
    per-joint torque mean and std (the losses see z-scored torques) and the inertia scale
    sᵢ = √(std(uᵢ − Fᵢ) / std(q̈ᵢ)), a rough √Mᵢᵢ, so that M_θ = S M̃_θ S with M̃_θ of
    order one.
    """

    def __init__(
        self,
        name: str,
        config: ml_collections.ConfigDict,
        seed_keys: PRNGKey,
        *,
        jit: Callable = jax.jit,
    ):
        self.name = name
        self.config = c = config
        self.arm = ARMS[name]()
        self.num_joints = self.arm.num_joints
        self.model = InertiaNet(
            self.num_joints, tuple(c.model.hidden), c.model.activation, c.model.eps
        )
        points = c.data.points_per_trajectory
        if c.data.num_train + max(c.data.num_outer, 1) > points:
            raise ValueError(
                f"data.points_per_trajectory ({points}) must exceed data.num_train "
                f"({c.data.num_train}) + data.num_outer ({c.data.num_outer})."
            )
        # One compiled sampler for a fixed number of trajectories, called in chunks: the
        # simulator's nested derivatives are slow to compile, so compile them once.
        chunk = 8
        d = c.data
        sampler = jit(
            jax.vmap(
                lambda k: trajectories.sample_trajectory(
                    self.arm,
                    k,
                    points,
                    num_sinusoids=d.num_sinusoids,
                    amplitude=d.amplitude,
                    frequency_range=tuple(d.frequency_range),
                    q0_range=d.q0_range,
                    duration=d.duration,
                )
            )
        )

        def sample(key, num):
            keys = jax.random.split(key, -(-num // chunk) * chunk)
            parts = [sampler(keys[i : i + chunk]) for i in range(0, len(keys), chunk)]
            return jax.tree.map(lambda *x: jnp.concatenate(x)[:num], *parts)

        self.pool = sample(jax.random.key(c.data.pool_key), c.data.pool_trajectories)
        # Meta-test trajectories: new ones per seed, never in the pool.
        test = [
            sample(jax.random.fold_in(k, Seed.TEST_TRAJECTORIES), c.eval.num_tasks)
            for k in seed_keys
        ]
        self.test_data = jax.tree.map(lambda *x: jnp.stack(x), *test)  # [S, F, P, ...]
        u, bias, qdd = (
            np.asarray(self.pool[k]).reshape(-1, self.num_joints) for k in ("u", "F", "qdd")
        )
        self.u_mean = jnp.asarray(u.mean(0))
        self.u_std = jnp.asarray(u.std(0))
        self.scale = jnp.asarray(np.sqrt((u - bias).std(0) / qdd.std(0)))

    def batches(self, data: dict, num_train: int) -> tuple[dict, dict]:
        """Splits trajectories [..., P, ...] into training and held-out batches.

        Returns:
          `(train, heldout)`, each {'x': {'q', 'qdd', 'F'}, 'y': z-scored torques}; only the
          held-out batch carries the true inertia 'M'.
        """
        lead = (1,) * (data["u"].ndim - 1)
        y = (data["u"] - self.u_mean.reshape(*lead, -1)) / self.u_std.reshape(*lead, -1)
        x = {"q": data["q"], "qdd": data["qdd"], "F": data["F"]}
        first = lambda t: jax.tree.map(lambda v: v[..., :num_train, :], t)  # noqa: E731
        rest = lambda t: jax.tree.map(lambda v: v[..., num_train:, :], t)  # noqa: E731
        train = {"x": first(x), "y": first(y)}
        heldout = {"x": rest(x), "y": rest(y), "M": data["M"][..., num_train:, :, :]}
        return train, heldout

    def episode_tasks(self, pool: dict, key: PRNGKey, num_tasks: int) -> tuple[dict, dict]:
        """`num_tasks` random pool trajectories, each with random training/held-out points.

        Returns:
          `(train [T, num_train, ...], heldout [T, num_outer, ...])` as in `batches`.
        """
        d = self.config.data
        size = pool["q"].shape[0]
        points = pool["q"].shape[1]
        idx = jax.random.randint(jax.random.fold_in(key, Tasks.TRAJECTORIES), (num_tasks,), 0, size)
        perm = jax.vmap(lambda k: jax.random.permutation(k, points)[: d.num_train + d.num_outer])(
            jax.random.split(jax.random.fold_in(key, Tasks.POINTS), num_tasks)
        )
        data = jax.vmap(lambda i, p: jax.tree.map(lambda x: x[i][p], pool))(idx, perm)
        return self.batches(data, d.num_train)

    def init_params(self, key: PRNGKey):
        """Fresh θ for M̃_θ."""
        return self.model.init(key, jnp.zeros((1, self.num_joints)))

    def inertia(self, params, q: Array) -> Array:
        """M_θ(q) = S M̃_θ(q) S [B, n, n]."""
        return self.model.apply(params, q) * _outer(self.scale)

    def apply(self, params, x: dict, inertia: Array | None = None) -> Array:
        """z-scored predicted torques [B, n] of û = M_θ(q) q̈ + F(q, q̇).

        `inertia` [B, n, n], if given, stands in for M_θ(q) (to check the rest).
        """
        if inertia is None:
            inertia = self.inertia(params, x["q"])
        u_hat = predicted_torque(inertia, x["F"], x["qdd"])
        return (u_hat - self.u_mean[None]) / self.u_std[None]

    def torque_mse(self, params, batch: dict) -> Array:
        """Mean squared error of z-scored torques (per joint in units of its std)."""
        return jnp.mean((self.apply(params, batch["x"]) - batch["y"]) ** 2)

    def shaping_loss(self, params, batch: dict) -> Array:
        """`shaping_loss` of M̃_θ at the batch's q against its true 'M'."""
        return shaping_loss(self.model.apply(params, batch["x"]["q"]), batch["M"], self.scale)

    def inertia_error(self, params, batch: dict) -> Array:
        """`relative_inertia_error` of M_θ at the batch's q."""
        return relative_inertia_error(self.inertia(params, batch["x"]["q"]), batch["M"])


class InverseDynamics(ML3Experiment):
    """MSE vs ML³ vs shaped ML³ for the inverse dynamics of `config.arms` over `config.seeds`.

    The variants are the two learned losses (their task loss differs); an episode steps
    every arm's φ of one variant and seed.
    """

    VARIANTS = VARIANTS

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        c = config
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        unknown = set(c.arms) - set(ARMS)
        if unknown or not c.arms:
            raise ValueError(f"Unknown arms {sorted(unknown)}; choose from {sorted(ARMS)}.")
        super().__init__(config, mesh=mesh)
        self.problems = {name: ArmProblem(name, c, self.seed_keys, jit=self.jit) for name in c.arms}
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self.shaped = jnp.asarray([v == "ml3_shaped" for v in VARIANTS])
        # The data travel as arguments, not as constants baked into the programs.
        self.pools = {name: p.pool for name, p in self.problems.items()}
        self.test_data = {name: p.test_data for name, p in self.problems.items()}
        # One compiled program serves the evaluations and the final figures.
        self._all_traces_jit = self.jit(self.all_traces)

    def variant_inputs(self):
        """Whether each variant's task loss is the shaping loss [V]."""
        return self.shaped

    def chunk_inputs(self):
        """The meta-train pools {arm: trajectories}."""
        return self.pools

    # Losses -------------------------------------------------------------------------------

    def inner_loss(self, problem: ArmProblem, use_mse: Array | bool = False):
        """ℓ_φ(u, û) on z-scored torques, output-wise over joints; or the torque MSE where
        `use_mse` (a traced flag, so that the three meta-test methods share one program)."""

        def loss(phi, y, y_hat, batch):
            del batch
            mse = jnp.mean((y_hat - y) ** 2)
            return jnp.where(use_mse, mse, self.loss_fn(phi, y, y_hat))

        return ml3.regression_inner_loss(problem.apply, loss)

    def outer_loss(self, problem: ArmProblem, shaped: Array):
        def outer(params, model_state, batch, key):
            del model_state, key
            return jnp.where(
                shaped, problem.shaping_loss(params, batch), problem.torque_mse(params, batch)
            )

        return outer

    # Meta-train ---------------------------------------------------------------------------

    def init_one(self, seed_key):
        """{arm: φ and its optimizer state}, the same φ for every arm (and variant)."""
        phi = learned_losses.init_learned_loss(self.config.loss_net, seed_key)
        return {name: init_meta_state(phi, self.meta_opt) for name in self.problems}

    def _fresh(self, problem: ArmProblem, key: PRNGKey, num: int):
        params = jax.vmap(problem.init_params)(jax.random.split(key, num))
        return jax.vmap(lambda p: init_inner_state(p, self.inner_opt))(params)

    def _step_one(self, problem, pool, meta_state, shaped, seed_key, step):
        """One meta iteration: an episode from fresh θ on `data.num_tasks` pool trajectories."""
        c = self.config
        num_tasks, length, window = c.data.num_tasks, c.inner.episode_length, c.meta.window
        key = jax.random.fold_in(jax.random.fold_in(seed_key, Seed.META_TRAIN), step)
        train, heldout = problem.episode_tasks(pool, jax.random.fold_in(key, Step.TASKS), num_tasks)
        per_task = lambda k: jax.vmap(lambda t: ml3.repeat(t, k))  # noqa: E731
        return ml3.episode(
            meta_state,
            self._fresh(problem, jax.random.fold_in(key, Step.MODEL_INIT), num_tasks),
            per_task(length)(train),
            per_task(length // window)(heldout),
            jax.random.fold_in(key, Step.INNER),
            jax.random.fold_in(key, Step.OUTER),
            meta_optimizer=self.meta_opt,
            problem=bilevel.Problem(
                self.inner_loss(problem),
                self.outer_loss(problem, shaped),
                self.inner_opt,
            ),
            estimator=self.estimator,
        )

    def episode(self, meta_state, seed_key, step, shaped, pools):
        """One meta iteration of every arm, for one variant (`shaped`) and seed."""
        new, metrics = {}, {}
        for name, problem in self.problems.items():
            new[name], arm_metrics = self._step_one(
                problem, pools[name], meta_state[name], shaped, seed_key, step
            )
            for k, v in arm_metrics.items():
                metrics[f"{k}/{name}"] = v
        return new, metrics

    def chunk_metrics(self, metrics):
        """The episodes' metrics and `meta/loss` of the whole run: the mean over arms,
        variants and seeds, per step."""
        metrics = dict(metrics)
        metrics["meta/loss"] = jnp.mean(
            jnp.stack([jnp.mean(metrics[f"meta/loss/{n}"], axis=(1, 2)) for n in self.problems]),
            axis=0,
        )
        return metrics

    # Meta-test ----------------------------------------------------------------------------

    def _traces_one(self, problem, use_mse, phi, test_data, seed_key):
        """[F, K + 1, 2] traces of (held-out torque MSE, relative inertia error) on the
        seed's F meta-test trajectories [F, P, ...] from fresh θ₀ (the same data and θ₀
        for every loss of a seed)."""
        c = self.config
        train, test = problem.batches(test_data, c.data.num_train)
        params0 = jax.vmap(problem.init_params)(
            jax.random.split(jax.random.fold_in(seed_key, Seed.META_TEST_INIT), c.eval.num_tasks)
        )

        def one(params, train, test):
            def evaluate(p):
                return jnp.stack([problem.torque_mse(p, test), problem.inertia_error(p, test)])

            return ml3.fit(
                params,
                phi,
                train,
                jax.random.key(0),
                inner_loss=self.inner_loss(problem, use_mse),
                optimizer=self.inner_opt,
                num_steps=c.eval.test_steps,
                evaluate=evaluate,
            )[1]

        return jax.vmap(one)(params0, train, test)

    def all_traces(self, state, test_data):
        """{arm: {method: [S, F, K + 1, 2]}}; the methods run side by side under vmap."""
        use_mse = jnp.asarray([m == "mse" for m in METHODS])
        out = {}
        for name, problem in self.problems.items():
            # φ per method [M, S, ...]: MSE ignores its (placeholder) φ.
            phis = jax.tree.map(
                lambda x: jnp.stack(
                    [x[VARIANTS.index(m)] if m in VARIANTS else x[0] for m in METHODS]
                ),  # fmt: skip
                state[name].params,
            )
            per_seed = jax.vmap(
                lambda flag, phi, d, k, p=problem: self._traces_one(p, flag, phi, d, k),
                in_axes=(None, 0, 0, 0),
            )
            traces = jax.vmap(per_seed, in_axes=(0, 0, None, None))(
                use_mse, phis, test_data[name], self.seed_keys
            )
            out[name] = {m: traces[i] for i, m in enumerate(METHODS)}
        return out

    def traces(self, state):
        """`all_traces` of the meta-test trajectories, as one compiled program."""
        return self._all_traces_jit(state, self.test_data)

    def evaluate(self, state, step):
        del step
        out = {}
        for name, traces in self.traces(state).items():
            for method, trace in traces.items():
                final = jnp.mean(trace[:, :, -1], axis=1)  # [S, 2]
                out[f"eval/torque_mse/{name}/{method}"] = final[:, 0]
                out[f"eval/inertia_error/{name}/{method}"] = final[:, 1]
        return out

    def finalize(self, state, history, workdir):
        c = self.config
        traces = jax.device_get(self.traces(state))
        for name in self.problems:
            self.save_learned_losses(
                workdir,
                state[name].params,
                subdir=(name,),
                y="z-scored torques u",
                y_hat="z-scored predicted torques û",
            )
        plot_dir = os.path.join(workdir, "plots")
        summary = {"final_torque_mse": {}, "final_inertia_error": {}, "mean_torque_mse": {}}
        for name, arm_traces in traces.items():
            seeds_mean = {m: arm_traces[m].mean(axis=1) for m in PLOT_ORDER}  # [S, K + 1, 2]
            fig = FIGURES[name]
            curves = (  # (trace index, y label, title, file) of each meta-test figure
                (
                    0,
                    "held-out torque MSE (z-scored)",
                    f"{name}: inverse dynamics at meta-test on new trajectories (Fig. {fig[3:]})",
                    f"{fig}_{name}_torque_mse.png",
                ),
                (
                    1,
                    "‖M_θ − M‖²_F / ‖M‖²_F",
                    f"{name}: relative inertia error at meta-test",
                    f"{name}_inertia_error.png",
                ),
            )
            for index, ylabel, title, filename in curves:
                plots.meta_test_curve(
                    {LABELS[m]: t[..., index] for m, t in seeds_mean.items()},
                    ylabel=ylabel,
                    title=title,
                    path=os.path.join(plot_dir, filename),
                    log=True,
                )
            summary["final_torque_mse"][name] = {
                m: mean_std(t[:, -1, 0]) for m, t in seeds_mean.items()
            }
            summary["final_inertia_error"][name] = {
                m: mean_std(t[:, -1, 1]) for m, t in seeds_mean.items()
            }
            summary["mean_torque_mse"][name] = {
                m: mean_std(t[:, :, 0].mean(axis=1)) for m, t in seeds_mean.items()
            }
        evals = [r for r in history if any(k.startswith("eval/torque_mse/") for k in r)]
        for name in self.problems:
            plots.meta_train_curve(
                [r["step"] for r in evals],
                {LABELS[m]: [r[f"eval/torque_mse/{name}/{m}"] for r in evals] for m in PLOT_ORDER},
                ylabel="final meta-test torque MSE",
                title=f"{name}: meta-test torque MSE during meta-training",
                path=os.path.join(plot_dir, f"{name}_torque_mse_meta_train.png"),
            )
        summary.update(
            {
                "test_steps": c.eval.test_steps,
                "num_train_points": c.data.num_train,
                "seeds": list(c.seeds),
            }
        )
        return summary
