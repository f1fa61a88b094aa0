"""ML³ for model-based RL: a learned loss over (trajectory, goal) (Bechtle et al., Fig. 3).

Paper Sec. III-B1 and IV-A2. Each task is a goal g the agent must reach from a fixed start
state within `horizon` control steps (PointmassGoal: a point mass in the plane; ReacherGoal:
a 2-link arm's end effector). The pieces:

- A dynamics model P: an ensemble of small MLPs (`metalearn.models.ensemble`) predicting
  the state change from (state, action), trained with Adam on a fixed-size ring buffer
  (`metalearn.tasks.replay`) of real transitions held in the experiment state. The buffer
  starts with exploration rollouts (a random constant action plus noise) and grows every
  `dynamics.refit_every` meta iterations with real rollouts of the current policies (with
  exploration noise) and a few more exploration rollouts, after which the ensemble is
  refitted, so it follows the policies as they improve. Rollouts in the model use the
  ensemble mean.
- A deterministic policy π_θ(s) = tanh(MLP_θ(s)) · action_scale, fresh θ per goal and per
  episode. With `policy.preact_penalty` > 0 the learned loss's inner objective also
  penalises pre-tanh outputs beyond `policy.preact_bound` (`control.preactivation_penalty`),
  so that the tanh cannot saturate for good.
- The learned loss M_φ(τ, g): one network ℓ_φ applied to every time step and averaged,
  `learned_loss_fn(φ, y=g [T, G], ŷ=pos(s_{t+1}) [T, G], extra=[s_{t+1}, a_t, (t+1)/T])`
  with `output_wise=False`; inputs are divided by the fixed scales in `config.features`.

Inner step, identical at meta-train and meta-test: θ' = opt(θ, ∇_θ M_φ(τ(θ), g)) where τ is
a rollout with `detach_states=True`, so the gradient reaches θ only through the actions:
in the learned model at meta-train, in the real environment at meta-test (no model needed).
Task loss at meta-train: the final distance ‖pos(s_T) − g‖ of π_θ' rolled out in the
learned model, differentiated through the model. Each meta iteration is an episode of
`inner.episode_length` inner steps from fresh θ on `data.goals_per_step` training goals
with a meta update after every `meta.window` steps (`meta.estimator`: "truncated" for
shorter windows, e.g. 1, the pointmass default; "unrolled" for the whole episode, the
reacher default): the ML³ episode of `metalearn.algorithms.ml3.episode`. With
`meta.learn_step_size`, φ also holds log_step and the learned loss's inner objective is
scaled by exp(gain · log_step) (`step_size`): a meta-learned step size, as in the paper.

Meta-test (Fig. 3b-c): for each test goal, the same θ₀ is trained for `eval.test_steps`
updates of the same optimizer with (i) the learned loss alone on real rollouts, (ii) the
task loss (final distance) optimised through the learned dynamics model from meta-training,
and (iii) when `eval.reference`, a reference the paper does not have: the task loss
through the TRUE differentiable simulator (an upper bound). Each task-loss baseline is also
run with its step size scaled by every factor in `eval.baseline_lr_factors`, and the factor
with the best mean final distance on the evaluated goals is reported too (tuned on the
test goals themselves: generous to the baselines).
The metric is the final distance to the goal of the REAL rollout after each update; the
fraction of that rollout's actions at the limit (|a| ≥ 0.99 · scale) is traced alike.

The state holds every seed along a leading axis.
"""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from metalearn import bilevel, plots
from metalearn.algorithms import ml3
from metalearn.losses import learned as learned_losses
from metalearn.models import ensemble
from metalearn.models.mlp import MLP
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import ML3Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import MetaState, init_inner_state, init_meta_state
from metalearn.streams import Ml3MbrlRefit, Ml3MbrlSeed, Ml3MbrlStep
from metalearn.tasks import control, dynamics
from metalearn.tasks.replay import ReplayBuffer, buffer_add, buffer_init
from metalearn.types import Array, Params, PRNGKey

# The reacher steps with the closed-form 2-link dynamics: the true-simulator reference
# differentiates through them (the generic arm's derivative is a third-order graph).
ENVS = {
    "pointmass": dynamics.pointmass_env,
    "reacher": functools.partial(dynamics.reacher_env, closed_form=True),
}
# An action counts as saturated when |tanh(·)| is above this (pre-activation beyond ±2.65).
SATURATED = 0.99
GOAL_SETS = ("train_goals", "test_goals")
LABELS = {
    "ml3": "ML³ loss (real rollouts, no model)",
    "task_model": "task loss through the learned model",
    "task_true": "task loss through the true simulator (reference)",
}


# --- rollouts and losses ----------------------------------------------------------------


def final_distance(position: Array, goal: Array) -> Array:
    """‖position − goal‖, smoothed at 0 so its gradient is defined everywhere."""
    return jnp.sqrt(jnp.sum((position - goal) ** 2) + 1e-8)


def collect(step, policy, state0: Array, noise: Array, action_scale: float):
    """A real rollout with additive action noise [T, A], actions clipped to the scale.

    Returns:
      Transitions `(states [T, S], actions [T, A], next_states [T, S])`.
    """

    def body(s, eps):
        a = jnp.clip(policy(s) + eps, -action_scale, action_scale)
        s_next = step(s, a)
        return s_next, (s, a, s_next)

    _, transitions = jax.lax.scan(body, state0, noise)
    return transitions


@flax.struct.dataclass
class MBRLState:
    """Per seed: φ (with its optimizer), the dynamics ensemble, its optimizer, the buffer."""

    meta: MetaState
    model: dict
    model_opt: optax.OptState
    buffer: ReplayBuffer


class ModelBasedRL(ML3Experiment):
    """ML³ for MBRL on one environment (`config.env`) over `config.seeds`.

    The state (`MBRLState`) holds every seed along a leading axis: the episode of one seed
    also grows its buffer and refits its dynamics model.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        c = config
        if c.env not in ENVS:
            raise ValueError(f"Unknown environment {c.env!r}; choose one of {sorted(ENVS)}.")
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        super().__init__(config, mesh=mesh)
        self.env = env = ENVS[c.env]()
        self.horizon = c.horizon
        self.state0 = env.initial_state()
        self.policy_net = MLP((*c.policy.hidden, env.action_dim), "tanh")  # z; a = tanh(z)
        self.dyn_net = ensemble.dynamics_network(
            env.state_dim, c.dynamics.hidden, c.dynamics.activation
        )
        self.dyn_opt = make_optimizer(c.dynamics.optimizer)
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self.num_extra = env.state_dim + env.action_dim + 1
        if 1.0 not in c.eval.baseline_lr_factors:
            raise ValueError("eval.baseline_lr_factors must contain 1.0 (the shared step size).")
        self.lr_factors = jnp.asarray(c.eval.baseline_lr_factors, jnp.float32)
        # The true-simulator reference costs a third-order graph for the arm (slow to compile).
        self.task_methods = ("task_model", "task_true") if c.eval.reference else ("task_model",)
        self.methods = ("ml3", *self.task_methods)
        # The seed keys are an argument of these programs, not a closed-over constant.
        self._meta_test_jit = self.jit(self._meta_test_all)
        self._model_error_jit = self.jit(self._model_errors)

    # -- policies, rollouts, losses --

    def policy(self, params: Params, state: Array) -> Array:
        """π_θ(s) = tanh(MLP_θ(s)) · action_scale."""
        return jnp.tanh(self.policy_net.apply(params, state)) * self.env.action_scale

    def init_policy(self, key: PRNGKey) -> Params:
        return self.policy_net.init(key, jnp.zeros((self.env.state_dim,)))

    def model_step(self, model):
        """`(state, action) -> next state` of the learned dynamics `model`."""
        return functools.partial(ensemble.ensemble_step, self.dyn_net, model)

    def rollout(self, step, params: Params, *, detach_states: bool):
        """(states [T+1, S], actions [T, A]) of π_θ under `step` from the start state.

        With `detach_states`, `control.rollout` also cuts the action's gradient into the
        step, so the dynamics are never differentiated (no JVP of the arm's RK4 to compile).
        """
        return control.rollout(
            step,
            functools.partial(self.policy, params),
            self.state0,
            self.horizon,
            detach_states=detach_states,
        )

    def loss_inputs(self, states: Array, actions: Array, goal: Array):
        """(y, ŷ, extra) of the per-time-step learned loss, scaled by `config.features`."""
        f, env = self.config.features, self.env
        t = self.horizon
        pos = jax.vmap(env.position)(states[1:]) / f.position_scale
        y = jnp.broadcast_to(goal / f.position_scale, pos.shape)
        time = (jnp.arange(1, t + 1, dtype=pos.dtype) / t)[:, None]
        extra = jnp.concatenate(
            [states[1:] / jnp.asarray(f.state_scale)[None], actions / env.action_scale, time], -1
        )
        return y, pos, extra

    def learned_loss(self, phi, states: Array, actions: Array, goal: Array) -> Array:
        """M_φ(τ, g): ℓ_φ averaged over the trajectory's time steps."""
        return self.loss_fn(phi, *self.loss_inputs(states, actions, goal))

    def loss_params(self, phi, learn_step_size: bool | None = None):
        """The loss network's part of φ (all of it without `meta.learn_step_size`, read now
        unless given)."""
        if learn_step_size is None:
            learn_step_size = self.config.meta.learn_step_size
        return phi["loss"] if learn_step_size else phi

    def step_size(self, phi, learn_step_size: bool | None = None) -> Array:
        """The learned step-size factor exp(gain · φ['log_step']) (1 without
        `meta.learn_step_size`, read now unless given), multiplying the inner optimizer's
        step on the learned loss."""
        if learn_step_size is None:
            learn_step_size = self.config.meta.learn_step_size
        if not learn_step_size:
            return jnp.ones(())
        return jnp.exp(self.config.meta.step_size_gain * phi["log_step"])

    def learned_inner_loss(self, step):
        """Inner objective M_φ(τ(θ), g), τ rolled out by `step` with detached states, plus
        `policy.preact_penalty` × `control.preactivation_penalty` (read here, once), all
        times the learned step size (`step_size`): for SGD the same as a learned rate."""
        penalty, bound = self.config.policy.preact_penalty, self.config.policy.preact_bound
        learn = self.config.meta.learn_step_size

        def inner_loss(params, model_state, phi, batch, key):
            del key
            states, actions = self.rollout(step, params, detach_states=True)
            value = self.learned_loss(self.loss_params(phi, learn), states, actions, batch["goal"])
            if penalty:
                # The rollout's pre-activations z_t = MLP_θ(s_t), the states being data.
                z = self.policy_net.apply(params, states[:-1])
                value = value + penalty * control.preactivation_penalty(z, bound)
            value = self.step_size(phi, learn) * value
            dist = final_distance(self.env.position(states[-1]), batch["goal"])
            return value, (model_state, {"inner/final_distance": dist})

        return inner_loss

    def task_loss(self, step, params: Params, goal: Array) -> Array:
        """Final distance of π_θ rolled out by `step`, differentiated through it."""
        states, _ = self.rollout(step, params, detach_states=False)
        return final_distance(self.env.position(states[-1]), goal)

    def real_metrics(self, params: Params, goal: Array) -> dict[str, Array]:
        """{'distance': final distance, 'saturation': fraction of actions with
        |a| ≥ SATURATED · action_scale} of the real rollout of π_θ, metrics: never
        differentiated. θ is detached on the way in (not only the results on the way out),
        so that under a `grad` (they are traced inside the inner loss's aux) no JVP of the
        simulator is traced."""
        states, actions = self.rollout(
            self.env.step, jax.lax.stop_gradient(params), detach_states=True
        )
        saturated = jnp.abs(actions) >= SATURATED * self.env.action_scale
        return {
            "distance": final_distance(self.env.position(states[-1]), goal),
            "saturation": jnp.mean(saturated.astype(jnp.float32)),
        }

    def real_distance(self, params: Params, goal: Array) -> Array:
        """Final distance of the real rollout of π_θ (`real_metrics`' 'distance')."""
        return self.real_metrics(params, goal)["distance"]

    # -- goals --

    def sample_goals(self, key: PRNGKey, num: int, region) -> Array:
        """`num` goals from a region: a box (low, high) or, for kind 'annulus', polar
        coordinates (radius, angle) between `low` and `high`."""
        u = jax.random.uniform(
            key, (num, 2), minval=jnp.asarray(region.low), maxval=jnp.asarray(region.high)
        )
        if region.kind == "box":
            return u
        if region.kind == "annulus":
            return jnp.stack([u[:, 0] * jnp.cos(u[:, 1]), u[:, 0] * jnp.sin(u[:, 1])], -1)
        raise ValueError(f"Unknown goal region kind {region.kind!r}; choose 'box' or 'annulus'.")

    def train_goals(self, seed_key: PRNGKey, key: PRNGKey, num: int) -> Array:
        """A meta-train batch: fresh goals from the training region, or, when
        `data.num_train_goals` > 0, draws from that many fixed goals of the seed."""
        d = self.config.data
        if d.num_train_goals:
            pool = self.sample_goals(
                jax.random.fold_in(seed_key, Ml3MbrlSeed.TRAIN_GOAL_POOL),
                d.num_train_goals,
                d.train_region,
            )
            return pool[jax.random.randint(key, (num,), 0, d.num_train_goals)]
        return self.sample_goals(key, num, d.train_region)

    def eval_goals(self, seed_key: PRNGKey):
        """Meta-test goals [N, G] per set (`GOAL_SETS`).

        'train_goals' come from the training distribution (fresh goals of the training
        region, or the seed's fixed training goals when `data.num_train_goals` > 0);
        'test_goals' were never trained on (fresh goals of `eval.test_region`).
        """
        e, d = self.config.eval, self.config.data
        if d.num_train_goals:
            pool = self.sample_goals(
                jax.random.fold_in(seed_key, Ml3MbrlSeed.TRAIN_GOAL_POOL),
                d.num_train_goals,
                d.train_region,
            )
            train = pool[jnp.arange(e.num_goals) % d.num_train_goals]
        else:
            train = self.sample_goals(
                jax.random.fold_in(seed_key, Ml3MbrlSeed.EVAL_TRAIN_GOALS),
                e.num_goals,
                d.train_region,
            )
        test = self.sample_goals(
            jax.random.fold_in(seed_key, Ml3MbrlSeed.EVAL_TEST_GOALS), e.num_goals, e.test_region
        )
        return {"train_goals": train, "test_goals": test}

    # -- data collection and the dynamics model --

    def explore(self, key: PRNGKey, num: int):
        """`num` exploration rollouts: a random constant action plus noise, flattened."""
        d, scale = self.config.dynamics, self.env.action_scale
        k1, k2 = jax.random.split(key)
        const = jax.random.uniform(k1, (num, self.env.action_dim), minval=-scale, maxval=scale)
        noise = (
            d.explore_noise
            * scale
            * jax.random.normal(k2, (num, self.horizon, self.env.action_dim))
        )
        trans = jax.vmap(lambda c, n: collect(self.env.step, lambda s: c, self.state0, n, scale))(
            const, noise
        )
        return jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), trans)

    def policy_data(self, key: PRNGKey, params: Params):
        """Real rollouts of the policies `params` [N] with Gaussian action noise, flattened."""
        d, scale = self.config.dynamics, self.env.action_scale
        num = jax.tree.leaves(params)[0].shape[0]
        noise = (
            d.policy_noise
            * scale
            * jax.random.normal(key, (num, self.horizon, self.env.action_dim))
        )
        trans = jax.vmap(
            lambda p, n: collect(
                self.env.step, functools.partial(self.policy, p), self.state0, n, scale
            )
        )(params, noise)
        return jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), trans)

    def fit_model(self, state: MBRLState, key: PRNGKey, num_steps: int) -> MBRLState:
        model, opt_state, _ = ensemble.fit_ensemble(
            self.dyn_net,
            state.model,
            state.model_opt,
            state.buffer,
            key,
            optimizer=self.dyn_opt,
            num_steps=num_steps,
            batch_size=self.config.dynamics.batch_size,
        )
        return state.replace(model=model, model_opt=opt_state)

    def model_error(self, model, key: PRNGKey) -> Array:
        """One-step prediction error on fresh real exploration transitions: RMS of the
        error of s' relative to the RMS of the true Δs (0 is perfect, 1 predicts no change)."""
        s, a, s2 = self.explore(key, self.config.eval.model_error_rollouts)
        pred = jax.vmap(self.model_step(model))(s, a)
        return jnp.sqrt(jnp.mean((pred - s2) ** 2) / jnp.mean((s2 - s) ** 2))

    def init_one(self, seed_key: PRNGKey) -> MBRLState:
        c, env = self.config, self.env
        phi = learned_losses.init_learned_loss(
            c.loss_net,
            jax.random.fold_in(seed_key, Ml3MbrlSeed.LOSS_INIT),
            num_outputs=env.goal_dim,
            num_extra=self.num_extra,
        )
        if c.meta.learn_step_size:
            log_step = np.log(c.meta.init_step_size) / c.meta.step_size_gain
            phi = {"loss": phi, "log_step": jnp.asarray(log_step, jnp.float32)}
        model = ensemble.init_ensemble(
            self.dyn_net,
            jax.random.fold_in(seed_key, Ml3MbrlSeed.MODEL_INIT),
            c.dynamics.members,
            env.state_dim,
            env.action_dim,
        )
        buffer = buffer_init(c.dynamics.capacity, env.state_dim, env.action_dim)
        buffer = buffer_add(
            buffer,
            *self.explore(
                jax.random.fold_in(seed_key, Ml3MbrlSeed.INIT_EXPLORE), c.dynamics.init_rollouts
            ),
        )
        state = MBRLState(
            init_meta_state(phi, self.meta_opt), model, self.dyn_opt.init(model["params"]), buffer
        )
        return self.fit_model(
            state, jax.random.fold_in(seed_key, Ml3MbrlSeed.INIT_FIT), c.dynamics.init_fit_steps
        )

    # -- meta-training --

    def episode(self, state: MBRLState, seed_key: PRNGKey, step: Array, variant, inputs):
        """One meta iteration: an episode from fresh θ on a batch of training goals, then
        (every `dynamics.refit_every` iterations) new real data and a refit of the model."""
        del variant, inputs
        c = self.config
        num, length = c.data.goals_per_step, c.inner.episode_length
        key = jax.random.fold_in(seed_key, step)
        goals = self.train_goals(seed_key, jax.random.fold_in(key, Ml3MbrlStep.GOALS), num)
        thetas = jax.vmap(self.init_policy)(
            jax.random.split(jax.random.fold_in(key, Ml3MbrlStep.POLICY_INIT), num)
        )
        fresh = jax.vmap(lambda p: init_inner_state(p, self.inner_opt))(thetas)
        model_step = self.model_step(state.model)

        def outer_loss(params, model_state, batch, key):
            return self.task_loss(model_step, params, batch["goal"])

        per_task = lambda k: jax.vmap(lambda g: ml3.repeat({"goal": g}, k))  # noqa: E731
        windows = length // c.meta.window
        meta, finals, metrics = ml3.episode(
            state.meta,
            fresh,
            per_task(length)(goals),
            per_task(windows)(goals),
            jax.random.fold_in(key, Ml3MbrlStep.INNER),
            jax.random.fold_in(key, Ml3MbrlStep.OUTER),
            meta_optimizer=self.meta_opt,
            return_final_states=True,
            problem=bilevel.Problem(
                self.learned_inner_loss(model_step),
                outer_loss,
                self.inner_opt,
            ),
            estimator=self.estimator,
        )
        state = state.replace(meta=meta)
        metrics["train/real_final_distance"] = jnp.mean(
            jax.vmap(self.real_distance)(finals.params, goals)
        )

        def refit(state):
            k = jax.random.fold_in(key, Ml3MbrlStep.REFIT)
            buffer = buffer_add(
                state.buffer,
                *self.policy_data(jax.random.fold_in(k, Ml3MbrlRefit.POLICY_DATA), finals.params),
            )
            buffer = buffer_add(
                buffer,
                *self.explore(
                    jax.random.fold_in(k, Ml3MbrlRefit.EXPLORE), c.dynamics.explore_rollouts
                ),
            )
            return self.fit_model(
                state.replace(buffer=buffer),
                jax.random.fold_in(k, Ml3MbrlRefit.FIT),
                c.dynamics.refit_steps,
            )

        # `step` is shared by every seed, so under vmap this stays a real conditional.
        state = jax.lax.cond((step + 1) % c.dynamics.refit_every == 0, refit, lambda s: s, state)
        return state, metrics

    # -- meta-test --

    def fit_policy(self, inner_loss, meta_params, theta0, goal, lr_factor=1.0):
        """Trains θ₀ for `eval.test_steps` updates; returns (θ_K, {'distance',
        'saturation'}: real-rollout traces [K+1], as in `real_metrics`)."""
        opt = optax.chain(self.inner_opt, optax.scale(lr_factor))
        return ml3.fit(
            theta0,
            meta_params,
            {"goal": goal},
            jax.random.key(0),
            inner_loss=inner_loss,
            optimizer=opt,
            num_steps=self.config.eval.test_steps,
            evaluate=lambda p: self.real_metrics(p, goal),
        )

    def task_inner_loss(self, step):
        """The task loss (final distance through `step`) as an inner objective."""

        def inner_loss(params, model_state, meta_params, batch, key):
            del meta_params, key
            return self.task_loss(step, params, batch["goal"]), (model_state, {})

        return inner_loss

    def _meta_test_goals(self, state: MBRLState, seed_key: PRNGKey, goals: Array):
        """Meta-test on goals [N, G] from the same θ₀ per goal for every method.

        Returns:
          {'ml3': distance traces [N, K+1], 'ml3_saturation': saturated-action fraction
          traces [N, K+1], 'ml3_states': the final ML³ policies' real rollouts [N, T+1, S],
          and for each task-loss method '<method>' and '<method>_saturation': traces
          [F, N, K+1] over `eval.baseline_lr_factors`}.
        """
        thetas = jax.vmap(self.init_policy)(
            jax.random.split(
                jax.random.fold_in(seed_key, Ml3MbrlSeed.META_TEST_INIT), goals.shape[0]
            )
        )
        learned = self.learned_inner_loss(self.env.step)
        params, trace = jax.vmap(lambda t, g: self.fit_policy(learned, state.meta.params, t, g))(
            thetas, goals
        )
        states = jax.vmap(lambda p: self.rollout(self.env.step, p, detach_states=True)[0])(params)
        out = {
            "ml3": trace["distance"],
            "ml3_saturation": trace["saturation"],
            "ml3_states": states,
        }
        steps = {"task_model": self.model_step(state.model), "task_true": self.env.step}
        for method in self.task_methods:
            step = steps[method]
            inner = self.task_inner_loss(step)

            def per_factor(f, inner=inner):
                return jax.vmap(lambda t, g: self.fit_policy(inner, {}, t, g, f)[1])(thetas, goals)

            traces = jax.vmap(per_factor)(self.lr_factors)
            out[method], out[f"{method}_saturation"] = traces["distance"], traces["saturation"]
        return out

    def _meta_test_all(self, state: MBRLState, seed_keys: PRNGKey):
        """Every seed and every goal set at once (sets concatenated along the goal axis)."""

        def one(state, seed_key):
            goals = jnp.concatenate(list(self.eval_goals(seed_key).values()))
            return self._meta_test_goals(state, seed_key, goals)

        return jax.vmap(one)(state, seed_keys)

    def meta_test(self, state: MBRLState):
        """{goal set: {'ml3': [S, N, K+1], 'ml3_states': [S, N, T+1, S'], '<method>':
        [S, N, K+1] at step-size factor 1, '<method>_best_lr': [S, N, K+1] at the factor
        with the best mean final distance on these goals (per seed), '<method>_factor':
        that factor [S]}} for the task-loss methods, and '<method>_saturation' [S, N, K+1]
        (the fraction of saturated actions, at factor 1) for every method, as numpy arrays."""
        results = jax.device_get(self._meta_test_jit(state, self.seed_keys))
        n = self.config.eval.num_goals
        factors = np.asarray(self.config.eval.baseline_lr_factors)
        one = list(factors).index(1.0)
        out = {}
        for i, name in enumerate(GOAL_SETS):
            part = slice(i * n, (i + 1) * n)
            res = {k: results[k][:, part] for k in ("ml3", "ml3_saturation", "ml3_states")}
            for method in self.task_methods:
                sweep = results[method][:, :, part]  # [S, F, N, K+1]
                best = np.argmin(sweep[..., -1].mean(-1), axis=1)
                res[method] = sweep[:, one]
                res[f"{method}_saturation"] = results[f"{method}_saturation"][:, one, part]
                res[f"{method}_best_lr"] = sweep[np.arange(sweep.shape[0]), best]
                res[f"{method}_factor"] = factors[best]
            out[name] = res
        return out

    def evaluate(self, state, step):
        del step
        out = {}
        for name, res in self.meta_test(state).items():
            for method in self.methods:
                out[f"eval/final_distance/{method}/{name}"] = res[method][..., -1].mean(-1)
            out[f"eval/saturation/ml3/{name}"] = res["ml3_saturation"][..., -1].mean(-1)
        out["eval/model_error"] = self._model_error_jit(state.model, self.seed_keys)
        return out

    def _model_errors(self, models, seed_keys):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, Ml3MbrlSeed.MODEL_ERROR))(seed_keys)
        return jax.vmap(self.model_error)(models, keys)

    # -- finalize --

    def finalize(self, state, history, workdir):
        c = self.config
        results = self.meta_test(state)
        model_error = np.asarray(self._model_error_jit(state.model, self.seed_keys))
        env = self.env
        self.save_learned_losses(
            workdir,
            self.loss_params(state.meta.params),
            y="goal / features.position_scale, per time step",
            y_hat="position of s_{t+1} / features.position_scale",
            extra=(
                *(f"s_{{t+1}}[{i}] / features.state_scale[{i}]" for i in range(env.state_dim)),
                *(f"a_t[{i}] / action_scale" for i in range(env.action_dim)),
                "(t + 1) / horizon",
            ),
        )
        plot_dir = os.path.join(workdir, "plots")
        goals = {k: np.asarray(v) for k, v in self.eval_goals(self.seed_keys[0]).items()}
        # Fig. 3a: real rollouts of the ML³-trained policies (first seed), per goal set.
        plots.goal_trajectories(
            {
                name: np.asarray(jax.vmap(jax.vmap(env.position))(res["ml3_states"][0]))
                for name, res in results.items()
            },
            goals,
            np.asarray(env.position(self.state0)),
            title=f"{env.name}: ML³-trained policies after {c.eval.test_steps} updates, "
            "goals x (Fig. 3a)",
            path=os.path.join(plot_dir, "fig3a_trajectories.png"),
        )
        fig = "3b" if c.env == "pointmass" else "3c"
        for name, res in results.items():
            series = {LABELS[m]: res[m].mean(1) for m in self.methods}
            series[LABELS["task_model"] + ", best step size"] = res["task_model_best_lr"].mean(1)
            plots.meta_test_curve(
                series,
                ylabel="final distance to the goal (real rollout)",
                title=f"{c.env}: meta-test on {name.replace('_', ' ')} (Fig. {fig})",
                path=os.path.join(plot_dir, f"fig{fig}_meta_test_{name}.png"),
            )
        evals = [r for r in history if "eval/model_error" in r]
        plots.meta_train_curve(
            [r["step"] for r in evals],
            {
                f"ML³, {name.replace('_', ' ')}": [
                    r[f"eval/final_distance/ml3/{name}"] for r in evals
                ]
                for name in GOAL_SETS
            }
            | {"model one-step error (relative)": [r["eval/model_error"] for r in evals]},
            ylabel=f"final distance after {c.eval.test_steps} updates",
            title=f"{c.env}: ML³ meta-test during meta-training",
            path=os.path.join(plot_dir, "meta_train_progress.png"),
        )
        early = c.eval.early_step
        reported = (*self.methods, *(f"{m}_best_lr" for m in self.task_methods))
        summary = {}
        for name, res in results.items():
            summary[name] = {
                "final_distance": {m: mean_std(res[m][..., -1].mean(-1)) for m in reported},
                f"distance_after_{early}_updates": {
                    m: mean_std(res[m][..., early].mean(-1)) for m in reported
                },
                "initial_distance": mean_std(res["ml3"][..., 0].mean(-1)),
                "best_lr_factor": {m: res[f"{m}_factor"].tolist() for m in self.task_methods},
                # Fraction of the real rollout's actions at the torque limit, per update.
                "saturated_action_fraction": {
                    m: {
                        "after_1_update": mean_std(res[f"{m}_saturation"][..., 1].mean(-1)),
                        "final": mean_std(res[f"{m}_saturation"][..., -1].mean(-1)),
                        "per_update_mean": res[f"{m}_saturation"].mean((0, 1)).tolist(),
                    }
                    for m in self.methods
                },
            }
        summary["model_one_step_relative_error"] = mean_std(model_error)
        if c.meta.learn_step_size:
            step_sizes = np.asarray(jax.vmap(self.step_size)(state.meta.params))
            summary["learned_step_size_factor"] = step_sizes.tolist()
        summary["test_steps"] = c.eval.test_steps
        summary["seeds"] = list(c.seeds)
        summary["notes"] = (
            "Final distance of the REAL rollout, averaged over goals, mean ± std over seeds. "
            "task_true is a reference the paper does not have (gradients of the true "
            "simulator); *_best_lr uses, per seed, the step-size factor with the best final "
            "distance on the evaluated goals themselves (tuned on the test goals)."
        )
        return summary
