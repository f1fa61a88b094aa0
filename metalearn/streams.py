"""The named PRNG streams: what each `jax.random.fold_in(key, <stream>)` draws.

One `enum.IntEnum` per namespace, the key that its streams are folded from; the values are
the numbers the streams have always had, so results do not change. A fold over a loop
variable (a step, a task) is not a stream and is not named here.
"""

import enum


@enum.unique
class SelfLossLM(enum.IntEnum):
    """Streams folded from the self-loss LM's run key (`jax.random.key(config.seed)`)."""

    INIT = 0  # θ's initialisation
    PHASE2 = 3  # Phase 2's key, folded with the step for its batch
    SAMPLE = 4  # the hack report's sampled continuation


@enum.unique
class SelfLossLMPhase1(enum.IntEnum):
    """Streams folded from the key of Phase 1 step t (the run key folded with t)."""

    INNER = 1  # the inner steps' batches
    OUTER = 2  # the outer batch
    NOISE = 5  # ES's perturbations
    INNER_STEPS = 11  # the inner steps' keys


@enum.unique
class GistLM(enum.IntEnum):
    """Streams folded from the gist LM's run key (`jax.random.key(config.seed)`)."""

    INIT = 0  # θ's initialisation
    PHASE_G = 1  # Phase G's key, folded with the step for its batch
    PHASE2 = 2  # Phase 2's key, folded with the step for its batch


@enum.unique
class GistLMPhase2(enum.IntEnum):
    """Streams folded from the key of Phase 2 step t (the PHASE2 key folded with t)."""

    META = 3  # plan 3: the batch of the encoder's meta-objective
