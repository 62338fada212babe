"""Train the small MoE that ships with moetier as ``--model demo``.

What it learns, all generated here from templates (nothing is downloaded):

* multi-digit addition, ``12+345=357<eos>``: one operand pair in ten is held out by a
  hash of the pair and never trained on; 200 of those make ``moetier/tasks/addition.jsonl``;
* short facts and sentences (capitals, animal sounds, colours, counting, tiny stories);
* the same as chat turns, ``<|user|>What is 12+345?<|assistant|>12+345=357<|eos|>``.

Digits and words go through different experts, so the router learns input-dependent,
skewed routing, which is what moetier's expert caches exploit.

The model is a transformers ``MixtralForCausalLM`` built from a config (8 experts, top-2,
4 layers, ~3.5 M parameters) trained on the CPU with a fixed seed; a byte-level BPE
tokenizer (digits split one per token) is trained with ``tokenizers`` on the same corpus.
Output, in the Hugging Face layout: ``moetier/demo_model/`` (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

``--size small`` trains ``--model demo-small`` (``moetier/demo_small_model/``): the same corpus
and the demo's own tokenizer files (copied byte for byte, so token ids are shared), a 2-layer,
hidden-64, 4-expert model (0.29 M parameters, 1.2 MB) trained for ~6 minutes, so that it gets
only part of the addition task right (about three answers in four): the small end of a
confidence cascade (``moetier.cascade``). It leaves the task file alone and writes
``moetier/tasks/addition_calibrate.jsonl``: 1000 more held-out additions, none in the task, to
calibrate cascades on (the task stays the held-out split).

    PYTHONPATH=. python scripts/train_demo.py            # ~20 min on one CPU core
    PYTHONPATH=. python scripts/train_demo.py --size small   # moetier/demo_small_model/, a few minutes
    PYTHONPATH=. python scripts/train_demo.py --steps 50 --out /tmp/demo --task /tmp/task.jsonl   # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
MAX_DIGITS = 3
BOS, EOS, PAD, USER, ASSISTANT, SYSTEM = "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIALS = [PAD, BOS, EOS, USER, ASSISTANT, SYSTEM]

# One turn per message; an assistant turn ends with EOS, which is also where generation stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% else %}<|system|>{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MODEL_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False, router_aux_loss_coef=0.01,
)

# --size small: the cascade's small model; same tokenizer, vocabulary and context
SMALL_CONFIG = dict(MODEL_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_local_experts=4)
SIZES = {"demo": MODEL_CONFIG, "small": SMALL_CONFIG}
DEFAULT_OUT = {"demo": ROOT / "moetier" / "demo_model", "small": ROOT / "moetier" / "demo_small_model"}
# the small run's defaults: steps (at batch 128), learning rate, and a time budget it finishes well
# within (~6 min on one core), so that the steps, not the clock, set the schedule
SMALL_STEPS, SMALL_LR, SMALL_BUDGET_MIN = 3000, 2e-3, 12.0

# ---------------------------------------------------------------------------- corpus

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
    "Russia": "Moscow", "India": "Delhi", "Greece": "Athens", "Norway": "Oslo", "Poland": "Warsaw",
    "Chile": "Santiago", "Cuba": "Havana", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon",
}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "horse": "neigh", "pig": "oink", "frog": "ribbit", "bee": "buzz", "mouse": "squeak"}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
           "a tomato": "red", "an orange": "orange", "the sea": "blue", "a lemon": "yellow", "milk": "white"}
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
NAMES = ["Alice", "Bob", "Carol", "Dave", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack"]
ADJ = ["small", "big", "happy", "sleepy", "brown", "quick", "old", "young"]
VERBS = ["run", "sleep", "play", "swim", "eat", "sing", "jump", "read"]


def is_held_out(a: int, b: int) -> bool:
    """One operand pair in ten, fixed by a hash, is never trained on."""
    return hashlib.md5(f"{a}+{b}".encode()).digest()[0] % 10 == 0


def random_operand(rng: random.Random) -> int:
    digits = rng.choices(range(1, MAX_DIGITS + 1), weights=[1, 2, 6][:MAX_DIGITS])[0]
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def addition_pair(rng: random.Random, held_out: bool) -> tuple[int, int]:
    while True:
        a, b = random_operand(rng), random_operand(rng)
        if is_held_out(a, b) == held_out:
            return a, b


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        c = rng.choice(list(CAPITALS))
        return f"The capital of {c} is {CAPITALS[c]}."
    if kind == 1:
        a = rng.choice(list(SOUNDS))
        return f"The {a} says {SOUNDS[a]}."
    if kind == 2:
        t = rng.choice(list(COLOURS))
        return f"{t[0].upper()}{t[1:]} is {COLOURS[t]}."
    if kind == 3:
        i = rng.randrange(len(NUMBERS) - 4)
        return " ".join(NUMBERS[i : i + rng.randrange(4, len(NUMBERS) - i + 1)]) + "."
    if kind == 4:
        i = rng.randrange(7)
        return f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    if kind == 5:
        n, a, animal, v = rng.choice(NAMES), rng.choice(ADJ), rng.choice(list(SOUNDS)), rng.choice(VERBS)
        return f"{n} has a {a} {animal}. The {animal} likes to {v}."
    x, y = rng.randrange(6), rng.randrange(7)
    return f"{NUMBERS[x].capitalize()} plus {NUMBERS[y]} is {NUMBERS[x + y]}."


def chat_turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = addition_pair(rng, held_out=False)
        return f"What is {a}+{b}?", f"{a}+{b}={a + b}"
    if kind == 1:
        c = rng.choice(list(CAPITALS))
        return f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}."
    if kind == 2:
        a = rng.choice(list(SOUNDS))
        return f"What does the {a} say?", f"The {a} says {SOUNDS[a]}."
    t = rng.choice(list(COLOURS))
    return f"What colour is {t}?", f"{t[0].upper()}{t[1:]} is {COLOURS[t]}."


def example(rng: random.Random) -> tuple[str, str]:
    """One training document as (context, target), special tokens written out. The loss is on
    the target only: an addition's operands and a chat question are random, not learnable."""
    r = rng.random()
    if r < 0.75:
        a, b = addition_pair(rng, held_out=False)
        return f"{BOS}{a}+{b}=", f"{a + b}{EOS}"
    if r < 0.9:
        return BOS, f"{sentence(rng)}{EOS}"
    q, ans = chat_turn(rng)
    return f"{BOS}{USER}{q}{ASSISTANT}", f"{ans}{EOS}"


# ---------------------------------------------------------------------------- tokenizer

def train_tokenizer(rng: random.Random, vocab_size: int):
    """Byte-level BPE, digits split one per token, BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = ["".join(example(rng)) for _ in range(20000)]
    for s in SPECIALS:  # specials are not merged into words
        texts = [t.replace(s, " ") for t in texts]
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM], chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_CONFIG["max_position_embeddings"], clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------- training

def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def pad_batch(tok, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context ids, target ids) rows -> right-padded ids ``[B, L]``, attention mask, and labels
    that are -100 except on target tokens."""
    L = max(len(c) + len(t) for c, t in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (c, t) in enumerate(rows):
        n = len(c) + len(t)
        ids[i, :n] = torch.tensor(c + t)
        mask[i, :n] = 1
        labels[i, len(c) : n] = torch.tensor(t)
    return ids, mask, labels


def batches(tok, rng: random.Random, batch: int, pool: int = 16):
    """Endless training batches. Documents are drawn ``pool`` batches at a time and batched with
    others of similar length, which halves the padding; lengths overlap across the kinds of
    document, so batches still mix additions and sentences (the balancing loss sees both)."""
    while True:
        rows = [tuple(encode(tok, part) for part in example(rng)) for _ in range(batch * pool)]
        rows.sort(key=lambda r: len(r[0]) + len(r[1]))
        chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        rng.shuffle(chunks)
        for c in chunks:
            yield pad_batch(tok, c)


@torch.no_grad()
def held_out_exact_match(model, tok, rng: random.Random, n: int = 256) -> float:
    """Teacher-forced exact match of answer + EOS on held-out additions. It equals greedy exact
    match: greedy decoding reproduces the answer iff each answer token is the argmax given the
    ones before it."""
    model.eval()
    pairs = [addition_pair(rng, held_out=True) for _ in range(n)]
    ids, mask, labels = pad_batch(tok, [(encode(tok, f"{BOS}{a}+{b}="), encode(tok, f"{a + b}{EOS}")) for a, b in pairs])
    pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # [B, L]
    target = labels[:, 1:]
    ok = ((pred[:, :-1] == target) | (target == -100)).all(dim=1)
    model.train()
    return ok.float().mean().item()


def train(args) -> None:
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    t_start = time.perf_counter()
    if args.size == "demo":
        tok = train_tokenizer(random.Random(SEED + 1), args.vocab)
    else:  # the demo's tokenizer as shipped: both models must share token ids
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(DEFAULT_OUT["demo"]))
    cfg = MixtralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, output_router_logits=True, **SIZES[args.size])
    model = MixtralForCausalLM(cfg).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    active = n_params - sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) * (
        1 - cfg.num_experts_per_tok / cfg.num_local_experts)
    print(f"tokenizer: {len(tok)} tokens; model: {n_params / 1e6:.2f} M parameters "
          f"({active / 1e6:.2f} M active per token)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = min(200, args.steps // 10)
    budget_s = args.time_budget * 60

    def lr_at(step: int, progress: float) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    # The schedule runs on progress = max(steps done / --steps, time used / --time-budget): on a
    # machine fast enough to finish the steps in the budget (0.25 s a step) the run is
    # deterministic; on a slower or busier one, it decays and stops on time instead.
    data_rng, eval_rng = random.Random(SEED + 2), random.Random(SEED + 3)
    t_train, running, step, progress = time.perf_counter(), None, 0, 0.0
    stream = batches(tok, data_rng, args.batch)
    while progress < 1.0:
        lr = lr_at(step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, mask, labels = next(stream)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t_train
        progress = max(step / args.steps, elapsed / budget_s)
        # printed loss: next-token cross-entropy on target tokens only, without the balancing loss
        lm = (out.loss - cfg.router_aux_loss_coef * out.aux_loss).item()
        running = lm if running is None else 0.95 * running + 0.05 * lm
        last = progress >= 1.0
        if step % args.log_every == 0 or step == 1 or last:
            line = (f"step {step:5d}  loss {lm:.4f}  (avg {running:.4f})  aux {out.aux_loss.item():.3f}  "
                    f"lr {lr:.2e}  {elapsed:6.0f} s")
            if step % (args.log_every * 5) == 0 or last:
                line += f"  held-out exact match {held_out_exact_match(model, tok, eval_rng):.3f}"
            print(line, flush=True)
    if step < args.steps:
        print(f"note: stopped by the {args.time_budget:g} min time budget after {step} of {args.steps} steps; "
              "this run is not bit-reproducible", flush=True)
    train_s = time.perf_counter() - t_train
    final = held_out_exact_match(model, tok, random.Random(SEED + 4), n=1000)
    print(f"training: {step} steps in {train_s:.0f} s ({train_s / 60:.1f} min); final loss (avg) "
          f"{running:.4f}; held-out exact match (1000 items) {final:.3f}", flush=True)
    save(model, tok, cfg, Path(args.out), GenerationConfig)
    if args.size == "demo":
        write_task(Path(args.task), args.task_items)
    else:  # byte for byte the demo's tokenizer files, whatever this transformers version writes
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(DEFAULT_OUT["demo"] / name, Path(args.out) / name)
        write_calibration_task(Path(args.task), Path(args.task).with_name("addition_calibrate.jsonl"),
                               args.calibration_items)
    print(f"total time {time.perf_counter() - t_start:.0f} s", flush=True)


def save(model, tok, cfg, out: Path, GenerationConfig) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.config.output_router_logits = False  # a training switch; inference needs no router logits
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    portable_tokenizer_config(out)
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; installed package data should be world-readable
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB): {', '.join(sorted(f.name for f in out.iterdir()))}", flush=True)


def portable_tokenizer_config(out: Path) -> None:
    """Rewrite tokenizer_config.json in the form transformers 4.x and 5.x both read: the generic
    fast-tokenizer class, the chat template inline, extra specials as a list."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    extra = cfg.pop("extra_special_tokens", None)
    if extra:
        cfg["additional_special_tokens"] = list(extra)
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        cfg["chat_template"] = jinja.read_text()
        jinja.unlink()
    cfg["chat_template"] = cfg.get("chat_template") or CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_task(path: Path, n: int) -> None:
    """Held-out additions as ``{"prompt", "answer"}`` lines, from their own seed."""
    rng, seen, lines = random.Random(SEED + 5), set(), []
    while len(lines) < n:
        a, b = addition_pair(rng, held_out=True)
        if (a, b) not in seen:
            seen.add((a, b))
            lines.append(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({n} held-out items)", flush=True)


def write_calibration_task(task: Path, path: Path, n: int) -> None:
    """More held-out additions, from their own seed, none of them in ``task``: a cascade's
    thresholds are picked on these and checked on the task."""
    lines_in = task.read_text().splitlines() if task.exists() else []
    taken = {json.loads(line)["prompt"] for line in lines_in if line.strip()}
    rng, lines = random.Random(SEED + 6), []
    while len(lines) < n:
        a, b = addition_pair(rng, held_out=True)
        if f"{a}+{b}=" not in taken:
            taken.add(f"{a}+{b}=")
            lines.append(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({n} held-out items for calibration)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="demo", choices=sorted(SIZES),
                   help="demo (the shipped demo model) or small (demo-small, the cascade's small model)")
    p.add_argument("--steps", type=int, default=None, help=f"default: 5000 (--size small: {SMALL_STEPS})")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"minutes; the schedule ends by then (default: 21; --size small: {SMALL_BUDGET_MIN:g})")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help=f"default: 1e-3 (--size small: {SMALL_LR:g})")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared or busy machine, 2 threads run 4x slower)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", default=None, help="default: moetier/demo_model (--size small: moetier/demo_small_model)")
    p.add_argument("--task", default=str(ROOT / "moetier" / "tasks" / "addition.jsonl"),
                   help="where the held-out task goes (--size demo only)")
    p.add_argument("--task-items", type=int, default=200)
    p.add_argument("--calibration-items", type=int, default=1000,
                   help="--size small: held-out additions written beside --task to calibrate cascades on")
    args = p.parse_args()
    small = args.size == "small"
    args.steps = args.steps if args.steps is not None else (SMALL_STEPS if small else 5000)
    args.time_budget = args.time_budget if args.time_budget is not None else (SMALL_BUDGET_MIN if small else 21.0)
    args.lr = args.lr if args.lr is not None else (SMALL_LR if small else 1e-3)
    args.out = args.out or str(DEFAULT_OUT[args.size])
    train(args)


if __name__ == "__main__":
    main()
