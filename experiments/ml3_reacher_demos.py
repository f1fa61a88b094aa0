"""ML³ loss shaping with expert demonstrations on ReacherGoal (Bechtle et al., Fig. 6c-d).

A learned trajectory loss M_φ(τ, g) is meta-trained so that one gradient step on it moves
a policy towards an expert, and is then used alone to train policies for new targets.

- Environment: `reacher_env()`, the 2-link planar arm from rest, stretched along x;
  state (q, q̇), torque actions, goal g = an end-effector position (x, y).
- Experts: iLQR (`control.expert_demos`) on the true dynamics for each training target,
  cost = final end-effector distance² plus small action and final-velocity costs, with
  the actions squashed as the policy's are (u ↦ tanh(u)·action_scale). Computed once per
  config in `__init__`, all targets in one call.
- Policy π_θ(s, g) = tanh(MLP(cos q, sin q, q̇, g)) · action_scale, fresh θ per task.
- Learned loss: a per-time-step network ℓ_φ(g, x_t, [cos q_t, sin q_t, q̇_t, a_t, t/T])
  averaged over the T steps of a rollout, x_t the end effector at s_t (the artifact's
  y = goal, ŷ = x_t, extra = the rest; positions are divided by the arm's reach, q̇ by
  `policy.velocity_scale`, actions by the action scale).
- Inner step (meta-train and meta-test alike): θ' = θ − α ∇_θ M_φ(τ(θ), g) on the
  policy's own rollout in the environment with `detach_states=True`, so the gradient
  reaches θ through the actions only: no dynamics model and no expert are needed.
- Meta-train task loss: behavioural cloning on the expert of the task's target,
  mean_t ‖π_θ'(s*_t, g) − a*_t‖² / action_scale². Each meta iteration is an episode of
  `inner.episode_length` inner steps from fresh θ on every training target, with a meta
  update after every step (the truncated estimator with a window of 1).
- Meta-test on new targets (no expert there): fresh θ trained with the frozen M_φ for
  `eval.test_steps` updates; the metric is the final end-effector distance to the
  target of the real rollout, after every update.
- Baseline "bc", as in the paper: one goal-conditioned policy trained by behavioural
  cloning on all training targets' demonstrations with the same optimizer and number of
  updates, evaluated on the new targets. The iLQR expert's own distance on the test
  targets is reported as an oracle.

The state holds φ with a leading seed axis (`ML3Experiment` without variants); targets
and seeds run under `vmap`.

What tuning the learned loss showed (5 seeds; docs/control.md has the default's numbers): an
ELU loss net beats ReLU, whose piecewise-constant gradients plateau further from new
targets; episodes of 30 inner steps (the meta-test horizon) help a little at three times
the cost, so the default is 1000 meta iterations of 10 steps; the goal-relative offset
(g − x_t) as an extra input (`loss_inputs.offset`) brings no gain. None brings new
targets within the experts' few millimetres: the loss generalises from 4 demonstrated
targets no better than a few centimetres, though it gets there in far fewer updates than
behavioural cloning.
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
from metalearn.state import InnerState, init_meta_state
from metalearn.streams import Ml3ReacherDemosSeed, Ml3ReacherDemosStep
from metalearn.tasks import control, dynamics
from metalearn.types import Array, Params

NUM_EXTRA = 9  # cos q (2), sin q (2), q̇ (2), action (2), t/T
NUM_OFFSET = 2  # (g − x_t) / reach, with `loss_inputs.offset`
EXTRA_NAMES = (
    "cos q1",
    "cos q2",
    "sin q1",
    "sin q2",
    "q̇1 / velocity_scale",
    "q̇2 / velocity_scale",
    "torque 1 / action_scale",
    "torque 2 / action_scale",
    "time t / T",
)
OFFSET_NAMES = ("(g − x_t)_x / reach", "(g − x_t)_y / reach")


class ReacherDemos(ML3Experiment):
    """ML³ with a behavioural-cloning task loss on ReacherGoal over `config.seeds`."""

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh)
        c = config
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        self.env = dynamics.reacher_env(dt=c.env.dt, substeps=c.env.substeps)
        self.horizon = c.env.horizon
        # The arm's reach (sum of link lengths), the unit of goal space.
        self.reach = float(jnp.sum(dynamics.reacher_arm().lengths))
        self.policy = MLP(
            features=(*c.policy.hidden, self.env.action_dim),
            activation=c.policy.activation,
            initializer="lecun_normal",
        )
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self.num_extra = NUM_EXTRA + (NUM_OFFSET if c.loss_inputs.offset else 0)
        self.train_goals = jnp.asarray(c.data.train_targets, jnp.float32)
        self.test_goals = jnp.asarray(c.data.test_targets, jnp.float32)
        experts = self.expert_demos(jnp.concatenate([self.train_goals, self.test_goals]))
        num_train = self.train_goals.shape[0]
        self.demos = jax.tree.map(lambda x: x[:num_train], experts)
        self.oracle = jax.tree.map(lambda x: x[num_train:], experts)  # only for the oracle row
        self._ml3_meta_test_jit = self.jit(self._ml3_meta_test)
        self._bc_meta_test_jit = self.jit(self._bc_meta_test)

    def expert_demos(self, goals: Array) -> dict[str, Array]:
        """The iLQR experts for `goals` [G, 2] (see `control.expert_demos`)."""
        c = self.config.expert
        return control.expert_demos(
            self.env,
            goals,
            self.horizon,
            action_cost=c.action,
            velocity_cost=c.velocity,
            max_iter=c.max_iter,
            distance_scale=self.reach,
        )

    # The policy and the two objectives.

    def _observe(self, state: Array, goal: Array) -> Array:
        q, qd = state[:2], state[2:]
        v = self.config.policy.velocity_scale
        return jnp.concatenate([jnp.cos(q), jnp.sin(q), qd / v, goal / self.reach])

    def act(self, params: Params, state: Array, goal: Array) -> Array:
        """π_θ(s, g) = tanh(MLP(features(s, g))) · action_scale [A]."""
        return self.env.action_scale * jnp.tanh(
            self.policy.apply(params, self._observe(state, goal))
        )

    def init_policy(self, key) -> Params:
        return self.policy.init(key, jnp.zeros((8,)))

    def rollout(self, params: Params, goal: Array, *, detach_states: bool = False):
        """(states [T + 1, S], actions [T, A]) of π_θ(·, g) from the start state."""
        return control.rollout(
            self.env.step,
            lambda s: self.act(params, s, goal),
            self.env.initial_state(),
            self.horizon,
            detach_states=detach_states,
        )

    def final_position(self, params: Params, goal: Array) -> Array:
        """The end effector at the end of the real rollout towards g [2]."""
        states, _ = self.rollout(params, goal)
        return self.env.position(states[-1])

    def loss_inputs(self, states: Array, actions: Array, goal: Array):
        """(y [T, 2], ŷ [T, 2], extra [T, 9]) of the learned loss for a rollout."""
        s = states[:-1]
        q, qd = s[:, :2], s[:, 2:]
        x = jax.vmap(self.env.position)(s) / self.reach
        t = (jnp.arange(self.horizon, dtype=s.dtype) / self.horizon)[:, None]
        extra = jnp.concatenate(
            [
                jnp.cos(q),
                jnp.sin(q),
                qd / self.config.policy.velocity_scale,
                actions / self.env.action_scale,
                t,
            ],
            axis=-1,
        )
        y = jnp.broadcast_to(goal / self.reach, x.shape)
        if self.config.loss_inputs.offset:
            extra = jnp.concatenate([extra, y - x], axis=-1)
        return y, x, extra

    def learned_inner_loss(self, params, model_state, phi, batch, key):
        """M_φ(τ(θ), g) on the policy's own rollout, states detached (actions carry ∇_θ)."""
        del key
        goal = batch["goal"]
        states, actions = self.rollout(params, goal, detach_states=True)
        value = self.loss_fn(phi, *self.loss_inputs(states, actions, goal))
        final = self.env.position(states[-1])
        metrics = {
            "task/final_distance": jnp.linalg.norm(final - goal),
            "task/final_position": final,
        }
        return value, (model_state, metrics)

    def _meta_train_inner_loss(self, params, model_state, phi, batch, key):
        value, (model_state, metrics) = self.learned_inner_loss(
            params, model_state, phi, batch, key
        )
        return value, (model_state, {"task/final_distance": metrics["task/final_distance"]})

    def bc_loss(self, policy, demo: dict[str, Array]) -> Array:
        """Behavioural cloning, mean_t ‖π(s*_t, g) − a*_t‖² / action_scale², on one demo.

        Args:
          policy: `(state, goal) -> action`.
          demo: {'goal' [2], 'states' [T + 1, S], 'actions' [T, A]}.
        """
        pred = jax.vmap(lambda s: policy(s, demo["goal"]))(demo["states"][:-1])
        return jnp.mean(jnp.sum(((pred - demo["actions"]) / self.env.action_scale) ** 2, -1))

    def _policy(self, params):
        return lambda s, g: self.act(params, s, g)

    def _bc_outer(self, params, model_state, batch, key):
        del model_state, key
        return self.bc_loss(self._policy(params), batch)

    def _bc_inner(self, params, model_state, meta_params, batch, key):
        """The baseline's objective: BC averaged over all training demonstrations."""
        del meta_params, key
        value = jnp.mean(jax.vmap(lambda d: self.bc_loss(self._policy(params), d))(batch))
        return value, (model_state, {})

    # Meta-training.

    def _fresh(self, key, num: int) -> InnerState:
        params = jax.vmap(self.init_policy)(jax.random.split(key, num))
        return InnerState(
            params, jax.vmap(self.inner_opt.init)(params), {}, jnp.zeros((num,), jnp.int32)
        )

    def init_one(self, seed_key):
        phi = learned_losses.init_learned_loss(
            self.config.loss_net,
            jax.random.fold_in(seed_key, Ml3ReacherDemosSeed.LOSS_INIT),
            2,
            self.num_extra,
        )
        return init_meta_state(phi, self.meta_opt)

    def episode(self, meta_state, seed_key, step, variant, inputs):
        """One meta iteration: an episode from fresh θ on every training target."""
        del variant, inputs
        c = self.config
        length, window = c.inner.episode_length, c.meta.window
        num = self.train_goals.shape[0]
        key = jax.random.fold_in(seed_key, step)
        per_task = lambda k: jax.vmap(lambda t: ml3.repeat(t, k))  # noqa: E731
        return ml3.episode(
            meta_state,
            self._fresh(jax.random.fold_in(key, Ml3ReacherDemosStep.POLICY_INIT), num),
            per_task(length)({"goal": self.train_goals}),
            per_task(length // window)({k: self.demos[k] for k in ("goal", "states", "actions")}),
            jax.random.fold_in(key, Ml3ReacherDemosStep.INNER),
            jax.random.fold_in(key, Ml3ReacherDemosStep.OUTER),
            meta_optimizer=self.meta_opt,
            problem=bilevel.Problem(
                self._meta_train_inner_loss,
                self._bc_outer,
                self.inner_opt,
            ),
            estimator=self.estimator,
        )

    # Meta-test.

    def learned_fit(self, phi, seed_key, goals: Array, num_steps: int):
        """Fresh θ per goal trained with the frozen M_φ for `num_steps` updates.

        The inner loss reports the end-effector position of the rollout it trains on (the
        real rollout at the current θ), so one extra, discarded update gives the position
        after the last one and the simulator appears once in the compiled program.

        Returns:
          End-effector positions at the end of the rollout after 0 … num_steps updates
          [G, num_steps + 1, 2].
        """
        keys = jax.random.split(
            jax.random.fold_in(seed_key, Ml3ReacherDemosSeed.META_TEST_INIT), goals.shape[0]
        )

        def one(goal, key):
            params = self.init_policy(key)
            state = InnerState(params, self.inner_opt.init(params), {}, jnp.zeros((), jnp.int32))
            _, metrics = bilevel.unroll(
                state,
                jax.lax.stop_gradient(phi),
                ml3.repeat({"goal": goal}, num_steps + 1),
                jax.random.split(jax.random.key(0), num_steps + 1),
                inner_loss=self.learned_inner_loss,
                optimizer=self.inner_opt,
            )
            return metrics["task/final_position"]

        return jax.vmap(one)(goals, keys)

    def bc_fit(self, seed_key, goals: Array, num_steps: int):
        """The BC baseline: one goal-conditioned policy on all training demonstrations.

        Returns:
          End-effector positions at the end of the rollout towards each of `goals` after
          0 … num_steps updates [G, num_steps + 1, 2].
        """
        demos = {k: self.demos[k] for k in ("goal", "states", "actions")}
        evaluate = lambda p: jax.vmap(lambda g: self.final_position(p, g))(goals)  # noqa: E731
        _, trace = ml3.fit(
            self.init_policy(jax.random.fold_in(seed_key, Ml3ReacherDemosSeed.BC_INIT)),
            {},
            demos,
            jax.random.key(0),
            inner_loss=self._bc_inner,
            optimizer=self.inner_opt,
            num_steps=num_steps,
            evaluate=evaluate,
        )
        return jnp.swapaxes(trace, 0, 1)

    def _meta_test_goals(self):
        return jnp.concatenate([self.test_goals, self.train_goals])

    def _split(self, positions):
        """Positions [S, Gte + Gtr, K + 1, 2] -> {'positions': final [S, Gte, 2],
        'test': distances [S, Gte, K + 1], 'train': distances [S, Gtr, K + 1]}."""
        goals = self._meta_test_goals()
        distance = jnp.linalg.norm(positions - goals[None, :, None, :], axis=-1)
        num = self.test_goals.shape[0]
        return {
            "positions": positions[:, :num, -1],
            "test": distance[:, :num],
            "train": distance[:, num:],
        }

    def _ml3_meta_test(self, phis):
        """Meta-test of every seed's φ on the test and the training targets."""
        n, goals = self.config.eval.test_steps, self._meta_test_goals()
        fit = jax.vmap(lambda phi, k: self.learned_fit(phi, k, goals, n))
        return self._split(fit(phis, self.seed_keys))

    def ml3_meta_test(self, phis):
        """`_split` of fresh θ trained with every seed's frozen M_φ on the test and the
        training targets."""
        return self._ml3_meta_test_jit(phis)

    def _bc_meta_test(self):
        n, goals = self.config.eval.test_steps, self._meta_test_goals()
        return self._split(jax.vmap(lambda k: self.bc_fit(k, goals, n))(self.seed_keys))

    def bc_meta_test(self):
        """`_split` of the BC baseline of every seed on the test and the training targets."""
        return self._bc_meta_test_jit()

    def evaluate(self, state, step):
        """Final distance after `eval.test_steps` updates with M_φ, per seed."""
        del step
        out = self.ml3_meta_test(state.params)
        return {
            "eval/final_distance/ml3_test": jnp.mean(out["test"][..., -1], axis=-1),
            "eval/final_distance/ml3_train": jnp.mean(out["train"][..., -1], axis=-1),
        }

    def finalize(self, state, history, workdir):
        c = self.config
        runs = jax.device_get({"ml3": self.ml3_meta_test(state.params), "bc": self.bc_meta_test()})
        out = {
            part: {k: v[part] for k, v in runs.items()} for part in ("positions", "test", "train")
        }
        self.save_learned_losses(
            workdir,
            state.params,
            subdir=("ml3",),
            y="goal g / reach",
            y_hat="end effector x_t / reach",
            extra=EXTRA_NAMES + (OFFSET_NAMES if c.loss_inputs.offset else ()),
        )
        plot_dir = os.path.join(workdir, "plots")
        plots.reacher_workspace(
            np.asarray(self.train_goals),
            np.asarray(self.test_goals),
            {"ML³ (BC-shaped)": out["positions"]["ml3"], "BC": out["positions"]["bc"]},
            jax.device_get(jax.vmap(jax.vmap(self.env.position))(self.demos["states"])),
            self.reach,
            os.path.join(plot_dir, "fig6c_workspace.png"),
        )
        labels = {"ml3": "ML³ loss (BC-shaped)", "bc": "behavioural cloning"}
        plots.meta_test_curve(
            {labels[k]: v.mean(axis=1) for k, v in out["test"].items()},
            ylabel="final distance to target (m)",
            title="ReacherGoal, new targets (Fig. 6d)",
            path=os.path.join(plot_dir, "fig6d_test_targets.png"),
        )
        evals = [r for r in history if "eval/final_distance/ml3_test" in r]
        plots.meta_train_curve(
            [r["step"] for r in evals],
            {
                "test targets": [r["eval/final_distance/ml3_test"] for r in evals],
                "training targets": [r["eval/final_distance/ml3_train"] for r in evals],
            },
            ylabel=f"distance after {c.eval.test_steps} updates (m)",
            title="ML³ loss during meta-training",
            path=os.path.join(plot_dir, "meta_train_distance.png"),
        )
        oracle = np.asarray(self.oracle["distance"])
        return {
            "final_distance_test": {
                k: mean_std(v[..., -1].mean(-1)) for k, v in out["test"].items()
            },
            "final_distance_train": {
                k: mean_std(v[..., -1].mean(-1)) for k, v in out["train"].items()
            },
            "distance_after_3_updates_test": {
                k: mean_std(v[..., min(3, c.eval.test_steps)].mean(-1))
                for k, v in out["test"].items()
            },
            "distance_after_3_updates_train": {
                k: mean_std(v[..., min(3, c.eval.test_steps)].mean(-1))
                for k, v in out["train"].items()
            },
            "initial_distance_test": {
                k: mean_std(v[..., 0].mean(-1)) for k, v in out["test"].items()
            },
            "oracle_ilqr_distance_test": float(oracle.mean()),
            "expert_distance_train": float(np.asarray(self.demos["distance"]).mean()),
            "test_steps": c.eval.test_steps,
            "seeds": list(c.seeds),
        }
