"""`lmstack quickstart --assistant`: how a language model becomes an assistant, on a laptop CPU.

The stages large systems run on many GPUs, each a real `lmstack` command run in this process and
written into the report, so a user can redo any of them on their own data:

1. pretrain a small GPT on a shipped mix: Shakespeare, short English and Chinese dialogues, and
   arithmetic word problems with worked solutions (`lmstack align tasks`);
2. SFT on the chat format, loss on the answers only: mean log P(A | Q) on held-out conversations
   before and after;
3. DPO on pairs that follow a rule a reader can see: a reply without a stock sign-off ("I hope
   this helps! ...") is preferred over the same reply with it. A share of the SFT replies carry the
   sign-off (as instruction data gathered from many sources often does), so the SFT model adds it
   to some replies; the held-out rate of replies without it is measured before and after;
4. GRPO on arithmetic problems with a verifier's reward (exact final number): held-out accuracy
   answering at once and with the worked steps, before and after, and the reward curve. Part of
   the SFT answers skip the steps (data from mixed sources), so the SFT model sometimes answers at
   once and is often wrong; the reward teaches it to show its steps;
5. two persona cards: LoRA adapters on the chatterbot `botprofile` dialogues (a robot) and on a
   sea captain's dialogues written for lmstack, asked the same questions;
6. `lmstack serve` with both cards, a few scripted requests through the OpenAI client, the two
   cards mixed in one batch.

Every stage counts steps (no wall-clock budget), so the same seed gives the same numbers on any
machine; `--minutes` scales the steps, as an explicit choice. The run is built in a hidden
directory beside `--out` and renamed into place at the end.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from lmstack.errors import InputError
from lmstack.io import atomic_write, output_dir, read_text, write_json
from lmstack.quickstart import check_out, machine
from lmstack.training.checkpoint import latest
from lmstack.training.metrics import read_metrics

DEFAULT_MINUTES = 15.0
MIN_TEXT_BYTES = 10_000
# One CPU thread for everything: another thread count sums floats in another order, and over a
# thousand steps that changes the numbers; on a loaded machine one thread is also the faster.
THREADS = 1
STAGES = 8
SIGN_OFF = {
    "en": "I hope this helps! Let me know if you have any other questions.",
    "zh": "希望对你有帮助！如果还有其他问题，请告诉我。",
}
SIGN_OFF_SHARE = 0.5  # of the SFT chat replies
DIRECT_SHARE = 0.7  # of the SFT arithmetic answers: "Answer: N" without the steps
LEVELS = "1,2"
ARITHMETIC_LANG = "en"  # the model is small: its arithmetic in one language (the dialogues are in two)
SHOWN_PROBLEMS = 3  # greedy replies shown in the report, before and after GRPO
PERSONAS = {
    "robot": dict(
        description="the chatbot of the chatterbot corpus's botprofile dialogues",
        system="You are Chatbot, a software program that lives on the Internet.",
    ),
    "captain": dict(
        description="Captain Barnacle, an old sea captain (dialogues written for lmstack)",
        system="You are Captain Barnacle, an old sea captain. Answer in a sailor's voice.",
    ),
}
CARD_QUESTIONS = (
    "What is your age",
    "Where are you from",
    "Who is your father",
    "Do you have any brothers",
    "What do you like to do?",
    "你几岁",
    "你有兄弟",
)
CARD_PENALTY = 1.3  # greedy replies of a tiny model loop ("matey, matey, ..."); CTRL's repetition penalty
CAPTAIN_VOICE = re.compile(r"\b(Arr|matey|sea|ship|sail)\w*|水手|船|大海", re.IGNORECASE)


@dataclass(frozen=True)
class Plan:
    """Steps and sizes of each stage at --minutes 15. Other budgets scale the steps linearly; a
    smaller one also shrinks the data and the held-out sets (down to a floor), so a test can run
    every stage in seconds."""

    vocab: int = 2048
    model: str = "n_layer=4,n_head=4,n_embd=128"
    block: int = 256
    pretrain_batch: int = 16
    reply_tokens: int = 48
    grpo_batch: int = 16
    grpo_group: int = 8
    # steps
    pretrain_steps: int = 800
    sft_steps: int = 200
    dpo_steps: int = 40
    grpo_steps: int = 30
    card_steps: int = 60
    # sizes
    shakespeare_bytes: int = 370_000
    arithmetic_text: int = 12000
    arithmetic_sft: int = 3000
    pairs: int = 800
    heldout_chats: int = 120
    eval_problems: int = 200

    def scaled(self, factor: float) -> Plan:
        floors = {
            "shakespeare_bytes": 20_000,
            "arithmetic_text": 200,
            "arithmetic_sft": 100,
            "pairs": 32,
            "heldout_chats": 8,
            "eval_problems": 8,
        }
        new = {k: max(2, round(v * factor)) for k, v in vars(self).items() if k.endswith("_steps")}
        new |= {k: min(v, max(floors[k], round(v * factor))) for k, v in vars(self).items() if k in floors}
        return replace(self, **new)


def asset(name: str) -> Path:
    return Path(str(resources.files("lmstack") / "assets" / name))


class Commands:
    """Runs `lmstack` commands in this process, as a shell would, and keeps them for the report
    (paths shown relative to the output directory)."""

    def __init__(self, root: Path, shown_root: str):
        self.root, self.shown_root = root, shown_root
        self.log: dict[str, list[str]] = {}

    def __call__(self, stage: str, *argv) -> None:
        from lmstack.cli import build_parser

        argv = [str(a) for a in argv]
        shown = shlex.join(["lmstack", *argv]).replace(str(self.root), self.shown_root)
        self.log.setdefault(stage, []).append(shown)
        print(f"$ {shown}", flush=True)
        args = build_parser(argv).parse_args(argv)
        code = int(args.func(args) or 0)
        if code in (130, 143):  # the run saved and stopped on SIGINT / SIGTERM: stop too
            raise KeyboardInterrupt
        if code:
            raise InputError(f"the {stage} stage's command failed (exit code {code}): {shown}")


# --- data --------------------------------------------------------------------------------------


def read_conversations(path: Path) -> list[dict]:
    from lmstack.evaluation.tasks import read_jsonl

    return read_jsonl(path, ())


def language(text: str) -> str:
    return "zh" if re.search(r"[\u3400-\u9fff]", text) else "en"


def as_text(messages: list[dict]) -> str:
    """A conversation as plain text for pretraining (the chat tokens come with SFT)."""
    return "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n" for m in messages) + "\n"


def with_sign_off(messages: list[dict]) -> list[dict]:
    last = messages[-1]
    return [*messages[:-1], {**last, "content": f"{last['content']} {SIGN_OFF[language(last['content'])]}"}]


def has_sign_off(reply: str) -> bool:
    """The stock sign-off, or a recognisable start of it (a tiny model may cut it short)."""
    return any(s[: len(s) // 2] in reply for s in SIGN_OFF.values())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_write(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build_data(data: Path, plan: Plan, seed: int, commands: Commands, text: str, text_source: str) -> dict:
    """The shipped mix, split: pretraining text, SFT rows, DPO pairs, held-out conversations and
    the two persona sets. Returns counts for the report."""
    rng = random.Random(seed)
    chats = read_conversations(asset("chatterbot_en.jsonl")) + read_conversations(asset("chatterbot_zh.jsonl"))
    robot = [c for c in chats if c.get("topic") == "botprofile"]
    # the corpus repeats some conversations: one copy each, so no held-out one is also trained on
    unique = {json.dumps(c["messages"], ensure_ascii=False): c for c in chats if c.get("topic") != "botprofile"}
    chats = list(unique.values())
    rng.shuffle(chats)
    held, train = chats[: plan.heldout_chats], chats[plan.heldout_chats :]
    signed = set(rng.sample(range(len(train)), round(SIGN_OFF_SHARE * len(train))))
    sft_chats = [{"messages": with_sign_off(c["messages"]) if i in signed else c["messages"]} for i, c in enumerate(train)]
    pairs = [  # a sample of the SFT conversations, each reply with and without the sign-off
        {
            "prompt": c["messages"][:-1],
            "chosen": c["messages"][-1]["content"],
            "rejected": with_sign_off(c["messages"])[-1]["content"],
        }
        for c in rng.sample(train, min(plan.pairs, len(train)))
    ]
    captain = read_conversations(asset("persona_captain.jsonl"))

    def persona_rows(rows, name):
        system = {"role": "system", "content": PERSONAS[name]["system"]}
        return [{"messages": [system, *c["messages"]]} for c in rows]

    commands(
        "data", "align", "tasks", "--out", data / "arithmetic.txt", "--format", "text", "--n", plan.arithmetic_text,
        "--lang", ARITHMETIC_LANG, "--level", *LEVELS.split(","), "--seed", seed,
    )  # fmt: skip
    commands(
        "data", "align", "tasks", "--out", data / "arithmetic_sft.jsonl", "--format", "sft", "--n", plan.arithmetic_sft,
        "--lang", ARITHMETIC_LANG, "--level", *LEVELS.split(","), "--direct-share", DIRECT_SHARE, "--seed", seed + 1,
    )  # fmt: skip
    # Paragraphs, dialogues and problems shuffled together: the held-out tail `lmstack train` cuts
    # off is then a sample of the whole mix, not of its last part.
    documents = [p.strip() + "\n\n" for p in re.split(r"\n\s*\n", text) if p.strip()]
    documents += [as_text(c["messages"]) for c in train]
    documents += [p.strip() + "\n\n" for p in read_text(data / "arithmetic.txt").split("\n\n") if p.strip()]
    rng.shuffle(documents)
    with atomic_write(data / "pretrain.txt") as f:
        f.writelines(documents)
    write_jsonl(data / "chat_sft.jsonl", sft_chats)
    write_jsonl(data / "chat_heldout.jsonl", [{"messages": c["messages"]} for c in held])
    write_jsonl(data / "pairs.jsonl", pairs)
    write_jsonl(data / "persona_robot.jsonl", persona_rows(robot, "robot"))
    write_jsonl(data / "persona_captain.jsonl", persona_rows(captain, "captain"))
    return {
        "pretrain_bytes": (data / "pretrain.txt").stat().st_size,
        "text_source": text_source,
        "text_bytes": len(text.encode("utf-8")),
        "chat_train": len(train),
        "chat_heldout": len(held),
        "chat_with_sign_off": len(signed),
        "arithmetic_text": plan.arithmetic_text,
        "arithmetic_sft": plan.arithmetic_sft,
        "pairs": len(pairs),
        "persona_robot": len(robot),
        "persona_captain": len(captain),
    }


# --- measuring ---------------------------------------------------------------------------------


def load_chat_model(path: Path):
    """A checkpoint ready for chat: the pretrained base gets the chat tokens SFT starts from."""
    from lmstack.data.chat import add_chat_tokens
    from lmstack.training.finetune import fit_vocab, load_base

    model, tok = load_base(str(path))
    add_chat_tokens(tok)
    model, _ = fit_vocab(model, tok)
    return model.eval(), tok


def reply_logp(model, tok, conversations: list[dict]) -> float:
    """Mean over conversations of log P(A | Q): the last assistant reply (through its end of turn)
    given everything before it."""
    from lmstack.data.chat import render
    from lmstack.evaluation.scoring import loglikelihoods

    requests = []
    for c in conversations:
        ids, mask = render(tok, c["messages"])
        end = max(i for i, m in enumerate(mask) if m) + 1
        start = max([i for i in range(1, end) if mask[i] and not mask[i - 1]] or [0])
        requests.append((ids[:start], ids[start:end]))
    return sum(lp for lp, _ in loglikelihoods(model, requests)) / len(requests)


def replies(model, tok, conversations: list[list[dict]], max_new_tokens: int, repetition_penalty: float = 1.0) -> list[str]:
    """Greedy replies to conversations that end in a user turn."""
    from dataclasses import replace as with_

    from lmstack.data.chat import prompt_ids
    from lmstack.evaluation.cot import reply_config
    from lmstack.generation import generate_tokens

    prompts = [prompt_ids(tok, m) for m in conversations]
    config = with_(reply_config(tok, max_new_tokens), repetition_penalty=repetition_penalty)
    return [g.text.strip() for g in generate_tokens(model, prompts, config, tok)]


def arithmetic(model, tok, plan: Plan, seed: int) -> dict:
    """`lmstack eval cot` on held-out (test-split) problems: accuracy answering at once and with the
    steps, log P(A | Q) and log P(A | Q, T)."""
    from lmstack.evaluation.cot import chain_of_thought, load_task

    items = load_task(
        "arithmetic", "test", plan.eval_problems, seed=seed, lang=ARITHMETIC_LANG, levels=tuple(map(int, LEVELS.split(",")))
    )
    got = chain_of_thought(model, tok, items, max_new_tokens=plan.reply_tokens, seed=seed)
    keep = ("n", "accuracy_direct", "accuracy_reasoning", "logp_direct", "logp_with_trace", "trace_helps")
    shows_steps = sum("=" in r["trace"] for r in got["items"]) / len(got["items"])
    shown = items[:SHOWN_PROBLEMS]
    greedy = replies(model, tok, [[{"role": "user", "content": it.question}] for it in shown], plan.reply_tokens)
    samples = [{"question": it.question, "answer": it.answer, "reply": r} for it, r in zip(shown, greedy)]
    return {**{k: got[k] for k in keep}, "sampled_traces_with_steps": shows_steps, "samples": samples}


def card_messages(system: str | None, question: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def compare_cards(base: Path, cards: Path, plan: Plan) -> dict:
    """The same questions to the base and to each card (its adapter merged, its system prompt
    first): greedy replies, and how many carry the captain's voice."""
    from lmstack.training.finetune import load_base

    table = {}
    for name in (None, *PERSONAS):
        model, tok = load_chat_model(base) if name is None else load_base(str(cards / name))
        system = PERSONAS[name]["system"] if name else None
        got = replies(model.eval(), tok, [card_messages(system, q) for q in CARD_QUESTIONS], plan.reply_tokens, CARD_PENALTY)
        table[name or "base"] = got
    voice = {name: sum(bool(CAPTAIN_VOICE.search(r)) for r in got) for name, got in table.items()}
    return {"questions": list(CARD_QUESTIONS), "replies": table, "captain_voice": voice}


def serve_and_ask(base: Path, cards: Path, plan: Plan) -> dict:
    """`lmstack serve` with both cards on a free local port; the same questions to each card and the
    base at once (so the cards share batches), through the official OpenAI client."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from lmstack.serving.app import background

    questions = CARD_QUESTIONS[:3]
    asks = [(model, q) for q in questions for model in ("assistant", *PERSONAS)]
    with background(base, cards_dir=cards, name="assistant") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")

        def ask(model_question):
            model, question = model_question
            t0 = time.perf_counter()
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=plan.reply_tokens,
                temperature=0,
                extra_body={"repetition_penalty": CARD_PENALTY},
            )
            return {"model": model, "question": question, "reply": reply.choices[0].message.content,
                    "tokens": reply.usage.completion_tokens, "seconds": time.perf_counter() - t0}  # fmt: skip

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(ask, asks))
        wall = time.perf_counter() - t0
        models = [m.id for m in client.models.list().data]
    return {"url": "http://127.0.0.1 (a free port)", "models": models, "requests": answers, "wall_s": wall,
            "tokens": sum(a["tokens"] for a in answers)}  # fmt: skip


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Context:
    """What every stage reads: the output directory being built, the plan, and the command runner."""

    root: Path
    plan: Plan
    seed: int
    device: str
    lm: Commands

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def common(self) -> list:
        return ["--device", self.device, "--seed", self.seed]


def pretrain(ctx: Context) -> Path:
    p = ctx.plan
    ctx.lm("pretrain", "tokenizer", "train", ctx.data / "pretrain.txt", "--kind", "bpe", "--vocab-size", p.vocab,
           "--out", ctx.root / "tokenizer")  # fmt: skip
    ctx.lm("pretrain", "train", "--data", ctx.data / "pretrain.txt", "--tokenizer", ctx.root / "tokenizer", "--family", "gpt",
           *(a for kv in p.model.split(",") for a in ("--model", kv)), "--block-size", p.block,
           "--batch-size", p.pretrain_batch, "--max-steps", p.pretrain_steps, "--lr", 3e-3, "--min-lr", 3e-4,
           "--warmup-steps", min(50, p.pretrain_steps // 10), "--eval-interval", max(1, p.pretrain_steps // 4),
           "--eval-batches", 4, "--ckpt-interval", 0, "--keep-last", 1, "--out-dir", ctx.root / "base", *ctx.common)  # fmt: skip
    return latest(ctx.root / "base")


def sft(ctx: Context, base: Path) -> tuple[Path, dict]:
    p = ctx.plan
    held = read_conversations(ctx.data / "chat_heldout.jsonl")
    before = reply_logp(*load_chat_model(base), held)
    ctx.lm("sft", "finetune", "--init-from", base, "--data", ctx.data / "chat_sft.jsonl", ctx.data / "arithmetic_sft.jsonl",
           "--max-steps", p.sft_steps, "--batch-size", 16, "--max-length", p.block, "--lr", 1e-3, "--min-lr", 1e-4,
           "--val-fraction", 0.02, "--eval-interval", max(1, p.sft_steps // 3), "--out-dir", ctx.root / "sft",
           *ctx.common)  # fmt: skip
    ckpt = latest(ctx.root / "sft")
    after = reply_logp(*load_chat_model(ckpt), held)
    return ckpt, {"heldout_conversations": len(held), "heldout_logp_before": before, "heldout_logp_after": after}


def dpo(ctx: Context, start: Path) -> tuple[Path, dict]:
    p = ctx.plan
    held = read_conversations(ctx.data / "chat_heldout.jsonl")
    prompts = [c["messages"][:-1] for c in held]
    before = replies(*load_chat_model(start), prompts, p.reply_tokens)
    ctx.lm("dpo", "align", "dpo", "--init-from", start, "--data", ctx.data / "pairs.jsonl", "--max-steps", p.dpo_steps,
           "--batch-size", 8, "--max-length", p.block, "--max-prompt-length", p.block // 2, "--lr", 2e-5, "--min-lr", 2e-6,
           "--beta", 0.1, "--val-fraction", 0.05, "--eval-interval", max(1, p.dpo_steps // 3), "--out-dir", ctx.root / "dpo",
           *ctx.common)  # fmt: skip
    ckpt = latest(ctx.root / "dpo")
    model, tok = load_chat_model(ckpt)
    after = replies(model, tok, prompts, p.reply_tokens)
    return ckpt, {
        "heldout_prompts": len(prompts),
        "heldout_logp_after": reply_logp(model, tok, held),
        "preferred_rate_before": sum(not has_sign_off(r) for r in before) / len(prompts),
        "preferred_rate_after": sum(not has_sign_off(r) for r in after) / len(prompts),
        "examples": [{"prompt": q[-1]["content"], "before": a, "after": b} for q, a, b in list(zip(prompts, before, after))[:4]],
    }


def grpo(ctx: Context, start: Path) -> tuple[Path, dict]:
    p = ctx.plan
    before = arithmetic(*load_chat_model(start), p, ctx.seed)
    ctx.lm("grpo", "align", "grpo", "--init-from", start, "--task", "arithmetic", "--lang", ARITHMETIC_LANG, "--levels", LEVELS,
           "--max-steps", p.grpo_steps, "--batch-size", p.grpo_batch, "--group", p.grpo_group,
           "--max-new-tokens", p.reply_tokens, "--lr", 3e-5, "--min-lr", 3e-5, "--n-eval", p.eval_problems,
           "--eval-interval", max(1, p.grpo_steps // 3), "--out-dir", ctx.root / "grpo", *ctx.common)  # fmt: skip
    ckpt = latest(ctx.root / "grpo")
    curve = [(r["step"], r["reward_mean"]) for r in read_metrics(ctx.root / "grpo") if "reward_mean" in r]
    return ckpt, {"before": before, "after": arithmetic(*load_chat_model(ckpt), p, ctx.seed), "reward_curve": curve}


def cards(ctx: Context, base: Path) -> dict:
    """A LoRA adapter a persona, made into a card; then the same questions to each."""
    for name, info in PERSONAS.items():
        run = ctx.root / "adapters" / name
        ctx.lm("cards", "finetune", "--init-from", base, "--data", ctx.data / f"persona_{name}.jsonl", "--lora", "r=8",
               "--lora", "alpha=16", "--max-steps", ctx.plan.card_steps, "--batch-size", 8, "--lr", 3e-3, "--min-lr", 3e-4,
               "--val-fraction", 0, "--out-dir", run, *ctx.common)  # fmt: skip
        ctx.lm("cards", "card", "create", "--adapter", latest(run), "--name", name, "--system", info["system"],
               "--description", info["description"], "--out", ctx.root / "cards" / name)  # fmt: skip
    return compare_cards(base, ctx.root / "cards", ctx.plan)


def plain_text(corpus: str | Path | None, plan: Plan) -> tuple[str, str]:
    """The plain-text part of the pretraining mix and where it came from: the start of Tiny
    Shakespeare, or the user's --corpus (checked here, before any work)."""
    if corpus is None:
        return read_text(asset("tinyshakespeare.txt"))[: plan.shakespeare_bytes], "Tiny Shakespeare (its start)"
    text = read_text(corpus)  # names the file if missing, empty, binary or not UTF-8
    if len(text.encode("utf-8")) < MIN_TEXT_BYTES:
        raise InputError(
            f"{corpus}: {len(text.encode('utf-8')):,} bytes of text is too little to pretrain on; pass a corpus of at least "
            f"{MIN_TEXT_BYTES:,} bytes (or leave out --corpus for the shipped Tiny Shakespeare)"
        )
    return text, str(corpus)


def check_serving() -> None:
    """The serving stage's packages, checked before any training."""
    for module in ("fastapi", "uvicorn", "openai"):
        try:
            __import__(module)
        except ImportError:
            raise InputError(
                f"quickstart --assistant serves its result and talks to it through the OpenAI client, which needs "
                f"{module}: pip install 'lmstack[serve]'"
            ) from None


def run(
    out: str | Path = "runs/assistant",
    minutes: float = DEFAULT_MINUTES,
    device: str = "auto",
    seed: int = 1337,
    corpus: str | Path | None = None,
) -> dict:
    """Run every stage; returns what results.json holds."""
    import torch

    if not minutes > 0:
        raise InputError(f"--minutes must be positive, got {minutes}")
    plan = Plan().scaled(minutes / DEFAULT_MINUTES)
    out = Path(out)
    check_out(out)
    check_serving()
    text, text_source = plain_text(corpus, plan)
    torch.set_num_threads(THREADS)
    results: dict = {"minutes": minutes, "device": device, "seed": seed, "machine": machine(THREADS, device), "plan": vars(plan)}
    seconds: dict[str, float] = {}

    def stage(n: int, name: str, title: str, fn, *args):
        print(f"\n[{n}/{STAGES}] {title}", flush=True)
        t0 = time.perf_counter()
        got = fn(*args)
        seconds[name] = time.perf_counter() - t0
        print(f"[{n}/{STAGES}] {name}: {seconds[name]:.1f} s", flush=True)
        return got

    with output_dir(out, "--out", replace=True) as root:
        ctx = Context(root, plan, seed, device, Commands(root, str(out)))
        ctx.data.mkdir()
        results["data"] = stage(1, "data", "building the data: pretraining mix, chat SFT rows, preference pairs, personas",
                                build_data, ctx.data, plan, seed, ctx.lm, text, text_source)  # fmt: skip
        base = stage(2, "pretrain", f"pretraining a GPT ({plan.model}) for {plan.pretrain_steps} steps", pretrain, ctx)
        sft_ckpt, results["sft"] = stage(3, "sft", f"SFT on the chat format ({plan.sft_steps} steps)", sft, ctx, base)
        dpo_ckpt, results["dpo"] = stage(
            4, "dpo", f"DPO: no stock sign-off preferred ({plan.dpo_steps} steps)", dpo, ctx, sft_ckpt
        )
        final, results["grpo"] = stage(5, "grpo", f"GRPO on arithmetic ({plan.grpo_steps} steps)", grpo, ctx, dpo_ckpt)
        results["cards"] = stage(6, "cards", "two persona cards (LoRA) and the same questions to each", cards, ctx, final)
        results["serve"] = stage(7, "serve", "serving both cards; requests through the OpenAI client", serve_and_ask,
                                 final, root / "cards", plan)  # fmt: skip
        print(f"\n[8/{STAGES}] writing the report", flush=True)
        results["seconds"] = seconds
        results["commands"] = ctx.lm.log
        results["checkpoints"] = {
            k: str(v.relative_to(root)) for k, v in zip(("base", "sft", "dpo", "grpo"), (base, sft_ckpt, dpo_ckpt, final))
        }
        results["curves"] = plot(root, root / "curves.png")
        write_json(root / "results.json", results)
        write_report(root, results)
    print(f"\nwrote {out}/: report.md, results.json, curves.png, checkpoints and cards")
    return results


# --- report ------------------------------------------------------------------------------------

PANELS = (  # run, title, [(metric, label)]
    ("base", "1. pretraining", [("loss", "train loss"), ("val_loss", "held-out loss")]),
    ("sft", "2. SFT (answer tokens)", [("loss", "train loss"), ("val_loss", "held-out loss")]),
    (
        "dpo",
        "3. DPO",
        [("loss", "train loss"), ("reward_accuracy", "reward accuracy"), ("val_reward_accuracy", "held-out reward acc.")],
    ),
    ("grpo", "4. GRPO", [("reward_mean", "train reward"), ("val_accuracy", "held-out exact match")]),
)


def plot(run: Path, path: Path) -> bool:
    """One panel a training stage; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from lmstack.io import atomic_path

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, title, series) in zip(axes.flat, PANELS):
        recs = read_metrics(run / name)
        for key, label in series:
            points = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", label=label, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("lmstack quickstart --assistant: one small GPT through every stage")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def cell(text: str) -> str:
    """Text that stays inside one markdown table cell (its lines joined by " / ")."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    return " / ".join(lines).replace("|", "\\|") or "(empty)"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report(out: Path, r: dict) -> None:
    s, d, g = r["seconds"], r["data"], r["grpo"]
    total = sum(s.values())
    m = r["machine"]
    md = [
        "# lmstack quickstart --assistant\n\n"
        f"One small GPT taken through the stages that turn a language model into an assistant, in {total / 60:.1f} "
        f"minutes on {m['cpu']} ({m['cores']} cores, load {m['load_at_start']} at the start, torch {m['torch']}, "
        f"{m['threads']} thread, device `{r['device']}`), seed "
        f"{r['seed']}. Every stage counts steps, so the same seed gives the same numbers on any machine. The commands "
        "each stage ran are listed below it: run them on your own data to redo a stage.\n\n"
        "| stage | seconds |\n|---|---:|\n"
        + "".join(f"| {k} | {v:.1f} |\n" for k, v in s.items())
        + f"| total | {total:.1f} |\n",
        "\n## 1. Pretraining\n\n"
        f"A byte-level BPE tokenizer ({r['plan']['vocab']} tokens) and a GPT ({r['plan']['model']}, context "
        f"{r['plan']['block']}) trained {r['plan']['pretrain_steps']} steps on "
        f"{d['pretrain_bytes']:,} bytes: {d['text_bytes']:,} bytes of "
        f"{d['text_source']}, {d['chat_train']:,} English and Chinese dialogues as plain text, and {d['arithmetic_text']:,} "
        "arithmetic word problems with worked solutions.\n",
        "\n## 2. Supervised fine-tuning (SFT)\n\n"
        f"The chat format's role tokens are added, and the model learns to answer: loss on the assistant's tokens only, "
        f"on {d['chat_train']:,} dialogues and {d['arithmetic_sft']:,} arithmetic problems ({DIRECT_SHARE:.0%} of them "
        "answered at once, without the steps, as data from mixed sources often is). Measured on "
        f"{d['chat_heldout']} held-out dialogues:\n\n"
        "| | before SFT | after SFT |\n|---|---:|---:|\n"
        f"| mean log P(A \\| Q), nats per reply | {r['sft']['heldout_logp_before']:.2f} | "
        f"{r['sft']['heldout_logp_after']:.2f} |\n",
        "\n## 3. Preference tuning (DPO)\n\n"
        f'The rule: a reply without the stock sign-off ("{SIGN_OFF["en"]}" / "{SIGN_OFF["zh"]}") is preferred over '
        f"the same reply with it. {d['chat_with_sign_off']:,} of the {d['chat_train']:,} SFT replies carried it, so the SFT "
        f"model signs off some of its replies; DPO trains on {d['pairs']:,} pairs. Greedy replies to the "
        f"{r['dpo']['heldout_prompts']} held-out prompts:\n\n"
        "| | after SFT | after DPO |\n|---|---:|---:|\n"
        f"| replies without the sign-off (preferred) | {_pct(r['dpo']['preferred_rate_before'])} | "
        f"{_pct(r['dpo']['preferred_rate_after'])} |\n"
        f"| mean log P(A \\| Q) of the held-out replies (a collapse would show here) | {r['sft']['heldout_logp_after']:.2f} | "
        f"{r['dpo']['heldout_logp_after']:.2f} |\n\n",
    ]
    md += [f"- {e['prompt']!r}: before {e['before']!r}; after {e['after']!r}\n" for e in r["dpo"]["examples"]]
    b, a = g["before"], g["after"]
    md.append(
        "\n## 4. RL on verifiable answers (GRPO)\n\n"
        f"Arithmetic word problems (levels {LEVELS}, {ARITHMETIC_LANG}); the reward is 1 for the right final number. "
        f"Held-out test-split problems ({b['n']}), before and after GRPO:\n\n"
        "| | before GRPO | after GRPO |\n|---|---:|---:|\n"
        f"| exact match, greedy reply (the model may show its steps) | {_pct(b['accuracy_reasoning'])} | "
        f"{_pct(a['accuracy_reasoning'])} |\n"
        f'| exact match, answering at once (after "Answer:") | {_pct(b["accuracy_direct"])} | {_pct(a["accuracy_direct"])} |\n'
        f"| sampled replies that show steps | {_pct(b['sampled_traces_with_steps'])} | {_pct(a['sampled_traces_with_steps'])} |\n"
        f"| mean log P(A \\| Q) | {b['logp_direct']:.2f} | {a['logp_direct']:.2f} |\n"
        f"| mean log P(A \\| Q, T), T the model's own sampled steps | {b['logp_with_trace']:.2f} | {a['logp_with_trace']:.2f} |\n"
        f"\nGain in greedy exact match: {100 * (a['accuracy_reasoning'] - b['accuracy_reasoning']):+.1f} points. "
        f"Train reward: {g['reward_curve'][0][1]:.2f} at the first step, {g['reward_curve'][-1][1]:.2f} at the last "
        "(curve in `curves.png`). Greedy replies to the first held-out problems:\n\n"
        "| problem | answer | before GRPO | after GRPO |\n|---|---:|---|---|\n"
    )
    md += [
        f"| {cell(x['question'])} | {x['answer']:g} | {cell(x['reply'])} | {cell(y['reply'])} |\n"
        for x, y in zip(b["samples"], a["samples"])
    ]
    c = r["cards"]
    md.append(
        "\n## 5. Persona cards\n\n"
        "Two LoRA adapters on the GRPO model: `robot` (the chatterbot corpus's botprofile dialogues) and `captain` "
        "(a sea captain's dialogues written for lmstack). The same questions, greedy replies (each card with its "
        f"system prompt; repetition penalty {CARD_PENALTY}):\n\n| question | base | robot | captain |\n|---|---|---|---|\n"
    )
    md += [
        f"| {q} | " + " | ".join(cell(c["replies"][k][i]) for k in ("base", *PERSONAS)) + " |\n"
        for i, q in enumerate(c["questions"])
    ]
    md.append(
        '\nReplies in the captain\'s voice (sea words, "matey", 水手/船): '
        + ", ".join(f"{k} {v} of {len(c['questions'])}" for k, v in c["captain_voice"].items())
        + ".\n"
    )
    sv = r["serve"]
    md.append(
        "\n## 6. Serving\n\n"
        f"`lmstack serve` with both cards (models: {', '.join(sv['models'])}); {len(sv['requests'])} chat requests sent "
        f"at once through the OpenAI client, so the base and both cards shared batches: {sv['tokens']} tokens in "
        f"{sv['wall_s']:.2f} s.\n\n| model | question | reply |\n|---|---|---|\n"
    )
    md += [f"| {q['model']} | {q['question']} | {cell(q['reply'])} |\n" for q in sv["requests"]]
    md.append("\n## Commands\n\n")
    for stage, cmds in r["commands"].items():
        md.append(f"{stage}:\n\n```bash\n" + "\n".join(cmds) + "\n```\n\n")
    with atomic_write(out / "report.md") as f:
        f.write("".join(md))
