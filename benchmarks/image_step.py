"""Step time of the baseline and of AdaLFL for every image model, printed as a table.

    python -m benchmarks.image_step                       # all models, batch 128, CIFAR shapes
    python -m benchmarks.image_step --models=lenet5,resnet20 --batch_size=64 --steps=10

For each model: one baseline training step (forward, backward, SGD update) and one AdaLFL
step (inner step on ℓ_φ, task loss and gradient at θ_{t+1}, the meta-gradient, Adam on
φ), each the jitted function the experiment runs, on a fixed device-resident batch of
random pixels at the dataset's shape (the input pipeline is not timed). Also a plain
forward and a forward + backward, to show where the time goes, and the AdaLFL step with
its meta-gradient taken by backpropagating through the backward pass (`meta.method =
"backprop"`), which costs at least three plain steps; the default JVP method
(`metalearn.bilevel.OneStep`) needs two plain steps plus one forward-mode pass.

Each model runs in a fresh subprocess, so its peak device memory (GPU: the allocator's
peak; CPU: the process's peak RSS) is its own. `--json=FILE` appends each model's row to
FILE as a JSON line as soon as it is measured.

`--profile=DIR` then profiles the model with the highest AdaLFL / baseline ratio (of those
measured, or of an earlier run's rows with `--rows_from=FILE`), at its batch size, in one
more subprocess: XLA's cost analysis of its compiled baseline and AdaLFL steps (FLOPs,
bytes accessed, the convolutions, matmuls and library calls in the optimised program)
and a `jax.profiler` trace of `--profile_steps` steps of each under DIR/<model>/<step>/
(open `perfetto_trace.json.gz` in ui.perfetto.dev), whose device operations are summed
into the step's device time and its most expensive operations. A CPU's trace holds no
device operations, so there the cost analysis alone is printed.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import time

MODELS = ("lenet5", "vgg16", "allcnn_c", "resnet20", "resnet44", "resnet56", "wrn16_8", "wrn28_10")


def _time(fn, state, steps, chain):
    """(compile + first call seconds, mean seconds per later call) of `fn(state)`.

    With `chain`, each call takes the state the previous one returned (a training loop);
    otherwise every call reads the same state, and all outputs are waited for.
    """
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(state))
    first = time.perf_counter() - start
    state = out if chain else state
    outs = []
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(state)
        if chain:
            state = out
        else:
            outs.append(out)
    jax.block_until_ready(out if chain else outs)
    return first, (time.perf_counter() - start) / steps


def _peak_memory(device) -> tuple[float, str]:
    """The process's peak memory so far, in GiB: the GPU allocator's, else host RSS."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def _setup(model: str, batch_size: int, dataset: str, dtype: str, backprop: bool) -> dict:
    """The baseline and AdaLFL experiments of `model` (and the AdaLFL one taking its
    meta-gradient by backprop, if `backprop`) on synthetic images, with one batch, one
    meta batch and the step index of the online phase."""
    import jax
    import numpy as np

    from configs._image import image_config
    from experiments.image_classification import ImageClassification
    from metalearn.tasks import images

    def config_for(algorithm, method="jvp"):
        c = image_config(algorithm, dataset, model)
        c.meta.method = method
        c.data.source = "synthetic"
        c.data.max_train_examples = c.data.max_test_examples = 2 * batch_size
        c.data.validation_fraction = 0.5  # a meta batch's worth of held-out images
        c.data.batch_size = c.meta.batch_size = batch_size
        c.model.dtype = dtype
        return c

    data = images.load_images(config_for("adalfl").data)
    ada = ImageClassification(config_for("adalfl"), data=data)
    return {
        "adalfl": ada,
        "baseline": ImageClassification(config_for("baseline"), data=data),
        "backprop": (
            ImageClassification(config_for("adalfl", "backprop"), data=data) if backprop else None
        ),
        "batch": ada.batch_at("train", 0),
        "meta_batch": ada.batch_at("meta", 0),
        "step": jax.device_put(np.int32(ada.init_steps), ada.replicated),
    }


def measure(
    model: str, batch_size: int, steps: int, dataset: str, dtype: str, skip_backprop: bool
) -> dict:
    """Times one model in this process; returns a row of the table."""
    import jax

    from experiments.image_classification import forward
    from metalearn.losses.task import softmax_cross_entropy

    e = _setup(model, batch_size, dataset, dtype, backprop=not skip_backprop)
    ada, base, backprop = e["adalfl"], e["baseline"], e["backprop"]
    batch, meta_batch, step = e["batch"], e["meta_batch"], e["step"]
    row = {"model": model, "batch": batch_size, "devices": jax.device_count()}

    def loss(params, s):
        logits, _ = forward(
            ada.model, ada.info, "none", params, s.inner.model_state, batch, jax.random.key(0)
        )
        return softmax_cross_entropy(batch["label"], logits)

    measured = {
        "forward": (jax.jit(lambda s: loss(s.inner.params, s)), False),
        "fwd_bwd": (jax.jit(lambda s: jax.grad(loss)(s.inner.params, s)), False),
        "baseline": (lambda s: base.train_step(s, batch, None, step)[0], True),
        "adalfl": (lambda s: ada.train_step(s, batch, meta_batch, step)[0], True),
        "backprop": (lambda s: backprop.train_step(s, batch, meta_batch, step)[0], True),
    }
    device = jax.devices()[0]
    for name, (fn, chain) in measured.items():
        if name == "backprop" and skip_backprop:
            continue
        first, per_step = _time(fn, ada.init(), steps, chain)
        row[f"{name}_compile_s"] = first
        row[f"{name}_ms"] = per_step * 1e3
        row[f"{name}_peak_gib"], row["mem_kind"] = _peak_memory(device)
    row["ratio"] = row["adalfl_ms"] / row["baseline_ms"]
    row["platform"] = f"{device.platform} ({device.device_kind})"
    return row


_CONV = re.compile(r"conv|xmma|cudnn|dgrad|wgrad|implicit_gemm", re.I)
_MATMUL = re.compile(r"gemm|matmul|cublas|cutlass|\bdot", re.I)


def _cost(compiled) -> dict:
    """XLA's cost analysis of a compiled step: GFLOP, GB accessed, and how many
    convolutions, dots and library calls (cuDNN, cuBLAS, ...) its optimised HLO holds."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one dict per computation in older JAX versions
        cost = cost[0] if cost else None
    cost = cost or {}
    hlo = compiled.as_text()
    ops = collections.Counter(re.findall(r"\b(convolution|dot)\(", hlo))
    ops.update(re.findall(r'custom_call_target="([^"]+)"', hlo))
    return {
        "gflop": float(cost.get("flops", 0.0)) / 1e9,
        "gbytes": float(cost.get("bytes accessed", 0.0)) / 1e9,
        "ops": dict(ops.most_common()),
    }


def device_time(trace_dir: str, steps: int, top: int = 6) -> dict:
    """The device time per step in a `jax.profiler` trace of `steps` steps, by operation.

    Reads the trace's `perfetto_trace.json.gz`: the spans of its device processes
    ('/device:...'), from the profiler's one-span-per-HLO-op line ('XLA Ops') where the
    trace has one, else the kernels on the device's streams.

    Returns:
      {"device_ms": per step, "top": [(name, ms per step, share)] of the `top` costliest,
      "kinds": {"convolution" | "matmul" | "other": share}}, or {"note": why not}.
    """
    pattern = os.path.join(trace_dir, "**", "perfetto_trace.json.gz")
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        return {"note": f"no perfetto trace under {trace_dir}"}
    with gzip.open(paths[-1]) as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    thread = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"
    }
    on_device = lambda e: process.get(e.get("pid"), "").startswith("/device:")
    spans = [e for e in events if e.get("ph") == "X" and on_device(e)]
    line = lambda e: thread.get((e["pid"], e.get("tid")), "")
    ops = [e for e in spans if "XLA Ops" in line(e)]
    skipped = re.compile("XLA Modules|Steps|TraceMe|Framework")
    spans = ops or [e for e in spans if not skipped.search(line(e))]
    if not spans:
        return {"note": "no device operations in the trace (a CPU's has none)"}
    by_name = collections.Counter()
    for e in spans:
        by_name[e["name"]] += e.get("dur", 0.0)
    total = sum(by_name.values())
    kinds = collections.Counter()
    for name, us in by_name.items():
        kind = "matmul" if _MATMUL.search(name) else "other"
        kinds["convolution" if _CONV.search(name) else kind] += us / total
    return {
        "device_ms": total / 1e3 / steps,
        "top": [(name, us / 1e3 / steps, us / total) for name, us in by_name.most_common(top)],
        "kinds": dict(kinds),
    }


def profile(model: str, batch_size: int, steps: int, dataset: str, dtype: str, log_dir: str):
    """Profiles one model's baseline and AdaLFL steps in this process: XLA's cost analysis
    of each compiled step and the device time of `steps` traced steps (`device_time`),
    the traces under `log_dir/<model>/<step>`."""
    import jax

    e = _setup(model, batch_size, dataset, dtype, backprop=False)
    out = {"model": model, "batch": batch_size, "steps": steps}
    for name in ("baseline", "adalfl"):
        experiment = e[name]
        inputs = (e["batch"], e["meta_batch"] if name == "adalfl" else None, e["step"])
        step = jax.jit(lambda s, b, m, t, x=experiment: x.train_step(s, b, m, t)[0])
        state = experiment.init()
        compiled = step.lower(state, *inputs).compile()
        state = jax.block_until_ready(compiled(state, *inputs))  # off the trace: first call
        trace_dir = os.path.join(log_dir, model, name)
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                state = compiled(state, *inputs)
            jax.block_until_ready(state)
        out[name] = {**_cost(compiled), "trace": trace_dir}
        try:
            out[name].update(device_time(trace_dir, steps))
        except Exception as err:  # a trace format not foreseen: keep the cost analysis
            out[name]["note"] = f"trace not summarised: {err!r}"
    return out


def _child(args, model: str, profile_dir: str | None = None) -> dict:
    """Runs `model` in a fresh subprocess; its row, or {"model", "failed": stderr tail}."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.image_step",
        "--child",
        f"--models={model}",
        f"--batch_size={args.batch_size}",
        f"--steps={args.steps}",
        f"--dataset={args.dataset}",
        f"--dtype={args.dtype}",
        f"--profile_steps={args.profile_steps}",
    ] + (["--skip_backprop"] if args.skip_backprop else [])
    if profile_dir:
        cmd.append(f"--profile={profile_dir}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
    if line is None:
        print(f"{model}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"model": model, "failed": proc.stderr[-2000:]}
    return json.loads(line[4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--dataset", default="cifar10", help="the input shape and class count")
    parser.add_argument("--dtype", default="float32", help="computation dtype, e.g. bfloat16")
    parser.add_argument(
        "--skip_backprop",
        action="store_true",
        help="skip the AdaLFL step by backprop through backprop (slow to compile on CPU)",
    )
    parser.add_argument("--json", help="append each row to this file as a JSON line")
    parser.add_argument("--profile", help="then profile the worst model, traces under this dir")
    parser.add_argument("--profile_steps", type=int, default=5, help="traced steps per step")
    parser.add_argument(
        "--rows_from",
        help="take the rows of an earlier --json run from this file instead of measuring "
        "(to --profile its worst model alone)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.profile:
            row = profile(
                args.models,
                args.batch_size,
                args.profile_steps,
                args.dataset,
                args.dtype,
                args.profile,
            )
            print("ROW " + json.dumps({"profile": row}))
            return
        row = measure(
            args.models, args.batch_size, args.steps, args.dataset, args.dtype, args.skip_backprop
        )
        print("ROW " + json.dumps(row))
        return

    def keep(row):
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    rows = []
    if args.rows_from:
        with open(args.rows_from) as f:
            lines = [x for x in f if x.startswith("{") and x.endswith("}\n")]  # not torn
        rows = [r for r in map(json.loads, lines) if "ratio" in r]
    for model in [] if args.rows_from else args.models.split(","):
        row = _child(args, model)
        keep(row)
        if "failed" not in row:
            rows.append(row)
            _print_rows(rows[-1:], header=len(rows) == 1)
    if rows and not args.rows_from:
        print(
            f"\n{rows[0]['platform']}, {rows[0]['devices']} device(s), batch {args.batch_size}, "
            f"{args.dataset} shapes, {args.dtype}; memory: {rows[0]['mem_kind']}."
        )
        print(
            "ratio = AdaLFL step / baseline step. AdaLFL takes its meta-gradient by a JVP "
            "(metalearn.bilevel.OneStep); 'by backprop' differentiates through the "
            "backward pass instead. Peak memory accumulates within a model's process and is "
            "read after each column; compile s includes the first call."
        )
    if args.profile and rows:
        worst_row = max(rows, key=lambda r: r["ratio"])
        worst, args.batch_size = worst_row["model"], worst_row["batch"]
        row = _child(args, worst, args.profile)
        keep(row if "profile" in row else {**row, "profile": None})
        if "profile" in row:
            print(f"\nProfile of {worst} (the highest ratio):\n" + format_profile(row["profile"]))


def format_profile(p: dict) -> str:
    """The profile of `profile` as lines: cost analysis, device time and top operations."""
    lines = []
    for name in ("baseline", "adalfl"):
        r = p[name]
        ops = ", ".join(f"{k} {v}" for k, v in r["ops"].items()) or "none"
        line = f"- {name}: {r['gflop']:.3g} GFLOP, {r['gbytes']:.3g} GB accessed; ops: {ops}"
        if "device_ms" in r:
            kinds = ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["kinds"].items())
            top = "; ".join(f"{n[:60]} {ms:.3f} ms ({100 * f:.0f} %)" for n, ms, f in r["top"])
            line += f"; device {r['device_ms']:.3f} ms/step ({kinds}); top: {top}"
        if "note" in r:
            line += f"; {r['note']}"
        lines.append(line + f"; trace: {r['trace']}")
    return "\n".join(lines)


COLUMNS = (  # (header, row -> text)
    ("model", lambda r: r["model"]),
    ("fwd ms", lambda r: f"{r['forward_ms']:.2f}"),
    ("fwd+bwd ms", lambda r: f"{r['fwd_bwd_ms']:.2f}"),
    ("baseline ms", lambda r: f"{r['baseline_ms']:.2f}"),
    ("AdaLFL ms", lambda r: f"{r['adalfl_ms']:.2f}"),
    ("ratio", lambda r: f"{r['ratio']:.2f}"),
    ("baseline img/s", lambda r: f"{r['batch'] / r['baseline_ms'] * 1e3:,.0f}"),
    ("AdaLFL img/s", lambda r: f"{r['batch'] / r['adalfl_ms'] * 1e3:,.0f}"),
    ("peak GiB base", lambda r: f"{r['baseline_peak_gib']:.2f}"),
    ("peak GiB AdaLFL", lambda r: f"{r['adalfl_peak_gib']:.2f}"),
    ("AdaLFL by backprop ms", lambda r: f"{r['backprop_ms']:.2f}" if "backprop_ms" in r else "-"),
    ("backprop peak GiB", lambda r: f"{r['backprop_peak_gib']:.2f}" if "backprop_ms" in r else "-"),
    ("compile s base", lambda r: f"{r['baseline_compile_s']:.1f}"),
    ("compile s AdaLFL", lambda r: f"{r['adalfl_compile_s']:.1f}"),
)


def _print_rows(rows, header):
    if header:
        print("| " + " | ".join(name for name, _ in COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(fn(r) for _, fn in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
