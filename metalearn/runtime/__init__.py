"""The impure edge: the run loop, logging, checkpoints and progress."""
