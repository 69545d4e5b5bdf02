"""`lmstack convert SRC_DIR DST_DIR [--to lmstack|hf]`: Hugging Face <-> lmstack checkpoints."""

from __future__ import annotations

from pathlib import Path

from lmstack.errors import InputError
from lmstack.io import check_output_dir, output_dir


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and lmstack formats",
        description="Import a local Hugging Face checkpoint (GPT-2, Llama and SmolLM2, Mistral, Qwen2/2.5, Qwen3, "
        "BERT, T5) as an lmstack checkpoint, or export an lmstack GPT as a directory `transformers` loads "
        "(GPT-2, Llama, Mistral, Qwen2 or Qwen3, whichever computes the same function). "
        "Nothing is downloaded: SRC_DIR is a directory such as `save_pretrained` writes. The tokenizer "
        "comes along with the same ids and its chat template: a byte-level BPE that lmstack's own BPE represents "
        "exactly (GPT-2's) as that, any other tokenizer.json (Qwen's, Mistral's and Llama 2's BPE, T5's Unigram, "
        "BERT's WordPiece) run by Hugging Face's tokenizers library (pip install 'lmstack[hf]'; without it the "
        "import is weights only).",
    )
    p.add_argument("src", metavar="SRC_DIR", help="checkpoint directory to read")
    p.add_argument("dst", metavar="DST_DIR", help="directory to write (created if missing)")
    p.add_argument(
        "--to",
        choices=["lmstack", "hf"],
        default=None,
        help="target format (default: the other one; an HF source becomes lmstack and vice versa)",
    )
    p.add_argument("--force", action="store_true", help="overwrite a DST_DIR that already holds a checkpoint")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    import lmstack
    from lmstack.models.hf import from_hf, hf_model_type, to_hf

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise InputError(f"{src}: no such checkpoint directory; check the path")
    check_output_dir(dst, "DST_DIR")
    if (dst / "config.json").exists() and not args.force:
        raise InputError(f"{dst}: already holds a checkpoint; pass --force to overwrite it or pick another DST_DIR")
    if src.resolve() == dst.resolve():
        raise InputError(f"{dst}: the destination is the source; pick another DST_DIR")
    from_hf_format = hf_model_type(src) is not None
    to = args.to or ("lmstack" if from_hf_format else "hf")
    if to == "lmstack":
        if not from_hf_format:
            raise InputError(
                f"{src}: not a Hugging Face model directory (no model_type in config.json); "
                "it is already lmstack's format or not a checkpoint"
            )
        model, tokenizer = from_hf(src)
    elif from_hf_format:
        raise InputError(f"{src}: already a Hugging Face model directory; use --to lmstack to import it")
    else:
        model, tokenizer = lmstack.load(src)
    with output_dir(dst, "DST_DIR") as out:
        _drop_stale_tokenizer(out)
        if to == "lmstack":
            model.save(out, tokenizer)
        else:
            to_hf(model, out, tokenizer)
        note = "" if (out / "tokenizer.json").exists() else _weights_only_note(src, to)
    print(f"wrote {to} checkpoint to {dst}{note}")
    return 0


def _drop_stale_tokenizer(dst: Path) -> None:
    """A --force overwrite must not leave an older tokenizer beside the new weights."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (dst / name).unlink(missing_ok=True)


def _weights_only_note(src: Path, to: str) -> str:
    from lmstack.tokenizers.hf_wrapped import installed

    if to == "lmstack" and (src / "tokenizer.json").exists() and not installed():
        return (
            " (weights only: its tokenizer.json needs Hugging Face's tokenizers library; "
            "pip install 'lmstack[hf]' and convert again)"
        )
    return " (weights only: no tokenizer in a form both sides read; keep using the source's tokenizer)"
