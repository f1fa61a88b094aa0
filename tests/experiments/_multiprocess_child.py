"""One process of an experiment run launched by `tests.multiprocess.run_processes`.

    python -m tests.experiments._multiprocess_child --config=configs/ml3_sine.py:smoke \
        --workdir=DIR [--set=seeds=[0,1,2,3] ...] [--stop_at=10]

Joins the processes' cluster (`initialize_distributed`), builds the config's experiment
and runs (or resumes) it in the workdir they share, as `experiments.run` does; the last
line of stdout is `RESULT <json>`: what this process saw (its index, the process and
device counts, the devices of the experiment's mesh) and whether the run finished.
"""

import argparse
import json

RESULT_PREFIX = "RESULT "


def _override(config, assignment: str) -> None:
    """`key.sub=<json>` set on the config; a JSON list becomes a tuple where the field
    holds one."""
    key, _, text = assignment.partition("=")
    *parents, name = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    value = json.loads(text)
    if isinstance(node[name], tuple) and isinstance(value, list):
        value = tuple(value)
    node[name] = value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", action="append", default=[], help="key=<json value>")
    parser.add_argument("--stop_at", type=int, default=None)
    args = parser.parse_args()

    from metalearn.runtime import sharding

    sharding.initialize_distributed()  # before anything else uses JAX

    import jax

    import experiments
    from experiments.run import load_config
    from metalearn.runtime.loop import train_and_evaluate

    config = load_config(args.config)
    for assignment in args.set:
        _override(config, assignment)
    experiment = experiments.make(config)
    summary = train_and_evaluate(experiment, config, args.workdir, stop_at=args.stop_at)
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mesh_processes": sorted({d.process_index for d in experiment.mesh.devices.flat}),
        "mesh_devices": int(experiment.mesh.devices.size),
        "finished": summary is not None,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
