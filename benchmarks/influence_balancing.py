"""PES's influence-balancing task: truncation biases the gradient, PES does not.

    python -m benchmarks.influence_balancing [--windows=3000] [--pairs=500]

The task of Vicol et al. 2021 (§5.1, after Tallec & Ollivier's UORO paper), as in the
authors' `persistent_es/influence_balancing.py`: a 23-unit linear state that is never
reset, s_{t+1} = A s_t + θ·b with A = 0.5·I + 0.5·(the superdiagonal), b = (+1 × 10,
−1 × 13), s_0 = 1, and after every window of one step the loss ½(s_t[0] − 1)². At the
steady state s*[0] = −6θ, so the loss is minimised at θ* = −1/6, and its gradient at
θ = 0.5 is +24.0. One scalar θ₀ = 0.5, SGD with learning rate 1e-4 for 3,000 windows,
500 antithetic pairs of σ = 0.1 for the ES estimators.

Written with the library's own pieces: the state is the inner "parameters", the
dynamics are an optax transformation (the inner "optimizer", `unprobed`: it needs the
real shapes) and the inner loss −θ⟨b, s⟩ gives the gradient −θ·b it turns into the step;
`windowed_meta_steps` runs the windows, one meta update after each, and its returned
`EstimatorState` (the state, and PES's particles) goes on from one call to the next.

Printed, per estimator: θ after the run done as one call and split into calls of 100 and
of 10 windows, and the gradient at θ = 0.5 (θ held there for the same number of windows:
mean ± standard error over the windows after the first 100, the standard error from 30
batch means, since successive PES estimates are correlated). "full unroll" backpropagates
through 200 steps from s_0 for every meta update (the steady state's gradient; exact,
no noise). A last row drops PES's state between calls, as a loop that ignores the
returned state's particles would (`PES.init` at every call). The results: docs/estimators.md.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from metalearn import bilevel
from metalearn.state import init_inner_state, init_meta_state

_WINDOWS = flags.DEFINE_integer("windows", 3000, "Meta updates (windows of one step).")
_PAIRS = flags.DEFINE_integer("pairs", 500, "Antithetic pairs of ES and PES.")
_SIGMA = flags.DEFINE_float("sigma", 0.1, "Perturbation scale of ES and PES.")
_LR = flags.DEFINE_float("lr", 1e-4, "θ's SGD learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the perturbations.")

N, POSITIVE = 23, 10
A = 0.5 * np.eye(N) + 0.5 * np.eye(N, k=1)
SIGN = np.asarray([1.0] * POSITIVE + [-1.0] * (N - POSITIVE), np.float32)
THETA0, THETA_STAR, TRUE_GRAD = 0.5, -1.0 / 6.0, 24.0
FULL_STEPS = 200  # the full unroll: (0.5 (I + N))^200 is below float32's precision
BURN_IN, BATCHES = 100, 30


def _dynamics() -> optax.GradientTransformation:
    """s ← A s − g: with the inner gradient g = −θ b, the task's s ← A s + θ b."""
    a = jnp.asarray(A, jnp.float32)

    def update(grads, state, params):
        return jax.tree.map(lambda g, s: a @ s - s - g, grads, params), state

    return bilevel.unprobed(optax.GradientTransformation(lambda p: optax.EmptyState(), update))


def inner_loss(params, model_state, meta_params, batch, key):
    del batch, key
    return -meta_params["theta"][0] * jnp.dot(jnp.asarray(SIGN), params), (model_state, {})


def outer_loss(params, model_state, batch, key):
    del model_state, batch, key
    return 0.5 * (params[0] - 1.0) ** 2


PROBLEM = bilevel.Problem(inner_loss, outer_loss, _dynamics())


@functools.partial(jax.jit, static_argnames=("estimator", "lr"))
def _windows(meta, state, keys, *, estimator, lr):
    """`len(keys) // W` meta updates of one task (W the estimator's window, None: all the
    keys); the estimates of each window."""
    k, window = keys.shape[0], estimator.window or keys.shape[0]
    meta, state, metrics = bilevel.windowed_meta_steps(
        meta,
        state,
        jnp.zeros((1, k)),
        keys[None],
        jnp.zeros((1, k // window)),
        keys[None, ::window],
        problem=PROBLEM,
        estimator=estimator,
        meta_optimizer=optax.sgd(lr),
        keep_estimates=True,
    )
    return meta, state, metrics["meta/estimate"]["theta"][:, 0]


@functools.partial(jax.jit, static_argnames=("lr",))
def _full_unrolls(meta, fresh, keys, *, lr):
    """One meta update per key, each backpropagated through FULL_STEPS from `fresh`, as
    one scanned program; the estimates [len(keys)]."""
    unrolled = bilevel.Unrolled()

    def update(meta, key):
        steps = jax.random.split(key, FULL_STEPS)
        start = unrolled.init_tasks(meta.params, fresh)
        meta, _, g = _windows(meta, start, steps, estimator=unrolled, lr=lr)
        return meta, g[0]

    return jax.lax.scan(update, meta, keys)


def run(
    estimator: str,
    theta: float,
    lr: float,
    calls: int,
    restart: bool = False,
    windows: int | None = None,
) -> tuple[float, np.ndarray]:
    """θ after `windows` (default `--windows`) windows in `calls` calls, and every
    window's estimate; with `restart`, PES's particles restart at every call (what a loop
    that drops the estimator state gets: truncated ES over each call)."""
    windows, opt = windows or _WINDOWS.value, optax.sgd(lr)
    meta = init_meta_state({"theta": jnp.asarray([theta], jnp.float32)}, opt)
    seed = _SEED.value  # the perturbations' stream (the task itself has no randomness)
    keys = jax.random.split(jax.random.key(seed), windows)
    states = jax.tree.map(lambda x: x[None], init_inner_state(jnp.ones(N, jnp.float32), opt))
    if estimator == "unrolled":  # every meta update a fresh unroll of FULL_STEPS from s_0
        meta, g = _full_unrolls(meta, states, keys, lr=lr)
        return float(meta.params["theta"][0]), np.asarray(g)
    est = bilevel.estimator_from_config(  # windows of one step of the never-reset state
        estimator,
        window=1,
        episode_length=windows,
        # --sigma and --pairs are the ES estimators' (the others refuse a non-default one).
        options={"sigma": _SIGMA.value, "pairs": _PAIRS.value}
        if estimator != "truncated"
        else None,
    )
    state = est.init_tasks(meta.params, states)
    estimates, per = [], windows // calls
    for c in range(calls):
        if restart and c:  # fresh particles from the unperturbed state: truncated ES
            state = est.init_tasks(meta.params, state.inner)
        meta, state, g = _windows(meta, state, keys[c * per : (c + 1) * per], estimator=est, lr=lr)
        estimates.append(g)
    return float(meta.params["theta"][0]), np.concatenate(estimates)


def gradient_at_start(estimator: str) -> tuple[float, float]:
    """Mean and standard error of the estimates with θ held at θ₀ (learning rate 0); the
    full unroll's, exact and the same at every window, from its first."""
    _, g = run(estimator, THETA0, 0.0, calls=1, windows=1 if estimator == "unrolled" else None)
    if estimator == "unrolled":
        return float(g[0]), 0.0
    g = g[BURN_IN:]
    means = g[: len(g) // BATCHES * BATCHES].reshape(BATCHES, -1).mean(1)
    return float(g.mean()), float(means.std(ddof=1) / np.sqrt(BATCHES))


def main(argv):
    del argv
    names = {
        "unrolled": f"full unroll ({FULL_STEPS} steps from s_0)",
        "truncated": "truncated backprop (1 step)",
        "es": "truncated ES (1 step)",
        "pes": "PES (1 step)",
    }
    print(
        f"influence balancing: θ₀ = {THETA0}, θ* = {THETA_STAR:.5f}, true gradient at θ₀ = "
        f"{TRUE_GRAD}; {_WINDOWS.value} windows, SGD {_LR.value}, {_PAIRS.value} pairs, "
        f"σ = {_SIGMA.value}, {jax.devices()[0].platform}\n"
    )
    print(
        "| estimator | final θ, one call | in calls of 100 | in calls of 10 | gradient at θ₀ | s |"
    )
    print("|---|---|---|---|---|---|")
    for estimator, name in names.items():
        start = time.time()
        finals = [
            run(estimator, THETA0, _LR.value, calls)[0]
            for calls in ((1,) if estimator == "unrolled" else (1, 30, 300))
        ]
        mean, se = gradient_at_start(estimator)
        cells = [f"{x:+.5f}" for x in finals] + ["(fresh per update)"] * (3 - len(finals))
        print(
            f"| {name} | {' | '.join(cells)} | {mean:+.2f} ± {se:.2f} | {time.time() - start:.0f} |"
        )
    start = time.time()
    restarted = [run("pes", THETA0, _LR.value, calls, restart=True)[0] for calls in (1, 30, 300)]
    cells = " | ".join(f"{x:+.5f}" for x in restarted)
    print(f"| PES, its state dropped between calls | {cells} | | {time.time() - start:.0f} |")


if __name__ == "__main__":
    app.run(main)
