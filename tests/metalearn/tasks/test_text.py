"""Byte-level text: tokens, windows, and the corpora (tiny_shakespeare from ../shared)."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import self_loss_lm
from metalearn.tasks import text


def test_text_tokens_round_trip_and_windows_are_pure():
    tokens = text.encode("héllo")
    assert tokens.dtype == np.uint8 and len(tokens) == 6
    ids = np.concatenate([tokens, [text.LOSS, text.GIST + 1]])
    assert text.decode(ids) == "héllo[LOSS][GIST1]"
    corpus = jax.numpy.arange(100, dtype=jax.numpy.uint8)
    a = text.windows(jax.random.key(0), corpus, 4, 8)
    np.testing.assert_array_equal(a, text.windows(jax.random.key(0), corpus, 4, 8))
    assert a.shape == (4, 9) and np.all(np.diff(np.asarray(a), axis=1) == 1)  # consecutive
    fixed = text.fixed_windows(np.arange(50, dtype=np.uint8), 3, 9)
    assert fixed.shape == (3, 10) and fixed[0, 0] == 0 and fixed[-1, -1] == 49


def test_tiny_shakespeare_and_a_text_file_give_three_splits(tmp_path):
    data = text.load_text(self_loss_lm.get_config("smoke").data)
    assert len(data.train) == 1_003_854 and len(data.validation) == len(data.test) == 55_770
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 10)
    config = self_loss_lm.get_config("file,smoke").data
    config.path, config.split_fractions = str(path), (0.1, 0.2)
    split = text.load_text(config)
    assert (len(split.train), len(split.validation), len(split.test)) == (70, 10, 20)


def test_mean_over_windows_is_the_mean_over_every_window_in_full_batches_and_a_rest():
    windows = jnp.arange(70 * 3, dtype=jnp.float32).reshape(70, 3)
    fn = lambda w: jnp.mean(w[:, 0])  # noqa: E731
    np.testing.assert_allclose(
        text.mean_over_windows(fn, windows, batch=32), jnp.mean(windows[:, 0]), rtol=1e-6
    )
    np.testing.assert_allclose(
        text.mean_over_windows(fn, windows[:64], batch=32), jnp.mean(windows[:64, 0]), rtol=1e-6
    )
