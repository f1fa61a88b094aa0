"""ML³ loss shaping on sine-frequency regression (Bechtle et al., Fig. 5a/5b).

The optimizee f_ω(x) = sin(ω·x) starts at ω₀ = 0.1 and must find the true frequency ν;
the MSE landscape over ω is full of local minima. Two learned losses ℓ_φ(y, ŷ, x) are
meta-trained side by side from the same seeds, differing only in the task loss: the
MSE (ŷ − y)² ("ml3_mse") or the shaping loss (ω − ν)², which uses ν, known only at
meta-train time ("ml3_shaped"). Protocol of the public code: each meta iteration is an
episode of 10 SGD steps (lr 1) from ω₀ on 4 new tasks, with a meta update after every
inner step.

At meta-test, fresh ω₀ are trained on unseen frequencies with each learned loss and with
MSE; the summary reports the fraction of test frequencies each reaches within
`eval.tolerance`, and the figures show the landscapes (5a) and |ω − ν| curves (5b).

The state holds [variant, seed] along two leading axes (`ML3Experiment` with
`VARIANTS`; the variant input of the episode is whether it is the shaped one).
"""

import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalearn import bilevel, plots
from metalearn.algorithms import ml3
from metalearn.losses import learned as learned_losses
from metalearn.losses.task import mse
from metalearn.models.mlp import SineFrequency
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import ML3Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import init_inner_state, init_meta_state
from metalearn.streams import Ml3ShapedSineSeed, Ml3ShapedSineStep
from metalearn.tasks.sine import sample_frequency_tasks
from metalearn.types import Array


def loss_minimum(loss_at: Callable[[Array], Array], grid: Array, refine: int = 41) -> Array:
    """The global minimiser of a 1-D loss: the best point of `grid`, refined around it.

    Args:
      loss_at: `ω -> scalar`.
      grid: [G] evenly spaced candidates.
      refine: points of the second, fine grid spanning ±1 step of `grid` around its best.

    Returns:
      The scalar ω of the fine grid with the lowest loss (resolution 2·step / (refine − 1)).
    """
    coarse = grid[jnp.argmin(jax.vmap(loss_at)(grid))]
    step = grid[1] - grid[0]
    fine = coarse + jnp.linspace(-step, step, refine)
    return fine[jnp.argmin(jax.vmap(loss_at)(fine))]


def reached_fractions(traces: Array, counts: Sequence[int], tolerance: float) -> dict[str, Array]:
    """The fraction of tasks within `tolerance` after each of `counts` steps.

    Args:
      traces: |ω − ν| [..., F, K + 1] from ω₀ (index k: after k steps).
      counts: step counts ≤ K.
      tolerance: the distance counted as reached.

    Returns:
      str(count) -> fraction [...] (mean over the F tasks).
    """
    return {str(k): jnp.mean(traces[..., k] < tolerance, axis=-1) for k in counts}


def offset_stats(offsets: np.ndarray, freqs: np.ndarray, tolerance: float, bins: int = 10) -> dict:
    """Summary numbers of the minimum's offsets argmin − ν (arrays [S, F]): per seed, the
    mean offset, its mean |·| and the fraction within `tolerance` (mean ± std over seeds), and the
    mean offset and mean |offset| in `bins` equal bins of ν (pooled over seeds)."""
    edges = np.linspace(freqs.min(), freqs.max() + 1e-6, bins + 1)
    which = np.digitize(freqs.ravel(), edges) - 1
    flat = offsets.ravel()
    return {
        "mean_offset": mean_std(offsets.mean(-1)),
        "mean_abs": mean_std(np.abs(offsets).mean(-1)),
        "within_tolerance": mean_std((np.abs(offsets) < tolerance).mean(-1)),
        "by_frequency": {
            "bin_edges": edges.tolist(),
            "mean_offset": [
                float(flat[which == b].mean()) if (which == b).any() else None for b in range(bins)
            ],
            "mean_abs": [
                float(np.abs(flat[which == b]).mean()) if (which == b).any() else None
                for b in range(bins)
            ],
        },
    }


class ShapedSine(ML3Experiment):
    """Shaped vs unshaped ML³ on sine frequencies over `config.seeds`."""

    VARIANTS = ("ml3_mse", "ml3_shaped")

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh)
        c = config
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        self.model = SineFrequency(c.model.init_freq)
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self.learned_inner = ml3.regression_inner_loss(
            self.model.apply, lambda phi, y, y_hat, batch: self.loss_fn(phi, y, y_hat, batch["x"])
        )
        self.mse_inner = ml3.regression_inner_loss(
            self.model.apply, lambda phi, y, y_hat, batch: mse(y, y_hat)
        )
        self._evaluate_jit = self.jit(self._evaluate)

    def _freq_tasks(self, key, num_tasks):
        d = self.config.data
        return sample_frequency_tasks(key, num_tasks, d.num_points, d.freq_range, d.x_range)

    def _fresh(self, num_tasks):
        params = self.model.init(jax.random.key(0), jnp.zeros((1, 1)))  # deterministic ω₀
        state = init_inner_state(params, self.inner_opt)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_tasks, *x.shape)), state)

    def init_one(self, seed_key):
        phi = learned_losses.init_learned_loss(self.config.loss_net, seed_key, num_extra=1)
        return init_meta_state(phi, self.meta_opt)

    def variant_inputs(self):
        """Whether each variant is meta-trained on the shaping loss: bool [V]."""
        return jnp.asarray([v == "ml3_shaped" for v in self.VARIANTS])

    def _outer_loss(self, shaped):
        def outer_loss(params, model_state, batch, key):
            shaping = (params["params"]["freq"] - batch["freq"]) ** 2
            return jnp.where(shaped, shaping, mse(batch["y"], self.model.apply(params, batch["x"])))

        return outer_loss

    def episode(self, meta_state, seed_key, step, variant, inputs):
        """One meta iteration: an episode on `data.num_tasks` new frequencies from ω₀,
        on the shaping task loss if `variant` (a traced bool), else on the MSE."""
        del inputs
        c = self.config
        num_tasks, length, window = c.data.num_tasks, c.inner.episode_length, c.meta.window
        tasks = self._freq_tasks(
            jax.random.fold_in(jax.random.fold_in(seed_key, Ml3ShapedSineSeed.TASKS), step),
            num_tasks,
        )
        key = jax.random.fold_in(seed_key, step)
        per_task = lambda k: jax.vmap(lambda t: ml3.repeat(t, k))  # noqa: E731
        return ml3.episode(
            meta_state,
            self._fresh(num_tasks),
            per_task(length)({"x": tasks["x"], "y": tasks["y"]}),
            per_task(length // window)(tasks),
            jax.random.fold_in(key, Ml3ShapedSineStep.INNER),
            jax.random.fold_in(key, Ml3ShapedSineStep.OUTER),
            meta_optimizer=self.meta_opt,
            problem=bilevel.Problem(
                self.learned_inner,
                self._outer_loss(variant),
                self.inner_opt,
            ),
            estimator=self.estimator,
        )

    def _test_tasks(self, seed_key):
        """The seed's unseen test frequencies (the same at every evaluation)."""
        return self._freq_tasks(
            jax.random.fold_in(seed_key, Ml3ShapedSineSeed.TEST_TASKS), self.config.eval.num_tasks
        )

    def _distance_traces(self, inner_loss, phi, seed_key, num_steps=None):
        """|ω − ν| traces [F, K + 1] on the seed's test frequencies, from ω₀; K is
        `num_steps`, by default `eval.test_steps`."""
        tasks = self._test_tasks(seed_key)
        params = self._fresh(1).params

        def one(x, y, freq):
            evaluate = lambda p: jnp.abs(p["params"]["freq"] - freq)  # noqa: E731
            _, trace = ml3.fit(
                jax.tree.map(lambda a: a[0], params),
                phi,
                {"x": x, "y": y},
                jax.random.key(0),
                inner_loss=inner_loss,
                optimizer=self.inner_opt,
                num_steps=num_steps or self.config.eval.test_steps,
                evaluate=evaluate,
            )
            return trace

        return jax.vmap(one)(tasks["x"], tasks["y"], tasks["freq"])

    def _all_traces(self, state, num_steps=None):
        """{'mse': [S, F, K+1], 'ml3_mse': ..., 'ml3_shaped': ...}."""
        phis = state.params
        traces = {
            "mse": jax.vmap(lambda k: self._distance_traces(self.mse_inner, {}, k, num_steps))(
                self.seed_keys
            )
        }
        for v, name in enumerate(self.VARIANTS):
            phi_v = jax.tree.map(lambda x, v=v: x[v], phis)
            traces[name] = jax.vmap(
                lambda phi, k: self._distance_traces(self.learned_inner, phi, k, num_steps)
            )(phi_v, self.seed_keys)
        return traces

    def _minimum_offsets(self, state):
        """Where each learned loss is lowest over ω on each test task's own data, against
        its ν: (ν [S, F], {variant: argmin − ν [S, F]}), the argmin global over
        `eval.landscape_range` (`loss_minimum`)."""
        c = self.config.eval
        grid = jnp.arange(c.landscape_range[0], c.landscape_range[1], c.minimum_grid_step)

        def per_seed(phi, seed_key):
            tasks = self._test_tasks(seed_key)

            def one(x, y, freq):
                at = lambda w: self.loss_fn(phi, y, jnp.sin(w * x), x)  # noqa: E731
                return loss_minimum(at, grid) - freq

            return jax.lax.map(lambda t: one(*t), (tasks["x"], tasks["y"], tasks["freq"]))

        offsets = {}
        for v, name in enumerate(self.VARIANTS):
            phi_v = jax.tree.map(lambda p, v=v: p[v], state.params)
            offsets[name] = jax.lax.map(lambda a: per_seed(*a), (phi_v, self.seed_keys))
        freqs = jax.vmap(lambda k: self._test_tasks(k)["freq"])(self.seed_keys)
        return freqs, offsets

    def _landscapes_across_freqs(self, state):
        """The shaped loss of the first seed over the ω grid for `eval.landscape_freqs`
        ν on the dense x of Fig. 5a: (ω grid [G], ν [N], loss [N, G])."""
        grid, x = self._landscape_grid()
        freqs = jnp.linspace(*self.config.eval.landscape_freqs)
        phi = jax.tree.map(lambda p: p[self.VARIANTS.index("ml3_shaped"), 0], state.params)

        def row(nu):
            y = jnp.sin(nu * x)
            return jax.vmap(lambda w: self.loss_fn(phi, y, jnp.sin(w * x), x))(grid)

        return grid, freqs, jax.lax.map(row, freqs)

    def _evaluate(self, state, step):
        del step
        tol = self.config.eval.tolerance
        out = {}
        for name, trace in self._all_traces(state).items():
            out[f"eval/reached_fraction/{name}"] = jnp.mean(trace[..., -1] < tol, axis=-1)
            out[f"eval/final_distance/{name}"] = jnp.mean(trace[..., -1], axis=-1)
        return out

    def evaluate(self, state, step):
        """The fraction of test frequencies within `eval.tolerance` and the mean final
        |ω − ν|, for MSE and each learned loss, per seed."""
        return self._evaluate_jit(state, step)

    def _landscape_grid(self):
        """The ω grid [G] of the landscape figures and their dense x [X, 1] (Fig. 5a)."""
        low, high = self.config.eval.landscape_range
        return jnp.arange(low, high, 0.05), jnp.arange(-5.0, 5.0, 0.1)[:, None]

    def _landscapes(self, state):
        """Loss over the ω grid for ν = `eval.landscape_freq`: name -> [S, G]."""
        c = self.config.eval
        grid, x = self._landscape_grid()
        y = jnp.sin(c.landscape_freq * x)

        def at(loss, omega):
            return loss(y, jnp.sin(omega * x), x)

        out = {
            "MSE": jnp.broadcast_to(
                jax.vmap(lambda w: at(lambda y, yh, x: mse(y, yh), w))(grid),
                (len(self.config.seeds), grid.size),
            )
        }
        for v, name in enumerate(self.VARIANTS):
            phi_v = jax.tree.map(lambda p, v=v: p[v], state.params)
            out[name] = jax.vmap(
                lambda phi: jax.vmap(lambda w: at(lambda y, yh, x: self.loss_fn(phi, y, yh, x), w))(
                    grid
                )
            )(phi_v)
        return grid, out

    def finalize(self, state, history, workdir):
        c = self.config
        counts = sorted({*c.eval.test_step_counts, c.eval.test_steps})
        arrays = lambda s: (  # noqa: E731  one program, compiled once
            self._all_traces(s, counts[-1]),
            self._landscapes(s),
            self._minimum_offsets(s),
            self._landscapes_across_freqs(s),
        )
        traces, (grid, landscapes), (freqs, offsets), across = jax.device_get(
            self.jit(arrays)(state)
        )
        self.save_learned_losses(
            workdir,
            state.params,
            y="targets sin(ν·x)",
            y_hat="model outputs sin(ω·x)",
            extra=("x",),
        )
        plot_dir = os.path.join(workdir, "plots")
        plots.loss_landscapes(
            grid,
            {
                "ML³ shaped (ω − ν)²": landscapes["ml3_shaped"],
                "ML³ (MSE task loss)": landscapes["ml3_mse"],
                "MSE": landscapes["MSE"],
            },
            truth=c.eval.landscape_freq,
            xlabel="frequency ω",
            title=f"Loss landscapes for ν = {c.eval.landscape_freq} (Fig. 5a)",
            path=os.path.join(plot_dir, "fig5a_landscapes.png"),
        )
        plots.landscapes_across_truth(
            *across,
            freqs,
            offsets["ml3_shaped"],
            tolerance=c.eval.tolerance,
            title="ML³ shaped loss across ν: where its minimum sits",
            path=os.path.join(plot_dir, "fig5a_minimum_across_freqs.png"),
        )
        labels = {"mse": "MSE", "ml3_mse": "ML³ (MSE task loss)", "ml3_shaped": "ML³ shaped"}
        plots.meta_test_curve(
            {labels[k]: v[..., : c.eval.test_steps + 1].mean(axis=1) for k, v in traces.items()},
            ylabel="|ω − ν|",
            title="Meta-test on unseen frequencies (Fig. 5b)",
            path=os.path.join(plot_dir, "fig5b_meta_test.png"),
        )
        evals = [r for r in history if "eval/reached_fraction/ml3_shaped" in r]
        eval_steps = [r["step"] for r in evals]
        per_eval = {k: [r[f"eval/reached_fraction/{k}"] for r in evals] for k in labels}
        reached_by_count = {
            k: {n: np.asarray(f) for n, f in reached_fractions(v, counts, c.eval.tolerance).items()}
            for k, v in traces.items()
        }
        plots.reached_fractions(
            eval_steps,
            {labels[k]: v for k, v in per_eval.items()},
            counts,
            {labels[k]: np.stack([v[str(n)] for n in counts]) for k, v in reached_by_count.items()},
            ylabel=f"fraction within {c.eval.tolerance} of ν",
            test_steps=c.eval.test_steps,
            path=os.path.join(plot_dir, "reached_fraction.png"),
        )
        with open(os.path.join(workdir, "minimum_offsets.json"), "w") as f:
            json.dump({"freq": freqs.tolist(), **{k: v.tolist() for k, v in offsets.items()}}, f)
        at = c.eval.test_steps
        return {
            "reached_fraction": {
                k: mean_std((v[..., at] < c.eval.tolerance).mean(-1)) for k, v in traces.items()
            },
            "final_distance": {k: mean_std(v[..., at].mean(-1)) for k, v in traces.items()},
            "reached_fraction_vs_test_steps": {
                k: {n: mean_std(f) for n, f in v.items()} for k, v in reached_by_count.items()
            },
            "final_distance_vs_test_steps": {
                k: {str(n): mean_std(v[..., n].mean(-1)) for n in counts} for k, v in traces.items()
            },
            "reached_fraction_vs_meta_iteration": {
                "step": eval_steps,
                **{k: [mean_std(f) for f in v] for k, v in per_eval.items()},
            },
            "minimum_offset": {
                k: offset_stats(v, freqs, c.eval.tolerance) for k, v in offsets.items()
            },
            "tolerance": c.eval.tolerance,
            "test_steps": c.eval.test_steps,
            "seeds": list(c.seeds),
        }
