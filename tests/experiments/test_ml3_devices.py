"""ML³ experiments spread their seeds over the devices and compute the same numbers."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import experiments
from configs import ml3_sine
from metalearn.runtime import sharding, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def eight_seed_config():
    config = ml3_sine.get_config("smoke")
    config.seeds = tuple(range(8))
    return config


def run(workdir):
    """The whole smoke run of 8 seeds: its summary, final φ and their devices."""
    config = eight_seed_config()
    experiment = experiments.make(config)
    summary = train_and_evaluate(experiment, config, workdir)
    state = experiment.init()
    state, _ = experiment.train_chunk(state, 0, 4)
    devices = len(jax.tree.leaves(state)[0].sharding.device_set)
    return summary, jax.tree.leaves(jax.device_get(state)), devices


# The device count is fixed when JAX starts: the 8-device half runs in a process of its own.
EIGHT_DEVICES = textwrap.dedent(
    """
    import importlib.util, json, sys
    import jax, numpy as np

    assert jax.device_count() == 8, jax.devices()
    spec = importlib.util.spec_from_file_location("test_module", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary, leaves, devices = module.run(sys.argv[2])
    np.savez(sys.argv[2] + ".npz", *leaves)
    json.dump({"summary": summary, "devices": devices}, open(sys.argv[2] + ".json", "w"))
    """
)


@pytest.mark.slow  # two smoke runs of 8 seeds, compilation-bound (~40 s)
def test_ml3_sine_gives_the_same_numbers_on_1_and_8_devices(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
    }
    eight_dir = str(tmp_path / "eight")
    proc = subprocess.Popen(
        [sys.executable, "-c", EIGHT_DEVICES, os.path.abspath(__file__), eight_dir],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        summary, leaves, devices = run(str(tmp_path / "one"))
        _, stderr = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    eight = json.loads(open(eight_dir + ".json").read())
    assert devices == 1 and eight["devices"] == 8  # one seed a device there
    with np.load(eight_dir + ".npz") as saved:
        eight_leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    # Seeds never meet on a device, so only the compiled programs' partitioning differs.
    for a, b in zip(leaves, eight_leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    one_mse, eight_mse = (
        s["final_mse"]["learned_loss"]["per_seed"] for s in (summary, eight["summary"])
    )
    np.testing.assert_allclose(one_mse, eight_mse, rtol=1e-5)


@pytest.mark.parametrize(("seeds", "devices", "used"), [(8, 8, 8), (5, 8, 5), (6, 4, 3), (2, 1, 1)])
def test_the_seed_mesh_uses_the_most_devices_that_divide_the_seeds(seeds, devices, used):
    fake = np.asarray([jax.devices()[0]] * devices)  # only the count matters here
    mesh = sharding.seed_mesh(seeds, jax.sharding.Mesh(fake, ("data",)) if devices > 1 else None)
    assert mesh.devices.size == used
