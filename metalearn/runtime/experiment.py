"""The experiment protocol that `runtime.loop.train_and_evaluate` drives.

An experiment program (a module of `experiments/`) subclasses `Experiment`, or
`ML3Experiment` for the common ML³ shape, and is built as `Cls(config, mesh=mesh)`:

- `init()`, `train_chunk(state, start, num)` and `evaluate(state, step)` are pure in
  what they compute (each calls programs compiled with `self.jit`), so a run is a
  function of its config and resumes exactly;
- `finalize(state, history, workdir)` is the impure end: the final evaluation, figures
  and artifacts, returning the summary.

The loop reads no key of an experiment's config but `log_every`; the cadences it takes
from the experiment's attributes, and what else it reports (the estimators a non-finite
error hints at, the phase a progress line names) it asks the experiment (`estimators`,
`phase`).

`config.fast_compile` (set by every `:smoke` variant) compiles every program of the
experiment with most XLA optimisations off: a smoke run's time is its compilation, and
the numbers it computes stay meaningful (only their last bits change). Otherwise
`config.compiler_options`, if given, are XLA's options for every program of the
experiment (e.g. `{"xla_backend_optimization_level": 1}`: small programs whose time is
their compilation, such as ML³ sine's).
"""

import abc
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from metalearn import bilevel
from metalearn.losses import learned as learned_losses
from metalearn.runtime import sharding
from metalearn.types import MetaParams, PRNGKey

# The XLA options of `jax_disable_most_optimizations`, applied per program.
FAST_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """XLA's options for every program of an experiment with this config.

    `FAST_COMPILE_OPTIONS` if `config.fast_compile`, else `config.compiler_options`
    (a mapping of XLA option names to values; none if absent). XLA itself rejects an
    unknown option name when the first program compiles.
    """
    if config.get("fast_compile", False):
        return dict(FAST_COMPILE_OPTIONS)
    options = config.get("compiler_options", None) or {}
    if isinstance(options, ml_collections.ConfigDict):
        options = options.to_dict()
    if not isinstance(options, dict):
        raise TypeError(
            f"config.compiler_options must map XLA option names to values, e.g. "
            f"{{'xla_backend_optimization_level': 1}}; got {options!r}."
        )
    return dict(options)


class Experiment(abc.ABC):
    """One experiment: pure steps over a state, plus a final impure `finalize`.

    Attributes:
      config: the experiment's config.
      mesh: the device mesh the experiment may shard over (None: it chooses).
      num_steps: total steps of the run (set by the subclass).
      eval_every: steps between evaluations (`config.eval.every`).
      checkpoint_every: steps between checkpoints (`config.checkpoint_every`), a multiple
        of `eval_every`.
      keep_checkpoints: steps whose checkpoints are saved and kept for good, besides the
        newest two (each a multiple of `eval_every`; e.g. the end of an offline phase).
      piece_steps: where the loop may cut a chunk into several `train_chunk` calls
        without changing a number (see the class attribute); None by default.
    """

    num_steps: int
    keep_checkpoints: tuple[int, ...] = ()
    # The smallest number of steps a chunk may be cut into, at multiples of it from the
    # chunk's start, with every number unchanged (e.g. 1 where each step is a program of
    # its own); None: a chunk is one program, not to be cut. The loop cuts long chunks
    # so that progress shows within them.
    piece_steps: int | None = None

    def __init__(self, config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh
        self.eval_every = config.eval.every
        self.checkpoint_every = config.checkpoint_every

    def jit(self, fun: Callable, **kwargs: Any) -> Callable:
        """`jax.jit(fun, **kwargs)` with the config's compiler options (`compiler_options`).

        Most optimisations are off if `config.fast_compile`; otherwise the options are
        `config.compiler_options` (none by default).
        """
        options = compiler_options(self.config)
        if options:
            kwargs.setdefault("compiler_options", options)
        return jax.jit(fun, **kwargs)

    @abc.abstractmethod
    def init(self) -> Any:
        """The initial state (a pytree of arrays)."""

    @abc.abstractmethod
    def train_chunk(self, state: Any, start: int, num: int) -> tuple[Any, dict[str, Any]]:
        """Steps start … start+num−1; metrics stacked with a leading axis of length num."""

    @abc.abstractmethod
    def evaluate(self, state: Any, step: int) -> dict[str, Any]:
        """Evaluation metrics at `step` (written under `eval/...`)."""

    @abc.abstractmethod
    def finalize(self, state: Any, history: list[dict], workdir: str) -> dict[str, Any]:
        """Final evaluation, figures and artifacts; returns the summary."""

    def check_divergence(self, metrics: dict[str, Any], step: int) -> tuple[int, str] | None:
        """Whether the run has diverged, seen from host metrics; None if it has not.

        Called by the loop after every chunk (`metrics` stacked as `train_chunk` returns
        them, `step` the chunk's first step) and after every evaluation (`metrics` the
        evaluation's, `step` its step). Returns `(step, message)`: the step at which it
        diverged and a message naming the quantity and its bound; the loop then stops
        the run with a `DivergenceError`. By default nothing diverges but non-finite
        values, which the loop checks itself.
        """
        return None

    def estimators(self) -> tuple[str, ...]:
        """The gradient estimators the run's meta-training uses, by their config names.

        The loop's non-finite error hints at each one's usual failure (e.g. the σ of
        "es"). By default `config.meta.estimator` where the config has one; an experiment
        with more than one (an offline phase of its own, say) names them all.
        """
        meta = self.config.get("meta") or {}
        name = meta.get("estimator")
        return (name,) if name else ()

    @staticmethod
    def config_estimator(config: ml_collections.ConfigDict, episode_length: int):
        """The `bilevel.Estimator` of `config.meta` (`estimator`, `window`,
        `estimator_options`, `remat`) for episodes of `episode_length` inner steps."""
        meta = config.meta
        return bilevel.estimator_from_config(
            meta.estimator,
            window=meta.window,
            episode_length=episode_length,
            options=meta.get("estimator_options"),
            remat=meta.get("remat", False),
        )

    def phase(self, step: int) -> str:
        """What step `step` does, in a few words, for progress lines ("" by default).

        E.g. "offline ML³" for the steps of an offline phase.
        """
        del step
        return ""


def scan_steps(step: Callable[[Any, jax.Array], tuple[Any, Any]], state, start, num: int):
    """`num` steps `state, metrics = step(state, t)` for t = start … start+num−1, scanned.

    Metrics come back stacked with a leading axis of length `num`.
    """
    return jax.lax.scan(step, state, start + jnp.arange(num))


class ML3Experiment(Experiment):
    """The common ML³ shape: φ for every (variant, seed), one episode a meta step.

    The state holds every seed along a leading axis, or [variant, seed] when the class
    names `VARIANTS` (learned losses that differ in one input of the episode, e.g. the
    task loss they are meta-trained on). Subclasses implement `episode` — one meta step
    of one (variant, seed), usually `algorithms.ml3.episode` — and `init_one`, and may
    pass arrays that should not be baked into the program as `chunk_inputs` and add
    metrics of the whole run to a chunk's (`chunk_metrics`).
    """

    VARIANTS: tuple[str, ...] = ()
    # True: `chunk_inputs` has a leading seed axis and each seed's episode gets its slice.
    CHUNK_INPUTS_PER_SEED: bool = False

    def __init__(self, config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None):
        super().__init__(config, mesh=mesh)
        self.num_steps = config.meta.steps
        # The seeds are independent: each device of the mesh meta-trains its share of them.
        # Every program of the experiment takes the seed keys, so XLA keeps what it
        # computes per seed on the seed's device (the state, the meta-test's fits).
        self.mesh = sharding.seed_mesh(len(config.seeds), mesh)
        key_data = jax.random.key_data(jax.vmap(jax.random.key)(jnp.asarray(config.seeds)))
        self.seed_keys = jax.random.wrap_key_data(
            sharding.put(jax.device_get(key_data), sharding.data_sharded(self.mesh))
        )
        self._chunk = self.jit(self._train_chunk, static_argnums=2)
        # Every leaf of the state seed-sharded, as the chunks return it: left to XLA,
        # the optimizer state came out replicated, so the second chunk compiled again.
        seeds = (None, sharding.DATA_AXIS) if self.VARIANTS else (sharding.DATA_AXIS,)
        self._init = self.jit(
            self._init_all, out_shardings=NamedSharding(self.mesh, PartitionSpec(*seeds))
        )

    # --- what a subclass provides -----------------------------------------------------

    def variant_inputs(self) -> Any:
        """Per-variant inputs of `episode`, leading axis len(VARIANTS); None if unused."""
        return None

    def chunk_inputs(self) -> Any:
        """Arrays passed to the compiled chunk as an argument (e.g. a dataset).

        Every seed's episode sees them whole, or its slice of their leading axis [S, ...]
        when the class sets `CHUNK_INPUTS_PER_SEED`.
        """
        return None

    def chunk_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics a chunk returns, from its episodes' (pure; traced in the chunk).

        Args:
          metrics: what `episode` returned, stacked [num, S, ...] ([num, V, S, ...] with
            VARIANTS).

        Returns:
          The chunk's metrics, each with the leading axis [num]: by default `metrics`
          unchanged; a subclass may add figures of the whole run (e.g. a mean over
          seeds), computed in the same compiled program.
        """
        return metrics

    @abc.abstractmethod
    def init_one(self, seed_key: PRNGKey) -> Any:
        """The initial state of one seed (φ and its optimizer state, or a pytree of
        them), pure."""

    @abc.abstractmethod
    def episode(self, meta_state, seed_key: PRNGKey, step, variant, inputs) -> tuple[Any, dict]:
        """One meta step of one seed (and variant): `(meta_state, metrics)`."""

    # --- the shared protocol ----------------------------------------------------------

    def _init_all(self, seed_keys):
        """`init_one` of every seed [S], the same for every variant: [V, S] with VARIANTS."""
        one_variant = jax.vmap(self.init_one)(seed_keys)
        if not self.VARIANTS:
            return one_variant
        return jax.tree.map(lambda x: jnp.stack([x] * len(self.VARIANTS)), one_variant)

    def init(self):
        return self._init(self.seed_keys)

    def _train_chunk(self, state, start, num, inputs, seed_keys):
        seed_axis = 0 if self.CHUNK_INPUTS_PER_SEED else None
        per_seed = jax.vmap(self.episode, in_axes=(0, 0, None, None, seed_axis))
        if self.VARIANTS:
            per_variant = jax.vmap(per_seed, in_axes=(0, None, None, 0, None))
            variants = self.variant_inputs()
            body = lambda s, t: per_variant(s, seed_keys, t, variants, inputs)  # noqa: E731
        else:
            body = lambda s, t: per_seed(s, seed_keys, t, None, inputs)  # noqa: E731
        state, metrics = scan_steps(body, state, start, num)
        metrics = self.chunk_metrics(metrics)
        if jax.process_count() > 1:
            # The loop reads the metrics on every process: whole there, not a share of
            # the seeds (on one process every shard is this process's).
            metrics = jax.lax.with_sharding_constraint(metrics, sharding.replicated(self.mesh))
        return state, metrics

    def train_chunk(self, state, start, num):
        # The seed keys go in as an argument: a program cannot close over an array that
        # spans several processes' devices.
        return self._chunk(state, start, num, self.chunk_inputs(), self.seed_keys)

    def save_learned_losses(
        self,
        workdir: str,
        params: MetaParams,
        *,
        subdir: Sequence[str] = (),
        variants: Sequence[str] | None = None,
        **description: Any,
    ) -> None:
        """Writes one learned-loss artifact per (variant,) seed under `workdir/learned_loss`.

        Args:
          workdir: the run directory.
          params: φ with leading axes [variant, seed] (or [seed] without variants).
          subdir: folders between `learned_loss/` and the variant / `seed_<i>` folders.
          variants: names of the leading variant axis (default `VARIANTS`; () for none).
          **description: recorded in each artifact (see `losses.learned.save_learned_loss`).
        """
        variants = self.VARIANTS if variants is None else tuple(variants)
        params = sharding.host_get(params)  # every process's seeds
        root = os.path.join(workdir, "learned_loss", *subdir)
        folders = (
            {
                (v, i): os.path.join(root, name, f"seed_{seed}")
                for v, name in enumerate(variants)
                for i, seed in enumerate(self.config.seeds)
            }
            if variants
            else {
                (i,): os.path.join(root, f"seed_{seed}") for i, seed in enumerate(self.config.seeds)
            }
        )
        for index, folder in folders.items():
            learned_losses.save_learned_loss(
                folder,
                self.config.loss_net,
                jax.tree.map(lambda x, index=index: x[index], params),
                **{**self.loss_description(), **description},
            )

    def loss_description(self) -> dict[str, Any]:
        """How the saved losses must be fed and what they were meta-trained for."""
        c = self.config
        return {
            "inner_optimizer": c.inner.optimizer.to_dict(),
            "inner_steps": c.inner.get("episode_length", None),
        }
