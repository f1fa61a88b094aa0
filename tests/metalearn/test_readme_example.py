"""The README's "use it from your own JAX code" example runs and does what it says.

`EXAMPLE` is the README's code block, verbatim: your own Flax model, a learned loss
meta-trained by the heart in a loop you write, saved, loaded as a plain function, and used
to train a fresh model on a task it has not seen.
"""

import os

import jax
import jax.numpy as jnp
import optax

EXAMPLE = """
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import metalearn as ml


class Net(nn.Module):  # your model: any Flax module (or pure function)
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(32)(x)))


net = Net()
loss_config = ml.default_loss_net_config()  # ℓ_φ: an MLP over (y, ŷ)
learned_loss = ml.learned_loss_fn(loss_config)  # (φ, y, y_hat) -> scalar


def inner_loss(params, model_state, phi, batch, key):  # what θ is trained on: L_φ
    y_hat = net.apply(params, batch["x"])
    return learned_loss(phi, batch["y"], y_hat), (model_state, {})


def outer_loss(params, model_state, batch, key):  # what L_φ should make small: the MSE
    return jnp.mean((net.apply(params, batch["x"]) - batch["y"]) ** 2)


def sine_task(key, n=64):  # y = a·sin(x + b), a new task for every key
    ka, kb, kx = jax.random.split(key, 3)
    a = jax.random.uniform(ka, (), minval=0.5, maxval=2.0)
    b = jax.random.uniform(kb, (), maxval=3.0)
    x = jax.random.uniform(kx, (n, 1), minval=-3.0, maxval=3.0)
    return {"x": x, "y": a * jnp.sin(x + b)}


K = 10  # inner steps from a fresh θ, differentiated through
inner_opt, meta_opt = optax.sgd(0.01), optax.adam(1e-3)
meta = ml.init_meta_state(ml.init_learned_loss(loss_config, jax.random.key(0)), meta_opt)
problem = ml.Problem(inner_loss, outer_loss, inner_opt)
estimator = ml.Unrolled()  # or ml.Truncated(window=5), ml.ES(sigma=0.01, pairs=64), ...


@jax.jit
def meta_train_step(meta, key):
    k_task, k_init, k_steps = jax.random.split(key, 3)
    task = sine_task(k_task)
    state = ml.init_inner_state(net.init(k_init, task["x"]), inner_opt)
    batches = jax.tree.map(lambda v: jnp.stack([v] * K), task)  # [K, ...]: one per step
    grads, _, metrics = estimator.estimate(  # a gradient estimate, never an update
        problem, meta.params, estimator.init(meta.params, state),
        batches, jax.random.split(k_steps, K), task, k_steps,
    )
    return ml.meta_step(meta, grads, meta_optimizer=meta_opt), metrics["meta/loss"]


meta_losses = []
for step in range(100):
    meta, loss = meta_train_step(meta, jax.random.fold_in(jax.random.key(1), step))
    meta_losses.append(float(loss))

# The learned loss is an artifact: save it, load it as a plain loss(y, y_hat) -> scalar,
# and train a fresh model on a new task with it, in any training loop.
ml.save_learned_loss(
    "my_loss", loss_config, meta.params, inner_optimizer={"name": "sgd", "lr": 0.01}, inner_steps=K
)
loss_fn = ml.load_learned_loss("my_loss")
task = sine_task(jax.random.key(123))
params = net.init(jax.random.key(7), task["x"])
opt_state = inner_opt.init(params)


@jax.jit
def train_step(params, opt_state):
    grads = jax.grad(lambda p: loss_fn(task["y"], net.apply(p, task["x"])))(params)
    updates, opt_state = inner_opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state


mse_before = outer_loss(params, {}, task, None)
for _ in range(100):
    params, opt_state = train_step(params, opt_state)
mse_after = outer_loss(params, {}, task, None)
first, last = sum(meta_losses[:10]) / 10, sum(meta_losses[-10:]) / 10
print(f"meta loss {first:.3f} -> {last:.3f}; fresh model's MSE {mse_before:.3f} -> {mse_after:.3f}")
"""

# The README's code block after the example, verbatim: it runs in the example's namespace.
LOADING = """
# Continuing the example: the artifact it saved, loaded the way a run's are
# (ml.load_learned_loss("runs/ml3_sine/learned_loss/seed_0") for seed 0 of an ML³ sine run).
loaded = ml.load_learned_loss("my_loss")
print(loaded.description)  # how it is fed ('y', 'y_hat', 'extra') and what it was trained for
value = loaded(task["y"], net.apply(params, task["x"]))  # y, ŷ: [batch, outputs] -> scalar
"""

# The README's AdaLFL block: φ adapted online, one meta step per model step, in your loop.
ONLINE = """
# AdaLFL: adapt the learned loss online while a fresh model trains on it, one meta step
# (exact, through the model's step) per model step; θ and φ are yours to carry.
from metalearn.algorithms import adalfl

learner = adalfl.OnlineLearner(problem, meta_optimizer=optax.adam(1e-3))  # ml.OneStep(): a JVP
online = learner.init(meta.params)  # φ from the offline phase above (ML³ initialisation)
state = ml.init_inner_state(net.init(jax.random.key(8), task["x"]), inner_opt)
step = jax.jit(learner.step)
mse_start = outer_loss(state.params, {}, task, None)
for t in range(100):  # batch and meta batch: here the task's data, in practice two draws
    key = jax.random.fold_in(jax.random.key(2), t)
    state, online, metrics = step(online, state, task, task, key)
print(f"online: MSE {mse_start:.3f} -> {metrics['meta/loss']:.3f} ({metrics['meta/finite']=})")
"""


def test_readme_example_meta_trains_a_loss_that_trains_a_fresh_model(
    tmp_path, monkeypatch, fast_compile
):
    monkeypatch.chdir(tmp_path)  # the example writes its artifact to ./my_loss
    namespace = {"__name__": "readme_example"}
    exec(compile(EXAMPLE, "README example", "exec"), namespace)
    losses = namespace["meta_losses"]
    # Meta-training lowers the task loss reached after K steps on the learned loss...
    assert sum(losses[-20:]) < 0.7 * sum(losses[:20]), losses
    # ...and the saved loss alone trains a fresh model on an unseen task (an untrained ℓ_φ
    # makes it worse here).
    assert float(namespace["mse_after"]) < 0.5 * float(namespace["mse_before"])
    assert (tmp_path / "my_loss" / "loss_net.json").exists()
    # The snippet after it loads the artifact, describes it and evaluates it.
    exec(compile(LOADING, "README loading snippet", "exec"), namespace)
    assert {"y", "y_hat", "extra"} <= set(namespace["loaded"].description)
    value = namespace["value"]
    assert value.shape == () and bool(jnp.isfinite(value))
    # The AdaLFL block trains a fresh model while it adapts φ, every step finite.
    exec(compile(ONLINE, "README AdaLFL snippet", "exec"), namespace)
    metrics = namespace["metrics"]
    assert float(metrics["meta/finite"]) == 1.0
    assert float(metrics["meta/loss"]) < 0.5 * float(namespace["mse_start"])
    moved = jax.tree.map(jnp.subtract, namespace["online"].params, namespace["meta"].params)
    assert float(optax.global_norm(moved)) > 0  # φ was adapted


def test_the_readme_shows_this_example_verbatim():
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme) as f:
        text = f.read()
    assert EXAMPLE.strip() in text
    assert LOADING.strip() in text
    assert ONLINE.strip() in text
