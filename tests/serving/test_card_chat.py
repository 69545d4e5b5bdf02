"""`lmstack generate --chat` on a persona card starts from the card's system prompt, as the server does."""

import json

from lmstack.cli import main

from .conftest import make_card, tiny_gpt


def test_generate_chat_on_a_card_uses_its_system_prompt(tmp_path, capsys):
    model, tok = tiny_gpt()
    model.save(tmp_path / "base", tok)
    make_card(tmp_path / "base", model, tmp_path / "pirate", "pirate", "You are a pirate.")

    def reply(*extra):
        args = ["generate", "--model", str(tmp_path / "pirate"), "--chat", "--prompt", "hello", "--temperature", "0"]
        assert main([*args, "--max-tokens", "12", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["text"]

    own = reply()
    assert own == reply("--system", "You are a pirate.")
    assert own != reply("--system", "")  # an empty --system drops it
