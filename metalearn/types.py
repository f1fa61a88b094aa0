"""Type aliases shared across metalearn.

They document intent only: every alias is a JAX pytree or array at run time.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays: model parameters θ
MetaParams = Any  # a pytree of arrays: loss parameters φ (or anything the outer loop learns)
ModelState = Any  # non-trainable model collections (batch-norm statistics); {} when unused
Batch = Any  # a pytree of arrays with a leading example axis
Metrics = Mapping[str, Array]

# inner_loss(params, model_state, meta_params, batch, key) -> (loss, (model_state, metrics))
InnerLossFn = Callable[[Params, ModelState, MetaParams, Batch, PRNGKey], tuple[Array, Any]]
# outer_loss(params, model_state, batch, key) -> loss
OuterLossFn = Callable[[Params, ModelState, Batch, PRNGKey], Array]
