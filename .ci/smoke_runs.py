"""Runs `:smoke` configs to their summaries in one interpreter, for `compare_smoke.py`.

    python .ci/smoke_runs.py OUT_ROOT CONFIG[:VARIANT] ...

Run from the root of the tree under test (with that tree first on PYTHONPATH), once on
the tree before a change and once after; then `python .ci/compare_smoke.py BEFORE AFTER`.
Each config runs through `runtime.loop.train_and_evaluate`, as the command line does,
into OUT_ROOT/<config>_<variant>.
"""

import importlib
import os
import sys
import time

import experiments
from metalearn.runtime.loop import train_and_evaluate


def main(out_root: str, specs: list[str]) -> None:
    print("tree:", os.path.dirname(os.path.dirname(experiments.__file__)), flush=True)
    for spec in specs:
        name, _, variant = spec.partition(":")
        module = importlib.import_module(f"configs.{name.removesuffix('.py')}")
        config = module.get_config(variant or None)
        workdir = os.path.join(out_root, f"{name}_{variant}".replace(",", "_").replace(":", "_"))
        t = time.time()
        train_and_evaluate(experiments.make(config), config, workdir)
        print(f"{spec}: {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
