"""Chat conversations as token ids, with the mask of the tokens a model must learn to produce.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
`render` turns one into ids and an assistant mask: True on each assistant message's content and
on the token that ends it (`<|end|>`, or the template's end of turn such as `<|im_end|>`), False
on everything the model only reads (system and user turns, role headers). Fine-tuning puts its
loss on the masked tokens; `prompt_ids` is the same rendering ending in an open assistant turn,
which generation and serving feed to the model.

Formats, chosen by `tokenizer.chat_template`:
- None: lmstack's built-in format, `<|system|>text<|end|><|user|>text<|end|><|assistant|>text<|end|>`,
  whose role tokens are special tokens (`add_chat_tokens` registers them).
- a Hugging Face jinja template (as in a checkpoint's tokenizer_config.json), run as transformers
  runs it: a sandboxed environment (`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks,
  loop controls), with `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and an
  imported tokenizer's other named tokens), `raise_exception` and `strftime_now`. Assistant spans
  come from the template's `{% generation %}` blocks when it has them; otherwise from rendering
  growing prefixes: a reply starts where the conversation before it, rendered with the generation
  prompt, ends, and stops after the last special token the reply's turn renders (its end of turn;
  a separator such as the newline after `<|im_end|>` is not learned).

Tokenization. The rendered text is cut at the assistant span boundaries and each piece is
encoded on its own, so a token never straddles a span and the mask is exact. Template chat
formats put those boundaries after a role header and after an end-of-turn token, where BPE
pre-tokenization splits anyway, so the ids equal encoding the whole text at once (the tests check
this against transformers' `apply_chat_template`). Special-token strings the template writes
become their special ids; the same strings inside message content stay text (transformers'
`sanitize_control_tokens`), so a data row cannot forge a turn boundary.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import re
from datetime import datetime
from typing import ClassVar

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.errors import FormatError, InputError
from lmstack.tokenizers.base import BOS, CHAT_ROLES, Tokenizer

ROLES = ("system", "user", "assistant")

# lmstack's built-in format, written as a jinja template so it takes the same path as any other.
BUILTIN_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Private-use characters wrapped around special-token strings found in message content (transformers' choice).
_START, _END = "\U000f0000", "\U000f0001"
_MARKED = re.compile(f"{_START}(.*?){_END}|[{_START}{_END}]", re.DOTALL)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TRACKER: contextvars.ContextVar = contextvars.ContextVar("lmstack_chat_generation", default=None)


def add_chat_tokens(tokenizer: Tokenizer) -> list[str]:
    """Register the built-in format's role tokens the tokenizer lacks, as special tokens; returns those
    added, so the caller grows the model's embedding. A tokenizer with its own chat template needs none."""
    if tokenizer.chat_template is not None:
        return []
    missing = [t for t in CHAT_ROLES if t not in tokenizer.special_tokens]
    tokenizer.add_special_tokens(missing)
    return missing


def render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, assistant mask) of a conversation in the tokenizer's chat format."""
    messages = check_messages(messages)
    text, spans = _text_and_spans(tokenizer, messages, add_generation_prompt)
    ids: list[int] = []
    mask: list[bool] = []
    cuts = sorted({0, len(text), *(i for span in spans for i in span)})
    for a, b in itertools.pairwise(cuts):
        piece = _encode(tokenizer, text[a:b])
        ids += piece
        mask += [any(s <= a and b <= e for s, e in spans)] * len(piece)
    return ids, mask


def prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The ids a model continues to answer the conversation: rendered with an open assistant turn."""
    return render(tokenizer, messages, add_generation_prompt=True)[0]


def turn_end_id(tokenizer: Tokenizer) -> int | None:
    """The special id that ends an assistant turn in the tokenizer's chat format (`<|end|>`, `<|im_end|>`,
    `<|eot_id|>`), where generation of a reply stops; None when the format ends turns with plain text."""
    ids, mask = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}])
    last = [i for i, m in zip(ids, mask) if m][-1:]
    return last[0] if last and last[0] in tokenizer.special_tokens.values() else None


def render_text(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text in the tokenizer's chat format (what `render` tokenizes), for display."""
    text, _ = _text_and_spans(tokenizer, check_messages(messages), add_generation_prompt)
    return re.sub(f"[{_START}{_END}]", "", text)


def check_messages(messages) -> list[dict]:
    """The conversation as plain {"role", "content"} dicts (other keys dropped), or InputError."""
    if not isinstance(messages, list) or not messages:
        raise InputError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise InputError(f"message {n} is not a {{'role': ..., 'content': <string>}} object: {m!r:.80}")
        if m["role"] not in ROLES:
            raise InputError(f"message {n} has unknown role {m['role']!r}; allowed roles: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# --- rendering ------------------------------------------------------------------------------------


def _text_and_spans(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool):
    """Rendered text (special strings in content wrapped in markers) and assistant character spans."""
    template = tokenizer.chat_template
    if template is None:
        missing = [t for t in CHAT_ROLES if t not in tokenizer.special_tokens]
        if missing:
            raise InputError(
                f"the tokenizer lacks the chat tokens {missing}; register them with "
                "lmstack.data.chat.add_chat_tokens (and grow the model's embedding), or set a chat template"
            )
        template = BUILTIN_TEMPLATE
    compiled = _compile(template)
    variables = _template_tokens(tokenizer)
    messages = [{"role": m["role"], "content": _mark(tokenizer, m["content"])} for m in messages]
    text, spans = _run(compiled, messages, add_generation_prompt, variables)
    if _GENERATION_TAG.search(template):
        return text, spans
    return text, _prefix_spans(tokenizer, compiled, messages, text, variables)


def _prefix_spans(tokenizer, compiled, messages, text, variables) -> list[tuple[int, int]]:
    """Assistant spans of a template without generation blocks, found by rendering growing prefixes."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = _run(compiled, messages[:i], True, variables)
        through, _ = _run(compiled, messages[: i + 1], False, variables)
        if not (through.startswith(before) and text.startswith(through)):
            raise FormatError(
                "the chat template does not render a conversation as a prefix of its continuation, so "
                "assistant turns cannot be located; mark them with {% generation %} blocks in the template"
            )
        turn = through[len(before) :]
        template_text = _MARKED.sub(lambda m: " " * len(m.group()), turn)  # same offsets, content specials hidden
        ends = [m.end() for m in _special_pattern(tokenizer).finditer(template_text)]
        spans.append((len(before), len(before) + (ends[-1] if ends else len(turn))))
    return spans


def _run(compiled, messages, add_generation_prompt, variables) -> tuple[str, list[tuple[int, int]]]:
    """Render, recording what `{% generation %}` blocks produced; template failures are InputError."""
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKER.set((blocks, spans))
    try:
        for block in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            blocks.append(block)  # noqa: PERF402 - `_Generation` reads the blocks as they grow
    except jinja2.TemplateError as e:
        raise InputError(f"the chat template rejected this conversation: {e}") from None
    finally:
        _TRACKER.reset(token)
    return "".join(blocks), spans


class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`: records the span of text the block renders."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller):
        # Output before this block has been yielded (and collected by `_run`) when the block runs.
        text = caller()
        state = _TRACKER.get()
        if state is not None:
            blocks, spans = state
            start = sum(map(len, blocks))
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise FormatError(
            f"the tokenizer's chat template is not valid jinja ({e}, line {e.lineno}); fix chat_template in tokenizer.json"
        ) from None


def _template_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token / eos_token (and an imported tokenizer's other named tokens) for the template."""
    tokens = dict(getattr(tokenizer, "roles", {}))
    if "eos_token" not in tokens and tokenizer.eot_id is not None:
        tokens["eos_token"] = tokenizer.decode([tokenizer.eot_id])
    if "bos_token" not in tokens and BOS in tokenizer.special_tokens:
        tokens["bos_token"] = BOS
    return tokens


# --- tokenizing -----------------------------------------------------------------------------------


def _special_pattern(tokenizer: Tokenizer) -> re.Pattern:
    return _pattern_for(tuple(sorted(tokenizer.special_tokens, key=len, reverse=True)))


@functools.lru_cache(maxsize=16)
def _pattern_for(longest_first: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")  # (?!) never matches


def _mark(tokenizer: Tokenizer, content: str) -> str:
    """Content with its special-token strings wrapped in markers, so they are encoded as text."""
    content = content.replace(_START, "").replace(_END, "")
    return _special_pattern(tokenizer).sub(lambda m: f"{_START}{m.group()}{_END}", content)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of rendered text: template text with special strings as special ids, marked content
    strings as ordinary text; a lone marker (the template cut a marked string) just breaks the text."""
    ids: list[int] = []
    pieces = _MARKED.split(text)  # [template text, marked string or None, template text, ...]
    for n, piece in enumerate(pieces):
        if not piece:
            continue
        ids += tokenizer.encode_ordinary(piece) if n % 2 else tokenizer.encode(piece, allowed_special="all")
    return ids
