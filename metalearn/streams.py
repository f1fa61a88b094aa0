"""Named random streams: the numbers folded into keys and added to seeds, by namespace.

A stream is a number folded into a key to derive an independent key
(`jax.random.fold_in(key, Ns.NAME)`), or added to a seed for the same end
(`seed + Ns.NAME`). Names are per namespace: one `enum.IntEnum` per key (or seed) that
several streams come from, whose members never share a number (`@enum.unique`, checked
by `tests/metalearn/test_streams.py`); two classes may. A new stream takes a new member,
with a number its class does not use; never reuse or renumber a member, since that
changes every result drawn from it. Indices (a step, a task, an epoch) are folded as they
are; a member that is the base of a range (`BASE + k`) says so, and no other member of
its class falls in that range. Splitting a key spends numbers too: with JAX's default
`jax_threefry_partitionable`, `jax.random.split(key, n)[i]` is `fold_in(key, i)`. Where a
class's docstring says that a step's key equals a stream's key, the collision predates
the names and is kept, since removing it would change results.
"""

import enum

# ---- metalearn -------------------------------------------------------------------------


@enum.unique
class OuterKey(enum.IntEnum):
    """Streams folded from a window's task-loss key inside `metalearn.bilevel`."""

    ES_NOISE = 0x5E5  # ES / PES perturbations when the caller passes no noise key


@enum.unique
class DigitPairs(enum.IntEnum):
    """Numpy generators of a binary-MNIST seed, `np.random.default_rng([seed, member])`.

    `default_rng(seed)` is the generator of `[seed, 0]`, so PAIRS may be written either way.
    """

    PAIRS = 0  # which digit pairs are the seed's five tasks
    EXAMPLES = 1  # the tasks' training, held-out and test examples


@enum.unique
class SyntheticImages(enum.IntEnum):
    """Numpy seeds of the random-pixel splits that stand in for absent image data."""

    TRAIN = 0
    TEST = 1


# ---- experiments/ml3_sine.py -----------------------------------------------------------


@enum.unique
class Ml3SineSeed(enum.IntEnum):
    """Streams folded from an ML³ sine seed's key.

    The meta step's key is `fold_in(seed_key, step)`, so the keys of steps 1, 2, 3 and 5
    equal these; the meta-test fit splits the seed's key itself (its regression loss
    ignores the keys).
    """

    TRAIN_TASK = 1
    TEST_TASKS = 2
    LOSS_INIT = 3  # φ₀
    META_TEST_INIT = 5  # θ₀ of test task t: fold_in(this, t)


@enum.unique
class Ml3SineStep(enum.IntEnum):
    """Streams folded from an ML³ sine meta step's key."""

    MODEL_INIT = 0  # the episode's fresh θ
    INNER = 1  # the inner steps' keys
    OUTER = 2  # the task loss's keys


# ---- experiments/ml3_shaped_sine.py ----------------------------------------------------


@enum.unique
class Ml3ShapedSineSeed(enum.IntEnum):
    """Streams folded from a shaped-sine seed's key (φ₀ is drawn from the key itself).

    The meta step's key is `fold_in(seed_key, step)`, so the keys of steps 7 and 9 equal
    these.
    """

    TASKS = 7  # the frequencies of meta step s: fold_in(this, s)
    TEST_TASKS = 9


@enum.unique
class Ml3ShapedSineStep(enum.IntEnum):
    """Streams folded from a shaped-sine meta step's key."""

    INNER = 1
    OUTER = 2


# ---- experiments/ml3_mnist_binary.py ---------------------------------------------------


@enum.unique
class Ml3MnistBinarySeed(enum.IntEnum):
    """Streams folded from a binary-MNIST seed's key."""

    META_TRAIN = 0  # meta step s: fold_in(this, s), the namespace `Ml3MnistBinaryStep`
    LOSS_INIT = 1  # φ₀
    FIT = 2  # meta-test task t: fold_in(this, t), the namespace `Ml3MnistBinaryFit`


@enum.unique
class Ml3MnistBinaryStep(enum.IntEnum):
    """Streams folded from a binary-MNIST meta step's key."""

    MODEL_INIT = 0
    BATCHES = 1  # the inner steps' mini-batches
    OUTER_BATCHES = 2  # the task loss's held-out mini-batches
    INNER = 3
    OUTER = 4


@enum.unique
class Ml3MnistBinaryFit(enum.IntEnum):
    """Streams folded from the key of a binary-MNIST meta-test fit (a seed and a task)."""

    MODEL_INIT = 0
    BATCHES = 1
    INNER = 2


# ---- experiments/ml3_mountain_car.py ---------------------------------------------------


@enum.unique
class Ml3MountainCarSeed(enum.IntEnum):
    """Streams folded from a mountain-car seed's key (φ₀ is drawn from the key itself).

    The meta step's key is `fold_in(seed_key, step)`: META_TEST is clear of the steps of
    any run shorter than 10,000 meta steps.
    """

    META_TEST = 10_000  # split into the meta-test's fresh policies


@enum.unique
class Ml3MountainCarStep(enum.IntEnum):
    """Streams folded from a mountain-car meta step's key."""

    POLICY_INIT = 0  # split into the episode's fresh policies
    INNER = 1
    OUTER = 2


# ---- experiments/ml3_mbrl.py -----------------------------------------------------------


@enum.unique
class Ml3MbrlSeed(enum.IntEnum):
    """Streams folded from a model-based RL seed's key.

    The meta step's key is `fold_in(seed_key, step)`, so the keys of steps 1, 2, 3, 4,
    11, 13, 17, 19 and 23 equal these.
    """

    LOSS_INIT = 1  # φ₀
    MODEL_INIT = 2  # the dynamics ensemble
    INIT_EXPLORE = 3  # the first exploration rollouts
    INIT_FIT = 4  # the dynamics model's first fit
    TRAIN_GOAL_POOL = 11  # the fixed training goals (data.num_train_goals > 0)
    EVAL_TRAIN_GOALS = 13  # meta-test goals of the training region
    EVAL_TEST_GOALS = 17  # meta-test goals of eval.test_region
    META_TEST_INIT = 19  # split into the meta-test's θ₀ per goal
    MODEL_ERROR = 23  # the exploration transitions that score the model


@enum.unique
class Ml3MbrlStep(enum.IntEnum):
    """Streams folded from a model-based RL meta step's key."""

    GOALS = 1
    POLICY_INIT = 2  # split into the episode's fresh policies
    INNER = 3
    OUTER = 4
    REFIT = 5  # the namespace `Ml3MbrlRefit`


@enum.unique
class Ml3MbrlRefit(enum.IntEnum):
    """Streams folded from the key of a meta step's new real data and model refit."""

    POLICY_DATA = 1  # rollouts of the episode's final policies
    EXPLORE = 2
    FIT = 3


# ---- experiments/ml3_mfrl.py -----------------------------------------------------------


@enum.unique
class Ml3MfrlSeed(enum.IntEnum):
    """Streams folded from a model-free RL seed's key.

    The meta step's key is `fold_in(seed_key, step)`, so the keys of steps 1 and 29
    equal these.
    """

    LOSS_INIT = 1  # φ₀
    META_TEST = 29  # test goal i: fold_in(this, i), the namespace `Ml3MfrlMetaTestGoal`


@enum.unique
class Ml3MfrlStep(enum.IntEnum):
    """Streams folded from a model-free RL meta step's key (the backprop estimators)."""

    GOALS = 1
    POLICY_INIT = 2  # split into the episode's fresh policies
    # Iteration k = 0 … K of the episode folds ROLLOUTS + k: no other member may be ≥ 3.
    ROLLOUTS = 3


@enum.unique
class Ml3MfrlEsStep(enum.IntEnum):
    """Streams folded from a model-free RL meta step's key by the "es"/"pes" episode.

    It also folds `Ml3MfrlStep.GOALS` and `Ml3MfrlStep.POLICY_INIT`, never
    `Ml3MfrlStep.ROLLOUTS`' range, whose numbers these reuse.
    """

    INNER = 3  # the inner steps' episodes
    OUTER = 4  # the scored episodes (and ES's noise)


@enum.unique
class Ml3MfrlMetaTestGoal(enum.IntEnum):
    """Streams folded from the key of a seed's meta-test on one goal."""

    POLICY_INIT = 0
    FIT = 1  # update k's episodes: fold_in(this, k)


@enum.unique
class Ml3MfrlGoalSeedOffset(enum.IntEnum):
    """Offsets added to `eval.goal_seed` (one for every seed and method)."""

    TEST_GOALS = 0
    EVAL_STARTS = 1  # the start states of the scored episodes


# ---- experiments/ml3_reacher_demos.py --------------------------------------------------


@enum.unique
class Ml3ReacherDemosSeed(enum.IntEnum):
    """Streams folded from a reacher-demonstrations seed's key.

    The meta step's key is `fold_in(seed_key, step)`, so the keys of steps 1, 4 and 5
    equal these.
    """

    LOSS_INIT = 1  # φ₀
    META_TEST_INIT = 4  # split into the meta-test's θ₀ per goal
    BC_INIT = 5  # the behaviour-cloning baseline's θ₀


@enum.unique
class Ml3ReacherDemosStep(enum.IntEnum):
    """Streams folded from a reacher-demonstrations meta step's key."""

    POLICY_INIT = 0  # split into the episode's fresh policies
    INNER = 1
    OUTER = 2


# ---- experiments/image_classification.py -----------------------------------------------


@enum.unique
class ImageClassificationSeed(enum.IntEnum):
    """Streams folded from an image-classification run's key, `jax.random.key(seed)`."""

    MODEL_INIT = 0  # θ₀
    LOSS_INIT = 1  # φ₀
    ONLINE = 2  # AdaLFL's online step s: fold_in(this, s), split into (fresh θ, step) keys
    OFFLINE = 3  # the same for the offline phase's steps
    PLAIN = 4  # plain step s: fold_in(this, s)
    SELECT = 5  # selection-run step s: fold_in(this, s)
    SELECT_INIT = 6  # the selection runs' fresh θ
    # The device path's data streams; epoch e of one is fold_in(this, e).
    TRAIN_BATCHES = 1000
    META_BATCHES = 1001
    SELECT_BATCHES = 1002


@enum.unique
class ImageClassificationSeedOffset(enum.IntEnum):
    """Offsets added to `seed` for the host path's data order (`images.batch_indices`)."""

    MODEL = 0  # the model's batches; also the meta batches of the validation split
    META_ON_TRAIN = 100_003  # the meta batches with meta.split='train'
    SELECT = 200_003  # the selection runs' batches


# ---- experiments/ml3_inverse_dynamics.py ----------------------------------------------


@enum.unique
class Ml3InverseDynamicsSeed(enum.IntEnum):
    """Streams folded from an inverse-dynamics seed's key. Every arm gets the same keys."""

    META_TRAIN = 7  # then the meta step: `Ml3InverseDynamicsStep`
    TEST_TRAJECTORIES = 9
    META_TEST_INIT = 11


@enum.unique
class Ml3InverseDynamicsStep(enum.IntEnum):
    """Streams folded from an inverse-dynamics meta step's key."""

    TASKS = 0
    MODEL_INIT = 1
    INNER = 2
    OUTER = 3


@enum.unique
class Ml3InverseDynamicsEpisodeTasks(enum.IntEnum):
    """Streams folded from the key that draws an episode's tasks from the pool."""

    TRAJECTORIES = 0
    POINTS = 1


# ---- benchmarks/transformer_step.py ----------------------------------------------------


@enum.unique
class TransformerStepBenchmark(enum.IntEnum):
    """Streams folded from the transformer step benchmark's fixed key."""

    MODEL_INIT = 0
    INNER_TOKENS = 1
    OUTER_TOKENS = 2
    INNER = 3
    OUTER = 4


# ---- experiments/self_loss_lm.py -------------------------------------------------------


@enum.unique
class SelfLossLMSeed(enum.IntEnum):
    """Streams folded from the self-loss LM's run key (`jax.random.key(config.seed)`).

    Phase 1 step t's key is `fold_in(run_key, t)`, so the keys of steps 0, 3 and 4 equal
    these.
    """

    INIT = 0  # θ's initialisation
    PHASE2 = 3  # Phase 2's key, folded with the step for its batch
    SAMPLE = 4  # the hack report's sampled continuation


@enum.unique
class SelfLossLMStep(enum.IntEnum):
    """Streams folded from the key of Phase 1 step t (the run key folded with t)."""

    INNER = 1  # the inner steps' batches
    OUTER = 2  # the outer batch
    NOISE = 5  # ES's perturbations
    INNER_STEPS = 11  # the inner steps' keys


# ---- experiments/gist_lm.py ------------------------------------------------------------


@enum.unique
class GistLMSeed(enum.IntEnum):
    """Streams folded from the gist LM's run key (`jax.random.key(config.seed)`)."""

    INIT = 0  # θ's initialisation
    PHASE_G = 1  # Phase G's key, folded with the step for its batch
    PHASE2 = 2  # Phase 2's key, folded with the step for its batch


@enum.unique
class GistLMStep(enum.IntEnum):
    """Streams folded from the key of Phase 2 step t (the PHASE2 key folded with t)."""

    META = 3  # plan 3: the batch of the encoder's meta-objective
