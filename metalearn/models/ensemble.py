"""An ensemble of MLP dynamics models, s′ = s + Δs(s, a), as pure functions.

A model is a dict {'params': member parameters stacked along a leading axis [E, ...],
'stats': normalisation statistics}: each member maps the normalised (s, a) to the
normalised Δs, and a step uses the members' mean. `fit_ensemble` trains every member
with its own minibatches of a `metalearn.tasks.replay.ReplayBuffer`, refreshing the
statistics from the buffer first. Everything is jit- and vmap-able (vmap over seeds).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from metalearn.models.mlp import MLP
from metalearn.tasks.replay import ReplayBuffer
from metalearn.types import Array, Params, PRNGKey

# {'params': [E, ...] member parameters, 'stats': {'in_mean', 'in_std', 'out_mean', 'out_std'}}
EnsembleModel = dict


def dynamics_network(state_dim: int, hidden: Sequence[int], activation: str) -> MLP:
    """One ensemble member: (normalised s, a) -> normalised Δs [state_dim]."""
    return MLP((*hidden, state_dim), activation)


def init_ensemble(
    network: MLP, key: PRNGKey, members: int, state_dim: int, action_dim: int
) -> EnsembleModel:
    """Ensemble parameters [E, ...] (one key per member) and identity normalisation."""
    dummy = jnp.zeros((state_dim + action_dim,))
    params = jax.vmap(network.init, in_axes=(0, None))(jax.random.split(key, members), dummy)
    stats = {
        "in_mean": jnp.zeros((state_dim + action_dim,)),
        "in_std": jnp.ones((state_dim + action_dim,)),
        "out_mean": jnp.zeros((state_dim,)),
        "out_std": jnp.ones((state_dim,)),
    }
    return {"params": params, "stats": stats}


def _member_deltas(network: MLP, params: Params, stats, states: Array, actions: Array) -> Array:
    x = (jnp.concatenate([states, actions], -1) - stats["in_mean"]) / stats["in_std"]
    return network.apply(params, x)


def ensemble_step(network: MLP, model: EnsembleModel, state: Array, action: Array) -> Array:
    """One step of the learned dynamics: s + mean over members of the predicted Δs.

    Args:
      network: the member network.
      model: the ensemble.
      state, action: [S], [A].

    Returns:
      The predicted next state [S].
    """
    stats = model["stats"]
    deltas = jax.vmap(lambda p: _member_deltas(network, p, stats, state, action))(model["params"])
    return state + jnp.mean(deltas, axis=0) * stats["out_std"] + stats["out_mean"]


def ensemble_loss(network: MLP, params: Params, stats, states, actions, next_states) -> Array:
    """Mean over members of the MSE of normalised Δs; inputs [E, B, ...] (one batch each)."""

    def member(p, s, a, s2):
        def one(s, a, s2):
            target = (s2 - s - stats["out_mean"]) / stats["out_std"]
            return jnp.mean((_member_deltas(network, p, stats, s, a) - target) ** 2)

        return jnp.mean(jax.vmap(one)(s, a, s2))

    return jnp.mean(jax.vmap(member)(params, states, actions, next_states))


def normalisation_stats(buffer: ReplayBuffer) -> dict[str, Array]:
    """Mean and std of the inputs (s, a) and of Δs over the valid rows of the buffer."""
    mask = (jnp.arange(buffer.states.shape[0]) < buffer.count)[:, None]
    n = jnp.maximum(buffer.count, 1)

    def moments(x):
        mean = jnp.sum(jnp.where(mask, x, 0.0), 0) / n
        var = jnp.sum(jnp.where(mask, (x - mean[None]) ** 2, 0.0), 0) / n
        return mean, jnp.sqrt(var) + 1e-6

    in_mean, in_std = moments(jnp.concatenate([buffer.states, buffer.actions], -1))
    out_mean, out_std = moments(buffer.next_states - buffer.states)
    return {"in_mean": in_mean, "in_std": in_std, "out_mean": out_mean, "out_std": out_std}


def fit_ensemble(
    network: MLP,
    model: EnsembleModel,
    opt_state: optax.OptState,
    buffer: ReplayBuffer,
    key: PRNGKey,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: int,
) -> tuple[EnsembleModel, optax.OptState, Array]:
    """`num_steps` optimizer steps on the buffer, each member on its own uniform minibatch.

    Refreshes the normalisation statistics from the buffer first.

    Args:
      network: the member network.
      model: the ensemble to train.
      opt_state: `optimizer`'s state for `model['params']`.
      buffer: the transitions (only its `count` valid rows are drawn).
      key: PRNG key (split per step).
      optimizer: the optax optimizer.
      num_steps: how many steps.
      batch_size: transitions per member and step.

    Returns:
      `(model, opt_state, losses [num_steps])`.
    """
    stats = normalisation_stats(buffer)
    members = jax.tree.leaves(model["params"])[0].shape[0]

    def body(carry, k):
        params, opt_state = carry
        rows = jax.random.randint(k, (members, batch_size), 0, jnp.maximum(buffer.count, 1))
        batch = (buffer.states[rows], buffer.actions[rows], buffer.next_states[rows])
        loss, grads = jax.value_and_grad(ensemble_loss, argnums=1)(network, params, stats, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(
        body, (model["params"], opt_state), jax.random.split(key, num_steps)
    )
    return {"params": params, "stats": stats}, opt_state, losses
