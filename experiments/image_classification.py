"""Image classification with a fixed or a learned loss: the baseline, ML³ and AdaLFL.

One experiment for the three algorithms of the AdaLFL paper, chosen by
`config.algorithm`; everything else (data order, model, optimizer, schedule, budget) is
shared, so runs differ only in the loss θ is trained on:

- `baseline`: cross-entropy for `inner.steps` steps.
- `ml3`: `meta.init_steps` offline ML³ steps (each a fresh θ, one inner step on ℓ_φ, one
  meta step on the task loss at the new θ), then `inner.steps` steps on the frozen ℓ_φ.
- `adalfl`: the same initialisation, then `inner.steps` lock-step iterations: one inner
  step on ℓ_φ and one meta step on the task loss at θ_{t+1}.

Global step t runs the initialisation for t < init_steps and trains the model after, so
`eval/model_step` = t − init_steps. The data position is the step: batch t of every
stream is a pure function of (seed, t), which makes a resumed run read exactly the
batches an uninterrupted one would. Steps are jitted over a device mesh: batches split
along `data`, state replicated. Where the data fits in device memory (`data.on_device`) the
train and validation images live there, each batch is gathered there from a permutation
per epoch (`images.device_batch_indices`) and a chunk of steps is one compiled `lax.scan`
(`scan_chunk`), so small models run at the speed of their compute, not of one dispatch
per step (on a CPU, where XLA runs convolution gradients slowly inside loops, each step
is a program of its own: `data.scan_steps`); otherwise batches come from the host, one
jitted step at a time. The two paths order the batches differently; the summary's
`batches` says which a run used.

The learned loss ℓ_φ is fed output-wise: the one-hot label y_c and the softmax
probability ŷ_c of every class c (`make_losses`), by default added to cross-entropy
(`loss_net.ce_term`); it is saved at the end as `<workdir>/learned_loss`. Two
restricted families take it apart (docs/adalfl.md, "Schedule or shape"):
`loss_net.kind="scaled_ce"`, exp(s)·cross-entropy, learns the step size alone (a
learning-rate multiplier: hypergradient descent), and `loss_net.normalise_grad` gives the
learned loss cross-entropy's gradient norm at every step, so it learns the shape alone.

What decides divergence is logged every step: `train/grad_ratio`, the learned loss's
gradient at the logits relative to cross-entropy's (its implied learning-rate
multiplier), and `train/update_norm`, the size of the base update; `plots/grad_ratio.png`
draws both, `plots/loss_shapes.png` the loss's shape at several points. Options that
bear on it: `loss_net.max_grad_ratio` (a bound on that ratio), `meta.lookahead` (the
meta-objective at the momentum's whole displacement), `meta.select_every` (best-φ
selection by short validation runs in the offline phase), `meta.optimizer.clip_value`,
and `meta.split` (meta batches from the held-out validation split). A run that diverges
(test error at chance, or the ratio past `divergence.max_grad_ratio`) stops with the step
and the quantity (`check_divergence`).
"""

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from metalearn import bilevel, plots
from metalearn.algorithms import adalfl
from metalearn.losses import learned as learned_losses
from metalearn.losses.task import softmax_cross_entropy
from metalearn.models import vision
from metalearn.optim import make_lookahead, make_optimizer
from metalearn.runtime import sharding
from metalearn.runtime.experiment import Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import InnerState, MetaState, init_inner_state, init_meta_state
from metalearn.streams import ImageClassificationSeed, ImageClassificationSeedOffset
from metalearn.tasks import images
from metalearn.types import Array, Batch, PRNGKey

ALGORITHMS = ("baseline", "ml3", "adalfl")
CURVE_POINTS = 21  # predicted probabilities at which the learned loss's shape is logged
NO_ERROR_YET = 2.0  # the best selection error before any (above every error rate; finite)
# The device path's data streams, each a stream of the run's key.
_DATA_KEYS = {
    "train": ImageClassificationSeed.TRAIN_BATCHES,
    "meta": ImageClassificationSeed.META_BATCHES,
    "select": ImageClassificationSeed.SELECT_BATCHES,
}


@flax.struct.dataclass
class TrainState:
    """θ (with optimizer and batch-norm state), φ (with its optimizer state), and, with
    `meta.select_every`, the best φ of the offline phase's selection runs so far with its
    validation error (`NO_ERROR_YET` before the first); without selection both are None,
    so the state carries no second copy of φ."""

    inner: InnerState
    meta: MetaState
    best_meta_params: Any = None
    best_error: Array | None = None


def forward(
    model,
    info: images.DatasetInfo,
    augment: str,
    params,
    model_state,
    batch: Batch,
    key: PRNGKey,
) -> tuple[Array, Any]:
    """Training-mode logits (float32) of a uint8 batch, with augmentation and dropout."""
    aug_key, dropout_key = jax.random.split(key)
    x = images.preprocess(
        batch["image"], info, augment=augment, key=None if augment == "none" else aug_key
    )
    logits, model_state = vision.apply_model(
        model, params, model_state, x, train=True, key=dropout_key
    )
    return logits.astype(jnp.float32), model_state


def grad_scale_mode(loss_net: ml_collections.ConfigDict) -> str:
    """`adalfl.scale_to_cross_entropy`'s mode for a loss_net group: "normalised" with
    `normalise_grad`, "bounded" with `max_grad_ratio` > 0, else "free".

    Raises:
      ValueError: for both at once (a normalised loss's ratio is 1: no bound applies),
        or a negative bound.
    """
    normalise, bound = loss_net.get("normalise_grad", False), loss_net.max_grad_ratio
    if bound < 0:
        raise ValueError(f"loss_net.max_grad_ratio must be ≥ 0 (0: no bound); got {bound:g}.")
    if normalise and bound:
        raise ValueError(
            f"loss_net.normalise_grad fixes the learned loss's gradient ratio at 1, so "
            f"loss_net.max_grad_ratio={bound:g} bounds nothing: set one of them "
            "(--config.loss_net.max_grad_ratio=0 with normalise_grad)."
        )
    return "normalised" if normalise else "bounded" if bound > 0 else "free"


def make_losses(model, info, augment: str, meta_augment: str, loss_fn, scale=("free", 0.0)):
    """The inner objectives (learned, cross-entropy) and the outer task loss.

    Args:
      model, info: the classifier and its dataset's description.
      augment: augmentation of inner (training) batches.
      meta_augment: augmentation of the meta-objective batches.
      loss_fn: `loss(φ, y_onehot, probs) -> scalar`, the learned loss.
      scale: `(mode, max_ratio)` of `adalfl.scale_to_cross_entropy`: "free" leaves the
        learned loss as it is, "bounded" scales it down wherever its gradient in the
        logits is more than `max_ratio` times cross-entropy's, "normalised" gives it
        cross-entropy's gradient norm always (shape only).

    Returns:
      `(learned_inner, ce_inner, outer)` with the signatures of `metalearn.types`. The
      learned loss sees (one-hot y_c, softmax probability ŷ_c) output-wise; both inner
      losses report `train/ce` and `train/accuracy` of the same forward pass, the learned
      one also `train/learned_loss` and `train/grad_ratio` (‖∇_z L_φ‖ / ‖∇_z CE‖ at the
      logits z of the batch, after any bound: the learned loss's step size relative to
      cross-entropy's, its implied learning-rate multiplier).
    """

    def inner(use_learned, params, model_state, phi, batch, key):
        logits, model_state = forward(model, info, augment, params, model_state, batch, key)
        ce = softmax_cross_entropy(batch["label"], logits)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        metrics = {"train/ce": ce, "train/accuracy": accuracy}
        if not use_learned:
            return ce, (model_state, metrics)
        y = jax.nn.one_hot(batch["label"], logits.shape[-1])
        mode, max_ratio = scale
        loss, ratio = adalfl.scale_to_cross_entropy(
            loss_fn, phi, y, logits, mode=mode, max_ratio=max_ratio or 1.0
        )
        metrics.update(
            {"train/learned_loss": loss, "train/grad_ratio": jax.lax.stop_gradient(ratio)}
        )
        return loss, (model_state, metrics)

    def outer(params, model_state, batch, key):
        logits, _ = forward(model, info, meta_augment, params, model_state, batch, key)
        return softmax_cross_entropy(batch["label"], logits)

    return functools.partial(inner, True), functools.partial(inner, False), outer


class ImageClassification(Experiment):
    """Baseline, ML³ or AdaLFL on an image dataset, driven by `runtime.loop`."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        mesh: jax.sharding.Mesh | None = None,
        data: images.ImageData | None = None,
    ):
        """Builds the experiment.

        Args:
          config: see configs/_image.py.
          mesh: the device mesh (default: every device, one `data` axis).
          data: the dataset, if already in memory (e.g. synthetic images for a benchmark);
            by default loaded as `config.data` says.
        """
        super().__init__(config, mesh=mesh)
        c = config
        if c.algorithm not in ALGORITHMS:
            raise ValueError(f"Unknown algorithm {c.algorithm!r}; choose one of {ALGORITHMS}.")
        self.learned = c.algorithm != "baseline"
        self.init_steps = c.meta.init_steps if self.learned else 0
        # S_inner steps from a fresh θ in each offline step, and their estimator.
        self.init_inner_steps = c.meta.get("init_inner_steps", 1)
        self.init_estimator = c.meta.get("init_estimator", "unrolled")
        if self.learned:
            # The online step's estimator: `meta.estimator` of one step ('unrolled'), by a
            # JVP (`OneStep`) or backpropagation (`Unrolled`) as `meta.method` says.
            online = bilevel.estimator_from_config(c.meta.estimator, window=1, episode_length=1)
            adalfl.check_online_estimator(online)
            adalfl.online_estimator(c.meta.method)  # an unknown method fails here, early
            self.offline_estimator = bilevel.estimator_from_config(
                self.init_estimator,
                window=self.init_inner_steps,
                episode_length=self.init_inner_steps,
                options=c.meta.get("estimator_options"),
            )
            adalfl.check_offline_estimator(self.offline_estimator, self.init_inner_steps)
        self.num_steps = self.init_steps + c.inner.steps
        # The end of the offline phase: kept, for other runs to start from (reproduce_images).
        self.keep_checkpoints = (self.init_steps,) if self.init_steps else ()
        if self.init_steps % self.eval_every:
            raise ValueError(
                f"meta.init_steps ({self.init_steps}) must be a multiple of eval.every "
                f"({self.eval_every}), so that an evaluation marks the end of the offline phase."
            )
        if c.meta.split not in ("train", "validation"):
            raise ValueError(f"meta.split must be 'train' or 'validation'; got {c.meta.split!r}.")
        has_validation = c.data.validation_size or c.data.get("validation_fraction", 0.0)
        if c.meta.split == "validation" and self.learned and not has_validation:
            raise ValueError(
                "meta.split='validation' needs a validation split: set "
                "data.validation_fraction (e.g. --config.data.validation_fraction=0.1) or "
                "data.validation_size, or use --config.meta.split=train."
            )
        self.select_every = c.meta.select_every if self.learned else 0
        if self.select_every:
            if not has_validation:
                raise ValueError(
                    "meta.select_every > 0 selects φ by its error on the validation split: "
                    "set data.validation_fraction (e.g. 0.1), or meta.select_every=0."
                )
            if self.init_steps % self.select_every or c.meta.select_steps <= 0:
                raise ValueError(
                    f"meta.select_every ({self.select_every}) must divide meta.init_steps "
                    f"({self.init_steps}) and meta.select_steps ({c.meta.select_steps}) must "
                    "be positive."
                )

        self.data = images.load_images(c.data) if data is None else data
        self.info = self.data.info
        augment = self.info.augment if c.data.augment == "default" else c.data.augment
        if augment not in images.AUGMENTATIONS:
            raise ValueError(
                f"Unknown augmentation {augment!r}; choose one of {images.AUGMENTATIONS}."
            )
        meta_augment = augment if c.meta.split == "train" else "none"

        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.replicated = sharding.replicated(self.mesh)
        self.batch_sharding = sharding.data_sharded(self.mesh)
        global_batch = c.data.batch_size
        sharding.check_batch_size(global_batch, self.mesh)
        sharding.check_batch_size(c.meta.batch_size, self.mesh, "meta batch size")
        sharding.check_batch_size(c.eval.batch_size, self.mesh, "evaluation batch size")

        dropout = None if c.model.dropout < 0 else c.model.dropout
        self.model = vision.make_model(
            c.model.name, self.info.num_classes, dropout=dropout, dtype=jnp.dtype(c.model.dtype)
        )
        self.optimizer = make_optimizer(c.inner.optimizer, differentiated=self.learned)
        self.lookahead = make_lookahead(c.meta.get("lookahead", "none"), c.inner.optimizer)
        self.meta_optimizer = make_optimizer(c.meta.optimizer)
        self.loss_net = learned_losses.make_loss_network(c.loss_net)
        loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self.learned_inner, self.ce_inner, self.outer = make_losses(
            self.model,
            self.info,
            augment,
            meta_augment,
            loss_fn,
            (grad_scale_mode(c.loss_net), c.loss_net.max_grad_ratio),
        )
        self.problem = bilevel.Problem(self.learned_inner, self.outer, self.optimizer)
        if self.learned:
            self.learner = adalfl.OnlineLearner(
                self.problem,
                self.meta_optimizer,
                adalfl.online_estimator(c.meta.method, self.lookahead),
            )
        self.key = jax.random.key(c.seed)
        self._streams: dict[str, tuple[int, Any]] = {}

        repl, data = self.replicated, self.batch_sharding
        self._init = self.jit(self.init_state, out_shardings=repl)
        donate = () if jax.default_backend() == "cpu" else (0,)  # CPU cannot donate
        shardings = dict(out_shardings=(repl, repl), donate_argnums=donate)
        self._lockstep = self.jit(
            self.lockstep_step, in_shardings=(repl, data, data, repl, repl), **shardings
        )
        self._plain_step = self.jit(self.plain_step, in_shardings=(repl, data, repl), **shardings)
        self._offline_step = self.jit(
            self.offline_step, in_shardings=(repl, data, data, repl), **shardings
        )
        self._eval_step = self.jit(self.eval_step, in_shardings=(repl, data), out_shardings=repl)
        self._curves = self.jit(self.loss_curves)
        self._select_init = self.jit(self._fresh_inner, out_shardings=repl)
        self._select_step = self.jit(
            self.select_step, in_shardings=(repl, repl, data, repl), out_shardings=repl
        )
        self._keep_best = self.jit(self.keep_best, out_shardings=repl)

        # The device path: the splits the streams read, resident on every device.
        splits = {self.stream(name)[0] for name in self.streams()}
        host = {s: self.host_split(s) for s in splits}
        nbytes = sum(x.nbytes + 4 * len(y) for x, y in host.values())
        self.on_device, reason = images.choose_on_device(
            c.data.get("on_device", "auto"),
            nbytes,
            c.data.get("on_device_budget_gib", 0.0),
            self.mesh.devices.flat[0],
        )
        # Steps per compiled program on the device path (None: a whole piece of a chunk).
        # XLA:CPU runs convolution gradients inside a loop (or any nested computation)
        # without its fast kernels, several times slower, so on a CPU each step is its own
        # program there (gathering its batch on the device) unless data.scan_steps says.
        cpu = self.mesh.devices.flat[0].platform == "cpu"
        self.scan_steps = c.data.get("scan_steps", 0) or (1 if cpu else None)
        per_call = f"scans of {self.scan_steps or 'all'} steps"
        self.batches = (  # recorded in the summary
            f"device: per-epoch jax.random permutations, {per_call} ({reason})"
            if self.on_device
            else f"host: per-epoch numpy permutations, one dispatch per step ({reason})"
        )
        # Where each step is a program of its own (the host path, or one step per scan),
        # a chunk cut anywhere runs the same programs on the same batches: the loop may
        # cut it to show progress (a CPU's offline phase is one long chunk).
        self.piece_steps = 1 if not self.on_device or self.scan_steps == 1 else None
        self.resident = None
        if self.on_device:
            put = functools.partial(jax.make_array_from_process_local_data, repl)
            self.resident = {
                s: {"image": put(np.asarray(x)), "label": put(np.asarray(y, np.int32))}
                for s, (x, y) in host.items()
            }
        self._indices = self.jit(self.piece_indices, static_argnums=(2, 3), out_shardings=repl)
        self._scan = self.jit(self.scan_chunk, static_argnums=(6, 7), **shardings)
        self._select_run = self.jit(self.select_run, static_argnums=6, out_shardings=repl)
        self._gather = self.jit(self.gather, out_shardings=data)

    # ---- pure functions -------------------------------------------------------------

    def _fresh_inner(self, key: PRNGKey) -> InnerState:
        params, model_state = vision.init_model(self.model, key, self.info.image_shape)
        return init_inner_state(params, self.optimizer, model_state)

    def init_state(self) -> TrainState:
        """θ₀ and φ₀ with their optimizer states."""
        inner = self._fresh_inner(jax.random.fold_in(self.key, ImageClassificationSeed.MODEL_INIT))
        phi = learned_losses.init_learned_loss(
            self.config.loss_net,
            jax.random.fold_in(self.key, ImageClassificationSeed.LOSS_INIT),
            self.info.num_classes,
        )
        state = TrainState(inner=inner, meta=init_meta_state(phi, self.meta_optimizer))
        if self.select_every:
            state = state.replace(
                best_meta_params=phi, best_error=jnp.asarray(NO_ERROR_YET, jnp.float32)
            )
        return state

    def lockstep_step(
        self, state: TrainState, batch: Batch, meta_batch: Batch, step: Array, offline: Array
    ) -> tuple[TrainState, dict]:
        """One AdaLFL iteration, from the carried θ or (offline) from a fresh one.

        `offline` (a traced bool) selects Algorithm 1's step (S_inner = 1: φ learns from a
        freshly initialised θ, which is then dropped) or Algorithm 2's (θ and φ both
        advance). Both are one compiled program, so the initialisation and the online
        phase share their compilation.
        """
        fresh_key, key = self._step_keys(step, offline)
        start = jax.lax.cond(offline, lambda: self._fresh_inner(fresh_key), lambda: state.inner)
        inner, meta, metrics = self.learner.step(state.meta, start, batch, meta_batch, key)
        metrics["train/update_norm"] = optax.global_norm(
            jax.tree.map(jnp.subtract, inner.params, start.params)
        )
        inner = jax.lax.cond(offline, lambda: state.inner, lambda: inner)
        return state.replace(inner=inner, meta=meta), metrics

    def _step_keys(self, step: Array, offline) -> tuple[PRNGKey, PRNGKey]:
        """(the fresh θ's key, the step's key) of lock-step or offline step `step`."""
        phase = jnp.where(offline, ImageClassificationSeed.OFFLINE, ImageClassificationSeed.ONLINE)
        return jax.random.split(jax.random.fold_in(jax.random.fold_in(self.key, phase), step))

    def offline_step(
        self, state: TrainState, batch: Batch, meta_batch: Batch, step: Array
    ) -> tuple[TrainState, dict]:
        """One offline ML³ step (Algorithm 1): with S_inner = 1 `lockstep_step`'s offline
        branch; with S_inner > 1, `meta.init_inner_steps` steps from a fresh θ on the
        step's batch (augmented afresh each step), differentiated by `meta.init_estimator`
        (`adalfl.offline_unroll_step`). θ is untouched."""
        if self.init_inner_steps == 1:
            return self.lockstep_step(state, batch, meta_batch, step, True)
        fresh_key, key = self._step_keys(step, True)
        batches = jax.tree.map(lambda x: jnp.stack([x] * self.init_inner_steps), batch)
        meta, metrics = adalfl.offline_unroll_step(
            state.meta,
            self._fresh_inner(fresh_key),
            batches,
            meta_batch,
            key,
            problem=self.problem,
            estimator=self.offline_estimator,
            meta_optimizer=self.meta_optimizer,
        )
        return state.replace(meta=meta), metrics

    def plain_step(self, state: TrainState, batch: Batch, step: Array) -> tuple[TrainState, dict]:
        """One model step on cross-entropy (baseline) or on the frozen ℓ_φ (ML³)."""
        key = jax.random.fold_in(jax.random.fold_in(self.key, ImageClassificationSeed.PLAIN), step)
        loss = self.learned_inner if self.config.algorithm == "ml3" else self.ce_inner
        inner, metrics = bilevel.inner_step(
            state.inner, state.meta.params, batch, key, inner_loss=loss, optimizer=self.optimizer
        )
        metrics["train/update_norm"] = optax.global_norm(
            jax.tree.map(jnp.subtract, inner.params, state.inner.params)
        )
        return state.replace(inner=inner), metrics

    def select_step(self, inner: InnerState, phi, batch: Batch, step: Array) -> InnerState:
        """One step of a selection run: a fresh model trained on the frozen ℓ_φ."""
        key = jax.random.fold_in(jax.random.fold_in(self.key, ImageClassificationSeed.SELECT), step)
        inner, _ = bilevel.inner_step(
            inner, phi, batch, key, inner_loss=self.learned_inner, optimizer=self.optimizer
        )
        return inner

    def keep_best(self, state: TrainState, error: Array) -> TrainState:
        """φ becomes the best φ if its selection run's error is the lowest so far."""
        best, best_error = adalfl.keep_best(
            state.best_meta_params, state.best_error, state.meta.params, error
        )
        return state.replace(best_meta_params=best, best_error=best_error)

    def init_phase_step(self, state, batch, meta_batch, step) -> tuple[TrainState, dict]:
        """Global step `step` < init_steps: one offline ML³ step (jitted). With S_inner = 1
        it is the lock-step program's offline branch, so both phases share a compilation."""
        if self.init_inner_steps == 1:
            return self._lockstep(state, batch, meta_batch, step, True)
        return self._offline_step(state, batch, meta_batch, step)

    def train_step(self, state, batch, meta_batch, step) -> tuple[TrainState, dict]:
        """Global step `step` ≥ init_steps: one model step of the algorithm (jitted)."""
        if self.config.algorithm == "adalfl":
            return self._lockstep(state, batch, meta_batch, step, False)
        return self._plain_step(state, batch, step)

    def scanned_step(self, offline: bool) -> str:
        """The pure step a scanned piece of the offline (or online) phase runs, as
        `init_phase_step` / `train_step` choose it: 'lockstep' (`lockstep_step`: both
        phases of AdaLFL, and an offline phase of S_inner = 1), 'offline' (`offline_step`,
        S_inner > 1) or 'plain' (`plain_step`)."""
        if offline:
            return "lockstep" if self.init_inner_steps == 1 else "offline"
        return "lockstep" if self.config.algorithm == "adalfl" else "plain"

    def uses_meta(self, offline: bool) -> bool:
        """Whether a step of the offline (or online) phase takes a meta batch."""
        return self.learned and (offline or self.config.algorithm == "adalfl")

    def streams(self) -> tuple[str, ...]:
        """The data streams the run reads."""
        return ("train",) + ("meta",) * self.learned + ("select",) * bool(self.select_every)

    def stream(self, name: str) -> tuple[str, int, int]:
        """(split, host-path seed, batch size) of stream 'train' (the model's batches),
        'meta' (the meta-objective's: the validation split, or with meta.split='train' the
        training images in another order) or 'select' (the selection runs')."""
        c = self.config
        if name == "train":
            return "train", c.seed + ImageClassificationSeedOffset.MODEL, c.data.batch_size
        if name == "select":
            return "train", c.seed + ImageClassificationSeedOffset.SELECT, c.meta.batch_size
        if c.meta.split == "train":  # the same images, in another order
            return "train", c.seed + ImageClassificationSeedOffset.META_ON_TRAIN, c.meta.batch_size
        return "validation", c.seed + ImageClassificationSeedOffset.MODEL, c.meta.batch_size

    def stream_indices(self, resident: dict, name: str, start: Array, num: int) -> Array:
        """int32 [num, B]: the device path's indices of batches start … start+num−1 of
        stream `name` into its split of `resident`, a pure function of (seed, step)."""
        split, _, batch_size = self.stream(name)
        key = jax.random.fold_in(self.key, _DATA_KEYS[name])
        num_examples = resident[split]["label"].shape[0]
        return images.device_batch_indices(key, num_examples, batch_size, start, num)

    def gather(self, split: dict, idx_B: Array) -> Batch:
        """The batch of examples `idx_B` of a resident split, split over the mesh."""
        idx_B = jax.lax.with_sharding_constraint(idx_B, self.batch_sharding)
        return {"image": split["image"][idx_B], "label": split["label"][idx_B]}

    def piece_indices(
        self, resident: dict, start: Array, num: int, names: tuple[str, ...]
    ) -> dict[str, Array]:
        """{stream: int32 [num, B]}: `stream_indices` of the streams `names` for steps
        start … start+num−1, computed once for a piece that runs as several programs."""
        return {n: self.stream_indices(resident, n, start, num) for n in names}

    def scan_chunk(
        self,
        state: TrainState,
        resident: dict,
        idx: dict[str, Array],
        offset: Array,
        start: Array,
        offline: Array,
        num: int,
        kind: str,
    ) -> tuple[TrainState, dict]:
        """Steps start … start+num−1 of one phase as one `lax.scan`: the steps of
        `init_phase_step` (offline) or `train_step`, each on batches gathered from the
        device-resident splits, at rows offset … offset+num−1 of `idx`
        (`piece_indices`). Metrics come back stacked [num].

        The body calls the pure step those two jit, `kind` (`scanned_step`), since a
        program compiled with `fast_compile`'s options cannot be called inside another;
        `offline` is traced, so that the phases of 'lockstep' share one program as the
        jitted step does. A test holds the scan to the loop of `step_loop`, which calls
        the jitted steps.
        """
        idx = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, offset, num), idx)

        def body(state, xs):
            t, idx_t = xs
            b = {n: self.gather(resident[self.stream(n)[0]], i) for n, i in idx_t.items()}
            if kind == "lockstep":
                return self.lockstep_step(state, b["train"], b["meta"], t, offline)
            if kind == "offline":
                return self.offline_step(state, b["train"], b["meta"], t)
            return self.plain_step(state, b["train"], t)

        xs = (start + jnp.arange(num, dtype=jnp.int32), idx)
        if num == 1:  # no loop: a step at the top level of its program (see `scan_steps`)
            state, metrics = body(state, jax.tree.map(lambda x: x[0], xs))
            return state, jax.tree.map(lambda x: x[None], metrics)
        return jax.lax.scan(body, state, xs)

    def select_run(
        self,
        inner: InnerState,
        phi,
        resident: dict,
        idx: dict[str, Array],
        offset: Array,
        start: Array,
        num: int,
    ) -> InnerState:
        """Steps start … start+num−1 of a selection run (`select_step`) as one `lax.scan`
        on the device path (one plain step for num = 1), at rows offset … offset+num−1
        of `idx` (`piece_indices` of the 'select' stream)."""
        idx = jax.lax.dynamic_slice_in_dim(idx["select"], offset, num)

        def body(inner, xs):
            i, idx_B = xs
            return self.select_step(inner, phi, self.gather(resident["train"], idx_B), i), None

        xs = (start + jnp.arange(num, dtype=jnp.int32), idx)
        if num == 1:
            return body(inner, jax.tree.map(lambda x: x[0], xs))[0]
        return jax.lax.scan(body, inner, xs)[0]

    def eval_step(self, inner: InnerState, batch: Batch) -> dict:
        """Sums of cross-entropy, correct predictions and examples over a masked batch."""
        x = images.preprocess(batch["image"], self.info, augment="none", key=None)
        logits, _ = vision.apply_model(self.model, inner.params, inner.model_state, x, train=False)
        logits = logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = jnp.argmax(logits, -1) == batch["label"]
        mask = batch["mask"]
        return {"ce": jnp.sum(ce * mask), "correct": jnp.sum(correct * mask), "n": jnp.sum(mask)}

    def loss_curves(self, phi) -> dict:
        """ℓ_φ(y, p) on a grid of predicted probabilities p, for y = 1 and y = 0."""
        p = jnp.linspace(0.0, 1.0, CURVE_POINTS)
        true = jnp.stack([jnp.ones_like(p), p], -1)
        wrong = jnp.stack([jnp.zeros_like(p), p], -1)
        ce = 0.0
        if self.config.loss_net.get("ce_term", False):  # the per-output loss, CE included
            ce = -jnp.log(jnp.maximum(p, learned_losses.PROBABILITY_FLOOR))
        return {
            "curve/true_class": self.loss_net.apply(phi, true)[:, 0] + ce,
            "curve/wrong_class": self.loss_net.apply(phi, wrong)[:, 0],
        }

    # ---- the impure edge: data streams, chunks, evaluation, figures -----------------

    def init(self) -> TrainState:
        """The initial state, replicated over the mesh."""
        return self._init()

    def _at(self, value: int | bool) -> jax.Array:
        """A step number (int32) or a phase flag (bool), replicated over the mesh."""
        dtype = np.bool_ if isinstance(value, bool) else np.int32
        return sharding.put(np.asarray(value, dtype), self.replicated)

    def host_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of split 'train' or 'validation' on the host."""
        if split == "train":
            return self.data.train_images, self.data.train_labels
        return self.data.val_images, self.data.val_labels

    def batch_at(self, name: str, step: int):
        """Batch `step` of stream `name` ('train', 'meta' or 'select'), on the devices.

        On the device path it is gathered there, from the indices a scanned chunk would
        use (`stream_indices`). On the host path consecutive calls reuse one prefetching
        iterator; any other step starts a new one there, since batch t is a pure function
        of (seed, t).
        """
        if self.on_device:
            if name not in self.streams():
                raise ValueError(f"This run reads the streams {self.streams()}, not {name!r}.")
            idx_B = self.stream_indices(self.resident, name, np.int32(step), 1)[0]
            return self._gather(self.resident[self.stream(name)[0]], idx_B)
        pos, it = self._streams.get(name, (None, None))
        if pos != step:
            if it is not None:
                it.close()  # stops its prefetch thread
            split, seed, batch_size = self.stream(name)
            x, y = self.host_split(split)
            it = images.prefetch_to_device(
                images.host_batches(x, y, batch_size, seed, step),
                self.batch_sharding,
                self.config.data.prefetch,
            )
        self._streams[name] = (step + 1, it)
        return next(it)

    def train_chunk(self, state: TrainState, start: int, num: int) -> tuple[TrainState, dict]:
        """Steps start … start+num−1, cut where the offline phase ends and at its selection
        points (`select`). On the device path each piece runs as compiled scans of
        `scan_steps` steps (`scan_chunk`; by default the whole piece, one step on a CPU)
        and a remainder: one program per phase and length. On the host path a loop of
        jitted steps."""
        pieces = []
        t, stop = start, start + num
        while t < stop:
            offline = t < self.init_steps
            end = min(stop, self.init_steps) if offline else stop
            if offline and self.select_every:
                end = min(end, (t // self.select_every + 1) * self.select_every)
            if self.on_device:
                kind = self.scanned_step(offline)
                names = ("train",) if kind == "plain" else ("train", "meta")
                idx = self._indices(self.resident, self._at(t), end - t, names)
                for s in range(t, end, self.scan_steps or end - t):
                    n = min(self.scan_steps or end - t, end - s)
                    at = (self.resident, idx, self._at(s - t), self._at(s), self._at(offline))
                    state, metrics = self._scan(state, *at, n, kind)
                    pieces.append(metrics)
            else:
                state, metrics = self.step_loop(state, t, end - t, offline)
                pieces.append(metrics)
            if offline and self.select_every and end % self.select_every == 0:
                state = self.select(state, end)
            t = end
        if len(pieces) == 1:
            return state, pieces[0]
        return state, jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)

    def step_loop(
        self, state: TrainState, start: int, num: int, offline: bool
    ) -> tuple[TrainState, dict]:
        """Steps start … start+num−1 of one phase, one jitted step each, on `batch_at`'s
        batches (the host path; on the device path the same steps as `scan_chunk`)."""
        step_fn = self.init_phase_step if offline else self.train_step
        rows = []
        for t in range(start, start + num):
            batch = self.batch_at("train", t)
            meta_batch = self.batch_at("meta", t) if self.uses_meta(offline) else None
            state, metrics = step_fn(
                state, batch, meta_batch, sharding.put(np.int32(t), self.replicated)
            )
            rows.append(metrics)
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

    def select(self, state: TrainState, step: int) -> TrainState:
        """Best-φ selection at offline step `step`: a fresh model trained
        `meta.select_steps` steps on the current ℓ_φ (the same initial θ and batches at
        every selection point), its error on the validation split; the φ of the lowest
        error so far is kept, and at the end of the offline phase becomes φ."""
        c = self.config
        inner = self._select_init(jax.random.fold_in(self.key, ImageClassificationSeed.SELECT_INIT))
        if self.on_device:
            num = c.meta.select_steps
            idx = self._indices(self.resident, self._at(0), num, ("select",))
            for s in range(0, num, self.scan_steps or num):
                n = min(self.scan_steps or num, num - s)
                at = (self.resident, idx, self._at(s), self._at(s))
                inner = self._select_run(inner, state.meta.params, *at, n)
        else:
            for i in range(c.meta.select_steps):
                batch = self.batch_at("select", i)
                inner = self._select_step(
                    inner, state.meta.params, batch, sharding.put(np.int32(i), self.replicated)
                )
        error = self.error_rate(inner, self.data.val_images, self.data.val_labels)[0]
        state = self._keep_best(state, sharding.put(np.float32(error), self.replicated))
        if step == self.init_steps:
            meta = state.meta.replace(params=state.best_meta_params)
            state = state.replace(meta=meta)
        return state

    def error_rate(self, inner: InnerState, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(error, mean cross-entropy) of θ on the images `x` with labels `y`."""
        batches = images.eval_batches(x, y, self.config.eval.batch_size)
        totals = None
        for batch in images.prefetch_to_device(
            batches, self.batch_sharding, self.config.data.prefetch
        ):
            out = self._eval_step(inner, batch)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        totals = jax.device_get(totals)
        n = float(totals["n"])
        return 1.0 - float(totals["correct"]) / n, float(totals["ce"]) / n

    def evaluate(self, state: TrainState, step: int) -> dict:
        metrics = {}
        if self.learned:
            metrics.update(self._curves(state.meta.params))
        if step < self.init_steps:
            return metrics  # θ is untouched during the offline phase
        error, loss = self.error_rate(state.inner, self.data.test_images, self.data.test_labels)
        metrics.update(
            {
                "eval/model_step": step - self.init_steps,
                "eval/test_error": error,
                "eval/test_loss": loss,
            }
        )
        if len(self.data.val_labels):  # for model selection (e.g. a baseline's learning rate)
            metrics["eval/val_error"] = self.error_rate(
                state.inner, self.data.val_images, self.data.val_labels
            )[0]
        if self.select_every and step == self.init_steps:
            metrics["eval/selected_error"] = state.best_error
        return metrics

    def estimators(self) -> tuple[str, ...]:
        """`meta.estimator` (the online phase's) and the offline phase's
        `meta.init_estimator`; none for the baseline."""
        if not self.learned:
            return ()
        return (self.config.meta.estimator, self.init_estimator)

    def phase(self, step: int) -> str:
        """'offline ML³' for the offline phase's steps, else the algorithm's name."""
        return "offline ML³" if step < self.init_steps else self.config.algorithm

    def check_divergence(self, metrics: dict, step: int) -> tuple[int, str] | None:
        """Diverged: test error at chance (≥ 1 − 1.5/classes, or `divergence.max_test_error`)
        after `divergence.check_after` model steps, or the learned loss's gradient ratio
        (`train/grad_ratio`) above `divergence.max_grad_ratio`."""
        d = self.config.divergence
        if not d.stop:
            return None
        if "eval/test_error" in metrics:
            bound = d.max_test_error if d.max_test_error > 0 else 1 - 1.5 / self.info.num_classes
            model_step = metrics["eval/model_step"]
            if model_step >= max(d.check_after, 1) and metrics["eval/test_error"] >= bound:
                return step, (
                    f"Diverged: test error {metrics['eval/test_error']:.3f} >= {bound:.3f} "
                    f"(chance level) at model step {model_step} (step {step})."
                )
        ratio = metrics.get("train/grad_ratio")
        if ratio is not None and d.max_grad_ratio > 0:
            over = np.flatnonzero(np.asarray(ratio) > d.max_grad_ratio)
            if over.size:
                at = step + int(over[0]) + 1
                return at, (
                    f"Diverged: the learned loss's gradient is {float(ratio[over[0]]):.3g} times "
                    f"cross-entropy's (train/grad_ratio > divergence.max_grad_ratio = "
                    f"{d.max_grad_ratio:g}) at step {at}."
                )
        return None

    def finalize(self, state: TrainState, history: list[dict], workdir: str) -> dict:
        evals = [r for r in history if "eval/test_error" in r]
        final = evals[-1]
        c = self.config
        label = f"{c.algorithm} ({c.model.name}, {c.data.name})"
        plots.image_training_curves({label: history}, os.path.join(workdir, "plots", "curves.png"))
        summary = {
            "test_error": mean_std([final["eval/test_error"]]),
            "test_loss": mean_std([final["eval/test_loss"]]),
            "best_test_error": mean_std([min(r["eval/test_error"] for r in evals)]),
            "batches": self.batches,
        }
        if "eval/val_error" in final:  # for model selection (reproduce_images --ce_search)
            summary["val_error"] = mean_std([final["eval/val_error"]])
        if self.learned:
            plots.learned_loss_shapes(
                history, self.init_steps, os.path.join(workdir, "plots", "loss_shapes.png")
            )
            plots.gradient_ratios(
                {label: history}, self.init_steps, os.path.join(workdir, "plots", "grad_ratio.png")
            )
            learned_losses.save_learned_loss(
                os.path.join(workdir, "learned_loss"),
                c.loss_net,
                state.meta.params,
                **self.loss_description(),
            )
        return summary

    def loss_description(self) -> dict[str, Any]:
        """How the saved ℓ_φ must be fed, and what it was meta-trained for.

        ML³'s offline phase meta-trains it for episodes of S_inner steps from a fresh θ
        (`meta.init_inner_steps`); AdaLFL differentiates one inner step at a time from the
        carried θ, so its φ followed one training run of `inner.steps` steps.
        """
        c = self.config
        return {
            "y": "one-hot labels",
            "y_hat": "softmax probabilities",
            "extra": (),
            "inner_optimizer": c.inner.optimizer.to_dict(),
            "inner_steps": c.inner.steps if c.algorithm == "adalfl" else self.init_inner_steps,
        }
