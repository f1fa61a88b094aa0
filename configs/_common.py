"""Config groups several configs share. Imports only ml_collections, like every config."""

import ml_collections


def loss_net(**overrides) -> ml_collections.ConfigDict:
    """The `loss_net` group with its defaults (ML³: ReLU + Softplus, 2×40).

    The same defaults as `metalearn.losses.learned.default_loss_net_config()` (a test
    keeps the two equal), written here so that parsing a config does not import JAX.
    """
    c = ml_collections.ConfigDict(
        {
            "hidden": (40, 40),
            "activation": "relu",  # or "smooth_leaky_relu" (AdaLFL), "elu", "tanh"
            "output_activation": "softplus",  # or "smooth_leaky_relu", "identity"
            "use_bias": True,
            "init": "xavier_uniform",
            "bias_init": 0.0,
            "beta": 10.0,  # smooth leaky ReLU smoothness
            "gamma": 0.01,  # smooth leaky ReLU leak
            "output_wise": True,
            "ce_term": False,  # classification: cross-entropy + the learned term (NPBML)
            "anchor": "none",  # or "weighted_squared_error", "target_distance"
            "kind": "mlp",  # or "scaled_ce": exp(s)·cross-entropy, one parameter
        }
    )
    c.update(overrides)
    return c
