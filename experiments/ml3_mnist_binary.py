"""ML³ binary digit classification (Bechtle et al., Fig. 2, bottom row), all seeds in one program.

Protocol (see `configs/ml3_mnist_binary.py`): each seed draws a random partition of the
ten digits into five pairs (`tasks.digit_pairs.task_pairs`); the first pair is the
meta-train task, the other four are the meta-test tasks, each a binary problem (label 1
for the pair's second digit). Every task holds a fixed, class-balanced sample:
`data.examples_per_task` training images and `data.test_examples_per_task` test images
(from MNIST's test split); the meta-train task also holds `data.heldout_examples`
training images, disjoint from its sample, on which the meta objective (the task
cross-entropy at the new θ) is evaluated.

Each meta iteration is an episode of `inner.episode_length` SGD steps on mini-batches of
the meta-train task from a fresh LeNet θ, with φ updated after every window of
`meta.window` inner steps. Every `eval.every` meta iterations, a fresh model is trained
for `eval.test_steps` steps on the meta-train task with the current learned loss and with
cross-entropy (Fig. 2c); at the end, fresh models on the four meta-test tasks give the
test-set cross-entropy and accuracy every `eval.trace_every` gradient steps (Fig. 2d).
Training with cross-entropy does not depend on φ, so its runs are computed once.

The state (φ and its optimizer state) holds all seeds along a leading axis; every
function is vmapped over it. The task samples are device arrays [S, ...] passed to the
jitted functions as arguments (`chunk_inputs`, one slice per seed).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalearn import bilevel, plots
from metalearn.algorithms import ml3
from metalearn.losses import learned as learned_losses
from metalearn.losses.task import softmax_cross_entropy
from metalearn.models import vision
from metalearn.optim import make_optimizer
from metalearn.runtime.experiment import ML3Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import init_inner_state, init_meta_state
from metalearn.streams import Ml3MnistBinaryFit, Ml3MnistBinarySeed, Ml3MnistBinaryStep
from metalearn.tasks import images
from metalearn.tasks.digit_pairs import NUM_PAIRS, sample_batches, sample_tasks, task_pairs


class MnistBinary(ML3Experiment):
    """The ML³ binary-MNIST experiment over `config.seeds`, driven by `runtime.loop`.

    It runs on one device (the mesh is not used).
    """

    CHUNK_INPUTS_PER_SEED = True  # the task samples [S, ...]

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh)
        c = config
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        if tuple(c.data.classes):
            raise ValueError(
                "data.classes must be (): the digit pairs are drawn from each seed "
                "(see task_pairs)."
            )
        if c.eval.test_steps % c.eval.trace_every:
            raise ValueError(
                f"eval.test_steps ({c.eval.test_steps}) must be a multiple of "
                f"eval.trace_every ({c.eval.trace_every})."
            )
        full = images.load_images(c.data)
        self.info = full.info
        self.pairs = np.stack([task_pairs(s) for s in c.seeds])  # [S, 5, 2]
        per_seed = [
            sample_tasks(
                full,
                s,
                examples_per_task=c.data.examples_per_task,
                heldout_examples=c.data.heldout_examples,
                test_examples_per_task=c.data.test_examples_per_task,
            )
            for s in c.seeds
        ]
        self.data = {k: jnp.asarray(np.stack([p[k] for p in per_seed])) for k in per_seed[0]}
        self.model = vision.make_model(c.model.name, num_classes=2)
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self._fit_task_jit = self.jit(self._fit_task)
        self._ce_traces = {}

    def _logits(self, params, model_state, x_uint8, train, key=None):
        x = images.preprocess(x_uint8, self.info, augment="none", key=None)
        return vision.apply_model(self.model, params, model_state, x, train=train, key=key)

    def _inner_loss(self, use_learned):
        """The inner objective: L_φ(one-hot y, softmax probabilities) or cross-entropy
        (`use_learned`, a bool or a traced scalar, so one program serves both)."""

        def loss(params, model_state, phi, batch, key):
            logits, model_state = self._logits(params, model_state, batch["x"], True, key)
            y = jax.nn.one_hot(batch["y"], 2)
            ce = softmax_cross_entropy(batch["y"], logits)
            value = jnp.where(use_learned, self.loss_fn(phi, y, jax.nn.softmax(logits)), ce)
            return value, (model_state, {"task/ce": ce})

        return loss

    def _outer_loss(self, params, model_state, batch, key):
        del key
        logits, _ = self._logits(params, model_state, batch["x"], False)
        return softmax_cross_entropy(batch["y"], logits)

    def _test_metrics(self, params, model_state, x, y):
        """[2]: (cross-entropy, accuracy) on a task's test sample."""
        logits, _ = self._logits(params, model_state, x, False)
        ce = softmax_cross_entropy(y, logits)
        return jnp.stack([ce, jnp.mean(jnp.argmax(logits, -1) == y)])

    def _fresh(self, key):
        params, model_state = vision.init_model(self.model, key, self.info.image_shape)
        return init_inner_state(params, self.inner_opt, model_state)

    def init_one(self, key):
        phi = learned_losses.init_learned_loss(
            self.config.loss_net,
            jax.random.fold_in(key, Ml3MnistBinarySeed.LOSS_INIT),
            num_outputs=2,
        )
        return init_meta_state(phi, self.meta_opt)

    def chunk_inputs(self):
        """The task samples of every seed, [S, ...] (see `digit_pairs.sample_tasks`)."""
        return self.data

    def episode(self, meta_state, seed_key, step, variant, data):
        """One episode of Algorithm 1 from a fresh θ on the meta-train task (task 0) of
        the seed's task samples `data`."""
        del variant
        c = self.config
        length, window = c.inner.episode_length, c.meta.window
        key = jax.random.fold_in(jax.random.fold_in(seed_key, Ml3MnistBinarySeed.META_TRAIN), step)
        batches = sample_batches(
            jax.random.fold_in(key, Ml3MnistBinaryStep.BATCHES),
            data["train_x"][0],
            data["train_y"][0],
            length,
            c.inner.batch_size,
        )
        outer = sample_batches(
            jax.random.fold_in(key, Ml3MnistBinaryStep.OUTER_BATCHES),
            data["heldout_x"],
            data["heldout_y"],
            length // window,
            c.meta.batch_size,
        )
        add_task_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
        return ml3.episode(
            meta_state,
            add_task_axis(self._fresh(jax.random.fold_in(key, Ml3MnistBinaryStep.MODEL_INIT))),
            add_task_axis(batches),
            add_task_axis(outer),
            jax.random.fold_in(key, Ml3MnistBinaryStep.INNER),
            jax.random.fold_in(key, Ml3MnistBinaryStep.OUTER),
            meta_optimizer=self.meta_opt,
            problem=bilevel.Problem(
                self._inner_loss(True),
                self._outer_loss,
                self.inner_opt,
            ),
            estimator=self.estimator,
        )

    def _fit(self, phi, seed_key, data, task, use_learned):
        """Algorithm 2 on task number `task` (0: meta-train, 1…4: meta-test). θ₀ and the
        mini-batch order depend on the seed and the task only, so the learned loss and
        cross-entropy start from the same θ₀ and see the same batches.

        Returns:
          Test-set (cross-entropy, accuracy) [P, 2] at θ₀ and after every
          `eval.trace_every` of the `eval.test_steps` steps (P = steps // every + 1).
        """
        c = self.config
        every = c.eval.trace_every
        num_chunks = c.eval.test_steps // every
        key = jax.random.fold_in(jax.random.fold_in(seed_key, Ml3MnistBinarySeed.FIT), task)
        batches = sample_batches(
            jax.random.fold_in(key, Ml3MnistBinaryFit.BATCHES),
            data["train_x"][task],
            data["train_y"][task],
            num_chunks * every,
            c.inner.batch_size,
        )
        keys = jax.random.split(
            jax.random.fold_in(key, Ml3MnistBinaryFit.INNER), (num_chunks, every)
        )
        test_x, test_y = data["test_x"][task], data["test_y"][task]
        phi = jax.lax.stop_gradient(phi)

        def chunk(state, xs):
            state, _ = bilevel.unroll(
                state,
                phi,
                *xs,
                inner_loss=self._inner_loss(use_learned),
                optimizer=self.inner_opt,
            )
            return state, self._test_metrics(state.params, state.model_state, test_x, test_y)

        state = self._fresh(jax.random.fold_in(key, Ml3MnistBinaryFit.MODEL_INIT))
        first = self._test_metrics(state.params, state.model_state, test_x, test_y)
        by_chunk = jax.tree.map(lambda x: x.reshape(num_chunks, every, *x.shape[1:]), batches)
        _, trace = jax.lax.scan(chunk, state, (by_chunk, keys))
        return jnp.concatenate([first[None], trace])

    def _fit_task(self, meta_state, data, task, use_learned):
        """`_fit` of every seed: [S, P, 2]. One program serves every task and both losses."""

        def one(phi, seed_key, seed_data):
            return self._fit(phi, seed_key, seed_data, task, use_learned)

        return jax.vmap(one)(meta_state.params, self.seed_keys, data)

    def _cross_entropy_fit(self, state, task):
        # Training with cross-entropy ignores φ, so its traces are computed once and kept.
        if task not in self._ce_traces:
            self._ce_traces[task] = jax.device_get(
                self._fit_task_jit(state, self.data, task, False)
            )
        return self._ce_traces[task]

    def evaluate(self, state, step):
        """Fig. 2c: meta-train-task test CE and accuracy after `eval.test_steps` steps."""
        del step
        out = {}
        for name, traces in (
            ("learned", self._fit_task_jit(state, self.data, 0, True)),
            ("cross_entropy", self._cross_entropy_fit(state, 0)),
        ):
            out[f"eval/train_task_ce/{name}"] = traces[:, -1, 0]
            out[f"eval/train_task_acc/{name}"] = traces[:, -1, 1]
        return out

    def _meta_test(self, state):
        """Traces [S, 2 (learned, CE), 4 (test tasks), P, 2 (CE, accuracy)]."""
        tasks = range(1, NUM_PAIRS)
        learned = [jax.device_get(self._fit_task_jit(state, self.data, t, True)) for t in tasks]
        ce = [self._cross_entropy_fit(state, t) for t in tasks]
        return np.stack([np.stack(learned, axis=1), np.stack(ce, axis=1)], axis=1)

    def finalize(self, state, history, workdir):
        c = self.config
        traces = np.asarray(jax.device_get(self._meta_test(state)), np.float64)
        num_tasks, num_points = traces.shape[2:4]
        self.save_learned_losses(
            workdir,
            state.params,
            y="one-hot labels [B, 2]",
            y_hat="softmax probabilities [B, 2]",
        )
        names = {"learned": "learned loss (ML³)", "cross_entropy": "task loss (cross-entropy)"}
        plot_dir = os.path.join(workdir, "plots")
        evals = [r for r in history if "eval/train_task_ce/learned" in r]
        for metric, label in (("ce", "test cross-entropy"), ("acc", "test accuracy")):
            plots.meta_train_curve(
                [r["step"] for r in evals],
                {names[n]: [r[f"eval/train_task_{metric}/{n}"] for r in evals] for n in names},
                ylabel=f"meta-train task {label}\nafter {c.eval.test_steps} steps",
                title="ML³ binary MNIST: meta-train (Fig. 2c)",
                path=os.path.join(plot_dir, f"fig2c_meta_train_{metric}.png"),
            )
        # Bands over every (seed, meta-test task) run. `meta_test_curve` puts a point at
        # every gradient step; between the traced steps the runs are interpolated
        # linearly, which draws the same lines as plotting the traced points alone.
        traced_steps = np.arange(num_points) * c.eval.trace_every
        all_steps = np.arange(c.eval.test_steps + 1)
        for j, (metric, label) in enumerate(
            (("ce", "test cross-entropy"), ("acc", "test accuracy"))
        ):
            plots.meta_test_curve(
                {
                    name: np.stack(
                        [
                            np.interp(all_steps, traced_steps, run)
                            for run in traces[:, i, :, :, j].reshape(-1, num_points)
                        ]
                    )
                    for i, name in enumerate(names.values())
                },
                ylabel=f"meta-test task {label}",
                title=f"ML³ binary MNIST: meta-test on {num_tasks} unseen pairs (Fig. 2d)",
                path=os.path.join(plot_dir, f"fig2d_meta_test_{metric}.png"),
            )
        final = traces[:, :, :, -1].mean(axis=2)  # [S, 2, 2]: mean over the meta-test tasks
        last = evals[-1]
        return {
            "meta_test_final_accuracy": {n: mean_std(final[:, i, 1]) for i, n in enumerate(names)},
            "meta_test_final_ce": {n: mean_std(final[:, i, 0]) for i, n in enumerate(names)},
            "train_task_after_meta_train": {
                "accuracy": {n: mean_std(last[f"eval/train_task_acc/{n}"]) for n in names},
                "ce": {n: mean_std(last[f"eval/train_task_ce/{n}"]) for n in names},
            },
            "seeds": list(c.seeds),
            "task_pairs": self.pairs.tolist(),
            "meta_test_curve": {
                "steps": traced_steps.tolist(),
                **{
                    f"{n}_{m}_mean": traces[:, i, :, :, j].mean((0, 1)).tolist()
                    for i, n in enumerate(names)
                    for j, m in enumerate(("ce", "accuracy"))
                },
            },
        }
