"""Throughput, FLOPs and peak memory of the self-loss transformer's steps, printed as a table.

    python -m benchmarks.transformer_step                            # small and medium, float32
    python -m benchmarks.transformer_step --sizes=small --steps=3    # a quick look on a CPU
    python -m benchmarks.transformer_step --dtype=bfloat16 --sizes=medium,gpu   # on a GPU

Four steps, each one jitted function on a fixed device-resident batch of random byte
tokens, int32 [B, T + 1] (no dataset is read; the input pipeline is not timed):

- "CE step": one SGD step of θ on the true next-token cross-entropy (`self_loss.true_loss`);
  the baseline, and the control of Phase 2.
- "Phase 1 meta step": `self_loss.meta_objective` (one inner SGD step on the self-produced
  loss, the true cross-entropy of an outer batch at θ', the meta-gradient through the inner
  step), the Adam update of θ and θ ← (1 − τ)θ + τθ', as the Phase 1 step of
  `experiments.self_loss_lm` runs it.
- "Phase 2 step": one SGD step of θ on the self-produced loss alone (`self_loss.self_loss`,
  the loss pass a separate forward over `input ⊕ prediction ⊕ [LOSS]`). The experiment's
  Phase 2 step also trains the control and measures diagnostics; those are not timed here.
- "Phase 2 step, shared prefix": the same with `layout="shared_prefix"`: the loss pass
  continues the language-model pass's keys and values instead of recomputing the input.

The self-produced loss is the default scalar one (`Spec(path="soft")`: soft predictions,
the score read as the mean of the output logits, the same live weights as critic); the
optimizers, learning rates and τ are those of `configs/self_loss_lm.py`.

Columns: compile s is `jit(...).lower(...).compile()` alone; ms/step the median of
`--steps` timed steps after `--warmup` untimed ones, each waited for with
`block_until_ready`, each step taking the state the previous one returned (a training
loop). tokens/s = B·T / step time: the tokens the language model reads in the step's main
batch (Phase 1 also reads an outer batch of B·T, and every loss pass reads 2T + 1 positions
per sequence; neither is counted, so the steps compare at equal data throughput). GFLOP
is XLA's cost analysis of the compiled step (every operation, the update included, not
the 6·N·tokens rule of thumb); TFLOP/s = GFLOP / step time. MFU = achieved / the chip's
dense matmul peak (`PEAKS`), on a GPU only: the bfloat16 peak for bfloat16, for float32 the
TF32 peak, since JAX's default matmul precision runs float32 dots on TF32 tensor cores (the
plain float32 peak when `jax_default_matmul_precision` asks for full float32).

Every (size, step) runs in a fresh subprocess, so its peak memory is its own: on a GPU the
allocator's peak (`memory_stats()["peak_bytes_in_use"]`), elsewhere the process's peak RSS
(which includes the Python and XLA runtime and the compiler's own memory). `--json=FILE`
appends each row to FILE as a JSON line as soon as it is measured.
"""

import dataclasses
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["small", "medium"], "Model sizes to run (see `SIZES`).")
_KINDS = flags.DEFINE_list(
    "kinds", ["ce", "phase1", "phase2", "phase2_prefix"], "Steps to time (see `KINDS`)."
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per measurement (the median is shown).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Computation dtype (bfloat16 on a GPU)."
)
_JSON = flags.DEFINE_string("json", None, "Append each row to this file as a JSON line.")
_CHILD = flags.DEFINE_string("child", None, "Internal: measure one 'size:kind' and print a row.")


@dataclasses.dataclass(frozen=True)
class Size:
    """A model and batch size: the `model` config fields it sets, plus context and batch."""

    d_model: int
    num_layers: int
    num_heads: int
    mlp_ratio: int
    context: int  # T
    batch_size: int  # B


SIZES = {
    # The experiment's default (configs/self_loss_lm.py).
    "small": Size(d_model=64, num_layers=2, num_heads=4, mlp_ratio=4, context=32, batch_size=16),
    "medium": Size(d_model=256, num_layers=4, num_heads=8, mlp_ratio=4, context=128, batch_size=16),
    # The `gpu` variant of configs/self_loss_lm.py.
    "gpu": Size(d_model=384, num_layers=6, num_heads=6, mlp_ratio=4, context=256, batch_size=64),
}
KINDS = {
    "ce": "CE step",
    "phase1": "Phase 1 meta step",
    "phase2": "Phase 2 step",
    "phase2_prefix": "Phase 2 step, shared prefix",
}
# Dense (no sparsity) peak FLOP/s by device_kind substring, first match wins: (bfloat16,
# TF32, float32). SXM parts; H200 has H100's compute.
PEAKS = (
    ("H100 PCIe", (756e12, 378e12, 51e12)),
    ("H100", (989e12, 494.5e12, 67e12)),
    ("H200", (989e12, 494.5e12, 67e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
)
_FULL_F32 = ("highest", "float32", "f32_f32_f32")  # matmul precisions that rule out TF32

Step = Callable[[Any, dict], tuple[Any, Any]]  # (state, batch) -> (state, loss)


def build(size: Size, kind: str, dtype: str) -> tuple[Step, Any, dict, int]:
    """The step function of `kind`, its initial state, its batch, and the parameter count."""
    # Imported here so that the parent process never initialises an accelerator.
    import jax
    import optax

    from configs import self_loss_lm as config_lib
    from metalearn import bilevel
    from metalearn.algorithms import self_loss
    from metalearn.models import transformer
    from metalearn.optim import make_optimizer
    from metalearn.streams import TransformerStepBenchmark as Streams
    from metalearn.tasks import text

    c = config_lib.get_config()
    c.model.update(
        d_model=size.d_model,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_ratio,
        context=size.context,
        dtype=dtype,
    )
    model = transformer.make_transformer(c.model, size.context)
    key = jax.random.key(0)
    params = transformer.init_transformer(
        model, jax.random.fold_in(key, Streams.MODEL_INIT), size.context
    )
    draw = lambda stream: jax.random.randint(
        jax.random.fold_in(key, stream), (size.batch_size, size.context + 1), 0, text.NUM_BYTES
    )
    tokens = draw(Streams.INNER_TOKENS)
    sgd = make_optimizer(c.inner.optimizer, differentiated=True)  # SGD, lr 0.02
    spec = self_loss.Spec(path="soft")

    def descend(objective: Callable, optimizer: optax.GradientTransformation) -> Step:
        """One update of θ by `optimizer` on `objective(θ, batch) -> (loss, aux)`."""

        def step(state, batch):
            params, opt_state = state
            (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return step

    if kind == "ce":
        ce = lambda p, b: (self_loss.true_loss(p, {}, b["tokens"], None, model=model), None)
        return descend(ce, sgd), (params, sgd.init(params)), {"tokens": tokens}, _count(params)

    if kind in ("phase2", "phase2_prefix"):
        if kind == "phase2_prefix":
            spec = dataclasses.replace(spec, layout="shared_prefix")

        def self_objective(p, b):
            # critic = θ itself (critic 'same'); `self_loss` ignores the argument then.
            value, (_, aux) = self_loss.self_loss(
                p, {}, p, b["tokens"], None, model=model, spec=spec
            )
            return value, aux

        state = (params, sgd.init(params))
        return descend(self_objective, sgd), state, {"tokens": tokens}, _count(params)

    if kind != "phase1":
        raise app.UsageError(f"Unknown step kind {kind!r}; choose from {list(KINDS)}.")
    m = c.meta
    adam = make_optimizer(m.optimizer)  # Adam, lr 1e-3
    # The estimator as experiments.self_loss_lm builds it from the config.
    estimator = bilevel.estimator_from_config(
        m.estimator,
        window=m.window if m.estimator == "last_window" else m.inner_steps,
        episode_length=m.inner_steps,
        options=m.get("estimator_options"),
        remat=m.remat,
    )
    objective = functools.partial(
        self_loss.meta_objective,
        model=model,
        spec=spec,
        inner_optimizer=sgd,
        estimator=estimator,
    )

    def phase1(state, batch):
        params, opt_state = state
        (loss, (theta_prime, _)), grads = jax.value_and_grad(objective, has_aux=True)(
            params, batch["inner"], batch["keys"], batch["outer"], batch["key"]
        )
        updates, opt_state = adam.update(grads, opt_state, params)
        params = self_loss.interpolate(optax.apply_updates(params, updates), theta_prime, m.tau)
        return (params, opt_state), loss

    batch = {
        "inner": tokens[None],  # K = meta.inner_steps = 1 inner batch
        "keys": jax.random.split(jax.random.fold_in(key, Streams.INNER), m.inner_steps),
        "outer": draw(Streams.OUTER_TOKENS),
        "key": jax.random.fold_in(key, Streams.OUTER),
    }
    return phase1, (params, adam.init(params)), batch, _count(params)


def _count(params) -> int:
    import jax

    return sum(x.size for x in jax.tree.leaves(params))


def _flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled computation, or None where it gives none."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if isinstance(cost, list | tuple):  # one dict per computation in older JAX versions
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _peak_flops(device, dtype: str) -> tuple[float | None, str]:
    """The chip's dense matmul peak for `dtype` in FLOP/s (None off GPU or if unknown)."""
    import jax

    if device.platform != "gpu":
        return None, "no MFU (not a GPU)"
    peaks = next((p for name, p in PEAKS if name in device.device_kind), None)
    if peaks is None:
        return None, f"unknown peak for {device.device_kind}"
    if dtype != "float32":
        return peaks[0], "bfloat16 dense peak"
    # A string, a `lax.Precision` or a `lax.DotAlgorithmPreset` (str: 'Name.MEMBER').
    precision = str(jax.config.jax_default_matmul_precision).lower().rsplit(".", 1)[-1]
    if precision in _FULL_F32:
        return peaks[2], "float32 peak (full-precision matmuls)"
    return peaks[1], "TF32 dense peak (JAX's default float32 matmul precision)"


def _peak_memory_mib(device) -> tuple[float, str]:
    """The process's peak memory so far, in MiB: the GPU allocator's, else host RSS."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def measure(size_name: str, kind: str, steps: int, warmup: int, dtype: str) -> dict:
    """Compiles and times one (size, step kind) in this process; returns a table row."""
    import jax

    size = SIZES[size_name]
    step, state, batch, num_params = build(size, kind, dtype)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, loss = jax.block_until_ready(compiled(state, batch))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, loss = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    device = jax.devices()[0]
    flops = _flops(compiled)
    peak, peak_name = _peak_flops(device, dtype)
    memory, memory_kind = _peak_memory_mib(device)
    achieved = flops / seconds if flops else None
    return {
        "size": size_name,
        "kind": kind,
        "params": num_params,
        "compile_s": compile_s,
        "ms": seconds * 1e3,
        "tokens_per_s": size.batch_size * size.context / seconds,
        "gflop": flops / 1e9 if flops else None,
        "tflops": achieved / 1e12 if achieved else None,
        "mfu": achieved / peak if achieved and peak else None,
        "peak_mib": memory,
        "memory_kind": memory_kind,
        "peak_name": peak_name,
        "final_loss": float(loss),
        "jax": jax.__version__,
        "device": f"{device.platform} ({device.device_kind})",
        "devices": jax.device_count(),
    }


_DASH = "—"
COLUMNS = (  # (header, row -> text)
    ("size", lambda r: r["size"]),
    ("step", lambda r: KINDS[r["kind"]]),
    ("compile s", lambda r: f"{r['compile_s']:.1f}"),
    ("ms/step", lambda r: f"{r['ms']:.2f}"),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("GFLOP/step", lambda r: _DASH if r["gflop"] is None else f"{r['gflop']:.3g}"),
    ("TFLOP/s", lambda r: _DASH if r["tflops"] is None else f"{r['tflops']:.3g}"),
    ("MFU", lambda r: _DASH if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
    ("peak MiB", lambda r: f"{r['peak_mib']:,.0f}"),
)


def _print_header(row: dict, dtype: str) -> None:
    print(
        f"Self-loss transformer steps: jax {row['jax']}, {row['device']}, "
        f"{row['devices']} device(s), {dtype}; MFU: {row['peak_name']}.\n"
    )
    print("| " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))


def _print_row(row: dict) -> None:
    print("| " + " | ".join(fn(row) for _, fn in COLUMNS) + " |", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CHILD.value:
        size, kind = _CHILD.value.split(":")
        row = measure(size, kind, _STEPS.value, _WARMUP.value, _DTYPE.value)
        print("ROW " + json.dumps(row))
        return
    for name, allowed, values in (("size", SIZES, _SIZES.value), ("kind", KINDS, _KINDS.value)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise app.UsageError(f"Unknown {name}(s) {unknown}; choose from {list(allowed)}.")
    if _STEPS.value < 1:
        raise app.UsageError("--steps must be at least 1.")
    rows = []
    for size in _SIZES.value:
        for kind in _KINDS.value:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.transformer_step",
                f"--child={size}:{kind}",
                f"--steps={_STEPS.value}",
                f"--warmup={_WARMUP.value}",
                f"--dtype={_DTYPE.value}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
            if line is None:
                print(f"{size} / {kind}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                row = {"size": size, "kind": kind, "failed": proc.stderr[-2000:]}
            else:
                row = json.loads(line[4:])
            if _JSON.value:
                with open(_JSON.value, "a") as f:
                    f.write(json.dumps({**row, "dtype": _DTYPE.value}) + "\n")
            if "failed" in row:
                continue
            rows.append(row)
            if len(rows) == 1:
                _print_header(rows[0], _DTYPE.value)
            _print_row(rows[-1])
    if not rows:
        return
    print()
    for name in _SIZES.value:
        s = SIZES[name]
        params = next((r["params"] for r in rows if r["size"] == name), None)
        count = f", {params:,} parameters" if params is not None else ""
        print(
            f"{name}: d_model {s.d_model}, {s.num_layers} layers, {s.num_heads} heads, "
            f"MLP ×{s.mlp_ratio}, context T = {s.context}, batch B = {s.batch_size}{count}."
        )
    print(
        f"ms/step: median of {_STEPS.value} steps after {_WARMUP.value} warm-up steps; "
        "tokens/s = B·T / step time (the main batch only); GFLOP: XLA's cost analysis of the "
        f"step; peak MiB: {rows[0]['memory_kind']} of each (size, step)'s own process."
    )


if __name__ == "__main__":
    app.run(main)
