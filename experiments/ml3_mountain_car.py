"""ML³ loss shaping with an intermediate goal on the mountain car (Bechtle et al., Fig. 6a-b).

The car of gym's MountainCarContinuous starts at rest at x = −0.5 and must reach x ≥ 0.45
within `env.horizon` steps; its engine cannot climb the right hill directly, so it has to
swing back up the left hill first. A deterministic policy a = tanh(MLP(x, v)) (fresh θ
per seed) is trained only through a learned trajectory loss

    M_φ(τ) = mean_t ℓ_φ(g, x_t, [v_t / v_max, a_t, t / T])

(`loss_net` with `output_wise=False`: y = the goal g broadcast over time, ŷ = the
position), by θ' = θ − α ∇_θ M_φ(τ(θ)), with the states of τ detached so the gradient
reaches θ through the actions only: no model of the dynamics is needed to use the loss.

Meta-train (Algorithm 1): each meta iteration is an episode of `inner.episode_length`
such steps from a fresh random θ, with a meta update after every step on the task loss
of the new policy, differentiated through the differentiable simulator:

- ``ml3``: the distance to the goal at the last step, max(g − x_T, 0);
- ``ml3_extra``: the same plus `env.extra_weight` · E(x), a term rewarding the swing
  back towards an intermediate goal x_int on the left hill (`env.intermediate_goal`) that
  greedy descent on the final distance misses. `env.extra` picks its form
  (`control.intermediate_goal_term`):
  ``"min_distance"``, min_t |x_t − x_int| (how close the trajectory ever comes), or
  ``"early_mean"``, the mean of |x_t − x_int| over the first `env.extra_fraction` of the
  trajectory (as in the public ML³ code). This extra information exists only at
  meta-train time.

Meta-test: `eval.num_policies` fresh policies per seed (new keys) are trained for
`eval.test_steps` updates with each frozen loss; iLQR (`metalearn.tasks.control.ilqr`)
optimises open-loop actions from zero on the task cost max(g − x_T, 0)² + c Σ_t a_t²,
one iteration counting as one update. The summary reports, for all three, the updates
until the car first comes within `eval.tolerance` of the goal (never = test_steps + 1,
with the reached fraction alongside) and the final distance after the last update.

What the runs show (docs/control.md has the numbers): at T = 100 all three reach the goal
within a few updates, with or without the extra term, so the paper's contrast does not
appear there; at T = 75 (the ``short`` variant) the plain ML³ loss teaches every policy to
push right (a local optimum of the final distance) and never reaches, while ML³ with the
early_mean term reaches in most seeds. iLQR reaches in both settings (the paper's does
not).

The state holds [variant, seed] along two leading axes (`ML3Experiment` with `VARIANTS`;
the variant input of the episode is the weight γ of the intermediate-goal term).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalearn import bilevel, plots
from metalearn.algorithms import ml3
from metalearn.losses import learned as learned_losses
from metalearn.models.mlp import MLP
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import ML3Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import init_inner_state, init_meta_state
from metalearn.streams import Ml3MountainCarSeed, Ml3MountainCarStep
from metalearn.tasks import control, dynamics

LABELS = {"ml3": "ML³ (final distance)", "ml3_extra": "ML³ + intermediate goal", "ilqr": "iLQR"}
GOAL = dynamics.MOUNTAIN_CAR_GOAL
START = jnp.asarray(dynamics.MOUNTAIN_CAR_START)


class MountainCar(ML3Experiment):
    """ML³ with and without an intermediate goal vs iLQR, over `config.seeds`."""

    VARIANTS = ("ml3", "ml3_extra")

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh)
        c = config
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        if c.env.extra not in control.INTERMEDIATE_GOAL_TERMS:
            raise ValueError(
                f"Unknown env.extra {c.env.extra!r}; known: "
                f"{', '.join(control.INTERMEDIATE_GOAL_TERMS)}."
            )
        self.env = dynamics.mountain_car_env()
        self.policy = MLP(
            features=(*c.policy.hidden, 1),
            activation="tanh",
            output_activation="tanh",
            # LeCun-normal first-layer weights are large enough for fresh policies to be
            # near bang-bang and rock the car, which the learned loss then shapes.
            initializer="lecun_normal",
        )
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        # Fixed functions: they key iLQR's compilation cache.
        self.ilqr_stage_cost = lambda s, a: c.ilqr.action_cost * jnp.sum(a**2)
        self.ilqr_final_cost = lambda s: control.mountain_car_goal_distance(s[0]) ** 2
        self._meta_test_jit = self.jit(self._meta_test)  # one program for evaluate and finalize

    # The policy and the learned loss.

    def act(self, params, state):
        """a = tanh(MLP(x', v')) with the state scaled to about [−1, 1]."""
        features = jnp.stack(
            [(state[0] + 0.5) / 0.7, state[1] / dynamics.MOUNTAIN_CAR_MAX_SPEED], axis=-1
        )
        return self.env.action_scale * self.policy.apply(params, features)

    def rollout(self, params, *, detach_states):
        return control.rollout(
            self.env.step,
            lambda s: self.act(params, s),
            START,
            self.config.env.horizon,
            detach_states=detach_states,
        )

    def fresh_params(self, key):
        return self.policy.init(key, jnp.zeros((2,)))

    def learned_loss(self, phi, states, actions):
        """M_φ(τ): ℓ_φ(g, x_t, [v_t / v_max, a_t, t / T]) averaged over t < T."""
        horizon = actions.shape[0]
        positions = states[:-1, :1]
        extra = jnp.concatenate(
            [
                states[:-1, 1:] / dynamics.MOUNTAIN_CAR_MAX_SPEED,
                actions,
                (jnp.arange(horizon) / horizon)[:, None],
            ],
            axis=-1,
        )
        return self.loss_fn(phi, jnp.full_like(positions, GOAL), positions, extra)

    def inner_loss(self, params, model_state, phi, batch, key):
        """M_φ(τ(θ)) on a rollout with detached states (the same at meta-train and -test)."""
        del batch, key
        states, actions = self.rollout(params, detach_states=True)
        return self.learned_loss(phi, states, actions), (
            model_state,
            {"task/final_distance": control.mountain_car_goal_distance(states[-1, 0])},
        )

    def _outer_loss(self, extra_weight):
        def outer_loss(params, model_state, batch, key):
            del model_state, batch, key
            states, _ = self.rollout(params, detach_states=False)
            env = self.config.env
            return control.mountain_car_task_loss(
                states,
                extra_weight,
                env.intermediate_goal,
                extra=env.extra,
                extra_fraction=env.extra_fraction,
            )

        return outer_loss

    # Meta-training.

    def init_one(self, seed_key):
        phi = learned_losses.init_learned_loss(self.config.loss_net, seed_key, num_extra=3)
        return init_meta_state(phi, self.meta_opt)

    def variant_inputs(self):
        """The weight γ of the intermediate-goal term in each variant's task loss [V]."""
        return jnp.asarray(
            [self.config.env.extra_weight if v == "ml3_extra" else 0.0 for v in self.VARIANTS]
        )

    def episode(self, meta_state, seed_key, step, variant, inputs):
        """One meta iteration: an episode of K inner steps from fresh policies; `variant`
        is the weight γ of the task loss's intermediate-goal term."""
        del inputs
        c = self.config
        num, length, window = c.meta.num_policies, c.inner.episode_length, c.meta.window
        key = jax.random.fold_in(seed_key, step)
        fresh = jax.vmap(lambda k: init_inner_state(self.fresh_params(k), self.inner_opt))(
            jax.random.split(jax.random.fold_in(key, Ml3MountainCarStep.POLICY_INIT), num)
        )
        return ml3.episode(
            meta_state,
            fresh,
            {"step": jnp.zeros((num, length))},
            {"window": jnp.zeros((num, length // window))},
            jax.random.fold_in(key, Ml3MountainCarStep.INNER),
            jax.random.fold_in(key, Ml3MountainCarStep.OUTER),
            meta_optimizer=self.meta_opt,
            problem=bilevel.Problem(
                self.inner_loss,
                self._outer_loss(variant),
                self.inner_opt,
            ),
            estimator=self.estimator,
        )

    # Meta-test.

    def _policy_trace(self, phi, key):
        """One fresh policy trained on M_φ for K updates.

        Returns:
          (trace [K + 1, 2] of (distance at the last step, max position) at θ_0 … θ_K,
          positions [T + 1] of θ_K's rollout).
        """

        def evaluate(params):
            states, _ = self.rollout(params, detach_states=True)
            return jnp.stack(
                [control.mountain_car_goal_distance(states[-1, 0]), jnp.max(states[:, 0])]
            )

        params, trace = ml3.fit(
            self.fresh_params(key),
            phi,
            {},
            jax.random.key(0),
            inner_loss=self.inner_loss,
            optimizer=self.inner_opt,
            num_steps=self.config.eval.test_steps,
            evaluate=evaluate,
        )
        return trace, self.rollout(params, detach_states=True)[0][:, 0]

    def _meta_test(self, state):
        c = self.config.eval

        def per_seed(phi, seed_key):
            keys = jax.random.split(
                jax.random.fold_in(seed_key, Ml3MountainCarSeed.META_TEST), c.num_policies
            )
            return jax.vmap(lambda k: self._policy_trace(phi, k))(keys)

        return {
            name: jax.vmap(per_seed)(
                jax.tree.map(lambda x, v=v: x[v], state.params), self.seed_keys
            )
            for v, name in enumerate(self.VARIANTS)
        }

    def meta_test(self, state):
        """name -> ([S, P, K + 1, 2] traces, [S, P, T + 1] final positions) of fresh
        policies (new keys) trained with each frozen loss."""
        return self._meta_test_jit(state)

    def _reached(self, max_positions):
        return max_positions >= GOAL - self.config.eval.tolerance

    def updates_to_goal(self, max_positions):
        """First update index whose rollout comes within tolerance of the goal; K + 1 if none."""
        reached = self._reached(max_positions)
        never = max_positions.shape[-1]  # K + 1 traces: index K + 1 means "never"
        return jnp.where(reached.any(-1), jnp.argmax(reached, axis=-1), never)

    def evaluate(self, state, step):
        """Meta-test metrics per seed: final distance, reached fraction, updates to goal."""
        del step
        out = {}
        for name, (trace, _) in self.meta_test(state).items():
            out[f"eval/final_distance/{name}"] = trace[:, :, -1, 0].mean(-1)
            out[f"eval/reached_fraction/{name}"] = self._reached(trace[:, :, :, 1]).any(-1).mean(-1)
            out[f"eval/updates_to_goal/{name}"] = self.updates_to_goal(trace[:, :, :, 1]).mean(-1)
        return out

    def ilqr_trace(self):
        """iLQR from zero actions, one iteration per call (warm-started), K iterations.

        Returns:
          (trace [K + 1, 2] of (final distance, max position) after 0 … K iterations, the
          states [T + 1, 2] after K, and, if `ilqr.check_uninterrupted`, the final distance of
          one uninterrupted K-iteration run, which keeps its Levenberg-Marquardt
          regularisation across iterations; else None).
        """
        c = self.config
        actions = jnp.zeros((c.env.horizon, 1))

        def measure(states):
            return np.asarray(
                [
                    float(control.mountain_car_goal_distance(states[-1, 0])),
                    float(jnp.max(states[:, 0])),
                ]
            )

        states, _ = control.rollout(self.env.step, lambda s: jnp.zeros((1,)), START, c.env.horizon)
        trace = [measure(states)]
        for _ in range(c.eval.test_steps):
            states, actions, _, _ = control.ilqr(
                self.env.step,
                self.ilqr_stage_cost,
                self.ilqr_final_cost,
                START,
                actions,
                max_iter=1,
            )
            trace.append(measure(states))
        uninterrupted = None
        if c.ilqr.check_uninterrupted:
            full_states, _, _, _ = control.ilqr(
                self.env.step,
                self.ilqr_stage_cost,
                self.ilqr_final_cost,
                START,
                jnp.zeros((c.env.horizon, 1)),
                max_iter=c.eval.test_steps,
            )
            uninterrupted = float(control.mountain_car_goal_distance(full_states[-1, 0]))
        return np.stack(trace), np.asarray(states), uninterrupted

    def finalize(self, state, history, workdir):
        c = self.config
        results = jax.device_get(self.meta_test(state))
        traces = {k: v[0] for k, v in results.items()}
        positions = {k: v[1][:, 0] for k, v in results.items()}  # each seed's first policy
        ilqr_trace, ilqr_states, ilqr_uninterrupted = self.ilqr_trace()
        self.save_learned_losses(
            workdir,
            state.params,
            y="goal position g",
            y_hat="car position x_t",
            extra=("velocity v_t / v_max", "action a_t", "time t / T"),
        )
        # iLQR is deterministic from zero actions: the same trace for every seed.
        num_seeds = len(c.seeds)
        distances = {k: v[:, :, :, 0].mean(1) for k, v in traces.items()}  # [S, K + 1]
        distances["ilqr"] = np.broadcast_to(ilqr_trace[:, 0], (num_seeds, ilqr_trace.shape[0]))
        max_pos = {k: v[:, :, :, 1] for k, v in traces.items()}  # [S, P, K + 1]
        max_pos["ilqr"] = np.broadcast_to(ilqr_trace[:, 1], (num_seeds, 1, ilqr_trace.shape[0]))
        plot_dir = os.path.join(workdir, "plots")
        plots.meta_test_curve(
            {LABELS[k]: v for k, v in distances.items()},
            ylabel="distance to goal at the last step",
            title=f"Mountain car meta-test (Fig. 6b), T = {c.env.horizon}",
            path=os.path.join(plot_dir, "fig6b_distance_vs_update.png"),
        )
        plots.mountain_car_trajectories(
            {
                LABELS["ml3"]: positions["ml3"],
                LABELS["ml3_extra"]: positions["ml3_extra"],
                LABELS["ilqr"]: ilqr_states[None, :, 0],
            },
            goal=GOAL,
            intermediate_goal=c.env.intermediate_goal,
            title=f"Trajectories after {c.eval.test_steps} updates (Fig. 6a)",
            path=os.path.join(plot_dir, "fig6a_trajectories.png"),
        )
        evals = [r for r in history if "eval/final_distance/ml3" in r]
        plots.meta_train_curve(
            [r["step"] for r in evals],
            {LABELS[k]: [r[f"eval/final_distance/{k}"] for r in evals] for k in self.VARIANTS},
            ylabel=f"final distance after {c.eval.test_steps} updates",
            title="Mountain car: meta-test distance during meta-training",
            path=os.path.join(plot_dir, "final_distance_meta_train.png"),
        )
        updates = {k: np.asarray(self.updates_to_goal(jnp.asarray(v))) for k, v in max_pos.items()}
        return {
            "updates_to_goal": {k: mean_std(v.mean(-1)) for k, v in updates.items()},
            "reached_fraction": {
                k: mean_std(np.asarray(self._reached(jnp.asarray(v))).any(-1).mean(-1))
                for k, v in max_pos.items()
            },
            "final_distance": {k: mean_std(v[:, -1]) for k, v in distances.items()},
            **(
                {}
                if ilqr_uninterrupted is None
                else {"ilqr_uninterrupted_final_distance": ilqr_uninterrupted}
            ),
            "never": c.eval.test_steps + 1,
            "tolerance": c.eval.tolerance,
            "test_steps": c.eval.test_steps,
            "horizon": c.env.horizon,
            "seeds": list(c.seeds),
        }
