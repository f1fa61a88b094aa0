"""The self-loss language-model experiment: meta-train, then train on the model's own loss.

Global step t is a Phase 1 meta step for t < `meta.steps` (and while a "return to
meta-training" action is running) and a Phase 2 self-loss step after it:

- Phase 1 (`self_loss.meta_grad`): K inner steps on the self-produced loss from θ,
  the true cross-entropy of another batch at θ', an outer update of θ through the
  unroll (or by antithetic ES over forward unrolls, `meta.estimator` 'es', with σ and
  pairs from `meta.estimator_options`), then θ ← (1 − τ)θ + τθ'.
- Phase 2: θ ← θ − α ∇ (self-produced loss), nothing else; every `phase2.anchor_every`
  steps one step on the true cross-entropy instead, if configured. A control copy of θ,
  forked at the end of Phase 1, takes the same number of steps on the true
  cross-entropy of the same batches.

Every logged step records the predicted loss, the true train and validation
cross-entropies (diagnostics only: in Phase 2 they never reach θ), the control's
validation cross-entropy, the rank correlation of predicted loss and true train loss
over the detector's window, and their gap. The reward-hacking detector
(`hacking.detector_update`) flags the first logged step at which the predicted loss has
kept falling over its window while the validation cross-entropy rose by more than the
tolerance above its best or has not improved by the tolerance for a whole window;
`steps_to_hack` is the number of Phase 2 steps until the last improvement before it
(where the hack began). Its action is 'continue' (record only), 'stop' (θ frozen from
there), 'rollback' (θ back to its best-validation copy) or 'meta' (`detector.meta_steps`
more Phase 1 steps, then the critic refreshed).

Everything runs in one jitted `lax.scan` per chunk over device-resident text; the
batches of step t are a pure function of (seed, t), so a resumed run is bit-identical.
"""

import functools
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from metalearn import hacking, plots
from metalearn.algorithms import self_loss
from metalearn.estimators import EstimatorOptions
from metalearn.models import transformer
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.streams import SelfLossLM as Stream
from metalearn.streams import SelfLossLMPhase1 as Phase1Stream
from metalearn.tasks import text
from metalearn.types import Array, Params

ACTIONS = ("continue", "stop", "rollback", "meta")
SAMPLE_TOKENS = 96  # bytes of text the hack report samples from θ
FAVOURED = 8  # tokens the hack report lists by target (or prediction) mass


@flax.struct.dataclass
class SelfLossState:
    """θ with its two optimizer states, the critic copy, the control, and bookkeeping."""

    params: Params
    inner_opt: optax.OptState  # Phase 2's optimizer (the inner optimizer of Phase 1)
    meta_opt: optax.OptState  # Phase 1's outer optimizer
    critic: Params  # frozen or EMA copy of θ (unused for critic 'same')
    control: Params  # θ trained on the true cross-entropy from the end of Phase 1
    control_opt: optax.OptState
    best: Params  # θ at the best validation cross-entropy of Phase 2 (for rollback)
    detector: hacking.Detector
    val_ce: Array  # the last logged validation cross-entropy of θ and the control
    control_val_ce: Array
    meta_left: Array  # Phase 1 steps still to run after a 'meta' action
    stopped: Array  # a 'stop' action froze θ
    rollbacks: Array
    # At the first detection: θ then and at the onset (the last improvement before it),
    # the critic in effect, and the step (−1 before): for the hack report.
    onset_params: Params
    detect_params: Params
    detect_critic: Params
    detect_step: Array
    onset_step: Array
    detections: Array  # detections so far (one per Phase 2 cycle with the 'meta' action)


def make_spec(config: ml_collections.ConfigDict) -> self_loss.Spec:
    s = config.self_loss
    return self_loss.Spec(
        signal=s.signal,
        path=s.path,
        output=s.output,
        normalise=s.normalise,
        critic=s.critic,
        stop_gradient=s.stop_gradient,
        sees=s.sees,
        layout=s.layout,
        monotonicity=s.monotonicity,
        disjoint=config.model.loss_layers > 0,
    )


class SelfLossLM(Experiment):
    """The experiment; driven by `runtime.loop` (see the module docstring). One device:
    these models are small, so `mesh` is not used."""

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh)
        c = config
        self.spec = make_spec(c)
        if c.detector.action not in ACTIONS:
            raise ValueError(f"Unknown detector.action {c.detector.action!r}; choose {ACTIONS}.")
        if c.detector.action == "meta" and c.detector.meta_steps < 1:
            raise ValueError("detector.action='meta' needs detector.meta_steps >= 1.")
        self_loss.check_estimator(c.meta.estimator, c.meta.window, c.meta.inner_steps)
        # σ and pairs of "es"; unknown keys are refused here, before anything compiles.
        self.estimator_options = EstimatorOptions.from_config(c.meta.get("estimator_options"))
        # The spread of ES's perturbed outer losses, logged (zero in Phase 2) under "es".
        self.es_metrics = ("meta/es_loss_spread",) if c.meta.estimator == "es" else ()
        if c.meta.steps < 1 or c.phase2.steps < 0:
            raise ValueError("meta.steps must be >= 1 and phase2.steps >= 0.")
        for name, value in (("eval.every", c.eval.every), ("meta.steps", c.meta.steps)):
            if value % c.log_every:
                raise ValueError(
                    f"{name} ({value}) must be a multiple of log_every ({c.log_every})."
                )
        self.num_steps = c.meta.steps + c.phase2.steps
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
        observe = c.self_loss.get("observe", "embed") if self.spec.sees == "observed" else "none"
        self.model = transformer.make_transformer(c.model, self.context, observe=observe)
        self.refresh_every = c.phase2.get("refresh_every", 0)
        if self.refresh_every and self.spec.critic == "same":
            raise ValueError(
                "phase2.refresh_every copies θ into the critic copy: use critic 'frozen' or "
                "'ema' (the 'same' critic is θ already), or phase2.refresh_every=0."
            )
        self.quality = self_loss.QUALITY if self.spec.signal == "targets" else ()
        disjoint = self.spec.disjoint
        inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.control_opt = make_optimizer(c.inner.optimizer)
        self.self_opt = self_loss.routed(inner_opt, "loss" if disjoint else None)
        meta_opt = make_optimizer(c.meta.optimizer)
        if c.meta.get("critic_lr", 0.0):  # the critic's own parameters at their own rate
            critic_opt = make_optimizer(
                ml_collections.ConfigDict({**c.meta.optimizer.to_dict(), "lr": c.meta.critic_lr})
            )
            meta_opt = optax.multi_transform(
                {"trunk": meta_opt, "lm": meta_opt, "loss": critic_opt}, transformer.param_groups
            )
        self.meta_opt = self_loss.routed(meta_opt, "lm" if disjoint else None)
        self.key = jax.random.key(c.seed)
        self._chunk = self.jit(self._train_chunk, static_argnums=2)
        self._snapshot = self.jit(self._snapshot_stats)
        self._eval = self.jit(self._evaluate)
        self._init = self.jit(self._init_state)

    # ---- pure pieces ---------------------------------------------------------------

    def _ce(self, params: Params, windows: Array) -> Array:
        return self_loss.true_loss(params, {}, windows, None, model=self.model)

    def _eval_ce(self, params: Params, windows: Array) -> Array:
        """Mean cross-entropy over many windows (`text.mean_over_windows`)."""
        return text.mean_over_windows(lambda w: self._ce(params, w), windows)

    def _init_state(self) -> SelfLossState:
        c = self.config
        params = transformer.init_transformer(
            self.model, jax.random.fold_in(self.key, Stream.INIT), self.context
        )
        val = self._ce(params, self.diag_windows)
        return SelfLossState(
            params=params,
            inner_opt=self.self_opt.init(params),
            meta_opt=self.meta_opt.init(params),
            critic=params,
            control=params,
            control_opt=self.control_opt.init(params),
            best=params,
            detector=hacking.init_detector(c.detector.window, val, jnp.asarray(c.meta.steps)),
            val_ce=val,
            control_val_ce=val,
            meta_left=jnp.zeros((), jnp.int32),
            stopped=jnp.zeros((), bool),
            rollbacks=jnp.zeros((), jnp.int32),
            onset_params=params,
            detect_params=params,
            detect_critic=params,
            detect_step=jnp.full((), -1, jnp.int32),
            onset_step=jnp.full((), -1, jnp.int32),
            detections=jnp.zeros((), jnp.int32),
        )

    def _batch(self, key, split="train", num=None) -> Array:
        c = self.config
        draw = lambda k: text.windows(k, self.tokens[split], c.data.batch_size, self.context)  # noqa: E731
        return draw(key) if num is None else jax.vmap(draw)(jax.random.split(key, num))

    def _phase1(self, state: SelfLossState, t: Array) -> tuple[SelfLossState, dict]:
        c = self.config
        key = jax.random.fold_in(self.key, t)
        tokens = self._batch(jax.random.fold_in(key, Phase1Stream.INNER), num=c.meta.inner_steps)
        outer = self._batch(jax.random.fold_in(key, Phase1Stream.OUTER), split=c.meta.split)
        keys = jax.random.split(
            jax.random.fold_in(key, Phase1Stream.INNER_STEPS), c.meta.inner_steps
        )
        loss, grads, (theta_prime, inner) = self_loss.meta_grad(
            state.params,
            tokens,
            keys,
            outer,
            key,
            model=self.model,
            spec=self.spec,
            inner_optimizer=self.self_opt,
            estimator=c.meta.estimator,
            window=c.meta.window,
            remat=c.meta.remat,
            options=self.estimator_options,
            noise_key=jax.random.fold_in(key, Phase1Stream.NOISE),
        )
        updates, meta_opt = self.meta_opt.update(grads, state.meta_opt, state.params)
        params = self_loss.interpolate(
            optax.apply_updates(state.params, updates), theta_prime, c.meta.tau
        )
        meta_left = jnp.maximum(state.meta_left - 1, 0)
        # The last Phase 1 step (initial, or of a 'meta' action) hands over to Phase 2.
        handover = (t == c.meta.steps - 1) | (state.meta_left == 1)
        initial = t == c.meta.steps - 1
        pick = lambda new, old, cond=handover: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(cond, a, b), new, old
        )
        logged = ((t + 1) % c.log_every == 0) | handover
        val = jax.lax.cond(
            logged, lambda: self._ce(params, self.diag_windows), lambda: state.val_ce
        )
        state = state.replace(
            params=params,
            meta_opt=meta_opt,
            critic=pick(params, state.critic),
            control=pick(params, state.control, initial),
            control_opt=pick(self.control_opt.init(params), state.control_opt, initial),
            inner_opt=pick(self.self_opt.init(params), state.inner_opt),
            best=pick(params, state.best),
            detector=pick(hacking.init_detector(c.detector.window, val, t + 1), state.detector),
            val_ce=val,
            control_val_ce=jnp.where(initial, val, state.control_val_ce),
            meta_left=meta_left,
        )
        metrics = {
            "phase": jnp.ones((), jnp.int32),
            "self/pred_loss": jnp.mean(inner["pred_loss"]),
            "true/train_ce": inner["train_ce"][0],
            "meta/outer_ce": loss,
            "meta/grad_norm": optax.global_norm(grads),
            "self/anchor": jnp.zeros((), jnp.int32),
            **{k: inner[k][0] for k in self.quality},  # the targets for θ, this step
            **{k: inner[k.split("/")[1]][0] for k in self.es_metrics},
        }
        return state, metrics

    def _phase2(self, state: SelfLossState, t: Array) -> tuple[SelfLossState, dict]:
        c = self.config
        key = jax.random.fold_in(jax.random.fold_in(self.key, Stream.PHASE2), t)
        tokens = self._batch(key)
        critic = state.params if self.spec.critic == "same" else state.critic
        n = t - c.meta.steps + 1  # Phase 2 steps so far, this one included

        def descend(loss_fn):
            def run(_):
                (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
                updates, opt = self.self_opt.update(grads, state.inner_opt, state.params)
                return optax.apply_updates(state.params, updates), opt, aux

            return run

        def self_objective(p):
            value, (_, aux) = self_loss.self_loss(
                p, {}, critic, tokens, key, model=self.model, spec=self.spec
            )
            return value, aux

        def anchor_objective(p):
            ce = self._ce(p, tokens)
            return ce, {"pred_loss": ce, "train_ce": ce, **{k: jnp.zeros(()) for k in self.quality}}

        if c.phase2.anchor_every > 0:
            anchor = n % c.phase2.anchor_every == 0
            params, inner_opt, aux = jax.lax.cond(
                anchor, descend(anchor_objective), descend(self_objective), None
            )
        else:  # no anchor branch to compile
            anchor = jnp.zeros((), bool)
            params, inner_opt, aux = descend(self_objective)(None)
        params = jax.tree.map(lambda a, b: jnp.where(state.stopped, b, a), params, state.params)
        ctrl_grads = jax.grad(self._ce)(state.control, tokens)
        ctrl_updates, control_opt = self.control_opt.update(
            ctrl_grads, state.control_opt, state.control
        )
        control = optax.apply_updates(state.control, ctrl_updates)
        critic_copy = state.critic
        if self.spec.critic == "ema":
            critic_copy = self_loss.ema(state.critic, params, c.self_loss.ema_decay)
        if self.refresh_every:  # the critic copy becomes θ every refresh_every steps
            refresh = n % self.refresh_every == 0
            critic_copy = jax.tree.map(lambda a, b: jnp.where(refresh, a, b), params, critic_copy)

        logged = (t + 1) % c.log_every == 0
        val, control_val = jax.lax.cond(
            logged,
            lambda: (self._ce(params, self.diag_windows), self._ce(control, self.diag_windows)),
            lambda: (state.val_ce, state.control_val_ce),
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
        best = jax.tree.map(lambda a, b: jnp.where(improved, a, b), params, state.best)
        new_detection = (det.detected_at >= 0) & (state.detector.detected_at < 0)
        first = new_detection & (state.detect_step < 0)
        # The hack snapshots change once per run: a cond, not a tree-wide select per step.
        snapshots = jax.lax.cond(
            first,
            lambda: (best, params, params if self.spec.critic == "same" else critic_copy),
            lambda: (state.onset_params, state.detect_params, state.detect_critic),
        )
        state = state.replace(
            onset_params=snapshots[0],
            detect_params=snapshots[1],
            detect_critic=snapshots[2],
            detect_step=jnp.where(first, t + 1, state.detect_step),
            onset_step=jnp.where(first, det.onset, state.onset_step),
            detections=state.detections + new_detection.astype(jnp.int32),
        )
        state = state.replace(
            params=params,
            inner_opt=inner_opt,
            critic=critic_copy,
            control=control,
            control_opt=control_opt,
            best=best,
            detector=det,
            val_ce=val,
            control_val_ce=control_val,
        )
        state = self._act(state, hacked, t)
        metrics = {
            "phase": jnp.full((), 2, jnp.int32),
            "self/pred_loss": aux["pred_loss"],
            "true/train_ce": aux["train_ce"],
            "meta/outer_ce": jnp.zeros(()),
            "meta/grad_norm": jnp.zeros(()),
            "self/anchor": anchor.astype(jnp.int32),
            **{k: aux[k] for k in self.quality},
            **{k: jnp.zeros(()) for k in self.es_metrics},
        }
        extra = {"diag/rank_corr": corr, "diag/hacked": hacked.astype(jnp.int32)}
        return state, {**metrics, **extra}

    def _act(self, state: SelfLossState, hacked: Array, t: Array) -> SelfLossState:
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

    def _step(self, state: SelfLossState, t: Array) -> tuple[SelfLossState, dict]:
        in_phase1 = (t < self.config.meta.steps) | (state.meta_left > 0)

        def phase1(s):
            s, m = self._phase1(s, t)
            return s, {
                **m,
                "diag/rank_corr": jnp.zeros(()),
                "diag/hacked": jnp.zeros((), jnp.int32),
            }

        state, metrics = jax.lax.cond(in_phase1, phase1, lambda s: self._phase2(s, t), state)
        metrics.update(
            {
                "true/val_ce": state.val_ce,
                "control/val_ce": state.control_val_ce,
                "diag/gap": metrics["self/pred_loss"] - metrics["true/train_ce"],
                "diag/rollbacks": state.rollbacks,
                "diag/steps_to_hack": jnp.where(
                    state.onset_step >= 0, state.onset_step - self.config.meta.steps, -1
                ),
                "diag/detections": state.detections,
            }
        )
        return state, metrics

    def _train_chunk(self, state, start, num):
        return jax.lax.scan(self._step, state, start + jnp.arange(num))

    def _snapshot_stats(self, params: Params, critic: Params) -> dict[str, Array]:
        """What θ and its critic do on the diagnostic validation windows: cross-entropy,
        the targets' quality (signal 'targets'), the mean target and prediction
        distributions [V], the true next tokens' frequencies [V], and continuations of
        the first window (greedy and sampled, `SAMPLE_TOKENS` bytes)."""
        windows = self.diag_windows
        logits, _ = self.model.apply({"params": params}, windows[:, :-1])
        v = logits.shape[-1]
        out = {
            "val_ce": self._ce(params, windows),
            "prediction_mass": jnp.mean(jax.nn.softmax(logits), (0, 1)),
            "true_frequency": jnp.mean(jax.nn.one_hot(windows[:, 1:], v), (0, 1)),
        }
        if self.spec.signal == "targets":
            critic = params if self.spec.live_critic else critic
            q = self_loss.targets_of(self.model, critic, windows, logits, self.spec)
            out["target_mass"] = jnp.mean(q, (0, 1))
            out.update(self_loss.target_quality(q, logits, windows[:, 1:]))
        prompt = windows[:1, :-1]
        sample = functools.partial(
            transformer.generate,
            self.model,
            params,
            prompt,
            SAMPLE_TOKENS,
            num_tokens=text.NUM_BYTES,
        )
        out["greedy"] = sample()[0]
        out["sampled"] = sample(jax.random.fold_in(self.key, Stream.SAMPLE))[0]
        out["prompt"] = prompt[0]
        return out

    def hack_report(self, state: SelfLossState) -> dict | None:
        """The targets and samples at the onset of the first hack and at its detection."""
        if int(state.detect_step) < 0:
            return None
        start = self.config.meta.steps
        onset_critic = state.onset_params if self.spec.critic == "same" else state.detect_critic
        points = {
            "onset": (int(state.onset_step), state.onset_params, onset_critic),
            "detection": (int(state.detect_step), state.detect_params, state.detect_critic),
        }
        report = {}
        for name, (step, params, critic) in points.items():
            stats = jax.device_get(self._snapshot(params, critic))
            entry = {
                "step": step,
                "phase2_step": step - start,
                "val_ce": float(stats["val_ce"]),
                "prompt": text.decode(stats["prompt"]),
                "greedy": text.decode(stats["greedy"]),
                "sampled": text.decode(stats["sampled"]),
                "favoured": _favoured(stats),
            }
            entry.update({k.split("/")[1]: float(stats[k]) for k in self.quality})
            report[name] = entry
            report[name + "_mass"] = {
                k: stats[k].tolist()
                for k in ("target_mass", "prediction_mass", "true_frequency")
                if k in stats
            }
        return report

    def _evaluate(self, state: SelfLossState) -> dict[str, Array]:
        return {
            "eval/val_ce": self._eval_ce(state.params, self.eval_windows["validation"]),
            "eval/control_val_ce": self._eval_ce(state.control, self.eval_windows["validation"]),
        }

    # ---- the runtime.loop protocol ----------------------------------------------------

    def init(self) -> SelfLossState:
        return self._init()

    def train_chunk(self, state, start: int, num: int):
        return self._chunk(state, jnp.asarray(start, jnp.int32), num)

    def evaluate(self, state, step: int) -> dict[str, Any]:
        return self._eval(state)

    def finalize(self, state: SelfLossState, history: list[dict], workdir: str) -> dict:
        c = self.config
        start = c.meta.steps
        # The first detection (a 'meta' action starts the detector afresh after each).
        onset, detected = int(state.onset_step), int(state.detect_step)
        test = float(self._eval_ce(state.params, self.eval_windows["test"]))
        summary = {
            "steps_to_hack": onset - start if onset >= 0 else None,
            "hack_detected_at": detected - start if detected >= 0 else None,
            "phase2_steps": c.phase2.steps,
            "rollbacks": int(state.rollbacks),
            "detections": int(state.detections),
            "test_ce": mean_std([test]),
            **hacking.phase2_summary(
                history,
                start,
                c.detector.degrade_margin,
                tolerance=c.detector.tolerance,
                window=c.detector.window,
            ),
        }
        rows = [r for r in history if "self/pred_loss" in r]
        plots.self_loss_curves(
            {"": rows}, meta_steps=start, path=os.path.join(workdir, "plots", "self_loss.png")
        )
        if self.quality:
            plots.critic_quality(
                {"": rows}, meta_steps=start, path=os.path.join(workdir, "plots", "critic.png")
            )
        report = self.hack_report(state)
        if report is not None:
            with open(os.path.join(workdir, "hack_report.json"), "w") as f:
                json.dump(report, f, indent=1)
            plots.hack_targets(report, os.path.join(workdir, "plots", "hack_targets.png"))
            summary["hack_report"] = {
                name: {k: v for k, v in report[name].items() if k not in ("prompt", "favoured")}
                for name in ("onset", "detection")
            }
        return summary


def _favoured(stats: dict) -> list[dict]:
    """The tokens the targets (else the predictions) put most mass on, with the mass the
    targets, the model and the true next tokens give each."""
    mass = stats.get("target_mass", stats["prediction_mass"])
    top = np.argsort(-np.asarray(mass))[:FAVOURED]
    return [
        {
            "token": text.decode([int(i)]) if i < text.NUM_BYTES else f"<{int(i)}>",
            **({"target": float(stats["target_mass"][i])} if "target_mass" in stats else {}),
            "model": float(stats["prediction_mass"][i]),
            "true": float(stats["true_frequency"][i]),
        }
        for i in top
    ]
