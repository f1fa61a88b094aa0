"""Steps/s of the image experiment's `train_chunk`: host batches vs device-resident data.

    python -m benchmarks.image_loop                        # LeNet-5 and ResNet-20, batch 32
    python -m benchmarks.image_loop --paths=host,device1,scan --batch_size=128 --chunk=100

For each model (LeNet-5 at MNIST's shapes, ResNet-20 at CIFAR-10's) and algorithm (the
baseline's cross-entropy step; AdaLFL's online lock-step, whose program is also the
offline phase's), `ImageClassification.train_chunk` runs on each path:

- host: `data.on_device=false`, before: batches gathered from host arrays by the
  prefetching iterator and copied to the devices, one jitted step per dispatch;
- device: `data.on_device=true`, after: the images in device memory, each batch gathered
  there, with the platform's default steps per compiled program (`data.scan_steps=0`: a
  whole chunk in one `lax.scan` on a GPU or TPU, one step per program on a CPU);
- device1 / scan: the device path with one step per program / a whole chunk per scan,
  whatever the platform (on a CPU, `scan` shows why one step is its default there).

One chunk of `--chunk` steps is run first (compilation), then `--chunks` chunks are timed,
the paths taking turns, each chunk ending as `runtime.loop`'s do with the metrics fetched
to the host; the table gives each path's median. The images are random pixels at the
dataset's shapes (`data.source=synthetic`), `--examples` of them. `--json=FILE` appends
each (model, algorithm)'s row to FILE as a JSON line as soon as it is measured.
"""

import argparse
import json
import time

import jax
import numpy as np

MODELS = {"lenet5": "mnist", "resnet20": "cifar10"}
PATHS = {  # path -> (data.on_device, data.scan_steps, or None: the whole chunk)
    "host": ("false", 0),
    "device": ("true", 0),
    "device1": ("true", 1),
    "scan": ("true", None),
}


def build(model: str, algorithm: str, path: str, args):
    """The experiment of one (model, algorithm, path), its state after one chunk (the
    warm-up: compilation), and that chunk's seconds."""
    from configs._image import image_config
    from experiments.image_classification import ImageClassification

    on_device, scan_steps = PATHS[path]
    c = image_config(algorithm, MODELS[model], model)
    c.data.source = "synthetic"
    c.data.max_train_examples = args.examples
    c.data.max_test_examples = args.batch_size
    c.data.validation_fraction = 0.25
    c.data.batch_size = c.meta.batch_size = args.batch_size
    c.data.on_device = on_device
    c.data.scan_steps = args.chunk if scan_steps is None else scan_steps
    c.meta.init_steps = 0  # every step the online phase's
    c.eval.every = args.chunk
    experiment = ImageClassification(c)
    start = time.perf_counter()
    state, metrics = experiment.train_chunk(experiment.init(), 0, args.chunk)
    jax.device_get(metrics)
    return experiment, state, time.perf_counter() - start


def measure(model: str, algorithm: str, paths: list[str], args) -> dict[str, dict]:
    """Steps/s of each path: the median over `--chunks` chunks, the paths taking turns
    chunk by chunk so that a machine's changing load falls on all of them alike."""
    built = {p: build(model, algorithm, p, args) for p in paths}
    states = {p: b[1] for p, b in built.items()}
    seconds = {p: [] for p in paths}
    for i in range(1, args.chunks + 1):
        for p in paths:
            start = time.perf_counter()
            states[p], metrics = built[p][0].train_chunk(states[p], i * args.chunk, args.chunk)
            jax.device_get(metrics)
            seconds[p].append(time.perf_counter() - start)
    return {
        p: {
            "steps_per_s": args.chunk / float(np.median(seconds[p])),
            "first_chunk_s": built[p][2],
            "batches": built[p][0].batches,
        }
        for p in paths
    }


def _json_row(model: str, algorithm: str, row: dict[str, dict], args) -> dict:
    device = jax.devices()[0]
    return {
        "model": model,
        "algorithm": algorithm,
        "batch": args.batch_size,
        "chunk": args.chunk,
        "chunks": args.chunks,
        "device": f"{device.platform} ({device.device_kind})",
        "paths": {
            p: {"steps_per_s": r["steps_per_s"], "first_chunk_s": r["first_chunk_s"]}
            for p, r in row.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,resnet20")
    parser.add_argument("--algorithms", default="baseline,adalfl")
    parser.add_argument("--paths", default="host,device", help=f"from {','.join(PATHS)}")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=10, help="steps per train_chunk call")
    parser.add_argument("--chunks", type=int, default=5, help="timed chunks per path")
    parser.add_argument("--examples", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--json", help="append each row to this file as a JSON line")
    args = parser.parse_args()
    paths = args.paths.split(",")
    print(f"| model | algorithm | {' | '.join(f'{p} steps/s' for p in paths)} | speed-up |")
    print("|" + "---|" * (len(paths) + 3))
    rows = []
    for model in args.models.split(","):
        for algorithm in args.algorithms.split(","):
            row = measure(model, algorithm, paths, args)
            rows.append((model, algorithm, row))
            rates = [row[p]["steps_per_s"] for p in paths]
            speedup = f"{rates[-1] / rates[0]:.2f}x" if len(rates) > 1 else "-"
            cells = " | ".join(f"{r:.1f}" for r in rates)
            print(f"| {model} | {algorithm} | {cells} | {speedup} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(_json_row(model, algorithm, row, args)) + "\n")
    device = jax.devices()[0]
    print(
        f"\n{device.platform} ({device.device_kind}), batch {args.batch_size}: the median "
        f"of {args.chunks} chunks of {args.chunk} steps, after one chunk of warm-up; "
        "speed-up = the last path over the first. First chunk (compilation included): "
        + "; ".join(
            f"{m}/{a}/{p} {r['first_chunk_s']:.0f} s" for m, a, row in rows for p, r in row.items()
        )
        + "."
    )
    for p in paths:
        print(f"{p}: {rows[0][2][p]['batches']}")


if __name__ == "__main__":
    main()
