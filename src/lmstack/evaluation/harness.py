"""EleutherAI lm-evaluation-harness adapter: model type `lmstack`, for every family on the contract.

    import lmstack.evaluation.harness  # registers the model type
    import lm_eval
    lm_eval.simple_evaluate(model="lmstack", model_args="path=runs/gpt", tasks=["hellaswag"])

Importing this module needs `lm-eval` (`pip install 'lmstack[eval]'`); nothing else in lmstack
imports it. Requests are answered with the same code as lmstack's own tasks: `loglikelihood` with
`scoring.loglikelihoods`, `generate_until` with the batched generation engine.
"""

from __future__ import annotations

from lmstack.errors import InputError

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without lm-eval
    raise InputError("the lm-evaluation-harness adapter needs lm-eval; install it with pip install 'lmstack[eval]'") from None


@register_model("lmstack")
class LmstackLM(LM):
    """An lmstack checkpoint (`path=DIR`) or an in-memory (model, tokenizer) pair."""

    def __init__(
        self,
        path: str | None = None,
        model=None,
        tokenizer=None,
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        device: str = "cpu",
        max_batch_size: int | None = None,
    ):
        """`max_batch_size` is accepted because lm-eval always passes it; batches are `batch_size`."""
        super().__init__()
        if model is None:
            if path is None:
                raise InputError("model_args needs path=DIR, an lmstack checkpoint directory")
            from lmstack.models.checkpoint import load_for_text

            model, tokenizer = load_for_text(path, device)
        if tokenizer is None or tokenizer.eot_id is None:
            raise InputError("the harness needs the model's tokenizer, with an <|endoftext|> token to start documents")
        self.model, self.tok = model, tokenizer
        self._device = device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not supported: 8
        self.max_gen_toks = int(max_gen_toks)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm-eval's own models do: trailing spaces of the context belong to the continuation.
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self.tok.encode(context) or [self.tok.eot_id], self.tok.encode(continuation)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from lmstack.evaluation.scoring import loglikelihoods

        results = loglikelihoods(self.model, [self._pair(*r.args) for r in requests])
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log p(whole document) from <|endoftext|>, in disjoint windows of the model's context."""
        from lmstack.evaluation.scoring import loglikelihoods

        out = []
        for r in requests:
            tokens = self.tok.encode(r.args[0])
            window = getattr(self.model, "max_context", None) or max(len(tokens), 1)
            pairs = [
                lm_eval_utils.make_disjoint_window(w)
                for w in lm_eval_utils.get_rolling_token_windows(tokens, self.tok.eot_id, window, 1)
            ]
            total = sum(lp for lp, _ in loglikelihoods(self.model, pairs)) if pairs else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        """Batched generation; a context too long for the model keeps its end, as lm-eval's own
        models cut it."""
        from lmstack.generation import generate_tokens
        from lmstack.generation.engine import encode_prompt, keep_end

        out: list[str] = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i : i + self.batch_size]
            configs = [self._config(kwargs) for _, kwargs in (r.args for r in batch)]
            prompts = [keep_end(self.model, encode_prompt(self.tok, r.args[0]), c.max_new_tokens) for r, c in zip(batch, configs)]
            texts = [g.text for g in generate_tokens(self.model, prompts, configs, self.tok)]
            for r, text in zip(batch, texts):
                self.cache_hook.add_partial("generate_until", r.args, text)
            out += texts
        return out

    def _config(self, kwargs: dict):
        from lmstack.generation import GenerationConfig

        until = kwargs.get("until") or ()
        sample = kwargs.get("do_sample", False) and kwargs.get("temperature", 1.0) > 0
        return GenerationConfig(
            max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            stop=(until,) if isinstance(until, str) else tuple(until),
        )
