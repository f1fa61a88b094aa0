"""Image classifiers for AdaLFL's vision experiments, and a pure interface to them.

LeNet-5 (MNIST), VGG-16, All-CNN-C, the CIFAR ResNets and Wide ResNets (CIFAR-10/100),
built so that a meta-gradient can pass through an SGD step on them: everything is
differentiable twice, and batch-norm statistics are threaded explicitly as a model state
(`init_model` → `apply_model` → new state) rather than mutated in place, so an unrolled
inner loop differentiates through the running averages too. Convolutions use He-normal
initialisation (fan-out, as PyTorch's CIFAR reference code) and batch norm uses PyTorch's
defaults (momentum 0.1 in its convention, 0.9 in Flax's; ε = 1e-5). Padding is explicit
(1 for 3×3 convolutions) so that stride-2 layers match PyTorch's alignment.
"""

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from metalearn.types import Array, ModelState, Params, PRNGKey

MODELS: tuple[str, ...] = (
    "lenet5",
    "vgg16",
    "allcnn_c",
    "resnet8",  # the smallest CIFAR ResNet (1 block a stage): smoke runs and tests
    "resnet20",
    "resnet44",
    "resnet56",
    "wrn16_8",
    "wrn28_10",
)

_he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _param_dtype(dtype: DTypeLike) -> jnp.dtype:
    # Half-precision computation keeps float32 parameters; float64 (for finite-difference
    # tests) keeps float64 ones.
    return jnp.promote_types(dtype, jnp.float32)


def _conv(
    features: int,
    kernel: int,
    dtype: DTypeLike,
    *,
    strides: int = 1,
    padding: int = 1,
    use_bias: bool = False,
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        kernel_init=_he_normal,
        dtype=dtype,
        param_dtype=_param_dtype(dtype),
    )


def _batch_norm(train: bool, dtype: DTypeLike) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=_param_dtype(dtype),
    )


def _dense(features: int, dtype: DTypeLike) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=_param_dtype(dtype))


def _logits(x: Array, dtype: DTypeLike) -> Array:
    # Losses see at least float32 logits even when the network computes in bfloat16.
    return x.astype(_param_dtype(dtype))


def _global_average_pool(x_BxHxWxC: Array) -> Array:
    return jnp.mean(x_BxHxWxC, axis=(1, 2))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling.

    Inputs smaller than 32×32 (MNIST's 28×28) are zero-padded by 2 in the first
    convolution, as in the original, so both 28×28×1 and 32×32×C give a 5×5×16 feature map.

    Attributes:
      num_classes: number of output logits.
      dtype: computation dtype.
    """

    num_classes: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        del train  # no batch norm or dropout
        conv = functools.partial(_conv, dtype=self.dtype, use_bias=True)
        pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
        x = pool(nn.relu(conv(6, 5, padding=2 if x.shape[1] < 32 else 0)(x)))
        x = pool(nn.relu(conv(16, 5, padding=0)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(_dense(120, self.dtype)(x))
        x = nn.relu(_dense(84, self.dtype)(x))
        return _logits(_dense(self.num_classes, self.dtype)(x), self.dtype)


# Output channels of each 3×3 conv; "M" is a 2×2 max pool.
_VGG16_LAYERS: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M") + (
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG16(nn.Module):
    """VGG-16 with batch norm, CIFAR variant (32×32 inputs, 512-wide classifier).

    Attributes:
      num_classes: number of output logits.
      dtype: computation dtype.
    """

    num_classes: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for layer in _VGG16_LAYERS:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = _conv(layer, 3, self.dtype)(x)
                x = nn.relu(_batch_norm(train, self.dtype)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(_dense(512, self.dtype)(x))
        return _logits(_dense(self.num_classes, self.dtype)(x), self.dtype)


class AllCNNC(nn.Module):
    """All-CNN-C (Springenberg et al., 2015), with batch norm after every hidden conv.

    Batch norm is the common modern variant, not in the original paper. The final 1×1
    convolution has a bias and no normalisation or ReLU: its global average is the logits.

    Attributes:
      num_classes: number of output logits.
      dropout: rate after each stride-2 block.
      input_dropout: rate on the input image.
      dtype: computation dtype.
    """

    num_classes: int
    dropout: float = 0.5
    input_dropout: float = 0.2
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        def conv_bn_relu(x, features, kernel=3, strides=1, padding=1):
            x = _conv(features, kernel, self.dtype, strides=strides, padding=padding)(x)
            return nn.relu(_batch_norm(train, self.dtype)(x))

        x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
        for features in (96, 192):
            x = conv_bn_relu(x, features)
            x = conv_bn_relu(x, features)
            x = conv_bn_relu(x, features, strides=2)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = conv_bn_relu(x, 192, padding=0)
        x = conv_bn_relu(x, 192, kernel=1, padding=0)
        x = _conv(self.num_classes, 1, self.dtype, padding=0, use_bias=True)(x)
        return _logits(_global_average_pool(x), self.dtype)


class _BasicBlock(nn.Module):
    """Post-activation residual block with a projection shortcut when the shape changes."""

    features: int
    strides: int
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        bn = functools.partial(_batch_norm, train, self.dtype)
        y = _conv(self.features, 3, self.dtype, strides=self.strides)(x)
        y = nn.relu(bn()(y))
        y = bn()(_conv(self.features, 3, self.dtype)(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, strides=self.strides, padding=0)(x)
            x = bn()(x)
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. (2016, §4.2): depth 6n + 2.

    Shortcuts are projections (1×1 conv + BN) where the shape changes, option B of the
    paper, so parameter counts are a few thousand above the option-A numbers it reports.

    Attributes:
      num_classes: number of output logits.
      blocks_per_stage: n, the number of basic blocks in each of the three stages.
      dtype: computation dtype.
    """

    num_classes: int
    blocks_per_stage: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = nn.relu(_batch_norm(train, self.dtype)(_conv(16, 3, self.dtype)(x)))
        for stage, features in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(features, strides, self.dtype)(x, train)
        x = _global_average_pool(x)
        return _logits(_dense(self.num_classes, self.dtype)(x), self.dtype)


class _WideBlock(nn.Module):
    """Pre-activation residual block of a Wide ResNet, with dropout between its convs."""

    features: int
    strides: int
    dropout: float
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        bn = functools.partial(_batch_norm, train, self.dtype)
        y = nn.relu(bn()(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            # As in the reference code, the projection sees the pre-activated input.
            shortcut = _conv(self.features, 1, self.dtype, strides=self.strides, padding=0)(y)
        y = _conv(self.features, 3, self.dtype, strides=self.strides)(y)
        y = nn.relu(bn()(y))
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = _conv(self.features, 3, self.dtype)(y)
        return shortcut + y


class WideResNet(nn.Module):
    """Wide ResNet WRN-d-k (Zagoruyko & Komodakis, 2016).

    Attributes:
      num_classes: number of output logits.
      depth: d, with (d − 4) / 6 pre-activation blocks in each of the three stages.
      width: k, the widening factor (stage widths 16k, 32k, 64k).
      dropout: rate between the two convolutions of every block.
      dtype: computation dtype.
    """

    num_classes: int
    depth: int
    width: int
    dropout: float = 0.0
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}.")
        x = _conv(16, 3, self.dtype)(x)
        for stage, features in enumerate((16, 32, 64)):
            for block in range((self.depth - 4) // 6):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _WideBlock(features * self.width, strides, self.dropout, self.dtype)(x, train)
        x = nn.relu(_batch_norm(train, self.dtype)(x))
        x = _global_average_pool(x)
        return _logits(_dense(self.num_classes, self.dtype)(x), self.dtype)


def make_model(
    name: str, num_classes: int, *, dropout: float | None = None, dtype: DTypeLike = jnp.float32
) -> nn.Module:
    """Builds the classifier called `name`.

    Args:
      name: one of `MODELS`.
      num_classes: number of output logits.
      dropout: overrides the default rate of models with dropout (All-CNN-C's rate after
        its stride-2 blocks, default 0.5; the Wide ResNets' in-block rate, default 0.0).
        Ignored by the other models.
      dtype: computation dtype, e.g. `jnp.bfloat16` on GPU; parameters stay float32.

    Returns:
      An unbound Flax module, called as `module.apply(variables, images, train=...)`.
    """
    rate = {} if dropout is None else {"dropout": dropout}
    builders: dict[str, Callable[[], nn.Module]] = {
        "lenet5": lambda: LeNet5(num_classes, dtype=dtype),
        "vgg16": lambda: VGG16(num_classes, dtype=dtype),
        "allcnn_c": lambda: AllCNNC(num_classes, dtype=dtype, **rate),
        "resnet8": lambda: CifarResNet(num_classes, 1, dtype=dtype),
        "resnet20": lambda: CifarResNet(num_classes, 3, dtype=dtype),
        "resnet44": lambda: CifarResNet(num_classes, 7, dtype=dtype),
        "resnet56": lambda: CifarResNet(num_classes, 9, dtype=dtype),
        "wrn16_8": lambda: WideResNet(num_classes, 16, 8, dtype=dtype, **rate),
        "wrn28_10": lambda: WideResNet(num_classes, 28, 10, dtype=dtype, **rate),
    }
    if name not in builders:
        raise ValueError(f"Unknown model {name!r}; choose one of {list(MODELS)}.")
    return builders[name]()


def init_model(
    model: nn.Module, key: PRNGKey, input_shape: tuple[int, ...]
) -> tuple[Params, ModelState]:
    """Initialises a classifier.

    Args:
      model: a module from `make_model`.
      key: PRNG key for the parameters.
      input_shape: one example's (H, W, C).

    Returns:
      (params, model_state): the 'params' collection and a dict of the other collections,
      e.g. {'batch_stats': ...}, or {} for a model without batch norm.
    """
    variables = model.init({"params": key}, jnp.zeros((1, *input_shape)), train=False)
    params = variables["params"]
    # Running averages update in the dtype of the batch statistics (float64 for a float64
    # model); starting them there keeps the state's dtype fixed across steps (scan carries).
    dtype = _param_dtype(getattr(model, "dtype", jnp.float32))
    state = {k: jax.tree.map(lambda v: v.astype(dtype), v) for k, v in variables.items()}
    del state["params"]
    return params, state


def _has_dropout(model: nn.Module) -> bool:
    return any(getattr(model, field, 0.0) > 0.0 for field in ("dropout", "input_dropout"))


def apply_model(
    model: nn.Module,
    params: Params,
    model_state: ModelState,
    images: Array,
    *,
    train: bool,
    key: PRNGKey | None = None,
) -> tuple[Array, ModelState]:
    """Runs a classifier, purely: the batch-norm state goes in and comes out.

    Args:
      model: a module from `make_model`.
      params: its parameters.
      model_state: its non-trainable collections, as from `init_model`.
      images: float [B, H, W, C].
      train: training mode: batch norm normalises with the batch's statistics and updates
        the running averages; dropout is on. Otherwise the running averages are used.
      key: PRNG key for dropout; required when `train` and the model has dropout.

    Returns:
      (logits [B, num_classes], new model_state); model_state itself when not `train`.
    """
    variables = {"params": params, **model_state}
    rngs = None
    if train and _has_dropout(model):
        if key is None:
            raise ValueError(
                f"{type(model).__name__} has dropout: apply_model(..., train=True) needs `key`."
            )
        rngs = {"dropout": key}
    if not train or not model_state:
        return model.apply(variables, images, train=train, rngs=rngs), model_state
    logits, new_state = model.apply(
        variables, images, train=True, rngs=rngs, mutable=list(model_state)
    )
    return logits, dict(new_state)


def num_params(params: Params) -> int:
    """Total number of scalars in a parameter pytree (arrays or shape structs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
