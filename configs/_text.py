"""Config groups of the text experiments (self_loss_lm, gist_lm). Imports only
ml_collections, like every config."""

import os

import ml_collections

SHARED_TFDS = "../shared/data/tfds"
SHARED_TEXT = "../shared/data/raw/tiny_shakespeare/input.txt"


def text_data() -> ml_collections.ConfigDict:
    """The `data` group: tiny_shakespeare bytes from tfds, or any UTF-8 text file."""
    return ml_collections.ConfigDict(
        {
            "source": "tfds",  # or "file"
            "name": "tiny_shakespeare",
            "data_dir": "",  # '' = $TFDS_DATA_DIR, else tfds's default folder
            "download": True,
            "path": "",  # source="file": any UTF-8 text file
            "split_fractions": (0.05, 0.05),  # source="file": validation, test
            "batch_size": 16,
        }
    )


def transformer() -> ml_collections.ConfigDict:
    """The `model` group: the small decoder-only transformer of the CPU sweeps."""
    return ml_collections.ConfigDict(
        {
            "context": 32,
            "num_layers": 2,
            "loss_layers": 0,  # > 0: disjoint upper layers
            "d_model": 64,
            "num_heads": 4,
            "mlp_ratio": 4,
            "positions": "rotary",  # or "learned"
            "readout": "mean",  # or "head"
            "dtype": "float32",
        }
    )


def detector() -> ml_collections.ConfigDict:
    """The `detector` group: the reward-hacking detector (`metalearn.hacking`) and its
    action (`experiments._text`)."""
    return ml_collections.ConfigDict(
        {
            "window": 10,  # logged steps
            "tolerance": 0.01,  # nats
            "action": "continue",  # or "stop" | "rollback" | "meta"
            "meta_steps": 50,  # action "meta": first-phase steps before Phase 2 resumes
            "degrade_margin": 0.1,  # nats above the end of Phase 1: `steps_to_degrade`
        }
    )


def use_shared_data(c: ml_collections.ConfigDict) -> None:
    """Read the project's prepared tfds copy (no download)."""
    c.data.data_dir, c.data.download = SHARED_TFDS, False


def use_file(c: ml_collections.ConfigDict) -> None:
    """Read tiny_shakespeare as a plain text file."""
    c.data.source, c.data.path = "file", SHARED_TEXT


def shared_part(c: ml_collections.ConfigDict, part: str, name: str) -> None:
    """Applies a variant part both text experiments take (a detector action, `shared`,
    `file`); any other part is unknown to config `name`: a ValueError."""
    if part in ("stop", "rollback", "meta"):
        c.detector.action = part
    elif part == "shared":
        use_shared_data(c)
    elif part == "file":
        use_file(c)
    else:
        raise ValueError(
            f"Unknown variant part {part!r} of {name}; see the list in configs/{name}.py's "
            "docstring."
        )


def smoke_sizes(c: ml_collections.ConfigDict) -> None:
    """Seconds on a CPU: a one-block model (plus any disjoint blocks), batch 4, the
    project's tfds copy where there is one, few windows, every step logged, XLA
    optimisations off."""
    if c.data.source == "tfds" and not c.data.data_dir and os.path.isdir(SHARED_TFDS):
        use_shared_data(c)
    layers = c.model.loss_layers + 1  # one shared block (+ the disjoint ones)
    c.model.update(
        {"context": 16, "d_model": 32, "num_heads": 2, "mlp_ratio": 2, "num_layers": layers}
    )
    c.data.batch_size = 4
    c.detector.window = 3
    c.diagnostics.val_windows = 8
    c.eval.windows = 16
    c.log_every = 1
    c.fast_compile = True
