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

What it shares with `gist_lm` (the text data, the control, the logged steps with the
detector and its actions, the summary's Phase 2 numbers) is the base `experiments._text`.
Everything runs in one jitted `lax.scan` per chunk over device-resident text; the
batches of step t are a pure function of (seed, t), so a resumed run is bit-identical.
"""

import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments._text import TextSelfTraining, TextState
from metalearn import bilevel, plots
from metalearn.algorithms import self_loss
from metalearn.models import transformer
from metalearn.optim import make_optimizer
from metalearn.runtime.metrics import mean_std
from metalearn.streams import SelfLossLMSeed as Stream
from metalearn.streams import SelfLossLMStep as Phase1Stream
from metalearn.tasks import text
from metalearn.types import Array, Params

SAMPLE_TOKENS = 96  # bytes of text the hack report samples from θ
FAVOURED = 8  # tokens the hack report lists by target (or prediction) mass


@flax.struct.dataclass
class SelfLossState(TextState):
    """`TextState` with Phase 1's optimizer, the critic copy and the hack report's
    snapshots."""

    meta_opt: optax.OptState  # Phase 1's outer optimizer
    critic: Params  # frozen or EMA copy of θ (unused for critic 'same')
    # At the first detection: θ then and at the onset (the last improvement before it),
    # and the critic in effect: for the hack report.
    onset_params: Params
    detect_params: Params
    detect_critic: Params


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


class SelfLossLM(TextSelfTraining):
    """The experiment; driven by `runtime.loop` (see the module docstring)."""

    STREAMS = Stream
    FIRST = "meta.steps"
    FIRST_PHASE = "Phase 1 (meta-training)"

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh, first_steps=config.meta.steps)
        c = config
        self.spec = make_spec(c)
        # meta.window is the last steps differentiated by 'last_window'; the other
        # estimators of a Phase 1 step differentiate its whole unroll.
        self.estimator = bilevel.estimator_from_config(
            c.meta.estimator,
            window=c.meta.window if c.meta.estimator == "last_window" else c.meta.inner_steps,
            episode_length=c.meta.inner_steps,
            options=c.meta.get("estimator_options"),
            remat=c.meta.remat,
        )
        self_loss.check_estimator(self.estimator, c.meta.inner_steps)
        # The spread of ES's perturbed outer losses, logged (zero in Phase 2) under "es".
        self.es_metrics = ("meta/es_loss_spread",) if c.meta.estimator == "es" else ()
        self.log_actions = True  # its rows have always had the detector's action counts
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
        # Phase 2's optimizer and the inner optimizer of Phase 1.
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
        self._snapshot = self.jit(self._snapshot_stats)

    # ---- pure pieces ---------------------------------------------------------------

    def _initial_state(self, params: Params, fields: dict) -> SelfLossState:
        return SelfLossState(
            **fields,
            meta_opt=self.meta_opt.init(params),
            critic=params,
            onset_params=params,
            detect_params=params,
            detect_critic=params,
        )

    def _first_step(self, state: SelfLossState, t: Array) -> tuple[SelfLossState, dict]:
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
            estimator=self.estimator,
            noise_key=jax.random.fold_in(key, Phase1Stream.NOISE),
        )
        updates, meta_opt = self.meta_opt.update(grads, state.meta_opt, state.params)
        params = self_loss.interpolate(
            optax.apply_updates(state.params, updates), theta_prime, c.meta.tau
        )
        new, pick = self._end_first_step(state, t, params)
        new = new.replace(meta_opt=meta_opt, critic=pick(params, state.critic))
        metrics = {
            "self/pred_loss": jnp.mean(inner["pred_loss"]),
            "true/train_ce": inner["train_ce"][0],
            "meta/outer_ce": loss,
            "meta/grad_norm": optax.global_norm(grads),
            "self/anchor": jnp.zeros((), jnp.int32),
            **{k: inner[k][0] for k in self.quality},  # the targets for θ, this step
            **{k: inner[k.split("/")[1]][0] for k in self.es_metrics},
        }
        return new, metrics

    def _self_step(
        self, state: SelfLossState, t: Array, key: Array, tokens: Array
    ) -> tuple[SelfLossState, dict, dict]:
        critic = state.params if self.spec.critic == "same" else state.critic
        c = self.config
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
        params = self._unless_stopped(state, params)
        critic_copy = state.critic
        if self.spec.critic == "ema":
            critic_copy = self_loss.ema(state.critic, params, c.self_loss.ema_decay)
        if self.refresh_every:  # the critic copy becomes θ every refresh_every steps
            refresh = n % self.refresh_every == 0
            critic_copy = jax.tree.map(lambda a, b: jnp.where(refresh, a, b), params, critic_copy)
        metrics = {
            "meta/outer_ce": jnp.zeros(()),
            "meta/grad_norm": jnp.zeros(()),
            "self/anchor": anchor.astype(jnp.int32),
            **{k: aux[k] for k in self.quality},
            **{k: jnp.zeros(()) for k in self.es_metrics},
        }
        new = state.replace(params=params, inner_opt=inner_opt, critic=critic_copy)
        return new, aux, metrics

    def _record_detection(self, state: SelfLossState, first: Array) -> SelfLossState:
        # The hack snapshots change once per run: a cond, not a tree-wide select per step.
        critic = state.params if self.spec.critic == "same" else state.critic
        snapshots = jax.lax.cond(
            first,
            lambda: (state.best, state.params, critic),
            lambda: (state.onset_params, state.detect_params, state.detect_critic),
        )
        return state.replace(
            onset_params=snapshots[0], detect_params=snapshots[1], detect_critic=snapshots[2]
        )

    def _step_metrics(self, state: SelfLossState, metrics: dict) -> dict:
        return {"diag/gap": metrics["self/pred_loss"] - metrics["true/train_ce"]}

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

    # ---- the end of the run ------------------------------------------------------------

    def finalize(self, state: SelfLossState, history: list[dict], workdir: str) -> dict:
        start = self.first_steps
        # The first detection (a 'meta' action starts the detector afresh after each).
        summary = {
            **self.detector_summary(state),
            "test_ce": mean_std([self.test_ce(state)]),
            **self.phase2_summary(history),
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
