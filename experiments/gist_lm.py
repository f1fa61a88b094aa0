"""The gist-token language-model experiment: the bottleneck phase, then self-training on
a loss in gist space (research plans 2 and 3; `configs/gist_lm.py`).

Global step t is a Phase G step for t < `phase_g.steps` and a Phase 2 step after it:

- Phase G (`gist.bottleneck_loss`): Adam on the next-token cross-entropy of windows laid
  out as [context][k gists][chunk] under the mask `gist.mode` ('gist', or the controls
  'positive' and 'negative').
- Phase 2, plan 2: θ ← θ − α ∇ `gist.gist_self_loss`, the encoder a copy of θ frozen at
  the end of Phase G or its exponential moving average; plan 3: the same loss between
  E(x̂) and E(x̂ ⊕ x) with the encoder φ learned in lock-step (`adalfl.OnlineLearner`: the
  one-step meta-gradient of the cross-entropy of a `meta.split` batch at θ_{t+1}).
  A control copy of θ, forked at the end of Phase G, takes the same number of steps on
  the true cross-entropy of the same batches. θ never sees the true loss in Phase 2.

Every logged step records the gist loss (`self/pred_loss`), the true train and
validation cross-entropies of θ and the control's validation cross-entropy (in nats;
the summary also gives bits per byte), the Spearman correlation of the per-sequence gist
loss with the per-sequence cross-entropy over the batch (`gist/rank_corr`), and the
collapse of the gist space (`gist.collapse`) for the encodings of the observed chunks and
of the model's own continuations of the diagnostic windows. The reward-hacking detector
of plan 1 (`hacking.detector_update`) dates `steps_to_hack`, and `steps_to_degrade` has
plan 1's definition, so the plans compare in one table (`experiments.sweep_gist`). Its
action is plan 1's (the shared base, `experiments._text`): 'continue' (record only),
'stop' (θ frozen from there), 'rollback' (θ back to its best-validation copy; the
encoder stays) or 'meta' (`detector.meta_steps` more Phase G steps, then the encoder
refreshed from θ as at the end of Phase G).

Everything runs in one jitted `lax.scan` per chunk; the batches of step t are a pure
function of (seed, t), so a resumed run is bit-identical.
"""

import functools
import math
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments._text import TextSelfTraining, TextState
from metalearn import bilevel, plots
from metalearn.algorithms import adalfl, gist, self_loss
from metalearn.models import transformer
from metalearn.optim import make_optimizer
from metalearn.runtime.metrics import mean_std
from metalearn.state import InnerState, MetaState
from metalearn.streams import GistLMSeed as Stream
from metalearn.streams import GistLMStep as Phase2Stream
from metalearn.tasks import text
from metalearn.types import Array, Params

PLANS = ("plan2", "plan3", "bottleneck")
ENCODERS = ("frozen", "ema")
COLLAPSE = ("gist/mean_cosine", "gist/effective_rank")


@flax.struct.dataclass
class GistState(TextState):
    """`TextState` with Phase G's optimizer, the encoder and its optimizer, and the
    collapse diagnostics."""

    g_opt: optax.OptState  # Phase G's optimizer
    encoder: Params  # frozen copy, EMA of θ, or (plan 3) the learned φ
    meta_opt: optax.OptState  # plan 3: the encoder's optimizer
    diag: dict  # the last logged collapse diagnostics


class GistLM(TextSelfTraining):
    """The experiment; driven by `runtime.loop` (see the module docstring)."""

    STREAMS = Stream
    FIRST = "phase_g.steps"
    FIRST_PHASE = "Phase G (the bottleneck)"
    MEASURED = ("diag",)

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
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
        super().__init__(config, mesh=mesh, first_steps=c.phase_g.steps)
        if (g.plan == "bottleneck") != (c.phase2.steps == 0):
            raise ValueError(
                "gist.plan='bottleneck' runs Phase G alone: it needs phase2.steps=0, and "
                "plans 2 and 3 need phase2.steps >= 1."
            )
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
        self.model = transformer.make_transformer(c.model, self.context)
        self.g_opt = make_optimizer(c.phase_g.optimizer)
        self.self_opt = make_optimizer(c.inner.optimizer, differentiated=g.plan == "plan3")
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.bottleneck = functools.partial(
            gist.bottleneck_loss, model=self.model, k=g.k, context=g.context, mode=g.mode
        )
        self.self_loss = functools.partial(gist.gist_self_loss, model=self.model, spec=self.spec)
        self._chunk_ce = self.jit(self._held_out_chunk_ce, static_argnums=1)

    # ---- pure pieces ---------------------------------------------------------------

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

    def _initial_state(self, params: Params, fields: dict) -> GistState:
        return GistState(
            **fields,
            g_opt=self.g_opt.init(params),
            encoder=params,
            meta_opt=self.meta_opt.init(params),
            diag=self._diagnostics(params, params),
        )

    def _first_step(self, state: GistState, t: Array) -> tuple[GistState, dict]:
        tokens = self._batch(jax.random.fold_in(jax.random.fold_in(self.key, Stream.PHASE_G), t))
        (loss, parts), grads = jax.value_and_grad(self.bottleneck, has_aux=True)(
            state.params, tokens
        )
        updates, g_opt = self.g_opt.update(grads, state.g_opt, state.params)
        params = optax.apply_updates(state.params, updates)
        new, pick = self._end_first_step(
            state, t, params, lambda: {"diag": self._diagnostics(params, params)}
        )
        new = new.replace(
            g_opt=g_opt,
            encoder=pick(params, state.encoder),
            meta_opt=pick(self.meta_opt.init(params), state.meta_opt),
        )
        metrics = {
            "self/pred_loss": loss,
            "true/train_ce": loss,
            "gist/ce_context": parts["ce_context"],
            "gist/ce_chunk": parts["ce_chunk"],
            "gist/rank_corr": jnp.zeros(()),
            "meta/loss": jnp.zeros(()),
            "meta/grad_norm": jnp.zeros(()),
        }
        return new, metrics

    def _measure(self, state: GistState) -> dict:
        return {"diag": self._diagnostics(state.params, state.encoder)}

    def _self_step(
        self, state: GistState, t: Array, key: Array, tokens: Array
    ) -> tuple[GistState, dict, dict]:
        c = self.config
        if c.gist.plan == "plan3":
            meta_batch = self._batch(jax.random.fold_in(key, Phase2Stream.META), split=c.meta.split)
            problem = bilevel.Problem(
                self.self_loss,
                functools.partial(self_loss.true_loss, model=self.model),
                self.self_opt,
            )
            learner = adalfl.OnlineLearner(
                problem, self.meta_opt, adalfl.online_estimator(c.meta.method)
            )
            inner, meta, aux = learner.step(
                MetaState(state.encoder, state.meta_opt, jnp.zeros((), jnp.int32)),
                InnerState(state.params, state.inner_opt, {}, jnp.zeros((), jnp.int32)),
                tokens,
                meta_batch,
                key,
            )
            params = self._unless_stopped(state, inner.params)
            inner_opt, encoder, meta_opt = inner.opt_state, meta.params, meta.opt_state
        else:
            (_, (_, aux)), grads = jax.value_and_grad(self.self_loss, has_aux=True)(
                state.params, {}, state.encoder, tokens, key
            )
            updates, inner_opt = self.self_opt.update(grads, state.inner_opt, state.params)
            params = self._unless_stopped(state, optax.apply_updates(state.params, updates))
            encoder, meta_opt = state.encoder, state.meta_opt
            if c.gist.encoder == "ema":
                encoder = self_loss.ema(state.encoder, params, c.gist.ema_decay)
            aux = {**aux, "meta/loss": jnp.zeros(()), "meta/grad_norm": jnp.zeros(())}
        new = state.replace(params=params, inner_opt=inner_opt, encoder=encoder, meta_opt=meta_opt)
        metrics = {
            "gist/ce_context": jnp.zeros(()),
            "gist/ce_chunk": jnp.zeros(()),
            "gist/rank_corr": aux["rank_corr"],
            "meta/loss": aux["meta/loss"],
            "meta/grad_norm": aux["meta/grad_norm"],
        }
        return new, aux, metrics

    def _step_metrics(self, state: GistState, metrics: dict) -> dict:
        return {"self/anchor": jnp.zeros((), jnp.int32), **state.diag}

    def _held_out_chunk_ce(self, params: Params, mode: str) -> Array:
        """CE(x | gists) on the held-out validation windows under the mask `mode`."""
        fn = lambda w: self.bottleneck(params, w, mode=mode)[1]["ce_chunk"]  # noqa: E731
        return text.mean_over_windows(fn, self.eval_windows["validation"])

    # ---- the end of the run ------------------------------------------------------------

    def finalize(self, state: GistState, history: list[dict], workdir: str) -> dict:
        c = self.config
        start = self.first_steps
        test = self.test_ce(state)
        chunk_ce = float(self._chunk_ce(state.params, c.gist.mode))
        summary = {
            "plan": c.gist.plan,
            "k": c.gist.k,
            "mode": c.gist.mode,
            # CE(x | gists) of the final θ on held-out windows, under its Phase G mask.
            "chunk_ce": mean_std([chunk_ce]),
            "chunk_bits_per_byte": mean_std([chunk_ce / math.log(2)]),
            "test_ce": mean_std([test]),
            "test_bits_per_byte": mean_std([test / math.log(2)]),
        }
        rows = [r for r in history if "self/pred_loss" in r]
        if c.phase2.steps:
            phase2 = [r for r in rows if r["phase"] == 2]
            summary.update(
                {
                    **self.detector_summary(state),
                    **self.phase2_summary(history),
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
