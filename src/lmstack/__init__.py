"""lmstack: the whole language-model stack in one package.

A language model is a probability distribution over token sequences,
p(x_1..x_L) = prod_i p(x_i | x_<i); every model family implements that one contract.

The public API takes a model either as a checkpoint path or as a (model, tokenizer) pair and
imports torch only when called:

    model, tokenizer = lmstack.load("ckpt/")
    lmstack.generate("ckpt/", "Once upon a time", temperature=0.8, max_new_tokens=50).text
    lmstack.perplexity("ckpt/", files=["test.txt"])["bits_per_byte"]
    lmstack.score("ckpt/", "The capital of France is", " Paris")["logprob"]
"""

__version__ = "0.1.0"

from lmstack.errors import LmstackError  # noqa: E402

__all__ = ["__version__", "LmstackError", "load", "generate", "perplexity", "score"]


def load(path):
    """Load a checkpoint directory (or an ARPA file) -> (model, tokenizer or None)."""
    from lmstack.models.checkpoint import load as _load

    return _load(path)


def _model_and_tokenizer(model, tokenizer):
    """A path is loaded; a model with a vocabulary of its own (the n-gram) brings its tokenizer."""
    import os

    from lmstack.models.checkpoint import text_tokenizer

    if isinstance(model, (str, os.PathLike)):
        model, saved = load(model)
        tokenizer = tokenizer or saved
    return model, text_tokenizer(model, tokenizer)


def generate(model, prompts, tokenizer=None, **options):
    """Continue a prompt (a string -> one `Generation`) or a list of prompts (-> a list), with
    `options` from `lmstack.generation.GenerationConfig` (max_new_tokens, temperature, top_p, ...)."""
    import dataclasses

    from lmstack.errors import InputError
    from lmstack.generation import GenerationConfig
    from lmstack.generation import generate as _generate

    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    outs = _generate(model, tokenizer, [prompts] if isinstance(prompts, str) else list(prompts), GenerationConfig(**options))
    return outs[0] if isinstance(prompts, str) else outs


def perplexity(
    model,
    text: str | None = None,
    *,
    files=None,
    tokenizer=None,
    mode: str | None = None,
    context: int | None = None,
    stride: int | None = None,
) -> dict:
    """Perplexity per token and per word, bits per byte and the counts behind them, of `text` or
    of `files` (each one a document), as `lmstack eval perplexity` reports them. `mode`: "lines",
    "stream" (with `context` / `stride`) or "pseudo" (masked LMs); default by family."""
    import os

    from lmstack.errors import InputError
    from lmstack.evaluation.perplexity import measure
    from lmstack.io import read_text

    if (text is None) == (files is None):
        raise InputError("pass either text= or files=")
    if isinstance(model, (str, os.PathLike)):
        model, saved = load(model)
        tokenizer = tokenizer or saved
    docs = [text] if text is not None else [read_text(f) for f in files]
    return measure(model, tokenizer, docs, mode=mode, context=context, stride=stride).to_dict()


def score(model, prompt: str, continuation: str | None = None, tokenizer=None, top: int = 5) -> dict:
    """log p(continuation | prompt) with every token's log-probability and its `top` likeliest
    alternatives (without a continuation: log p(prompt) from end-of-text), as `lmstack score`."""
    from lmstack.evaluation.scoring import score_text

    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    return score_text(model, tokenizer, prompt, continuation, top=top)
