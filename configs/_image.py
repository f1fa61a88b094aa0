"""Shared builder for the image-classification configs (baseline, ML³, AdaLFL).

Every `configs/<algorithm>_<dataset>.py` calls `image_config`, so the three algorithms on
one dataset differ only in `config.algorithm` and the groups it reads: a comparison
between them changes nothing else (same model, data order, optimizer, schedule, budget).
"""

import ml_collections

from configs._common import loss_net

# The names of `metalearn.models.vision.MODELS` (a test keeps the two equal), written
# here so that parsing a config does not import JAX.
MODELS = (
    "lenet5",
    "vgg16",
    "allcnn_c",
    "resnet8",
    "resnet20",
    "resnet44",
    "resnet56",
    "wrn16_8",
    "wrn28_10",
)
# Per dataset: default model, base optimizer and training steps (S_train): the AdaLFL
# paper's protocols. MNIST / Fashion-MNIST: plain SGD, lr 0.01, no momentum, no weight
# decay, 10,000 steps. CIFAR-10 / CIFAR-100 / SVHN: SGD lr 0.01 with Nesterov 0.9 and
# weight decay 5e-4, 150,000 steps, the rate ×0.1 at 100,000 and 135,000. Batch 128.
# `max_grad_ratio`: the bound on the learned loss's step relative to cross-entropy's
# (loss_net.max_grad_ratio). Under momentum the offline phase's one-step objective tunes
# the loss's scale about 5× too large and training diverges (docs/adalfl.md, "AdaLFL: why it
# diverged"); bounded at 1 it trains. Plain SGD needs no bound.
_PAPER_SGD = {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}
_PAPER_NESTEROV = {"name": "nesterov", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
_CONSTANT = {"name": "constant", "boundaries": (), "factor": 1.0}
_STEPS_100K_135K = {"name": "step", "boundaries": (2 / 3, 0.9), "factor": 0.1}
_MNIST_PROTOCOL = {
    "optimizer": _PAPER_SGD,
    "schedule": _CONSTANT,
    "steps": 10_000,
    "max_grad_ratio": 0.0,
}
_CIFAR_PROTOCOL = {
    "optimizer": _PAPER_NESTEROV,
    "schedule": _STEPS_100K_135K,
    "steps": 150_000,
    "max_grad_ratio": 1.0,
}
DATASET_DEFAULTS = {
    dataset: {"model": model, **protocol}
    for dataset, model, protocol in (
        ("mnist", "lenet5", _MNIST_PROTOCOL),
        ("fashion_mnist", "lenet5", _MNIST_PROTOCOL),
        ("cifar10", "vgg16", _CIFAR_PROTOCOL),
        ("cifar100", "wrn28_10", _CIFAR_PROTOCOL),
        ("svhn_cropped", "allcnn_c", _CIFAR_PROTOCOL),
    )
}
CIFAR10_SUBSET = "../shared/data/raw/cifar10_subset"
SHARED_TFDS = "../shared/data/tfds"


def image_config(algorithm: str, dataset: str, arg: str | None) -> ml_collections.ConfigDict:
    """The config of `algorithm` ('baseline' | 'ml3' | 'adalfl') on `dataset`.

    Args:
      algorithm: which algorithm the config runs.
      dataset: a key of `DATASET_DEFAULTS`.
      arg: the variant after ':' in `--config=file.py:variant`, comma-separated parts:
        a model name (`vgg16`, `resnet44`, `wrn28_10`, ...); `subset` (CIFAR-10 only: the
        real 5,000-image subset in ../shared/data/raw/cifar10_subset); `cpu` (CIFAR-10
        only: `subset` with LeNet-5 and a budget a CPU finishes in about a quarter of an
        hour, see `CPU_BUDGET`); `shared` (read tfds data from ../shared/data/tfds);
        `smoke` (about a minute on a CPU).
    """
    d = DATASET_DEFAULTS[dataset]
    c = ml_collections.ConfigDict()
    c.experiment = "image_classification"  # the module experiments/image_classification.py
    c.algorithm = algorithm
    c.task = "image_classification"
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)
    c.seed = 0

    c.data = ml_collections.ConfigDict(
        {
            "name": dataset,
            "source": "tfds",  # or "cifar_binary" (.bin files in data_dir), "idx", "synthetic"
            # Where tfds data is read: data_dir, else $TFDS_DATA_DIR, else fallback_data_dir,
            # else tfds's default folder (resolved when the data is loaded, after overrides).
            "data_dir": "",
            "fallback_data_dir": "",
            "download": True,
            "train_files": (),
            "test_files": (),
            "validation_size": 0,
            # The held-out, class-stratified fraction of the training set (the AdaLFL
            # paper's 10 %): the meta-objective's data. Every algorithm trains on the rest,
            # so the three see the same training images. Overrides validation_size.
            "validation_fraction": 0.1,
            "validation_seed": 0,
            "classes": (),
            "max_train_examples": 0,
            "max_test_examples": 0,
            "augment": "default",  # or "none" | "crop" | "crop_flip"
            "batch_size": 128,
            "prefetch": 2,
            # Where training batches are drawn: "true" keeps the train and validation
            # images in device memory, gathers each batch there and runs the steps as
            # compiled scans (a batch order of its own, as deterministic); "false" draws
            # them on the host, one dispatch per step; "auto" keeps them on the device
            # when they fit in on_device_budget_gib (≤ 0: a quarter of a GPU's or TPU's
            # memory; on a CPU, where it measured no faster, the host path unless a
            # budget is given). The run's summary says which it used ("batches").
            "on_device": "auto",
            "on_device_budget_gib": 0.0,
            # Steps per compiled scan on the device path; 0: all of a chunk's on a GPU or
            # TPU, 1 on a CPU (XLA:CPU runs convolution gradients slowly inside loops).
            "scan_steps": 0,
        }
    )
    c.model = ml_collections.ConfigDict({"name": d["model"], "dropout": -1.0, "dtype": "float32"})
    # The loss network of ML³ and AdaLFL, as in the same authors' NPBML: cross-entropy
    # plus a learned term (so φ learns a correction to it), no output activation (the
    # AdaLFL paper: a Softplus output encourages flat losses), no biases, smooth leaky
    # ReLU with β = 2, γ = 0.25. `max_grad_ratio` > 0 bounds its logit gradient at that
    # many times cross-entropy's (experiments/image_classification.make_losses).
    c.loss_net = loss_net(
        activation="smooth_leaky_relu",
        output_activation="identity",
        use_bias=False,
        beta=2.0,
        gamma=0.25,
        ce_term=True,
    )
    c.loss_net.max_grad_ratio = d["max_grad_ratio"]
    # True: the learned loss's logit gradient always has cross-entropy's norm (the
    # shape-only AdaLFL of docs/adalfl.md; max_grad_ratio must then be 0).
    c.loss_net.normalise_grad = False
    c.inner = ml_collections.ConfigDict(
        {
            "steps": d["steps"],
            "optimizer": {
                **d["optimizer"],
                "schedule": {**d["schedule"], "steps": d["steps"]},
            },
        }
    )
    c.meta = ml_collections.ConfigDict(
        {
            # Adam 1e-3 (the paper's); clip_value > 0 clips the meta-gradient entrywise
            # first (NPBML: 10), clip_norm its global norm.
            "optimizer": {"name": "adam", "lr": 1e-3, "clip_value": 0.0, "clip_norm": 0.0},
            "estimator": "unrolled",  # exact; the only choice for a one-step unroll
            "method": "jvp",  # or "backprop": two exact ways, see metalearn.bilevel
            # Where the meta-objective measures the task loss after the inner step: "none"
            # (at θ_{t+1}) or "momentum" (θ_t plus the whole displacement −η/(1−μ)(g + λθ)
            # the step's gradient causes under the base optimizer's momentum).
            "lookahead": "none",
            "init_steps": 2500,  # S_init: offline ML³ steps
            # S_inner: inner steps from a fresh θ in each offline step (1: the paper's
            # setting), and how the meta-gradient through them is taken: "unrolled" (the
            # only choice for 1), "implicit" (the paper's suggestion for S_inner > 1: θ_S
            # as a fixed point of ℓ_φ on the step's batch, a CG solve whose memory does not
            # grow with S_inner), "es" or "first_order". The inner batches are the step's
            # training batch, S_inner times (augmented afresh each time).
            "init_inner_steps": 1,
            "init_estimator": "unrolled",
            # σ and pairs of "es", CG iterations and damping of "implicit".
            "estimator_options": {"sigma": 0.01, "pairs": 8, "cg_iters": 20, "damping": 0.0},
            "batch_size": 128,
            # Where the meta-objective batch comes from: "validation" (the held-out,
            # stratified data.validation_fraction of the training set, the paper's) or
            # "train" (the training images in another order).
            "split": "validation",
            # Best-φ selection in the offline phase (the authors' ML³ code): every
            # select_every offline steps (0: off), train a fresh model select_steps steps on
            # ℓ_φ and measure its error on the validation split; the offline phase ends
            # with the φ of the lowest error.
            "select_every": 0,
            "select_steps": 500,
        }
    )
    # Divergence is detected at each evaluation of the model and stops the run with the
    # step and the quantity: test error at or above `max_test_error` (-1: chance level,
    # 1 − 1.5/classes) from model step `check_after` on, or the learned loss's gradient
    # ratio (train/grad_ratio) over `max_grad_ratio`. `stop=False` only reports nothing.
    c.divergence = ml_collections.ConfigDict(
        {"max_test_error": -1.0, "check_after": 500, "max_grad_ratio": 1e4, "stop": True}
    )
    c.eval = ml_collections.ConfigDict({"every": 2500, "batch_size": 1000})
    c.checkpoint_every = 2500
    c.log_every = 10

    parts = [p for p in (arg or "").split(",") if p]
    for part in parts:
        if part in MODELS:
            c.model.name = part
        elif part in ("subset", "cpu"):
            if dataset != "cifar10":
                raise ValueError(f"The ':{part}' variant exists only for CIFAR-10.")
            c.data.source = "cifar_binary"
            c.data.data_dir = CIFAR10_SUBSET
            c.data.train_files = ("train_first4000.bin",)
            c.data.test_files = ("test_first1000.bin",)
        elif part == "shared":
            c.data.data_dir = SHARED_TFDS
            c.data.download = False
        elif part != "smoke":
            raise ValueError(
                f"Unknown variant {part!r} of {algorithm}_{dataset}; known: smoke, shared, "
                f"subset and cpu (CIFAR-10), and a model name: {', '.join(MODELS)}."
            )
    if "cpu" in parts:  # LeNet-5 unless a model is named
        _cpu_budget(c, keep_model=any(p in MODELS for p in parts))
    if "smoke" in parts:  # last, so that it sees where the data comes from
        _smoke(c, dataset)
    return c


# The `cpu` variant's budget: LeNet-5, S_init offline steps, then model steps under the
# dataset's protocol (optimizer, batch 128, its schedule over these steps).
CPU_BUDGET = {"model": "lenet5", "init_steps": 500, "steps": 3000, "every": 500}


def _cpu_budget(c: ml_collections.ConfigDict, keep_model: bool) -> None:
    """A real result on a CPU in about a quarter of an hour: `CPU_BUDGET` (the model
    too, unless `keep_model`)."""
    b = CPU_BUDGET
    if not keep_model:
        c.model.name = b["model"]
    c.meta.init_steps = b["init_steps"]
    c.inner.steps = c.inner.optimizer.schedule.steps = b["steps"]
    c.eval.every = c.checkpoint_every = b["every"]


def _smoke(c: ml_collections.ConfigDict, dataset: str) -> None:
    """Shrinks a config to about a minute on a CPU; real data where it is here, tiny budget.

    MNIST and Fashion-MNIST are read from `--config.data.data_dir`, else $TFDS_DATA_DIR,
    else ../shared/data/tfds, never downloaded; CIFAR-10 from its real subset; CIFAR-100
    and SVHN are random pixels unless `shared` points at a prepared folder.
    """
    c.fast_compile = True
    if dataset in ("mnist", "fashion_mnist"):
        c.data.fallback_data_dir = SHARED_TFDS
        c.data.download = False
    elif dataset == "cifar10" and c.data.source == "tfds":
        c.data.source = "cifar_binary"
        c.data.data_dir = CIFAR10_SUBSET
        c.data.train_files = ("train_first4000.bin",)
        c.data.test_files = ("test_first1000.bin",)
    elif c.data.data_dir != SHARED_TFDS:
        c.data.source = "synthetic"  # no CIFAR-100 / SVHN here: random pixels
    if c.model.name != "lenet5":
        c.model.name = "resnet8"  # batch norm and residuals, at a CPU-friendly compile time
    c.data.max_train_examples = 2000
    c.data.max_test_examples = 500
    c.data.batch_size = 32
    c.meta.batch_size = 32
    c.meta.init_steps = 20
    c.inner.steps = 40
    c.inner.optimizer.schedule.steps = 40
    c.eval.every = 20
    c.eval.batch_size = 250
    c.checkpoint_every = 20
    c.log_every = 1
