"""The meta-gradient estimators on ML³ sine regression with long inner unrolls.

    python -m benchmarks.estimators [--lengths=10,100,1000] [--episodes=20] [--seeds=2]

For each unroll length K (inner SGD steps of an episode, and of the meta-test) and each
estimator, meta-trains φ from the same start for `--episodes` episodes of the ML³ sine
protocol (`configs/ml3_sine.py`, one training task, fresh θ each episode) and prints:

- the meta-test MSE after K steps on the learned loss, on 10 unseen sine tasks (mean over
  seeds and tasks), next to training on the MSE itself (the same for every estimator);
- the time per meta update (φ step) and per episode, compilation excluded;
- the peak temporary memory of one episode's compiled program (XLA's `memory_analysis`:
  what backpropagation through the unroll stores grows with K, ES/PES/implicit's not).

The estimators: "none" (the initial φ, for reference), "unrolled" (exact, W = K),
"truncated" and "pes" (10 windows of K/10 steps, a φ update after each), "first_order",
"es" and "implicit" (W = K). ES and PES use σ = 0.01 and 8 antithetic pairs; implicit 20
CG iterations with damping 0.1.
"""

import time

import jax
import numpy as np
from absl import app, flags

import experiments
from configs import ml3_sine

_LENGTHS = flags.DEFINE_list("lengths", ["10", "100", "1000"], "Inner unroll lengths K.")
_EPISODES = flags.DEFINE_integer("episodes", 20, "Meta-training episodes per estimator.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Meta-training seeds (φ per seed).")
_META_LR = flags.DEFINE_float("meta_lr", 1e-2, "φ's Adam step (the protocol's: 1e-3).")
_ESTIMATORS = flags.DEFINE_list(
    "estimators",
    ["none", "unrolled", "truncated", "first_order", "es", "pes", "implicit"],
    "Estimators to compare ('none': the initial φ, not meta-trained).",
)

WINDOWS = 10  # "truncated" and "pes": windows per episode
OPTIONS = {"sigma": 0.01, "pairs": 8, "cg_iters": 20, "damping": 0.1}


def config_for(estimator: str, length: int):
    c = ml3_sine.get_config()
    c.seeds = tuple(range(_SEEDS.value))
    c.inner.episode_length = length
    c.eval.test_steps = length
    c.meta.steps = _EPISODES.value
    c.meta.estimator = estimator
    c.meta.window = length // WINDOWS if estimator in ("truncated", "pes") else length
    # damping is implicit's alone: another estimator refuses a non-default value.
    c.meta.estimator_options = {k: v for k, v in OPTIONS.items() if k != "damping"}
    if estimator == "implicit":
        c.meta.estimator_options.damping = OPTIONS["damping"]
    c.meta.optimizer.lr = _META_LR.value
    return c


def timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def run(estimator: str, length: int) -> dict:
    if estimator == "none":  # the meta-test of the initial φ, for reference
        exp = experiments.make(config_for("unrolled", length))
        traces = np.asarray(jax.device_get(exp._meta_test(exp.init())))
        return {"learned": float(traces[:, 0, 1:, -1].mean()), "updates": 0, "reference": True}
    c = config_for(estimator, length)
    exp = experiments.make(c)
    state = exp.init()
    inputs = exp.chunk_inputs()
    chunk = exp._chunk.lower(state, 0, 1, inputs, exp.seed_keys).compile()  # one episode a call
    temp_mib = chunk.memory_analysis().temp_size_in_bytes / 2**20
    per_episode = []
    for step in range(c.meta.steps):
        (state, _), t = timed(chunk, state, step, inputs, exp.seed_keys)
        per_episode.append(t)
    traces = np.asarray(jax.device_get(exp._meta_test(state)))  # [S, 2, 1 + T, K + 1]
    updates = length // c.meta.window
    t_episode = float(np.median(per_episode))
    return {
        "learned": float(traces[:, 0, 1:, -1].mean()),
        "mse": float(traces[:, 1, 1:, -1].mean()),
        "ms_per_update": 1e3 * t_episode / updates,
        "ms_per_episode": 1e3 * t_episode,
        "updates": updates,
        "temp_mib": temp_mib,
    }


def main(argv):
    del argv
    jax.config.update("jax_numpy_rank_promotion", "raise")
    print(
        f"ML³ sine, {_SEEDS.value} seeds × {_EPISODES.value} episodes per estimator; "
        f"meta-test MSE after K steps on 10 unseen tasks; {jax.devices()[0].platform}"
    )
    header = (
        "| K | estimator | φ updates / episode | meta-test MSE, learned loss | "
        "meta-test MSE, MSE | ms / φ update | ms / episode | peak temp memory (MiB) |"
    )
    print(header)
    print("|" + "---|" * 8)
    for length in map(int, _LENGTHS.value):
        for estimator in _ESTIMATORS.value:
            r = run(estimator, length)
            if r.get("reference"):
                print(f"| {length} | none (φ at init) | 0 | {r['learned']:.3f} | | | | |")
                continue
            print(
                f"| {length} | {estimator} | {r['updates']} | {r['learned']:.3f} | "
                f"{r['mse']:.3f} | {r['ms_per_update']:.2f} | {r['ms_per_episode']:.1f} | "
                f"{r['temp_mib']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
