"""ML³ sine regression (Bechtle et al., Fig. 2, top row), every seed in one program.

Protocol (the public code's, see `configs/ml3_sine.py`): one fixed training task
y = sin(x − π) on fixed points; each meta iteration is an episode of
`inner.episode_length` inner steps from a fresh θ, with φ updated on the task MSE at the
new θ after every window of `meta.window` inner steps.
Every `eval.every` meta steps, fresh models are trained for `eval.test_steps` steps with
the current learned loss and with plain MSE, on the training task (Fig. 2c) and on 10
unseen, out-of-distribution test tasks; at the end the full meta-test curves (Fig. 2d).

The state (φ and its optimizer state) holds all seeds along a leading axis; every
function is vmapped over it.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections

from metalearn import bilevel, plots
from metalearn.algorithms import ml3
from metalearn.losses import learned as learned_losses
from metalearn.losses.task import mse
from metalearn.models.mlp import MLP
from metalearn.optim import make_optimizer
from metalearn.runtime import sharding
from metalearn.runtime.experiment import ML3Experiment
from metalearn.runtime.metrics import mean_std
from metalearn.state import init_inner_state, init_meta_state
from metalearn.streams import Ml3SineSeed, Ml3SineStep
from metalearn.tasks.sine import sample_sine_tasks


class SineRegression(ML3Experiment):
    """The ML³ sine-regression experiment over `config.seeds`, driven by `runtime.loop`."""

    def __init__(self, config: ml_collections.ConfigDict, *, mesh=None):
        super().__init__(config, mesh=mesh)
        c = config
        self.estimator = self.config_estimator(c, c.inner.episode_length)
        features = (*c.model.hidden, 1)
        self.model = MLP(features, c.model.activation, initializer=c.model.meta_train_init)
        self.test_model = MLP(features, c.model.activation, initializer=c.model.meta_test_init)
        self.inner_opt = make_optimizer(c.inner.optimizer, differentiated=True)
        self.meta_opt = make_optimizer(c.meta.optimizer)
        self.loss_fn = learned_losses.learned_loss_fn(c.loss_net)
        self.learned_inner = self._inner_loss(True)
        self._fit_task_program = self.jit(self._fit_task)

    # Tasks are functions of the seed key, so the state needs not carry them.
    def _tasks(self, key):
        d = self.config.data
        train = sample_sine_tasks(
            jax.random.fold_in(key, Ml3SineSeed.TRAIN_TASK),
            1,
            d.num_points,
            d.train_amp,
            d.train_phase,
            d.train_x,
        )
        test = sample_sine_tasks(
            jax.random.fold_in(key, Ml3SineSeed.TEST_TASKS),
            d.num_test_tasks,
            d.num_points,
            d.test_amp,
            d.test_phase,
            d.test_x,
        )
        return train, test

    def init_one(self, key):
        phi = learned_losses.init_learned_loss(
            self.config.loss_net, jax.random.fold_in(key, Ml3SineSeed.LOSS_INIT)
        )
        return init_meta_state(phi, self.meta_opt)

    def episode(self, meta_state, seed_key, step, variant, inputs):
        """One episode of Algorithm 1 from a fresh θ on the training task."""
        c = self.config
        length, window = c.inner.episode_length, c.meta.window
        key = jax.random.fold_in(seed_key, step)
        train, _ = self._tasks(seed_key)
        batch = {"x": train["x"][0], "y": train["y"][0]}
        fresh = init_inner_state(
            self.model.init(jax.random.fold_in(key, Ml3SineStep.MODEL_INIT), batch["x"]),
            self.inner_opt,
        )
        add_task_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
        return ml3.episode(
            meta_state,
            add_task_axis(fresh),
            add_task_axis(ml3.repeat(batch, length)),
            add_task_axis(ml3.repeat(batch, length // window)),
            jax.random.fold_in(key, Ml3SineStep.INNER),
            jax.random.fold_in(key, Ml3SineStep.OUTER),
            meta_optimizer=self.meta_opt,
            problem=bilevel.Problem(
                self.learned_inner,
                lambda p, ms, b, k: mse(b["y"], self.model.apply(p, b["x"])),
                self.inner_opt,
            ),
            estimator=self.estimator,
        )

    def _fit(self, phi, seed_key, task, x, y, use_learned):
        """Meta-test trace [K + 1] of the task MSE on task number `task`, with the learned
        loss or with MSE (`use_learned`), from the same θ₀ for both."""
        params = self.test_model.init(
            jax.random.fold_in(jax.random.fold_in(seed_key, Ml3SineSeed.META_TEST_INIT), task), x
        )
        _, trace = ml3.fit(
            params,
            phi,
            {"x": x, "y": y},
            seed_key,
            inner_loss=self._inner_loss(use_learned),
            optimizer=self.inner_opt,
            num_steps=self.config.eval.test_steps,
            evaluate=lambda p: mse(y, self.model.apply(p, x)),
        )
        return trace

    def _inner_loss(self, use_learned):
        def loss(phi, y, y_hat, batch):
            return jnp.where(use_learned, self.loss_fn(phi, y, y_hat), mse(y, y_hat))

        return ml3.regression_inner_loss(self.model.apply, loss)

    def _fit_task(self, meta_state, seed_keys, task, use_learned):
        """Traces [S, K + 1] of every seed on task number `task` (0: the training task,
        1…T: the test tasks). One compiled program serves evaluation and meta-test."""

        def one(phi, seed_key):
            train, test = self._tasks(seed_key)
            x = jnp.concatenate([train["x"], test["x"]])[task]
            y = jnp.concatenate([train["y"], test["y"]])[task]
            return self._fit(phi, seed_key, task, x, y, use_learned)

        return jax.vmap(one)(meta_state.params, seed_keys)

    def _fit_task_jit(self, meta_state, task, use_learned):
        """`_fit_task` compiled, with the seed keys passed in (a program cannot close over
        an array spread over several processes' devices)."""
        return self._fit_task_program(meta_state, self.seed_keys, task, use_learned)

    def evaluate(self, state, step):
        """Fig. 2c: train-task MSE after `eval.test_steps` steps with the current φ."""
        del step
        final = self._fit_task_jit(state, 0, True)[:, -1]
        return {"eval/train_task_mse/learned_loss": sharding.host_get(final)}

    def _meta_test(self, state):
        """Traces [S, 2 (learned, MSE), 1 + T (train task, test tasks), K + 1]."""
        tasks = range(1 + self.config.data.num_test_tasks)
        return jnp.stack(
            [
                jnp.stack([self._fit_task_jit(state, t, use_learned) for t in tasks], axis=1)
                for use_learned in (True, False)
            ],
            axis=1,
        )

    def finalize(self, state, history, workdir):
        traces = sharding.host_get(self._meta_test(state))  # [S, 2, 1 + T, K+1]
        curves = traces[:, :, 1:].mean(axis=2)  # [S, 2, K+1]: mean over the test tasks
        train_task_mse = traces[:, 1, 0, -1]  # [S]: the MSE baseline does not depend on φ
        self.save_learned_losses(workdir, state.params, y="targets", y_hat="raw outputs")
        evals = [r for r in history if "eval/train_task_mse/learned_loss" in r]
        plot_dir = os.path.join(workdir, "plots")
        plots.meta_train_curve(
            [r["step"] for r in evals],
            {
                "learned loss (ML³)": [r["eval/train_task_mse/learned_loss"] for r in evals],
                "task loss (MSE)": [train_task_mse for _ in evals],
            },
            ylabel=f"train-task MSE after {self.config.eval.test_steps} steps",
            title="ML³ sine regression: meta-train (Fig. 2c)",
            path=os.path.join(plot_dir, "fig2c_meta_train.png"),
        )
        plots.meta_test_curve(
            {"learned loss (ML³)": curves[:, 0], "task loss (MSE)": curves[:, 1]},
            ylabel="test-task MSE",
            title="ML³ sine regression: meta-test on 10 unseen tasks (Fig. 2d)",
            path=os.path.join(plot_dir, "fig2d_meta_test.png"),
        )
        return {
            "train_task_mse_after_meta_train": {
                "learned_loss": mean_std(traces[:, 0, 0, -1]),
                "task_loss": mean_std(train_task_mse),
            },
            "final_mse": {
                "learned_loss": mean_std(curves[:, 0, -1]),
                "task_loss": mean_std(curves[:, 1, -1]),
            },
            "seeds": list(self.config.seeds),
            "meta_test_curve": {
                "learned_loss_mean": curves[:, 0].mean(0).tolist(),
                "task_loss_mean": curves[:, 1].mean(0).tolist(),
            },
            "published": {"learned_loss": [2.26, 0.54], "task_loss": [3.59, 0.85]},
        }
