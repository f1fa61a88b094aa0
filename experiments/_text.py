"""The base of the text self-training experiments (`self_loss_lm`, `gist_lm`).

Both run a first phase that trains θ (Phase 1's meta-training, Phase G's bottleneck) for
`first_steps` steps, then Phase 2, where θ descends a loss it produces itself while a
control copy, forked at the end of the first phase, takes the same number of steps on
the true cross-entropy of the same batches. `TextSelfTraining` holds what they share: the
text data on the device, the cross-entropies, the control's step, the logged steps'
measurements with the reward-hacking detector (`hacking.detector_update`), the detector's
actions and the protocol `runtime.loop` drives; a subclass supplies its two kinds of
step. The detector's action is 'continue' (record only), 'stop' (θ frozen from the
detection on), 'rollback' (θ back to its best-validation copy) or 'meta'
(`detector.meta_steps` more first-phase steps, then what Phase 2's loss reads refreshed
from θ, as at the end of the first phase).
"""

import abc
import enum
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from metalearn import hacking
from metalearn.algorithms import self_loss
from metalearn.models import transformer
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import Experiment, scan_steps
from metalearn.tasks import text
from metalearn.types import Array, Params

ACTIONS = ("continue", "stop", "rollback", "meta")


@flax.struct.dataclass
class TextState:
    """θ and its Phase 2 optimizer, the control, the detector and its bookkeeping; a
    subclass's state adds what its losses need."""

    params: Params
    inner_opt: optax.OptState  # Phase 2's optimizer
    control: Params  # θ trained on the true cross-entropy from the end of the first phase
    control_opt: optax.OptState
    best: Params  # θ at the best validation cross-entropy of Phase 2 (for rollback)
    detector: hacking.Detector
    val_ce: Array  # the last logged validation cross-entropy of θ and the control
    control_val_ce: Array
    meta_left: Array  # first-phase steps still to run after a 'meta' action
    stopped: Array  # a 'stop' action froze θ
    rollbacks: Array
    detect_step: Array  # the step of the first detection (−1 before)
    onset_step: Array  # the last improvement before it, where the hack began (−1 before)
    detections: Array  # detections so far (one per Phase 2 cycle with the 'meta' action)


class TextSelfTraining(Experiment):
    """Two phases on device-resident text (see the module docstring); driven by
    `runtime.loop`. One device: these models are small, so `mesh` is not used.

    A subclass sets `STREAMS` (its run key's streams: it has `INIT`, θ's initialisation,
    and `PHASE2`, Phase 2's batches), `FIRST` and `FIRST_PHASE`, builds `self.model` and
    `self.self_opt` (θ's optimizer on its own loss) and implements `_initial_state`,
    `_first_step` and `_self_step`; `MEASURED` with `_measure`, `_record_detection` and
    `_step_metrics` are optional.
    """

    STREAMS: type[enum.IntEnum]
    FIRST: str  # the config key of the first phase's length, for messages
    FIRST_PHASE: str  # the first phase's name, for progress lines
    MEASURED: tuple[str, ...] = ()  # state fields a logged step measures (`_measure`)
    model: transformer.Transformer
    self_opt: optax.GradientTransformation

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None, first_steps: int):
        super().__init__(config, mesh=mesh)
        c = config
        if c.detector.action not in ACTIONS:
            raise ValueError(f"Unknown detector.action {c.detector.action!r}; choose {ACTIONS}.")
        if c.detector.action == "meta" and c.detector.meta_steps < 1:
            raise ValueError("detector.action='meta' needs detector.meta_steps >= 1.")
        if first_steps < 1 or c.phase2.steps < 0:
            raise ValueError(f"{self.FIRST} must be >= 1 and phase2.steps >= 0.")
        for name, value in (("eval.every", c.eval.every), (self.FIRST, first_steps)):
            if value % c.log_every:
                raise ValueError(
                    f"{name} ({value}) must be a multiple of log_every ({c.log_every})."
                )
        self.first_steps = first_steps
        self.num_steps = first_steps + c.phase2.steps
        # The action's counts (`diag/rollbacks`, `diag/detections`, and in the summary)
        # where the detector acts; a subclass whose rows have always had them sets True.
        self.log_actions = c.detector.action != "continue"
        self.context = c.model.context
        data = text.load_text(c.data)
        text.check_length(data, self.context)
        self.tokens = {s: jnp.asarray(data.split(s)) for s in text.SPLITS}
        self.diag_windows = jnp.asarray(
            text.fixed_windows(data.validation, c.diagnostics.val_windows, self.context)
        )
        self.eval_windows = {
            s: jnp.asarray(text.fixed_windows(data.split(s), c.eval.windows, self.context))
            for s in ("validation", "test")
        }
        self.control_opt = make_optimizer(c.inner.optimizer)
        self.key = jax.random.key(c.seed)
        self._chunk = self.jit(self._train_chunk, static_argnums=2)
        self._eval = self.jit(self._evaluate)
        self._init = self.jit(self._init_state)

    # ---- what a subclass provides ---------------------------------------------------

    @abc.abstractmethod
    def _initial_state(self, params: Params, fields: dict) -> TextState:
        """The state at step 0 from θ and the shared `fields` (`TextState`'s)."""

    @abc.abstractmethod
    def _first_step(self, state: TextState, t: Array) -> tuple[TextState, dict]:
        """First-phase step t: θ's update, then `_end_first_step`; `(state, metrics)`
        (the base adds `phase` and Phase 2's detector metrics, zero here)."""

    @abc.abstractmethod
    def _self_step(
        self, state: TextState, t: Array, key: Array, tokens: Array
    ) -> tuple[TextState, dict, dict]:
        """θ's Phase 2 step on its own loss of `tokens` (θ unchanged where stopped:
        `_unless_stopped`); `(state, aux, metrics)`, `aux` with the detector's inputs
        `pred_loss` and `train_ce` (logged as `self/pred_loss` and `true/train_ce`)."""

    def _measure(self, state: TextState) -> dict:
        """The `MEASURED` fields of a logged Phase 2 step that ends in `state`."""
        return {}

    def _record_detection(self, state: TextState, first: Array) -> TextState:
        """What the state keeps of the run's first detection (`first`: this step)."""
        return state

    def _step_metrics(self, state: TextState, metrics: dict) -> dict:
        """Metrics of every step besides those the base logs."""
        return {}

    # ---- pure pieces ---------------------------------------------------------------

    def _ce(self, params: Params, windows: Array) -> Array:
        return self_loss.true_loss(params, {}, windows, None, model=self.model)

    def _eval_ce(self, params: Params, windows: Array) -> Array:
        """Mean cross-entropy over many windows (`text.mean_over_windows`)."""
        return text.mean_over_windows(lambda w: self._ce(params, w), windows)

    def _batch(self, key, split="train", num=None) -> Array:
        c = self.config
        draw = lambda k: text.windows(k, self.tokens[split], c.data.batch_size, self.context)  # noqa: E731
        return draw(key) if num is None else jax.vmap(draw)(jax.random.split(key, num))

    def _init_state(self) -> TextState:
        c = self.config
        params = transformer.init_transformer(
            self.model, jax.random.fold_in(self.key, self.STREAMS.INIT), self.context
        )
        val = self._ce(params, self.diag_windows)
        fields = {
            "params": params,
            "inner_opt": self.self_opt.init(params),
            "control": params,
            "control_opt": self.control_opt.init(params),
            "best": params,
            "detector": hacking.init_detector(
                c.detector.window, val, jnp.asarray(self.first_steps)
            ),
            "val_ce": val,
            "control_val_ce": val,
            "meta_left": jnp.zeros((), jnp.int32),
            "stopped": jnp.zeros((), bool),
            "rollbacks": jnp.zeros((), jnp.int32),
            "detect_step": jnp.full((), -1, jnp.int32),
            "onset_step": jnp.full((), -1, jnp.int32),
            "detections": jnp.zeros((), jnp.int32),
        }
        return self._initial_state(params, fields)

    def _end_first_step(
        self, state: TextState, t: Array, params: Params, measure: Callable[[], dict] = dict
    ) -> tuple[TextState, Callable]:
        """The bookkeeping of first-phase step t, which moved θ to `params`.

        A logged step measures θ's validation cross-entropy and `measure()` (the
        `MEASURED` fields). At the handover to Phase 2 (the first phase's last step, or a 'meta'
        action's) θ becomes the best copy and the Phase 2 optimizer and the detector
        start afresh; at the first handover the control forks from θ.

        Returns:
          The state and `pick(new, old)`: `new` at the handover, else `old`, for the
          subclass's own fields.
        """
        c = self.config
        meta_left = jnp.maximum(state.meta_left - 1, 0)
        handover = (t == self.first_steps - 1) | (state.meta_left == 1)
        initial = t == self.first_steps - 1
        pick = lambda new, old, cond=handover: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(cond, a, b), new, old
        )
        logged = ((t + 1) % c.log_every == 0) | handover
        val, measured = jax.lax.cond(
            logged,
            lambda: (self._ce(params, self.diag_windows), measure()),
            lambda: (state.val_ce, self._measured(state)),
        )
        state = state.replace(
            params=params,
            control=pick(params, state.control, initial),
            control_opt=pick(self.control_opt.init(params), state.control_opt, initial),
            inner_opt=pick(self.self_opt.init(params), state.inner_opt),
            best=pick(params, state.best),
            detector=pick(hacking.init_detector(c.detector.window, val, t + 1), state.detector),
            val_ce=val,
            control_val_ce=jnp.where(initial, val, state.control_val_ce),
            meta_left=meta_left,
            **measured,
        )
        return state, pick

    def _measured(self, state: TextState) -> dict:
        """The `MEASURED` fields as they are (what a step that is not logged keeps)."""
        return {name: getattr(state, name) for name in self.MEASURED}

    def _unless_stopped(self, state: TextState, params: Params) -> Params:
        """`params`, or θ as it was where a 'stop' action froze it."""
        return jax.tree.map(lambda a, b: jnp.where(state.stopped, b, a), params, state.params)

    def _phase2(self, state: TextState, t: Array) -> tuple[TextState, dict]:
        c = self.config
        key = jax.random.fold_in(jax.random.fold_in(self.key, self.STREAMS.PHASE2), t)
        tokens = self._batch(key)
        new, aux, metrics = self._self_step(state, t, key, tokens)
        ctrl_grads = jax.grad(self._ce)(state.control, tokens)
        ctrl_updates, control_opt = self.control_opt.update(
            ctrl_grads, state.control_opt, state.control
        )
        control = optax.apply_updates(state.control, ctrl_updates)

        logged = (t + 1) % c.log_every == 0
        val, control_val, measured = jax.lax.cond(
            logged,
            lambda: (
                self._ce(new.params, self.diag_windows),
                self._ce(control, self.diag_windows),
                self._measure(new),
            ),
            lambda: (state.val_ce, state.control_val_ce, self._measured(state)),
        )
        det, hacked, improved, corr = hacking.detector_update(
            state.detector,
            aux["pred_loss"],
            aux["train_ce"],
            val,
            t + 1,
            tolerance=c.detector.tolerance,
        )
        det = jax.tree.map(lambda a, b: jnp.where(logged, a, b), det, state.detector)
        hacked, improved = hacked & logged & ~state.stopped, improved & logged
        best = jax.tree.map(lambda a, b: jnp.where(improved, a, b), new.params, state.best)
        new_detection = (det.detected_at >= 0) & (state.detector.detected_at < 0)
        first = new_detection & (state.detect_step < 0)
        new = self._record_detection(new.replace(best=best), first)
        new = new.replace(
            detect_step=jnp.where(first, t + 1, state.detect_step),
            onset_step=jnp.where(first, det.onset, state.onset_step),
            detections=state.detections + new_detection.astype(jnp.int32),
            control=control,
            control_opt=control_opt,
            detector=det,
            val_ce=val,
            control_val_ce=control_val,
            **measured,
        )
        new = self._act(new, hacked, t)
        return new, {
            **metrics,
            "phase": jnp.full((), 2, jnp.int32),
            "self/pred_loss": aux["pred_loss"],
            "true/train_ce": aux["train_ce"],
            "diag/rank_corr": corr,
            "diag/hacked": hacked.astype(jnp.int32),
        }

    def _act(self, state: TextState, hacked: Array, t: Array) -> TextState:
        """The detector's action on a detection at step t + 1."""
        c = self.config
        action = c.detector.action
        if action == "stop":
            return state.replace(stopped=state.stopped | hacked)
        if action == "rollback":
            pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(hacked, x, y), a, b)  # noqa: E731
            fresh = hacking.restart_detector(state.detector, t + 1)
            return state.replace(
                params=pick(state.best, state.params),
                inner_opt=pick(self.self_opt.init(state.best), state.inner_opt),
                detector=pick(fresh, state.detector),
                rollbacks=state.rollbacks + hacked.astype(jnp.int32),
            )
        if action == "meta":
            return state.replace(
                meta_left=jnp.where(hacked, c.detector.meta_steps, state.meta_left)
            )
        return state

    def _step(self, state: TextState, t: Array) -> tuple[TextState, dict]:
        def first(s):
            s, m = self._first_step(s, t)
            return s, {
                **m,
                "phase": jnp.ones((), jnp.int32),
                "diag/rank_corr": jnp.zeros(()),
                "diag/hacked": jnp.zeros((), jnp.int32),
            }

        if self.config.phase2.steps:
            in_first = (t < self.first_steps) | (state.meta_left > 0)
            state, metrics = jax.lax.cond(in_first, first, lambda s: self._phase2(s, t), state)
        else:  # the first phase alone: no Phase 2 to compile
            state, metrics = first(state)
        onset = state.onset_step
        metrics.update(
            {
                "true/val_ce": state.val_ce,
                "control/val_ce": state.control_val_ce,
                "diag/steps_to_hack": jnp.where(onset >= 0, onset - self.first_steps, -1),
                **self._step_metrics(state, metrics),
            }
        )
        if self.log_actions:
            metrics.update({"diag/rollbacks": state.rollbacks, "diag/detections": state.detections})
        return state, metrics

    def _train_chunk(self, state, start, num):
        return scan_steps(self._step, state, start, num)

    def _evaluate(self, state: TextState) -> dict[str, Array]:
        windows = self.eval_windows["validation"]
        return {
            "eval/val_ce": self._eval_ce(state.params, windows),
            "eval/control_val_ce": self._eval_ce(state.control, windows),
        }

    # ---- the summary -----------------------------------------------------------------

    def test_ce(self, state: TextState) -> float:
        """θ's mean cross-entropy on the test windows."""
        return float(self._eval_ce(state.params, self.eval_windows["test"]))

    def detector_summary(self, state: TextState) -> dict:
        """The first detection's horizons in Phase 2 steps (None without one), and the
        action's counts where they are logged."""
        onset, detected = int(state.onset_step), int(state.detect_step)
        start = self.first_steps
        out = {
            "steps_to_hack": onset - start if onset >= 0 else None,
            "hack_detected_at": detected - start if detected >= 0 else None,
            "phase2_steps": self.config.phase2.steps,
        }
        if self.log_actions:
            out.update({"rollbacks": int(state.rollbacks), "detections": int(state.detections)})
        return out

    def phase2_summary(self, history: list[dict]) -> dict:
        """`hacking.phase2_summary` of this run's rows with its detector's settings."""
        d = self.config.detector
        return hacking.phase2_summary(
            history,
            self.first_steps,
            d.degrade_margin,
            tolerance=d.tolerance,
            window=d.window,
        )

    # ---- the runtime.loop protocol ----------------------------------------------------

    def init(self) -> TextState:
        return self._init()

    def train_chunk(self, state, start: int, num: int):
        return self._chunk(state, jnp.asarray(start, jnp.int32), num)

    def evaluate(self, state, step: int) -> dict[str, Any]:
        return self._eval(state)

    def phase(self, step: int) -> str:
        # A 'meta' action returns to the first phase inside Phase 2; the state says when.
        return self.FIRST_PHASE if step < self.first_steps else "Phase 2 (self-training)"
