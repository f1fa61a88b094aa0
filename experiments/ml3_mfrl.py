"""ML³ for model-free RL on real physics, against PPO (Bechtle et al., Sec. IV-A3, Fig. 4).

Each task is a goal g of a brax environment on MuJoCo MJX (`metalearn.tasks.goal_envs`:
ReacherGoal, AntGoal). The pieces:

- A stochastic policy π_θ(a|s): a diagonal Gaussian whose mean is tanh of an MLP
  (`metalearn.models.policy`), fresh θ per goal and per episode.
- The learned loss M_φ(s, a, π_θ(a|s), g): one network ℓ_φ (`output_wise=False`) applied
  to every transition of the rollouts and averaged, with ŷ = log π_θ(a|s), y = the
  transition's reward-to-go when `features.reward_to_go` (the experience (s, a, r) of the
  paper's minibatches) or 0 (the paper's inputs alone), and extra = [s, a, g] scaled by
  `config.features`. States and actions are data, so ∇_θ M_φ flows through log π_θ alone.
- Inner step, the same at meta-train and meta-test: `inner.rollouts` real episodes of
  `horizon` steps with π_θ, then θ' = θ − α ∇_θ M_φ (SGD).
- Task loss (meta-train only): the REINFORCE surrogate of `meta.rollouts` fresh real
  episodes of π_θ' (ML³ Eq. 7-8, `losses.task.reinforce`, batch-mean baseline),
  differentiated w.r.t. φ through θ'(φ) and never through the simulator.

Meta-training is Algorithm 1: each meta iteration trains fresh policies on
`data.goals_per_step` training goals for `inner.episode_length` inner steps with a meta
update after each (the truncated estimator, window 1: the episodes each step needs exist
only once its θ does, so the episode is scanned here, one `estimate_tasks`
of one step per update).

`meta.estimator = "es"` (or "pes") meta-trains on the return itself instead, with no
surrogate and no derivative through the simulator, the episodes or the inner steps
(`bilevel.windowed_meta_steps`, antithetic ES of `metalearn.estimators`). The K inner
steps run in windows of `meta.window` (any divisor of K, up to the whole episode), with a
meta step after each. Per goal, each of the 2P perturbations φ ± σε
(`meta.estimator_options`: sigma, pairs) runs the window's inner steps, each on fresh
episodes of its own current θ (`es_inner_loss`), and scores −(mean return) of
`meta.rollouts` fresh episodes of the final θ (`return_loss`); all perturbations use the
same episode keys (common random numbers). Only forward unrolls: memory does not grow
with the window. The unperturbed θ runs alongside and is carried to the next window;
"pes" (window < K) carries the perturbed particles too, which removes the truncation's
bias. 'implicit' is refused: it needs θ at a fixed point of one inner objective and the
task loss's gradient in θ, and here every step trains on new episodes and the return is
not differentiable.

Meta-test (Fig. 4): `eval.num_goals` held-out goals (drawn from a key no training goal
uses), the same for every seed and every method. From a fresh θ per goal, the learned loss
trains the policy for `eval.test_updates` inner steps; PPO (brax's trainer,
`brax.training.agents.ppo`, its published settings for the environment scaled to the
budget, see `configs/_mfrl.py`) trains a policy with the same hidden layers on the same
goal with exactly the same number of environment samples (checked when the experiment is
built). Both are scored the same way: the return and the mean goal distance of
`eval.episodes` episodes of the deterministic action (the mean; for PPO brax's evaluator
with `deterministic_eval`, whose start states are other draws of the same distribution).
The cross-architecture test (Fig. 4c-d) meta-tests the same loss with policies of
`eval.architectures` hidden layers. Samples are environment steps used for training.

`summary.json` holds, per method, the samples needed to reach 80 % of the final task
performance (the return after training, measured from the return at θ₀) on the curve
averaged over goals, per seed and as mean ± std; also with one common target for both
methods (80 % of the way to the better method's final return).

The state holds every seed along a leading axis. PPO runs in `finalize`, one brax run per
(`ppo.seeds`, goal), each written to `ppo/seed_<s>_goal_<g>.json` when done, so a resumed
run skips those.
"""

import contextlib
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metalearn import bilevel, plots
from metalearn.losses import learned as learned_losses
from metalearn.losses.task import reinforce
from metalearn.models import policy as policies
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import ML3Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import MetaState, init_inner_state, init_meta_state
from metalearn.streams import (
    Ml3MfrlEsStep,
    Ml3MfrlGoalSeedOffset,
    Ml3MfrlMetaTestGoal,
    Ml3MfrlSeed,
    Ml3MfrlStep,
)
from metalearn.tasks import goal_envs
from metalearn.types import Array, Params, PRNGKey

METHODS = ("ml3", "ppo")
LABELS = {"ml3": "ML³ loss", "ppo": "PPO (brax)"}
THRESHOLD = 0.8  # "samples to reach 80 % of task performance"


@contextlib.contextmanager
def brax_on_this_jax():
    """Runs brax's PPO trainer on a JAX that no longer has `jax.device_put_replicated`.

    brax 0.14.2 (the newest release) calls it once, to copy its training state to every
    local device; JAX 0.10 removed it. While the trainer runs, this supplies the drop-in
    replacement JAX's migration guide gives: one stacked copy per device, sharded along the
    new axis.
    """
    if hasattr(jax, "device_put_replicated"):
        yield
        return

    def device_put_replicated(x, devices):
        sharding = NamedSharding(Mesh(np.asarray(devices), ("d",)), PartitionSpec("d"))
        stacked = jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * len(devices)), x)
        return jax.device_put(stacked, sharding)

    jax.device_put_replicated = device_put_replicated
    try:
        yield
    finally:
        del jax.device_put_replicated


def reward_to_go(rewards: Array) -> Array:
    """Σ_{t' ≥ t} r_t' along the last axis."""
    return jnp.flip(jnp.cumsum(jnp.flip(rewards, -1), -1), -1)


def samples_to_fraction(samples, curve, target=None, fraction: float = THRESHOLD):
    """The first sample count at which `curve` reaches `fraction` of its improvement.

    The improvement is measured from curve[0] to `target` (default: the curve's last
    value). Returns `inf` if the curve never gets there, and 0 if there is no improvement
    to make.
    """
    curve = np.asarray(curve, np.float64)
    target = curve[-1] if target is None else target
    if target <= curve[0]:
        return 0.0
    level = curve[0] + fraction * (target - curve[0])
    hit = np.nonzero(curve >= level)[0]
    return float(samples[hit[0]]) if hit.size else float("inf")


class ModelFreeRL(ML3Experiment):
    """ML³ for model-free RL on `config.env` over `config.seeds`; PPO in `finalize`."""

    @property
    def forward_only(self) -> bool:
        """ES or PES (any window), which score the return itself; otherwise
        Truncated(window=1) or FirstOrder(window=1), one meta-gradient per inner step."""
        return isinstance(self.estimator, (bilevel.ES, bilevel.PES))

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        c = config
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        if c.meta.estimator == "implicit":
            raise ValueError(
                "ml3_mfrl cannot use meta.estimator='implicit': it needs θ at a fixed point of "
                "one inner objective and the task loss's gradient in θ, but every inner step "
                "trains on fresh episodes (no fixed point) and the return is not "
                "differentiable through the simulator. Use 'es' or 'pes' (the return itself, "
                "forward only) or 'truncated' / 'first_order' (the REINFORCE surrogate)."
            )
        if c.meta.estimator not in ("es", "pes") and (
            c.meta.estimator not in ("truncated", "first_order") or c.meta.window != 1
        ):
            raise ValueError(
                "ml3_mfrl collects fresh episodes at every inner step, so backpropagating its "
                "REINFORCE surrogate steps φ after each one: use meta.window=1 with "
                "meta.estimator='truncated' (exact through the step) or 'first_order'. For "
                "windows of several inner steps use 'es' or 'pes', which score the return of "
                "the updated policy and never differentiate. Got "
                f"{c.meta.estimator!r}, window {c.meta.window}."
            )
        super().__init__(config, mesh=mesh)
        self.env = goal_envs.make_env(c.env)
        self.obs_dim, self.action_dim = self.env.observation_size, self.env.action_size
        self.policy_net = self.make_policy_net(c.policy.hidden)
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self.num_extra = self.obs_dim + self.action_dim + self.env.goal_dim
        self.samples_per_update = c.inner.rollouts * c.horizon
        self.test_goals = goal_envs.sample_goals(
            c.env,
            jax.random.key(c.eval.goal_seed + Ml3MfrlGoalSeedOffset.TEST_GOALS),
            c.eval.num_goals,
        )
        self._meta_test_jit = {}
        if c.eval.ppo:
            self.check_ppo_budget()

    # -- policies, rollouts, losses --

    def make_policy_net(self, hidden) -> policies.GaussianPolicy:
        return policies.GaussianPolicy(
            tuple(hidden), self.action_dim, init_log_std=self.config.policy.init_log_std
        )

    def init_policy(self, net, key: PRNGKey) -> Params:
        return net.init(key, jnp.zeros((self.obs_dim,)))

    def rollouts(
        self, net, params: Params, goal: Array, key: PRNGKey, num: int, num_eval=0, eval_key=None
    ):
        """`num` real episodes of π_θ, then `num_eval` of its mean action (their start
        states drawn from `eval_key`); never differentiated. One batch, so that a program
        holds one copy of the simulator."""
        params = jax.lax.stop_gradient(params)
        scales = jnp.concatenate([jnp.ones((num,)), jnp.zeros((num_eval,))])
        keys = jax.random.split(key, num)
        if num_eval:
            keys = jnp.concatenate([keys, jax.random.split(eval_key, num_eval)])

        def episode(k, scale):
            act = lambda obs, k: policies.sample(net, params, obs, k, scale)  # noqa: E731
            return goal_envs.rollout(self.env, act, k, goal, self.config.horizon)

        return jax.vmap(episode)(keys, scales)

    @staticmethod
    def scores(data) -> dict[str, Array]:
        """Mean return and mean goal distance over episodes `data` [E, T]."""
        return {
            "return": jnp.mean(jnp.sum(data["rewards"], -1)),
            "mean_distance": jnp.mean(data["distance"]),
        }

    def loss_inputs(self, data, log_probs: Array, goal: Array):
        """(y, ŷ, extra) of M_φ for transitions [N, T]: y reward-to-go (or 0), ŷ log π."""
        f = self.config.features
        n, t = log_probs.shape
        if f.reward_to_go:
            y = reward_to_go(data["rewards"]) / f.return_scale
        else:
            y = jnp.zeros_like(log_probs)
        g = jnp.broadcast_to(goal / f.goal_scale, (n, t, goal.shape[-1]))
        extra = jnp.concatenate([data["obs"] / f.obs_scale, data["actions"], g], -1)
        flat = lambda x: x.reshape(n * t, -1)  # noqa: E731
        return flat(y), flat(log_probs), flat(extra)

    def learned_loss(self, phi, net, params: Params, data, goal: Array) -> Array:
        """M_φ(s, a, log π_θ(a|s), g) averaged over the transitions `data` [N, T]."""
        log_probs = policies.log_prob(net, params, data["obs"], data["actions"])
        return self.loss_fn(phi, *self.loss_inputs(data, log_probs, goal))

    def learned_inner_loss(self, net):
        """Inner objective: M_φ on the batch's transitions {'goal', 'data' [N, T]}."""

        def inner_loss(params, model_state, phi, batch, key):
            del key
            value = self.learned_loss(phi, net, params, batch["data"], batch["goal"])
            return value, (model_state, {})

        return inner_loss

    def task_loss(self, params, model_state, batch, key):
        """REINFORCE of π_θ' on the batch's fresh episodes {'data' [M, T]} (held fixed)."""
        del model_state, key
        data = batch["data"]
        log_probs = policies.log_prob(self.policy_net, params, data["obs"], data["actions"])
        return reinforce(log_probs, jnp.sum(data["rewards"], -1))

    def es_inner_loss(self, net):
        """Inner objective of "es"/"pes" for a batch {'goal'}: `inner.rollouts` fresh
        episodes of π_θ from the step's key, then M_φ on them (`learned_inner_loss`);
        reports their 'train/return' and 'train/mean_distance'."""
        inner_loss = self.learned_inner_loss(net)

        def collect_and_fit(params, model_state, phi, batch, key):
            goal = batch["goal"]
            data = self.rollouts(net, params, goal, key, self.config.inner.rollouts)
            value, (model_state, _) = inner_loss(
                params, model_state, phi, {"goal": goal, "data": data}, key
            )
            return value, (model_state, {f"train/{k}": v for k, v in self.scores(data).items()})

        return collect_and_fit

    def return_loss(self, params, model_state, batch, key):
        """Task loss of "es"/"pes": −(mean return) of `meta.rollouts` fresh episodes of
        π_θ' on batch['goal'] (never differentiated)."""
        del model_state
        data = self.rollouts(self.policy_net, params, batch["goal"], key, self.config.meta.rollouts)
        return -self.scores(data)["return"]

    # -- meta-training --

    def init_one(self, seed_key: PRNGKey) -> MetaState:
        phi = learned_losses.init_learned_loss(
            self.config.loss_net,
            jax.random.fold_in(seed_key, Ml3MfrlSeed.LOSS_INIT),
            num_outputs=1,
            num_extra=self.num_extra,
        )
        return init_meta_state(phi, self.meta_opt)

    def episode(self, meta: MetaState, seed_key: PRNGKey, step: Array, variant, inputs):
        """One meta iteration: fresh policies on training goals, a meta step per update.

        Iteration k = 0 … K collects episodes D_k with θ_k (`inner.rollouts` of them);
        for k ≥ 1 they are the fresh episodes of the task loss: φ steps on the REINFORCE
        loss of θ_k(φ) = θ_{k−1} − α∇_θ M_φ(D_{k−1}) on D_k (`Truncated(window=1)` or
        `FirstOrder(window=1)`, `estimate_tasks` over that one step, θ_{k−1} a constant).
        Then θ_{k+1} is taken on D_k with the new φ. D_k serves as the task loss's data of
        step k and the inner data of step k + 1 (both are episodes of π_θk), so a meta
        iteration simulates K + 1 batches of episodes and its program one simulator.
        """
        del variant, inputs
        c = self.config
        net, num = self.policy_net, c.data.goals_per_step
        key = jax.random.fold_in(seed_key, step)
        goals = goal_envs.sample_goals(c.env, jax.random.fold_in(key, Ml3MfrlStep.GOALS), num)
        thetas = jax.vmap(functools.partial(self.init_policy, net))(
            jax.random.split(jax.random.fold_in(key, Ml3MfrlStep.POLICY_INIT), num)
        )
        states = jax.vmap(lambda p: init_inner_state(p, self.inner_opt))(thetas)
        if self.forward_only:
            return self.es_episode(meta, key, goals, states)
        inner_loss = self.learned_inner_loss(net)
        problem = bilevel.Problem(inner_loss, self.task_loss, self.inner_opt)
        step_fn = functools.partial(
            bilevel.inner_step, inner_loss=inner_loss, optimizer=self.inner_opt
        )

        def body(carry, k):
            meta, prev_states, prev_data, states = carry
            keys = jax.random.split(jax.random.fold_in(key, Ml3MfrlStep.ROLLOUTS + k), num)
            data = jax.vmap(lambda p, g, kk: self.rollouts(net, p, g, kk, c.inner.rollouts))(
                states.params, goals, keys
            )
            grads, _, diagnostics = self.estimator.estimate_tasks(
                problem,
                meta.params,
                bilevel.EstimatorState(inner=prev_states),
                jax.tree.map(lambda x: x[:, None], {"goal": goals, "data": prev_data}),
                keys[:, None],
                {"data": data},
                keys,
            )
            loss = diagnostics["meta/loss"]
            stepped = bilevel.meta_step(meta, grads, meta_optimizer=self.meta_opt)
            meta = jax.tree.map(lambda a, b: jnp.where(k > 0, a, b), stepped, meta)
            new_states = jax.vmap(step_fn, in_axes=(0, None, 0, 0))(
                states, meta.params, {"goal": goals, "data": data}, keys
            )[0]
            metrics = {
                "meta/loss": loss,
                "meta/grad_norm": optax.global_norm(grads),
                "inner/loss": jnp.mean(diagnostics["inner/loss"]),
                "train/return": jnp.mean(jnp.sum(data["rewards"], -1)),
                "train/mean_distance": jnp.mean(data["distance"]),
            }
            return (meta, states, data, new_states), metrics

        # Iteration 0 has no previous step: its meta-gradient (of θ_0's own data) is dropped.
        data0 = jax.vmap(lambda p, g: self.rollouts(net, p, g, jax.random.key(0), 1))(
            states.params, goals
        )
        placeholder = jax.tree.map(
            lambda x: jnp.zeros((num, c.inner.rollouts, *x.shape[2:]), x.dtype), data0
        )
        (meta, _, _, _), metrics = jax.lax.scan(
            body, (meta, states, placeholder, states), jnp.arange(c.inner.episode_length + 1)
        )
        last = jax.tree.map(lambda x: x[-1], metrics)
        metrics = jax.tree.map(lambda x: jnp.mean(x[1:]), metrics)
        metrics["train/final_return"] = last["train/return"]
        metrics["train/final_mean_distance"] = last["train/mean_distance"]
        return meta, metrics

    def es_episode(self, meta: MetaState, key: PRNGKey, goals: Array, states):
        """The meta iteration of "es"/"pes" (module docstring) from fresh `states` [G].

        Returns:
          `(meta, metrics)`: metrics averaged over the windows; 'meta/loss' is −(mean
          return) of the unperturbed θ at each window's end, 'train/final_return' the
          return at θ_K, 'train/return' that of the inner steps' episodes.
        """
        c = self.config
        num, length, window = c.data.goals_per_step, c.inner.episode_length, c.meta.window

        def per_goal(n, stream):  # {'goal'} leaves [G, n, 2] and keys [G, n]
            batch = {"goal": jnp.broadcast_to(goals[:, None], (num, n, goals.shape[-1]))}
            return batch, jax.random.split(jax.random.fold_in(key, stream), (num, n))

        # Each meta iteration is a whole episode from fresh θ: PES's particles start afresh.
        meta, _, metrics = bilevel.windowed_meta_steps(
            meta,
            self.estimator.init_tasks(meta.params, states),
            *per_goal(length, Ml3MfrlEsStep.INNER),
            *per_goal(length // window, Ml3MfrlEsStep.OUTER),
            problem=bilevel.Problem(
                self.es_inner_loss(self.policy_net), self.return_loss, self.inner_opt
            ),
            estimator=self.estimator,
            meta_optimizer=self.meta_opt,
        )
        final_return = -metrics["meta/loss"][-1]
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        metrics["train/final_return"] = final_return
        return meta, metrics

    # -- meta-test --

    def fit_policy(self, net, phi, theta0: Params, goal: Array, key: PRNGKey):
        """Trains θ₀ on M_φ for `eval.test_updates` updates, each on fresh episodes.

        Iteration k = 0 … K simulates `inner.rollouts` episodes of π_θk and
        `eval.episodes` of its mean action (same start states at every k), scores the
        latter and steps θ on the former (the last step is not needed and dropped).

        Returns:
          Traces [K+1] of the mean action's 'return' and 'mean_distance' at θ_0 … θ_K.
        """
        c = self.config
        n, e = c.inner.rollouts, c.eval.episodes
        step_fn = functools.partial(
            bilevel.inner_step, inner_loss=self.learned_inner_loss(net), optimizer=self.inner_opt
        )
        eval_key = jax.random.key(c.eval.goal_seed + Ml3MfrlGoalSeedOffset.EVAL_STARTS)

        def body(state, k):
            data = self.rollouts(
                net, state.params, goal, jax.random.fold_in(key, k), n, e, eval_key=eval_key
            )
            train = jax.tree.map(lambda x: x[:n], data)
            state, _ = step_fn(state, phi, {"goal": goal, "data": train}, k)
            return state, self.scores(jax.tree.map(lambda x: x[n:], data))

        _, trace = jax.lax.scan(
            body, init_inner_state(theta0, self.inner_opt), jnp.arange(c.eval.test_updates + 1)
        )
        return trace

    def _meta_test(self, hidden, phis, seed_keys):
        """ML³ traces [S, N, K+1] on the test goals for every seed, a policy of `hidden`."""
        net = self.make_policy_net(hidden)

        def one_seed(phi, seed_key):
            def one_goal(goal, i):
                k = jax.random.fold_in(jax.random.fold_in(seed_key, Ml3MfrlSeed.META_TEST), i)
                theta0 = self.init_policy(
                    net, jax.random.fold_in(k, Ml3MfrlMetaTestGoal.POLICY_INIT)
                )
                return self.fit_policy(
                    net, phi, theta0, goal, jax.random.fold_in(k, Ml3MfrlMetaTestGoal.FIT)
                )

            goals = self.test_goals
            return jax.vmap(one_goal)(goals, jnp.arange(goals.shape[0]))

        return jax.vmap(one_seed)(phis, seed_keys)

    def meta_test(self, phis, hidden=None):
        hidden = tuple(self.config.policy.hidden if hidden is None else hidden)
        if hidden not in self._meta_test_jit:
            self._meta_test_jit[hidden] = self.jit(functools.partial(self._meta_test, hidden))
        return jax.device_get(self._meta_test_jit[hidden](phis, self.seed_keys))

    def evaluate(self, state: MetaState, step: int) -> dict:
        """Meta-test returns and goal distances, per meta seed, averaged over test goals."""
        del step
        traces = self.meta_test(state.params)  # [S, goals, K + 1]
        return {
            "eval/return/initial": traces["return"][..., 0].mean(-1),
            "eval/return/ml3": traces["return"][..., -1].mean(-1),
            "eval/mean_distance/ml3": traces["mean_distance"][..., -1].mean(-1),
        }

    # -- PPO --

    def ppo_run(self, seed: int, goal_index: int) -> dict:
        """brax's PPO on one test goal: evaluation curve against training samples."""
        from brax.training.agents.ppo import networks as ppo_networks
        from brax.training.agents.ppo import train as ppo

        c, p = self.config, self.config.ppo
        goal = self.test_goals[goal_index]
        samples, returns, distances = [], [], []

        def record(step, metrics):
            samples.append(int(step))
            returns.append(float(metrics["eval/episode_reward"]))
            distances.append(float(metrics["eval/episode_goal_distance"]) / c.horizon)

        network_factory = functools.partial(
            ppo_networks.make_ppo_networks,
            policy_hidden_layer_sizes=tuple(c.policy.hidden),
            value_hidden_layer_sizes=tuple(p.value_hidden),
            activation=jax.nn.tanh,
        )
        start = time.time()
        with brax_on_this_jax():
            ppo.train(
                environment=self.env.with_goal(goal),
                num_timesteps=self.budget,
                episode_length=c.horizon,
                action_repeat=1,
                num_envs=p.num_envs,
                batch_size=p.batch_size,
                num_minibatches=p.num_minibatches,
                unroll_length=p.unroll_length,
                num_updates_per_batch=p.num_updates_per_batch,
                learning_rate=p.learning_rate,
                entropy_cost=p.entropy_cost,
                discounting=p.discounting,
                reward_scaling=p.reward_scaling,
                normalize_observations=p.normalize_observations,
                num_evals=p.num_evals,
                num_eval_envs=c.eval.episodes,
                deterministic_eval=True,
                network_factory=network_factory,
                progress_fn=record,
                seed=seed,
            )
        return {
            "seed": seed,
            "goal": goal_index,
            "goal_position": np.asarray(goal).tolist(),
            "num_timesteps": self.budget,
            "samples": samples,
            "return": returns,
            "mean_distance": distances,
            "wall_s": time.time() - start,
        }

    def check_ppo_budget(self) -> None:
        """brax's PPO trains in whole updates between evaluations and rounds the sample
        count up to them; refuse settings under which it would see more samples than ML³."""
        p = self.config.ppo
        per_update = p.batch_size * p.num_minibatches * p.unroll_length
        per_eval = per_update * max(p.num_evals - 1, 1)
        if self.budget % per_eval:
            raise ValueError(
                f"PPO would not train on exactly the ML³ budget of {self.budget} samples "
                f"(eval.test_updates × inner.rollouts × horizon): its updates of "
                f"batch_size × num_minibatches × unroll_length = {per_update} samples, "
                f"times num_evals − 1 = {max(p.num_evals - 1, 1)}, must divide it. Change "
                "ppo.batch_size, ppo.num_minibatches or ppo.num_evals."
            )
        if (p.batch_size * p.num_minibatches) % p.num_envs:
            raise ValueError(
                "brax's PPO needs ppo.batch_size × ppo.num_minibatches to be a multiple of "
                f"ppo.num_envs; got {p.batch_size} × {p.num_minibatches} and {p.num_envs}."
            )

    @property
    def budget(self) -> int:
        """Environment samples each method trains one policy with."""
        return self.config.eval.test_updates * self.samples_per_update

    def ppo_all(self, workdir: str) -> list[dict]:
        """Every (seed, goal) PPO run, each cached in `workdir/ppo` once finished."""
        folder = os.path.join(workdir, "ppo")
        os.makedirs(folder, exist_ok=True)
        runs = []
        for seed in self.config.ppo.seeds:
            for g in range(self.config.eval.num_goals):
                path = os.path.join(folder, f"seed_{seed}_goal_{g}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        runs.append(json.load(f))
                    continue
                run = self.ppo_run(seed, g)
                with open(path + ".tmp", "w") as f:
                    json.dump(run, f)
                os.replace(path + ".tmp", path)
                print(
                    f"PPO seed {seed} goal {g}: return {run['return'][0]:.2f} -> "
                    f"{run['return'][-1]:.2f} in {run['wall_s']:.0f} s",
                    flush=True,
                )
                runs.append(run)
        return runs

    # -- the end --

    def finalize(self, state: MetaState, history: list[dict], workdir: str) -> dict:
        c = self.config
        seeds = list(c.seeds)
        k = c.eval.test_updates
        ml3_samples = np.arange(k + 1) * self.samples_per_update
        start = time.time()
        ml3_traces = self.meta_test(state.params)
        ml3_seconds = time.time() - start
        curves = {"ml3": {}, "ppo": {}}  # method -> metric -> (samples, [S, N, points])
        for metric in ("return", "mean_distance"):
            curves["ml3"][metric] = (ml3_samples, np.asarray(ml3_traces[metric]))

        ppo_runs = self.ppo_all(workdir) if c.eval.ppo else []
        if ppo_runs:
            ppo_samples = np.asarray(ppo_runs[0]["samples"])
            for metric in ("return", "mean_distance"):
                rows = np.asarray([r[metric] for r in ppo_runs], np.float64)
                curves["ppo"][metric] = (
                    ppo_samples,
                    rows.reshape(len(c.ppo.seeds), c.eval.num_goals, -1),
                )
        methods = [m for m in METHODS if curves[m]]

        # Samples to 80 % of the final performance, on the goal-averaged return curve of
        # each seed; and on the seed- and goal-averaged curve to one target for all methods.
        mean_curves = {m: curves[m]["return"][1].mean((0, 1)) for m in methods}
        best = max(curve[-1] for curve in mean_curves.values())
        speed, common = {}, {}
        for m in methods:
            x, rows = curves[m]["return"]
            speed[m] = [samples_to_fraction(x, row.mean(0)) for row in rows]
            common[m] = samples_to_fraction(x, mean_curves[m], target=best)

        arch = {}
        for hidden in c.eval.architectures:
            if tuple(hidden) == tuple(c.policy.hidden):
                arch[f"{len(hidden)}x{hidden[0]}"] = ml3_traces
            else:
                arch[f"{len(hidden)}x{hidden[0]}"] = self.meta_test(state.params, hidden)

        summary = {
            "env": c.env,
            "budget_samples": self.budget,
            "samples_per_update": self.samples_per_update,
            "test_goals": np.asarray(self.test_goals).tolist(),
            "ml3_meta_test_seconds": ml3_seconds,
            "env_steps_per_second_ml3_meta_test": float(
                len(seeds)
                * c.eval.num_goals
                * k
                * (c.inner.rollouts + c.eval.episodes)
                * c.horizon
                / ml3_seconds
            ),
        }
        for m in methods:
            x, rows = curves[m]["return"]
            dist = curves[m]["mean_distance"][1]
            summary[m] = {
                "initial_return": mean_std(rows[:, :, 0].mean(1)),
                "final_return": mean_std(rows[:, :, -1].mean(1)),
                "initial_mean_distance": mean_std(dist[:, :, 0].mean(1)),
                "mean_distance": mean_std(dist[:, :, -1].mean(1)),
                "samples_to_80pct_own_final": speed[m],
                "samples_to_80pct_common_target": common[m],
            }
        if ppo_runs:
            summary["ppo"]["seconds_per_run"] = float(np.mean([r["wall_s"] for r in ppo_runs]))
            steps = self.budget * len(ppo_runs)
            summary["ppo"]["env_steps_per_second"] = steps / sum(r["wall_s"] for r in ppo_runs)
        summary["architectures"] = {
            name: {
                "final_return": mean_std(t["return"][:, :, -1].mean(1)),
                "mean_distance": mean_std(t["mean_distance"][:, :, -1].mean(1)),
                "samples_to_80pct_own_final": [
                    samples_to_fraction(ml3_samples, t["return"][s].mean(0))
                    for s in range(len(seeds))
                ],
            }
            for name, t in arch.items()
        }

        plot_dir = os.path.join(workdir, "plots")
        for metric in ("return", "mean_distance"):
            plots.policy_learning_curves(
                {LABELS[m]: (curves[m][metric][0], curves[m][metric][1]) for m in methods},
                metric,
                f"{c.env}: meta-test on {c.eval.num_goals} held-out goals",
                os.path.join(plot_dir, f"ml3_vs_ppo_{metric}.png"),
            )
            plots.policy_learning_curves(
                {f"ML³ loss, policy {name}": (ml3_samples, t[metric]) for name, t in arch.items()},
                metric,
                f"{c.env}: one learned loss, four policy architectures",
                os.path.join(plot_dir, f"architectures_{metric}.png"),
            )
        self.save_learned_losses(
            workdir,
            state.params,
            y="reward-to-go / features.return_scale" if c.features.reward_to_go else "zeros",
            y_hat="log π_θ(a|s)",
            extra=("observation / features.obs_scale", "action", "goal / features.goal_scale"),
        )
        return summary
