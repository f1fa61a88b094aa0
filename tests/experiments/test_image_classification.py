"""Baseline / ML³ / AdaLFL image classification (experiments/image_classification.py).

The programs are built from the tiny MNIST config below and compiled once per module
where tests can share them (the `adalfl_run` fixture); the data is the real MNIST in
../shared/data/tfds where it exists. The 1-vs-8-device tests use ResNet-8 (batch norm)
on the real CIFAR-10 subset.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import experiments
from configs import _image, adalfl_cifar, adalfl_mnist
from experiments import _runs
from experiments.image_classification import ImageClassification
from experiments.reproduce_images import seed_offline_phase
from metalearn import load_learned_loss
from metalearn.models import vision
from metalearn.runtime import sharding
from metalearn.runtime.experiment import FAST_COMPILE_OPTIONS
from metalearn.runtime.loop import DivergenceError, train_and_evaluate
from metalearn.tasks import images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_TFDS = os.path.join(ROOT, "..", "shared", "data", "tfds")
needs_mnist = pytest.mark.skipif(
    not os.path.isdir(os.path.join(SHARED_TFDS, "mnist")), reason=f"no MNIST in {SHARED_TFDS}"
)
IMAGE_CONFIGS = [
    f"{algorithm}_{data}"
    for algorithm in ("adalfl", "baseline", "ml3")
    for data in ("mnist", "fashion_mnist", "cifar", "cifar100", "svhn")
]


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
    # The smoke run's options but XLA's default CPU emitters, which tests/conftest.py turns
    # off: its runs must equal each other bit for bit across programs of other shapes (a
    # chunk cut in two, a resumed run), which is what a user's run does.
    config.fast_compile = False
    config.compiler_options = {**FAST_COMPILE_OPTIONS, "xla_cpu_use_fusion_emitters": True}
    return config


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def adalfl_run(tmp_path_factory):
    """An uninterrupted tiny AdaLFL run: (config, workdir, summary, experiment), with its
    data on the device: batches drawn there, chunks scanned."""
    config = tiny()
    config.data.on_device = "true"
    workdir = str(tmp_path_factory.mktemp("adalfl") / "full")
    experiment = experiments.make(config)
    return config, workdir, train_and_evaluate(experiment, config, workdir), experiment


@pytest.fixture(scope="module")
def adalfl_host_run(tmp_path_factory):
    """`adalfl_run` with its batches drawn on the host, one jitted step at a time."""
    config = tiny()
    config.data.on_device = "false"
    workdir = str(tmp_path_factory.mktemp("adalfl_host") / "full")
    experiment = experiments.make(config)
    return config, workdir, train_and_evaluate(experiment, config, workdir), experiment


def test_config_model_names_are_the_vision_models():
    assert _image.MODELS == tuple(vision.MODELS)


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_every_image_config_builds_its_smoke_experiment(name):
    module = importlib.import_module(f"configs.{name}")
    smoke = module.get_config("smoke")
    assert smoke.experiment == "image_classification" and smoke.fast_compile
    experiment = experiments.make(smoke)
    assert isinstance(experiment, ImageClassification)
    assert experiment.num_steps > 0 and experiment.data.train_images.shape[0] > 0
    full = module.get_config()
    assert not full.fast_compile
    assert full.inner.steps >= 10_000 and full.data.batch_size == 128
    for model in ("resnet44", "wrn28_10"):
        assert module.get_config(model).model.name == model
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        module.get_config("nope")


@pytest.mark.parametrize("algorithm", ["baseline", "ml3", "adalfl"])
def test_the_cpu_variant_is_lenet5_on_the_real_cifar10_subset_at_the_cpu_budget(algorithm):
    config = _image.image_config(algorithm, "cifar10", "cpu")
    budget = _image.CPU_BUDGET
    assert config.model.name == "lenet5" and config.data.source == "cifar_binary"
    assert config.data.train_files == ("train_first4000.bin",) and not config.fast_compile
    assert config.inner.steps == config.inner.optimizer.schedule.steps == budget["steps"]
    assert config.meta.init_steps == budget["init_steps"]
    assert config.eval.every == config.checkpoint_every == budget["every"]
    assert config.data.batch_size == 128  # the protocol's, unlike smoke's
    assert _image.image_config(algorithm, "cifar10", "resnet8,cpu").model.name == "resnet8"
    with pytest.raises(ValueError, match="':cpu' variant exists only for CIFAR-10"):
        _image.image_config(algorithm, "mnist", "cpu")


@needs_mnist
def test_smoke_reads_data_dir_else_tfds_data_dir_else_the_shared_folder(tmp_path, monkeypatch):
    # Resolved when the data is loaded, so that `--config.data.data_dir` (applied after
    # get_config) and the environment both count; an empty folder proves which was read.
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    config = adalfl_mnist.get_config("smoke").data
    assert config.data_dir == "" and not config.download
    data = images.load_images(config)
    assert data.train_images.shape[0] + data.val_images.shape[0] == config.max_train_examples
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "env"))):
        images.load_images(config)
    config.data_dir = str(tmp_path / "flag")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "flag"))):
        images.load_images(config)


@needs_mnist
# Two runs of their own (20-30 s each): in the slow tier. The default tier holds the
# loop's resume on ml3_sine (test_run.py) and the scanned chunk against the jitted steps.
@pytest.mark.slow
@pytest.mark.parametrize("path", ["device", "host"])
def test_adalfl_resume_mid_offline_phase_and_mid_training_is_exact(path, request, tmp_path):
    run = {"device": "adalfl_run", "host": "adalfl_host_run"}[path]
    config, full_dir, full, experiment = request.getfixturevalue(run)
    assert full["batches"].startswith(f"{path}:")  # the summary names the path it took
    cut = str(tmp_path / "cut")
    # Stopped inside the offline phase, then inside online training (the experiment holds
    # no state but its data streams, which restart wherever a chunk starts elsewhere);
    # the last part is a new experiment, whose streams start at the restored step.
    for stop in (4, 12):
        assert train_and_evaluate(experiment, config, cut, stop_at=stop) is None
    assert train_and_evaluate(experiments.make(config), config, cut) == full
    phi = [load_learned_loss(os.path.join(d, "learned_loss")).params for d in (full_dir, cut)]
    jax.tree.map(np.testing.assert_array_equal, *phi)
    assert _rows(full_dir) == _rows(cut)


@pytest.mark.slow  # 6 s (the default tier was at 5 min)
@needs_mnist
def test_adalfl_from_ml3s_offline_phase_is_the_same_run(adalfl_run, tmp_path):
    """`reproduce_images` runs one offline phase for ML³ and AdaLFL of a seed: AdaLFL
    resumed from the checkpoint at its end in ML³'s finished run (kept there, although
    newer ones were written after it) gives AdaLFL's own numbers."""
    config, full_dir, full, _ = adalfl_run
    ml3_config = tiny("ml3")
    ml3_config.data.on_device = config.data.on_device  # the same batches
    ml3_dir, adalfl_dir = str(tmp_path / "ml3"), str(tmp_path / "adalfl")
    init = config.meta.init_steps
    train_and_evaluate(experiments.make(ml3_config), ml3_config, ml3_dir)
    kept = sorted(int(d) for d in os.listdir(os.path.join(ml3_dir, "checkpoints")))
    assert kept == [init, 12, 16]  # the newest two, and the offline phase's end
    assert seed_offline_phase(ml3_dir, adalfl_dir, init)
    assert not seed_offline_phase(ml3_dir, adalfl_dir, init)  # only into a fresh workdir
    assert train_and_evaluate(experiments.make(config), config, adalfl_dir) == full
    assert _rows(adalfl_dir) == _rows(full_dir)


@needs_mnist
def test_evaluations_mark_the_offline_phase_and_log_the_loss_shape(adalfl_run):
    _, workdir, _, _ = adalfl_run
    rows = _rows(workdir)
    evals = [r for r in rows if "eval/test_error" in r]
    assert [r["eval/model_step"] for r in evals] == [0, 4, 8]  # θ untouched before step 8
    assert [r["step"] for r in evals] == [8, 12, 16]
    assert any("curve/true_class" in r for r in rows if r["step"] < 8)
    assert all("meta/loss" in r for r in rows if 0 < r["step"] and "train/ce" in r)


@needs_mnist
def test_learned_loss_artifact_says_how_it_is_fed_and_what_it_was_trained_for(adalfl_run):
    config, workdir, _, _ = adalfl_run
    loss = load_learned_loss(os.path.join(workdir, "learned_loss"))
    assert loss.description == {
        "y": "one-hot labels",
        "y_hat": "softmax probabilities",
        "extra": [],
        "inner_optimizer": json.loads(json.dumps(config.inner.optimizer.to_dict())),
        "inner_steps": config.inner.steps,
    }
    y = np.eye(10, dtype=np.float32)[:2]
    assert np.isfinite(float(loss(y, np.full_like(y, 0.1))))


@needs_mnist
def test_the_three_algorithms_share_data_and_initial_model_and_differ_in_the_loss(adalfl_run):
    configs = {a: tiny(a) for a in ("baseline", "ml3")}
    for config in configs.values():
        config.data.on_device = adalfl_run[0].data.on_device  # the same batch order
    built = {a: experiments.make(config) for a, config in configs.items()}
    built["adalfl"] = adalfl_run[3]  # its programs are compiled already
    assert {a: e.num_steps for a, e in built.items()} == {"baseline": 8, "ml3": 16, "adalfl": 16}
    states = {a: e.init() for a, e in built.items()}
    for a in ("ml3", "adalfl"):
        for part in (lambda s: s.inner.params, lambda s: s.inner.model_state, lambda s: s.meta):
            jax.tree.map(np.testing.assert_array_equal, part(states["baseline"]), part(states[a]))
        for t in (0, 9):
            jax.tree.map(
                np.testing.assert_array_equal,
                built["baseline"].batch_at("train", t),
                built[a].batch_at("train", t),
            )
    # One model step from the same state and batch: CE (baseline) vs the frozen ℓ_φ (ML³).
    batch, step = built["baseline"].batch_at("train", 8), np.int32(8)
    after = {
        a: jax.device_get(built[a].train_step(states[a], batch, None, step)[0].inner.params)
        for a in ("baseline", "ml3")
    }
    leaves = [jax.tree.leaves(after[a]) for a in ("baseline", "ml3")]
    assert any(not np.allclose(x, y) for x, y in zip(*leaves, strict=True))


def test_bad_settings_fail_with_a_message_saying_what_to_change():
    config = tiny()
    config.meta.split = "validation"
    config.data.validation_fraction = 0.0
    with pytest.raises(ValueError, match="data.validation_fraction"):
        experiments.make(config)
    config.meta.split = "train"
    config.meta.select_every = 4
    with pytest.raises(ValueError, match="selects φ by its error on the validation split"):
        experiments.make(config)
    config = tiny()
    config.meta.select_every = 3
    with pytest.raises(ValueError, match=r"select_every \(3\) must divide meta.init_steps"):
        experiments.make(config)
    config = tiny()
    config.meta.init_steps = 6
    with pytest.raises(ValueError, match=r"init_steps \(6\) must be a multiple of eval.every"):
        experiments.make(config)
    config = tiny()
    config.meta.estimator = "first_order"
    with pytest.raises(ValueError, match="identical to Unrolled"):
        experiments.make(config)
    config = tiny()
    config.data.data_dir = "/nonexistent/tfds"
    with pytest.raises(FileNotFoundError, match="mnist"):
        experiments.make(config)


@pytest.mark.slow  # 13-16 s: the default tier is at its 5 minutes
@needs_mnist
def test_best_phi_selection_keeps_the_phi_of_the_lowest_validation_error(monkeypatch):
    config = tiny()
    config.meta.select_every, config.meta.select_steps = 2, 2  # 4 selection runs
    experiment = experiments.make(config)
    scripted = iter([0.5, 0.2, 0.7, 0.3])
    real = experiment.error_rate

    def error_rate(inner, x, y):
        if x is experiment.data.val_images:
            return next(scripted), 0.0
        return real(inner, x, y)

    candidates = []
    keep = experiment._keep_best

    def keep_best(state, error):
        candidates.append(jax.device_get(state.meta.params))
        return keep(state, error)

    monkeypatch.setattr(experiment, "error_rate", error_rate)
    monkeypatch.setattr(experiment, "_keep_best", keep_best)
    state, _ = experiment.train_chunk(experiment.init(), 0, config.meta.init_steps)
    assert len(candidates) == 4
    chosen = jax.tree.leaves(jax.device_get(state.meta.params))
    for a, b in zip(chosen, jax.tree.leaves(candidates[1]), strict=True):
        np.testing.assert_array_equal(a, b)  # the φ of error 0.2, not the last one
    assert float(state.best_error) == pytest.approx(0.2)
    assert not np.array_equal(jax.tree.leaves(candidates[3])[0], chosen[0])


@needs_mnist
@pytest.mark.parametrize("bound", ["grad_ratio", "test_error"])
def test_divergence_stops_the_run_with_the_step_and_the_quantity(bound, tmp_path):
    config = tiny()
    if bound == "grad_ratio":
        config.divergence.max_grad_ratio = 1e-9  # every step's ratio is above it
        message, step = r"gradient is \S+ times cross-entropy's .* at step 1\.", 1
    else:
        config.divergence.max_grad_ratio = 0.0
        config.divergence.max_test_error, config.divergence.check_after = 1e-6, 1
        message, step = r"test error \S+ >= 0.000 .* at model step 4 \(step 12\)", 12
    workdir = str(tmp_path / "run")
    with pytest.raises(DivergenceError, match=message):
        train_and_evaluate(experiments.make(config), config, workdir)
    info = json.load(open(os.path.join(workdir, "diverged.json")))
    assert info["step"] == step and re.search(message, info["message"])
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    with pytest.raises(_runs.Diverged, match=message):  # a sweep does not run it again
        _runs.run("configs/adalfl_mnist.py:smoke", workdir, ["--config.seed=1"])


@pytest.mark.slow  # 13-16 s: the default tier is at its 5 minutes
@needs_mnist
def test_the_gradient_ratio_bound_caps_the_learned_step(adalfl_run):
    free = adalfl_run[3].train_chunk(adalfl_run[3].init(), 0, 2)[1]
    bound = 0.5 * float(np.min(free["train/grad_ratio"]))
    config = tiny()
    config.loss_net.max_grad_ratio = bound
    experiment = experiments.make(config)
    _, metrics = experiment.train_chunk(experiment.init(), 0, 2)
    np.testing.assert_allclose(metrics["train/grad_ratio"], bound, rtol=1e-4)
    assert np.all(np.asarray(metrics["train/update_norm"]) < np.asarray(free["train/update_norm"]))


def _index(x: np.ndarray) -> set[int]:
    """The indices that `_indexed_data` wrote into the first two pixels of each image."""
    x = np.asarray(x).astype(int)
    return set(x[:, 0, 0, 0] + 256 * x[:, 0, 1, 0])


def _indexed_data(num_train: int, num_val: int) -> images.ImageData:
    """MNIST-shaped splits whose images encode their index: train 0…, validation after."""
    n = num_train + num_val
    x = np.zeros((n, 28, 28, 1), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    y = np.arange(n, dtype=np.int32) % 10
    train, val = (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:])
    return images.ImageData(images.DATASETS["mnist"], *train, *val, *train)


@pytest.mark.parametrize("on_device", ["true", "false"])
def test_meta_batches_come_from_the_held_out_validation_examples(on_device):
    data = _indexed_data(192, 64)
    train_index, val_index = _index(data.train_images), _index(data.val_images)
    for split, source in (("validation", val_index), ("train", train_index)):
        config = tiny()
        config.meta.split = split
        config.data.validation_size = 64
        config.data.on_device = on_device
        experiment = ImageClassification(config, data=data)
        assert experiment.on_device == (on_device == "true")
        for t in (0, 3, 9):  # 9: past the 4 meta batches of a validation epoch
            assert _index(experiment.batch_at("meta", t)["image"]) <= source, (split, t)
            assert _index(experiment.batch_at("train", t)["image"]) <= train_index


def _order(x) -> np.ndarray:
    """The indices `_indexed_data` wrote into a batch's images, in batch order."""
    x = np.asarray(x).astype(int)
    return x[:, 0, 0, 0] + 256 * x[:, 0, 1, 0]


def test_device_batches_are_a_pure_function_of_the_seed_and_step():
    # The library: batch t's indices whatever run of steps computes them; each epoch a
    # permutation of the split, a new one every epoch.
    key = jax.random.key(3)
    whole = np.asarray(images.device_batch_indices(key, 192, 16, np.int32(0), 40))
    for start in (0, 5, 11, 23, 33):  # within an epoch (12 steps), and across epochs' ends
        part = images.device_batch_indices(key, 192, 16, np.int32(start), 7)
        np.testing.assert_array_equal(part, whole[start : start + 7], err_msg=str(start))
    epochs = whole[:36].reshape(3, -1)
    assert all(sorted(e) == list(range(192)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    # The experiment: batch t of each stream from one experiment asked in any order, a
    # fresh one, and the indices its scanned chunks gather; another seed, other batches.
    data = _indexed_data(192, 64)
    config = tiny()
    config.data.validation_size = 64
    config.data.on_device = "true"
    first, again = (ImageClassification(config, data=data) for _ in range(2))
    for name in ("train", "meta"):
        scanned = np.asarray(first.stream_indices(first.resident, name, np.int32(0), 40))
        offset = 192 if name == "meta" else 0  # validation images are numbered after
        for t in (9, 0, 30, 1):
            batch = _order(first.batch_at(name, t)["image"])
            np.testing.assert_array_equal(batch, _order(again.batch_at(name, t)["image"]))
            np.testing.assert_array_equal(batch, scanned[t] + offset)
    config.seed = 1
    other = ImageClassification(config, data=data)
    assert not np.array_equal(
        _order(other.batch_at("train", 0)["image"]), _order(first.batch_at("train", 0)["image"])
    )


def test_auto_keeps_the_data_on_the_host_when_it_is_over_the_budget():
    data = _indexed_data(192, 64)  # 192 + 64 images of 784 bytes and 4-byte labels
    nbytes = 256 * (784 + 4)
    built = {}
    for setting, budget in (("auto", 0.0), ("auto", 0.99), ("auto", 1.01), ("true", 0.5)):
        config = tiny()
        config.data.validation_size = 64
        config.data.on_device = setting
        config.data.on_device_budget_gib = budget * nbytes / 2**30
        built[setting, budget] = ImageClassification(config, data=data)
    assert {k: e.on_device for k, e in built.items()} == {
        ("auto", 0.0): False,  # on a CPU without a budget: the host path
        ("auto", 0.99): False,
        ("auto", 1.01): True,
        ("true", 0.5): True,
    }
    over = built["auto", 0.99]
    assert over.batches.startswith("host:") and "over the budget" in over.batches
    assert over.resident is None
    # ... and draws the host path's batches.
    host = images.host_batches(data.train_images, data.train_labels, 16, 0, 5)
    np.testing.assert_array_equal(over.batch_at("train", 5)["image"], next(host)["image"])
    with pytest.raises(ValueError, match="data.on_device='maybe'"):
        images.choose_on_device("maybe", nbytes, 0.0, jax.devices()[0])


@pytest.mark.slow  # 10-15 s of compilation: the default tier is at its 5 minutes
@needs_mnist
def test_a_scanned_chunk_matches_the_loop_of_jitted_steps(adalfl_run, monkeypatch):
    """Steps 6-9 (offline, then online) through `train_chunk` on the device path, in
    scans of 2 steps and in programs of 1 (a CPU's default), against `step_loop`, one
    jitted step at a time on `batch_at`'s device batches."""
    experiment = adalfl_run[3]
    assert experiment.on_device and experiment.scan_steps == 1
    one = experiment.train_chunk(experiment.init(), 6, 4)
    monkeypatch.setattr(experiment, "scan_steps", 2)
    scanned = experiment.train_chunk(experiment.init(), 6, 4)
    state, offline = experiment.step_loop(experiment.init(), 6, 2, True)
    state, online = experiment.step_loop(state, 8, 2, False)
    looped = state, jax.tree.map(lambda a, b: np.concatenate([a, b]), offline, online)
    assert scanned[1]["train/ce"].shape == (4,)
    for run in (scanned, one):
        assert jax.tree.structure(run) == jax.tree.structure(looped)
        leaves = (jax.tree.leaves(jax.device_get(x)) for x in (run, looped))
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def step_leaves(algorithm: str, num_devices: int) -> list[np.ndarray]:
    """One step of `algorithm` from the initial state on a mesh of `num_devices`, as host
    leaves of the new state and the metrics.

    ResNet-8 on the CIFAR-10 subset, so that batch norm sees the sharded batch. Baseline:
    one training step on cross-entropy. AdaLFL: its one compiled lock-step program, run
    as an offline ML³ step (φ from a fresh θ) and as an AdaLFL step (θ_{t+1}, a training
    step on ℓ_φ, and φ).
    """
    config = adalfl_cifar.get_config("smoke")
    config.algorithm = algorithm
    config.data.max_train_examples = 80
    config.data.validation_fraction = 0.2  # 16 held-out images: one meta batch
    config.data.max_test_examples = 16
    config.data.batch_size = config.meta.batch_size = 16
    config.eval.batch_size = 16
    # SGD, not Adam: Adam's first step is about lr·sign(g), which would turn float
    # reassociation noise in near-zero gradient entries into differences of size lr.
    config.meta.optimizer = {"name": "sgd", "lr": 1e-2}
    exp = experiments.make(config, mesh=sharding.make_mesh(num_devices))
    state = exp.init()
    batch, meta_batch = exp.batch_at("train", 0), exp.batch_at("meta", 0)
    assert len(batch["image"].sharding.device_set) == num_devices
    # Split, not replicated: each device holds its own 16 / n examples, together all 16.
    for x in (batch["image"], batch["label"], meta_batch["image"]):
        shards = sorted(x.addressable_shards, key=lambda sh: sh.index[0].start or 0)
        assert [sh.data.shape[0] for sh in shards] == [16 // num_devices] * num_devices
        np.testing.assert_array_equal(np.concatenate([sh.data for sh in shards]), x)
    step = np.int32(0)
    results = [exp.train_step(state, batch, meta_batch, step)]
    if algorithm == "adalfl":
        results.append(exp.init_phase_step(state, batch, meta_batch, step))
    params = jax.tree.leaves(results[0][0].inner.params)
    assert len(params[0].sharding.device_set) == num_devices
    return jax.tree.leaves(jax.device_get(results))


# The 8-device half runs in a process of its own (the device count is fixed when JAX
# starts), at the same time as the 1-device half here: two compilations on two cores.
EIGHT_DEVICES = textwrap.dedent(
    """
    import importlib.util, sys
    import jax, numpy as np

    assert jax.device_count() == 8, jax.devices()
    spec = importlib.util.spec_from_file_location("test_module", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    np.savez(sys.argv[3], *module.step_leaves(sys.argv[2], 8))
    """
)


# The AdaLFL step's meta-gradient costs three times the compilation of a training step.
@pytest.mark.slow  # compilation-bound (the default tier was at 5 min 5 s in CI)
@pytest.mark.parametrize("algorithm", ["baseline", "adalfl"])
@pytest.mark.usefixtures("fast_compile")
def test_a_step_matches_on_1_and_8_devices(algorithm, tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",  # compile time is this test's cost
    }
    out = tmp_path / "eight.npz"
    proc = subprocess.Popen(
        [sys.executable, "-c", EIGHT_DEVICES, os.path.abspath(__file__), algorithm, str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        one = step_leaves(algorithm, 1)
        _, stderr = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    with np.load(out) as saved:
        eight = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    assert len(one) == len(eight)
    # Batch-norm statistics over 8 shards of 2 examples reassociate their sums: allow
    # float32 noise, far below what per-device statistics (a real bug) would give.
    for a, b in zip(one, eight, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=5e-5)


@needs_mnist
def test_summary_has_the_final_validation_error_for_model_selection(adalfl_run):
    from experiments.reproduce_images import final

    _, workdir, summary, _ = adalfl_run
    last = [r for r in _rows(workdir) if "eval/val_error" in r][-1]
    assert summary["val_error"]["per_seed"] == [last["eval/val_error"]]
    assert final(workdir, "val_error") == last["eval/val_error"]
    assert final(workdir, "test_error") == summary["test_error"]["mean"]


@pytest.mark.slow  # LeNet-5's CG solve through 3 inner steps compiles slowly on a CPU
@needs_mnist
def test_offline_phase_with_s_inner_steps_by_implicit_differentiation(tmp_path):
    """ML³'s offline phase with S_inner = 3 steps from a fresh θ, differentiated
    implicitly (the AdaLFL paper's suggestion): φ moves, the CG solve reports its
    residual, the frozen loss then trains the model, and the artifact says S_inner."""
    config = tiny("ml3")
    config.meta.init_inner_steps = 3
    config.meta.init_estimator = "implicit"
    config.meta.estimator_options.damping = 0.1
    workdir = str(tmp_path / "implicit")
    experiment = experiments.make(config)
    phi0 = jax.device_get(experiment.init().meta.params)
    summary = train_and_evaluate(experiment, config, workdir)
    rows = _rows(workdir)
    offline = [r for r in rows if "meta/cg_residual" in r]
    assert [r["step"] for r in offline] == list(range(1, 9))  # step t logs at t + 1
    assert all(np.isfinite(r["meta/cg_residual"]) and r["meta/loss"] > 0 for r in offline)
    assert not any("meta/cg_residual" in r for r in rows if r["step"] > 8)
    learned = load_learned_loss(os.path.join(workdir, "learned_loss"))
    assert learned.description["inner_steps"] == 3
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), learned.params, phi0)
    assert max(jax.tree.leaves(moved)) > 0  # the offline phase moved φ
    assert 0.0 <= summary["test_error"]["mean"] <= 1.0


def test_offline_estimator_settings_are_checked_when_the_experiment_is_built():
    config = tiny("ml3")
    config.meta.init_estimator = "implicit"  # S_inner = 1: not a fixed point
    with pytest.raises(ValueError, match="raise meta.init_inner_steps"):
        experiments.make(config)
    config.meta.init_inner_steps = 4
    # The loop's non-finite hints cover the offline phase's estimator too.
    assert experiments.make(config).estimators() == ("unrolled", "implicit")
    config.meta.estimator_options.sigmaa = 0.1
    with pytest.raises(ValueError, match="Unknown estimator option 'sigmaa'"):
        experiments.make(config)
