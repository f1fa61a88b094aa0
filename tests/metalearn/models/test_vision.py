"""Vision classifiers: shapes, parameter counts, batch-norm state, dropout, meta-gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn.models.vision import (
    MODELS,
    CifarResNet,
    WideResNet,
    apply_model,
    init_model,
    make_model,
    num_params,
)

# Published parameter counts (CIFAR-10 heads, 32×32×3 inputs):
#   LeNet-5 ≈ 62k; VGG-16 (BN, 512-wide classifier) ≈ 15.0M; All-CNN-C ≈ 1.37M
#   (Springenberg et al. 2015); ResNet-20/44/56 ≈ 0.27M/0.66M/0.85M (He et al. 2016,
#   Table 6; ResNet-8, n = 1, ≈ 0.078M by the same formula); WRN-16-8 ≈ 11.0M,
#   WRN-28-10 ≈ 36.5M (Zagoruyko & Komodakis 2016, Table 4).
PUBLISHED_PARAMS = {
    "lenet5": 62_000,
    "vgg16": 15.0e6,
    "allcnn_c": 1.37e6,
    "resnet8": 0.078e6,
    "resnet20": 0.27e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "wrn16_8": 11.0e6,
    "wrn28_10": 36.5e6,
}


# Compile time, not run time, dominates these tests (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compile")


# Compiled once per model and shape: op-by-op execution of these networks is slow.
_init = jax.jit(init_model, static_argnums=(0, 2))
_apply = jax.jit(apply_model, static_argnames=("model", "train"))


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def test_every_model_has_a_published_count():
    assert set(PUBLISHED_PARAMS) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_param_counts(name):
    model = make_model(name, 10)

    def init_and_apply(key):
        params, state = init_model(model, key, (32, 32, 3))
        logits, _ = apply_model(model, params, state, jnp.zeros((2, 32, 32, 3)), train=False)
        return params, logits

    params, logits = jax.eval_shape(init_and_apply, jax.random.key(0))
    chex.assert_shape(logits, (2, 10))
    assert logits.dtype == jnp.float32
    assert num_params(params) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.05)


def test_lenet_runs_on_mnist_and_padded_mnist_with_the_classic_count():
    model = make_model("lenet5", 10)
    for input_shape in ((28, 28, 1), (32, 32, 1)):
        params, state = jax.eval_shape(
            functools.partial(init_model, model, input_shape=input_shape), jax.random.key(0)
        )
        assert state == {}
        # LeCun et al.'s LeNet-5 with a 10-way dense head: 61,706 parameters either way.
        assert num_params(params) == 61_706
    params, state = _init(model, jax.random.key(0), (28, 28, 1))
    logits, new_state = _apply(model, params, state, _images((2, 28, 28, 1)), train=True)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    assert new_state == {}


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"'resnet18'.*'lenet5'.*'wrn28_10'"):
        make_model("resnet18", 10)


def test_dropout_override_and_dtype():
    assert make_model("allcnn_c", 10).dropout == 0.5
    assert make_model("allcnn_c", 10, dropout=0.1).dropout == 0.1
    assert make_model("wrn16_8", 10).dropout == 0.0
    assert make_model("wrn28_10", 10, dropout=0.3).dropout == 0.3
    # bfloat16 computation keeps float32 parameters and returns float32 logits.
    model = make_model("resnet20", 10, dtype=jnp.bfloat16)

    def init_and_apply(key):
        params, state = init_model(model, key, (8, 8, 3))
        return apply_model(model, params, state, jnp.zeros((2, 8, 8, 3)), train=True)

    logits, state = jax.eval_shape(init_and_apply, jax.random.key(0))
    params, _ = jax.eval_shape(
        functools.partial(init_model, model, input_shape=(8, 8, 3)), jax.random.key(0)
    )
    assert {p.dtype for p in jax.tree.leaves((params, state))} == {jnp.dtype(jnp.float32)}
    assert logits.dtype == jnp.float32


def test_batch_norm_state():
    model = make_model("resnet8", 10)
    params, state = _init(model, jax.random.key(0), (8, 8, 3))
    x = _images((4, 8, 8, 3))
    x_other = x.at[1:].set(_images((3, 8, 8, 3), seed=1))  # same first example

    logits, new_state = _apply(model, params, state, x, train=True)
    logits_other, _ = _apply(model, params, state, x_other, train=True)
    # Training mode: batch statistics, so example 0's logits depend on the rest of the batch,
    # and the running averages move.
    assert not np.allclose(logits[0], logits_other[0], atol=1e-4)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert not np.allclose(
        new_state["batch_stats"]["BatchNorm_0"]["mean"], state["batch_stats"]["BatchNorm_0"]["mean"]
    )

    # Eval mode: running averages, so examples are independent and the state is unchanged.
    eval_logits, eval_state = _apply(model, params, new_state, x, train=False)
    eval_logits_other, _ = _apply(model, params, new_state, x_other, train=False)
    np.testing.assert_allclose(eval_logits[0], eval_logits_other[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(eval_state, new_state)
    # ... and they are the running averages: other averages give other logits.
    old_logits, _ = _apply(model, params, state, x, train=False)
    assert not np.allclose(old_logits, eval_logits, atol=1e-4)


@pytest.mark.parametrize(
    "model, input_shape",
    [
        (make_model("allcnn_c", 10), (12, 12, 3)),
        (WideResNet(10, depth=10, width=1, dropout=0.3), (8, 8, 3)),
    ],
    ids=["allcnn_c", "wrn10_1"],
)
def test_dropout(model, input_shape):
    params, state = _init(model, jax.random.key(0), input_shape)
    x = _images((2, *input_shape))
    train = functools.partial(_apply, model, params, state, x, train=True)
    a, _ = train(key=jax.random.key(1))
    b, _ = train(key=jax.random.key(1))
    c, _ = train(key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-4)
    with pytest.raises(ValueError, match="needs `key`"):
        train()
    # Eval mode needs no key: dropout is off (flax would ask for a 'dropout' rng while
    # tracing), so tracing is enough.
    d, _ = jax.eval_shape(functools.partial(apply_model, model, train=False), params, state, x)
    chex.assert_shape(d, (2, 10))


def test_no_dropout_needs_no_key():
    model = WideResNet(10, depth=10, width=1)  # default rate 0.0

    def init_and_train(key):  # a missing key would raise while tracing
        params, state = init_model(model, key, (8, 8, 3))
        return apply_model(model, params, state, jnp.zeros((2, 8, 8, 3)), train=True)

    logits, _ = jax.eval_shape(init_and_train, jax.random.key(0))
    chex.assert_shape(logits, (2, 10))


@pytest.mark.parametrize(
    "model, input_shape",
    [
        # ResNet-8: ResNet-20's class and blocks with one block per stage, because compiling
        # the second-order graph of two unrolled steps of ResNet-20 takes ~30 s on 2 cores.
        pytest.param(
            CifarResNet(10, blocks_per_stage=1, dtype=jnp.float64),
            (8, 8, 3),
            marks=pytest.mark.slow,
        ),
        (make_model("lenet5", 10, dtype=jnp.float64), (12, 12, 1)),  # max pooling
    ],
    ids=["resnet8", "lenet5"],
)
def test_meta_gradient_matches_finite_differences(float64, model, input_shape):
    """d/dφ of CE after two SGD steps on φ·CE, evaluated with the threaded BN averages.

    The outer loss runs in eval mode with the running averages of the second inner step,
    which were computed at θ₁(φ), so the exact gradient also flows through the model state.
    It is taken forward-over-reverse (as AdaLFL's default JVP meta-gradient), by one
    compiled program that also returns the loss and the final (θ, state) for the
    central differences.
    """
    params, state = _init(model, jax.random.key(0), input_shape)
    assert {p.dtype for p in jax.tree.leaves((params, state))} == {jnp.dtype(jnp.float64)}
    x, x_val = _images((2, *input_shape), 1), _images((2, *input_shape), 2)
    y, y_val = jnp.array([1, 7]), jnp.array([3, 4])

    def inner_loss(theta, model_state, phi):
        logits, model_state = apply_model(model, theta, model_state, x, train=True)
        return phi * _ce(logits, y), model_state

    def outer_loss(theta, model_state):
        logits, _ = apply_model(model, theta, model_state, x_val, train=False)
        return _ce(logits, y_val)

    def sgd_step(carry, _, phi):
        theta, model_state = carry
        grads, model_state = jax.grad(inner_loss, has_aux=True)(theta, model_state, phi)
        return (jax.tree.map(lambda p, g: p - 0.1 * g, theta, grads), model_state), None

    def meta_loss(phi):
        step = functools.partial(sgd_step, phi=phi)
        (theta, model_state), _ = jax.lax.scan(step, (params, state), length=2)
        return outer_loss(theta, model_state), (theta, model_state)

    run = jax.jit(lambda phi: jax.jvp(meta_loss, (phi,), (1.0,)))
    phi, eps = 1.0, 1e-5
    (_, (theta, _)), (exact, _) = run(phi)
    (loss_plus, (_, state_plus)), _ = run(phi + eps)
    (loss_minus, (_, state_minus)), _ = run(phi - eps)
    total = (loss_plus - loss_minus) / (2 * eps)
    # The part of dg/dφ that flows only through the batch-norm running averages.
    outer_loss = jax.jit(outer_loss)
    via_state = (outer_loss(theta, state_plus) - outer_loss(theta, state_minus)) / (2 * eps)

    assert abs(float(exact)) > 1e-4
    np.testing.assert_allclose(exact, total, rtol=1e-6)
    if state:  # the test has power: a gradient that skipped the state would be far off
        assert abs(float(via_state)) > 1e-3 * abs(float(exact))
