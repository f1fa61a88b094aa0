"""The gist-token language-model experiment: the bottleneck phase, then self-training on
a loss in gist space (research plans 2 and 3; `configs/gist_lm.py`).

Global step t is a Phase G step for t < `phase_g.steps` and a Phase 2 step after it:

- Phase G (`gist.bottleneck_loss`): Adam on the next-token cross-entropy of windows laid
  out as [context][k gists][chunk] under the mask `gist.mode` ('gist', or the controls
  'positive' and 'negative').
- Phase 2, plan 2: θ ← θ − α ∇ `gist.gist_self_loss`, the encoder a copy of θ frozen at
  the end of Phase G or its exponential moving average; plan 3: the same loss between
  E(x̂) and E(x̂ ⊕ x) with the encoder φ learned in lock-step (`adalfl.lockstep`: the
  one-step meta-gradient of the cross-entropy of a `meta.split` batch at θ_{t+1}).
  A control copy of θ, forked at the end of Phase G, takes the same number of steps on
  the true cross-entropy of the same batches. θ never sees the true loss in Phase 2.

Every logged step records the gist loss (`self/pred_loss`), the true train and
validation cross-entropies of θ and the control's validation cross-entropy (in nats;
the summary also gives bits per byte), the Spearman correlation of the per-sequence gist
loss with the per-sequence cross-entropy over the batch (`gist/rank_corr`), and the
collapse of the gist space (`gist.collapse`) for the encodings of the observed chunks and
of the model's own continuations of the diagnostic windows. The reward-hacking detector
of plan 1 (`hacking.detector_update`, action 'continue') dates `steps_to_hack`, and
`steps_to_degrade` has plan 1's definition, so the plans compare in one table
(`experiments.sweep_gist`).

Everything runs in one jitted `lax.scan` per chunk; the batches of step t are a pure
function of (seed, t), so a resumed run is bit-identical.
"""

import functools
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from metalearn import hacking, plots
from metalearn.algorithms import adalfl, gist, self_loss
from metalearn.models import transformer
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import InnerState, MetaState
from metalearn.streams import GistLM as Stream
from metalearn.streams import GistLMPhase2 as Phase2Stream
from metalearn.tasks import text
from metalearn.types import Array, Params

PLANS = ("plan2", "plan3", "bottleneck")
ENCODERS = ("frozen", "ema")
COLLAPSE = ("gist/mean_cosine", "gist/effective_rank")


@flax.struct.dataclass
class GistState:
    """θ with its two optimizer states, the encoder, the control, and the detector."""

    params: Params
    g_opt: optax.OptState  # Phase G's optimizer
    inner_opt: optax.OptState  # Phase 2's optimizer
    encoder: Params  # frozen copy, EMA of θ, or (plan 3) the learned φ
    meta_opt: optax.OptState  # plan 3: the encoder's optimizer
    control: Params  # θ trained on the true cross-entropy from the end of Phase G
    control_opt: optax.OptState
    detector: hacking.Detector
    val_ce: Array
    control_val_ce: Array
    diag: dict  # the last logged collapse diagnostics


class GistLM(Experiment):
    """The experiment; driven by `runtime.loop` (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh)
        c = config
        g = c.gist
        if g.plan not in PLANS:
            raise ValueError(f"Unknown gist.plan {g.plan!r}; choose one of {PLANS}.")
        if g.encoder not in ENCODERS:
            raise ValueError(f"Unknown gist.encoder {g.encoder!r}; choose one of {ENCODERS}.")
        if g.plan == "plan3" and g.encoder != "frozen":
            raise ValueError(
                "Plan 3 learns its encoder by the meta-gradient; gist.encoder applies to plan 2: "
                "leave it 'frozen' (the default) with plan3."
            )
        if c.phase_g.steps < 1 or c.phase2.steps < 0:
            raise ValueError("phase_g.steps must be >= 1 and phase2.steps >= 0.")
        if (g.plan == "bottleneck") != (c.phase2.steps == 0):
            raise ValueError(
                "gist.plan='bottleneck' runs Phase G alone: it needs phase2.steps=0, and "
                "plans 2 and 3 need phase2.steps >= 1."
            )
        for name, value in (("eval.every", c.eval.every), ("phase_g.steps", c.phase_g.steps)):
            if value % c.log_every:
                raise ValueError(
                    f"{name} ({value}) must be a multiple of log_every ({c.log_every})."
                )
        self.context = c.model.context
        if not 2 <= g.context <= self.context - 1:
            raise ValueError(
                f"gist.context ({g.context}) is the compressed part of a window of "
                f"{self.context + 1} tokens: it must be in [2, {self.context - 1}]."
            )
        self.spec = gist.Spec(
            k=g.k,
            chunk=g.chunk,
            path=g.path,
            target="output_and_observed" if g.plan == "plan3" else "observed",
        )
        if g.chunk > self.context:
            raise ValueError(
                f"gist.chunk ({g.chunk}) exceeds the model's context ({self.context})."
            )
        self.num_steps = c.phase_g.steps + c.phase2.steps
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
        self.model = transformer.make_transformer(c.model, self.context)
        self.g_opt = make_optimizer(c.phase_g.optimizer)
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=g.plan == "plan3")
        self.control_opt = make_optimizer(c.inner.optimizer)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.bottleneck = functools.partial(
            gist.bottleneck_loss, model=self.model, k=g.k, context=g.context, mode=g.mode
        )
        self.self_loss = functools.partial(gist.gist_self_loss, model=self.model, spec=self.spec)
        self.key = jax.random.key(c.seed)
        self._chunk = self.jit(self._train_chunk, static_argnums=2)
        self._eval = self.jit(self._evaluate)
        self._init = self.jit(self._init_state)
        self._chunk_ce = self.jit(self._held_out_chunk_ce, static_argnums=1)

    # ---- pure pieces ---------------------------------------------------------------

    def _ce(self, params: Params, windows: Array) -> Array:
        return self_loss.true_loss(params, {}, windows, None, model=self.model)

    def _eval_ce(self, params: Params, windows: Array) -> Array:
        """Mean cross-entropy over many windows (`text.mean_over_windows`)."""
        return text.mean_over_windows(lambda w: self._ce(params, w), windows)

    def _diagnostics(self, params: Params, encoder: Params) -> dict[str, Array]:
        """Collapse of the gist space on the diagnostic windows: the encodings of their
        observed last chunks and of the model's own (soft) continuations of them."""
        windows = self.diag_windows
        k, chunk = self.spec.k, self.spec.chunk
        observed = gist.encode(self.model, encoder, windows[:, -chunk:], k)
        logits, _ = self.model.apply({"params": params}, windows[:, :-1])
        own = gist.encode(self.model, encoder, jax.nn.softmax(logits[:, -chunk:]), k)
        out = gist.collapse(observed)
        out.update({k.replace("gist/", "gist/output_"): v for k, v in gist.collapse(own).items()})
        return out

    def _init_state(self) -> GistState:
        c = self.config
        params = transformer.init_transformer(
            self.model, jax.random.fold_in(self.key, Stream.INIT), self.context
        )
        val = self._ce(params, self.diag_windows)
        return GistState(
            params=params,
            g_opt=self.g_opt.init(params),
            inner_opt=self.inner_opt.init(params),
            encoder=params,
            meta_opt=self.meta_opt.init(params),
            control=params,
            control_opt=self.control_opt.init(params),
            detector=hacking.init_detector(c.detector.window, val, jnp.asarray(c.phase_g.steps)),
            val_ce=val,
            control_val_ce=val,
            diag=self._diagnostics(params, params),
        )

    def _batch(self, key, split="train") -> Array:
        return text.windows(key, self.tokens[split], self.config.data.batch_size, self.context)

    def _phase_g(self, state: GistState, t: Array) -> tuple[GistState, dict]:
        c = self.config
        tokens = self._batch(jax.random.fold_in(jax.random.fold_in(self.key, Stream.PHASE_G), t))
        (loss, parts), grads = jax.value_and_grad(self.bottleneck, has_aux=True)(
            state.params, tokens
        )
        updates, g_opt = self.g_opt.update(grads, state.g_opt, state.params)
        params = optax.apply_updates(state.params, updates)
        handover = t == c.phase_g.steps - 1
        pick = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(handover, a, b), new, old
        )
        logged = ((t + 1) % c.log_every == 0) | handover
        val, diag = jax.lax.cond(
            logged,
            lambda: (self._ce(params, self.diag_windows), self._diagnostics(params, params)),
            lambda: (state.val_ce, state.diag),
        )
        state = state.replace(
            params=params,
            g_opt=g_opt,
            encoder=pick(params, state.encoder),
            control=pick(params, state.control),
            control_opt=pick(self.control_opt.init(params), state.control_opt),
            inner_opt=pick(self.inner_opt.init(params), state.inner_opt),
            meta_opt=pick(self.meta_opt.init(params), state.meta_opt),
            detector=pick(hacking.init_detector(c.detector.window, val, t + 1), state.detector),
            val_ce=val,
            control_val_ce=jnp.where(handover, val, state.control_val_ce),
            diag=diag,
        )
        metrics = {
            "phase": jnp.ones((), jnp.int32),
            "self/pred_loss": loss,
            "true/train_ce": loss,
            "gist/ce_context": parts["ce_context"],
            "gist/ce_chunk": parts["ce_chunk"],
            "gist/rank_corr": jnp.zeros(()),
            "meta/loss": jnp.zeros(()),
            "meta/grad_norm": jnp.zeros(()),
        }
        return state, metrics

    def _phase2(self, state: GistState, t: Array) -> tuple[GistState, dict]:
        c = self.config
        key = jax.random.fold_in(jax.random.fold_in(self.key, Stream.PHASE2), t)
        tokens = self._batch(key)
        if c.gist.plan == "plan3":
            meta_batch = self._batch(jax.random.fold_in(key, Phase2Stream.META), split=c.meta.split)
            inner, meta, aux = adalfl.lockstep(
                InnerState(state.params, state.inner_opt, {}, jnp.zeros((), jnp.int32)),
                MetaState(state.encoder, state.meta_opt, jnp.zeros((), jnp.int32)),
                tokens,
                meta_batch,
                key,
                inner_loss=self.self_loss,
                outer_loss=functools.partial(self_loss.true_loss, model=self.model),
                optimizer=self.inner_opt,
                meta_optimizer=self.meta_opt,
                method=c.meta.method,
            )
            params, inner_opt, encoder, meta_opt = (
                inner.params,
                inner.opt_state,
                meta.params,
                meta.opt_state,
            )
        else:
            (_, (_, aux)), grads = jax.value_and_grad(self.self_loss, has_aux=True)(
                state.params, {}, state.encoder, tokens, key
            )
            updates, inner_opt = self.inner_opt.update(grads, state.inner_opt, state.params)
            params = optax.apply_updates(state.params, updates)
            encoder, meta_opt = state.encoder, state.meta_opt
            if c.gist.encoder == "ema":
                encoder = self_loss.ema(state.encoder, params, c.gist.ema_decay)
            aux = {**aux, "meta/loss": jnp.zeros(()), "meta/grad_norm": jnp.zeros(())}
        ctrl_grads = jax.grad(self._ce)(state.control, tokens)
        ctrl_updates, control_opt = self.control_opt.update(
            ctrl_grads, state.control_opt, state.control
        )
        control = optax.apply_updates(state.control, ctrl_updates)
        logged = (t + 1) % c.log_every == 0
        val, control_val, diag = jax.lax.cond(
            logged,
            lambda: (
                self._ce(params, self.diag_windows),
                self._ce(control, self.diag_windows),
                self._diagnostics(params, encoder),
            ),
            lambda: (state.val_ce, state.control_val_ce, state.diag),
        )
        det, hacked, _, corr = hacking.detector_update(
            state.detector,
            aux["pred_loss"],
            aux["train_ce"],
            val,
            t + 1,
            tolerance=c.detector.tolerance,
        )
        det = jax.tree.map(lambda a, b: jnp.where(logged, a, b), det, state.detector)
        state = state.replace(
            params=params,
            inner_opt=inner_opt,
            encoder=encoder,
            meta_opt=meta_opt,
            control=control,
            control_opt=control_opt,
            detector=det,
            val_ce=val,
            control_val_ce=control_val,
            diag=diag,
        )
        metrics = {
            "phase": jnp.full((), 2, jnp.int32),
            "self/pred_loss": aux["pred_loss"],
            "true/train_ce": aux["train_ce"],
            "gist/ce_context": jnp.zeros(()),
            "gist/ce_chunk": jnp.zeros(()),
            "gist/rank_corr": aux["rank_corr"],
            "meta/loss": aux["meta/loss"],
            "meta/grad_norm": aux["meta/grad_norm"],
            "diag/rank_corr": corr,
            "diag/hacked": (hacked & logged).astype(jnp.int32),
        }
        return state, metrics

    def _step(self, state: GistState, t: Array) -> tuple[GistState, dict]:
        def phase_g(s):
            s, m = self._phase_g(s, t)
            return s, {
                **m,
                "diag/rank_corr": jnp.zeros(()),
                "diag/hacked": jnp.zeros((), jnp.int32),
            }

        if self.config.phase2.steps:
            in_g = t < self.config.phase_g.steps
            state, metrics = jax.lax.cond(in_g, phase_g, lambda s: self._phase2(s, t), state)
        else:  # the bottleneck alone: no Phase 2 to compile
            state, metrics = phase_g(state)
        onset = state.detector.onset
        metrics.update(
            {
                "true/val_ce": state.val_ce,
                "control/val_ce": state.control_val_ce,
                "self/anchor": jnp.zeros((), jnp.int32),
                "diag/steps_to_hack": jnp.where(onset >= 0, onset - self.config.phase_g.steps, -1),
                **state.diag,
            }
        )
        return state, metrics

    def _train_chunk(self, state, start, num):
        return jax.lax.scan(self._step, state, start + jnp.arange(num))

    def _held_out_chunk_ce(self, params: Params, mode: str) -> Array:
        """CE(x | gists) on the held-out validation windows under the mask `mode`."""
        fn = lambda w: self.bottleneck(params, w, mode=mode)[1]["ce_chunk"]  # noqa: E731
        return text.mean_over_windows(fn, self.eval_windows["validation"])

    def _evaluate(self, state: GistState) -> dict[str, Array]:
        windows = self.eval_windows["validation"]
        return {
            "eval/val_ce": self._eval_ce(state.params, windows),
            "eval/control_val_ce": self._eval_ce(state.control, windows),
        }

    # ---- the runtime.loop protocol ----------------------------------------------------

    def init(self) -> GistState:
        return self._init()

    def train_chunk(self, state, start: int, num: int):
        return self._chunk(state, jnp.asarray(start, jnp.int32), num)

    def evaluate(self, state, step: int) -> dict[str, Any]:
        return self._eval(state)

    def finalize(self, state: GistState, history: list[dict], workdir: str) -> dict:
        c = self.config
        start = c.phase_g.steps
        test = self._eval_ce(state.params, self.eval_windows["test"])
        chunk_ce = float(self._chunk_ce(state.params, c.gist.mode))
        summary = {
            "plan": c.gist.plan,
            "k": c.gist.k,
            "mode": c.gist.mode,
            # CE(x | gists) of the final θ on held-out windows, under its Phase G mask.
            "chunk_ce": mean_std([chunk_ce]),
            "chunk_bits_per_byte": mean_std([chunk_ce / math.log(2)]),
            "test_ce": mean_std([float(test)]),
            "test_bits_per_byte": mean_std([float(test) / math.log(2)]),
        }
        rows = [r for r in history if "self/pred_loss" in r]
        if c.phase2.steps:
            onset, detected = int(state.detector.onset), int(state.detector.detected_at)
            phase2 = [r for r in rows if r["phase"] == 2]
            summary.update(
                {
                    "steps_to_hack": onset - start if onset >= 0 else None,
                    "hack_detected_at": detected - start if detected >= 0 else None,
                    "phase2_steps": c.phase2.steps,
                    **hacking.phase2_summary(
                        history,
                        start,
                        c.detector.degrade_margin,
                        tolerance=c.detector.tolerance,
                        window=c.detector.window,
                    ),
                    "gist_rank_corr": mean_std([np.mean([r["gist/rank_corr"] for r in phase2])]),
                }
            )
            for key in (*COLLAPSE, *(k.replace("gist/", "gist/output_") for k in COLLAPSE)):
                name = key.split("/")[1]
                summary[f"start_{name}"] = mean_std(
                    [next(r[key] for r in rows if r["step"] == start)]
                )
                summary[f"final_{name}"] = mean_std([rows[-1][key]])
            for key in ("phase1_end_val_ce", "best_val_ce", "final_val_ce", "control_final_val_ce"):
                if key in summary:
                    bits = key.replace("_ce", "_bits_per_byte")
                    summary[bits] = mean_std([summary[key]["mean"] / math.log(2)])
            plots.self_loss_curves(
                {"": rows}, meta_steps=start, path=os.path.join(workdir, "plots", "gist.png")
            )
        return summary
