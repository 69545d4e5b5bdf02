import pytest

from lmstack.training.config import TrainConfig

TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="session")
def small_text(shared, tmp_path_factory):
    """The first 30 kB of Tiny Shakespeare: enough for a character vocabulary and short windows."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text((shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000])
    return path


@pytest.fixture
def tiny(small_text):
    """A TrainConfig for a one-layer GPT on `small_text` in a few seconds; keywords override."""

    def make(out, **kw):
        base = dict(
            out_dir=str(out),
            data=[str(small_text)],
            block_size=32,
            batch_size=4,
            max_steps=6,
            warmup_steps=2,
            eval_interval=0,
            eval_batches=2,
            ckpt_interval=0,
            model=dict(TINY_GPT),
        )
        return TrainConfig(**{**base, **kw})

    return make
