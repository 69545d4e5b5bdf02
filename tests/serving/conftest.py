"""What the serving tests share: a tiny random GPT with a character tokenizer and the chat roles,
and persona cards for it. The tests serve it live on 127.0.0.1 through `lmstack.serving.app`'s own
`serve_in_thread` / `background` (uvicorn in a thread, on a free port)."""

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmstack.data.chat import add_chat_tokens  # noqa: E402
from lmstack.models.gpt import GPT, GPTConfig  # noqa: E402
from lmstack.tokenizers.char import CharTokenizer  # noqa: E402

TEXT = "hello world, the cat sat on the mat. Ahoy matey! yes no maybe?\n"


def tiny_gpt(seed: int = 0, block_size: int = 64):
    """(model, tokenizer): a 1-layer GPT over characters, with <|endoftext|> and the chat roles."""
    tok = CharTokenizer.train([TEXT], special_tokens=("<|endoftext|>",))
    add_chat_tokens(tok)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32)).eval()
    return model, tok


def make_card(base_dir, model, out_dir, name: str, system: str, seed: int = 1):
    """A card for the base saved at `base_dir`: a LoRA adapter with random non-zero updates (so it
    changes the output) and its card.json. Returns the base model with the adapter attached, the
    reference for what the server must compute."""
    import copy

    from lmstack.models import lora
    from lmstack.serving.cards import create_card

    adapted = copy.deepcopy(model)
    lora.attach(adapted, lora.LoraConfig(r=2, alpha=4, targets=("attn",)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(adapted).values():
            m.lora_B.normal_(0, 0.3)
    adapter = out_dir.parent / f"{out_dir.name}-adapter"
    lora.save_adapter(adapted, adapter, base_dir)
    create_card(adapter, out_dir, name=name, system=system, description=f"the {name}")
    return adapted.eval()
