"""Baseline / ML³ / AdaLFL image classification end to end, on real data where it exists."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import adalfl_mnist
from metalearn import algorithms, load_learned_loss
from metalearn.runtime.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "..", "shared", "data", "tfds", "mnist")
needs_mnist = pytest.mark.skipif(not os.path.isdir(MNIST), reason=f"no MNIST at {MNIST}")


def tiny(algorithm="adalfl"):
    """MNIST, LeNet-5, 8 offline + 8 model steps of batch 16: seconds on a CPU."""
    config = adalfl_mnist.get_config("smoke")
    config.algorithm = algorithm
    config.data.max_train_examples = 256
    config.data.max_test_examples = 64
    config.data.batch_size = config.meta.batch_size = 16
    config.eval.batch_size = 32
    config.meta.init_steps = 8
    config.inner.steps = config.inner.optimizer.schedule.steps = 8
    config.eval.every = config.checkpoint_every = 4
    return config


@needs_mnist
def test_adalfl_resume_mid_offline_phase_and_mid_training_is_exact(tmp_path):
    config = tiny()
    full = train_and_evaluate(algorithms.make(config), config, str(tmp_path / "full"))
    cut = str(tmp_path / "cut")
    for stop in (4, 12):  # inside the offline phase, then inside online training
        assert train_and_evaluate(algorithms.make(config), config, cut, stop_at=stop) is None
    resumed = train_and_evaluate(algorithms.make(config), config, cut)
    assert resumed == full
    phi = [
        load_learned_loss(os.path.join(d, "learned_loss")).params for d in (tmp_path / "full", cut)
    ]
    jax.tree.map(np.testing.assert_array_equal, *phi)
    rows = [
        [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        for d in (tmp_path / "full", cut)
    ]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    assert rows[0] == rows[1]
    evals = [r for r in rows[0] if "eval/test_error" in r]
    assert [r["eval/model_step"] for r in evals] == [0, 4, 8]  # θ untouched before step 8
    assert any("curve/true_class" in r for r in rows[0] if r["step"] < 8)


@needs_mnist
def test_the_three_algorithms_share_data_and_initial_model_and_differ_in_the_loss(tmp_path):
    summaries, first_rows = {}, {}
    for algorithm in ("baseline", "ml3", "adalfl"):
        config = tiny(algorithm)
        experiment = algorithms.make(config)
        assert experiment.num_steps == (8 if algorithm == "baseline" else 16)
        summaries[algorithm] = train_and_evaluate(experiment, config, str(tmp_path / algorithm))
        rows = [json.loads(x) for x in open(tmp_path / algorithm / "metrics.jsonl")]
        first_rows[algorithm] = next(r for r in rows if r.get("eval/model_step") == 0)
    # The same θ_0 and test set: identical test error before any model step.
    errors = {a: r["eval/test_error"] for a, r in first_rows.items()}
    assert len(set(errors.values())) == 1, errors
    finals = {a: s["test_error"]["mean"] for a, s in summaries.items()}
    assert all(0.0 <= e <= 1.0 for e in finals.values())
    assert summaries["ml3"] != summaries["baseline"]


@needs_mnist
def test_bad_settings_fail_with_a_message_saying_what_to_change():
    config = tiny()
    config.meta.split = "validation"
    with pytest.raises(ValueError, match="data.validation_size"):
        algorithms.make(config)
    config = tiny()
    config.meta.init_steps = 6
    with pytest.raises(ValueError, match=r"init_steps \(6\) must be a multiple of eval.every"):
        algorithms.make(config)
    config = tiny()
    config.meta.estimator = "first_order"
    with pytest.raises(ValueError, match="identical to 'unrolled'"):
        algorithms.make(config)
    config = tiny()
    config.data.data_dir = "/nonexistent/tfds"
    with pytest.raises(FileNotFoundError, match="mnist"):
        algorithms.make(config)


@needs_mnist
def test_meta_objective_on_a_validation_split(tmp_path):
    config = tiny()
    config.meta.split = "validation"
    config.data.validation_size = 64
    summary = train_and_evaluate(algorithms.make(config), config, str(tmp_path / "val"))
    assert np.isfinite(summary["test_error"]["mean"])


MULTI_DEVICE = textwrap.dedent(
    """
    import jax, numpy as np
    from configs import adalfl_cifar
    from metalearn import algorithms
    from metalearn.runtime import sharding

    assert jax.device_count() == 8, jax.devices()
    config = adalfl_cifar.get_config("smoke")
    config.data.max_train_examples = 64
    config.data.max_test_examples = 16
    config.data.batch_size = config.meta.batch_size = 16
    config.eval.batch_size = 16
    # SGD, not Adam: Adam's first step is about lr·sign(g), which would turn float
    # reassociation noise in near-zero gradient entries into differences of size lr.
    config.meta.optimizer = {"name": "sgd", "lr": 1e-2}
    baseline = config.copy_and_resolve_references()
    baseline.algorithm = "baseline"
    results = {}
    for n in (1, 8):
        mesh = sharding.make_mesh(n)
        exp = algorithms.make(config, mesh=mesh)
        state = exp.init()
        batch, meta_batch = exp.batch_at("train", 0), exp.batch_at("meta", 0)
        assert len(batch["image"].sharding.device_set) == n
        step = np.int32(0)
        after_init, m_init = exp.init_phase_step(state, batch, meta_batch, step)
        after_ada, m_ada = exp.train_step(state, batch, meta_batch, step)
        assert len(jax.tree.leaves(after_ada.inner.params)[0].sharding.device_set) == n
        plain = algorithms.make(baseline, mesh=mesh).train_step(state, batch, None, step)
        results[n] = jax.device_get((after_init.meta.params, m_init, after_ada, m_ada, plain))
    flat1, flat8 = (jax.tree.leaves(results[n]) for n in (1, 8))
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(flat1, flat8))
    # Batch-norm statistics over 8 shards of 2 examples reassociate their sums: allow
    # float32 noise, far below what per-device statistics (a real bug) would give.
    for a, b in zip(flat1, flat8):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=5e-5)
    print("max abs difference", worst)
    """
)


def test_one_training_step_and_one_adalfl_step_match_on_1_and_8_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",  # compile time is this test's cost
    }
    proc = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "max abs difference" in proc.stdout
