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
peak; CPU: the process's peak RSS) is its own.
"""

import argparse
import json
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


def measure(
    model: str, batch_size: int, steps: int, dataset: str, dtype: str, skip_backprop: bool
) -> dict:
    """Times one model in this process; returns a row of the table."""
    import jax
    import numpy as np

    from configs._image import image_config
    from experiments.image_classification import ImageClassification, forward
    from metalearn.losses.task import softmax_cross_entropy
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
    base = ImageClassification(config_for("baseline"), data=data)
    backprop = ImageClassification(config_for("adalfl", "backprop"), data=data)
    batch, meta_batch = ada.batch_at("train", 0), ada.batch_at("meta", 0)
    step = jax.device_put(np.int32(ada.init_steps), ada.replicated)
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = measure(
            args.models, args.batch_size, args.steps, args.dataset, args.dtype, args.skip_backprop
        )
        print("ROW " + json.dumps(row))
        return
    rows = []
    for model in args.models.split(","):
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
        ] + (["--skip_backprop"] if args.skip_backprop else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            print(f"{model}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[4:]))
        _print_rows(rows[-1:], header=len(rows) == 1)
    if rows:
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
