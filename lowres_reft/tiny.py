"""The builtin tiny model: a Qwen2-architecture causal LM and a character-level tokenizer, built locally.

It lets the whole pipeline (4-bit quantization, LoRA, nested rollouts, training, export) run on a laptop
CPU with no downloads. Built once per size (and pretraining setting) and cached under `<cache_dir>/`:

- ``tiny-qwen2-L{layers}-H{hidden}/``: random init (``pretrain_steps = 0``, what the unit tests use);
- ``tiny-qwen2-L{layers}-H{hidden}-pt{steps}-{hash}/``: briefly pretrained (``pretrain_steps > 0``, the demo).
  ``hash`` covers `PRETRAIN_VERSION`, the seed and every pretraining setting, so a changed builder rebuilds
  instead of reusing a stale cache.

Why pretrain: a random-init model cannot learn arithmetic word problems through LoRA adapters alone in minutes,
so RL on it shows nothing. A real Nested-ReFT run starts from an LLM that already "knows some math" but not the
task's format; the tiny model imitates that. Before it is saved (and later quantized to NF4 by the run), it is
trained in full precision for `pretrain_steps` AdamW steps as a character-level LM on procedurally generated
arithmetic text that is *not* the word-problem format of `lowres_reft.data`: bare equations ("7+5=12",
"9-2=7", "3*4=12") and short phrases that state an operation in other words and then write it as an equation
("the sum of 7 and 5 is 7+5=12", "9 minus 2: 9-2=7", "3 times 4: 3*4=12"). So the base model can copy
numbers out of text and do the arithmetic, but has never seen "Question: ... Answer:", the word problems'
vocabulary ("gets 3 more", "gives away", "bags with ... each") or "The answer is N." plus end-of-text: the
supervised warm-up (LoRA) teaches that format and RL improves on it. Pretraining is seeded and deterministic
(fixed data stream, fixed init, fixed step count); it takes about a minute on 2 CPU cores for the demo size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TINY_NAME = "builtin:tiny"
PAD, EOS = "<pad>", "<|endoftext|>"
# Bump when the corpus generator or the training loop changes (the cache key includes it).
PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class PretrainSettings:
    """Settings of the tiny model's pretraining (all part of the cache key)."""

    steps: int
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.0
    # Operand ranges of the generated arithmetic (wider than the word problems' 1..20 so the facts generalize).
    max_add: int = 30
    max_mul_a: int = 12
    max_mul_b: int = 12


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1}
    for char in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[char] = len(vocab)
    # A BPE model without merges is a character tokenizer; Fuse() joins characters back on decode.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD)


def tiny_config(layers: int, hidden: int, vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )


# --------------------------------------------------------------------------------------------------
# Pretraining corpus: arithmetic text, not the word-problem format
# --------------------------------------------------------------------------------------------------

_PHRASES = {
    "+": ("the sum of {a} and {b} is {eq}", "{a} plus {b}: {eq}", "add {b} to {a}: {eq}", "{a} and {b} make {eq}"),
    "-": ("{a} minus {b}: {eq}", "take {b} from {a}: {eq}", "the difference of {a} and {b} is {eq}", "{a} less {b}: {eq}"),
    "*": ("{a} times {b}: {eq}", "the product of {a} and {b} is {eq}", "{a} lots of {b}: {eq}", "multiply {a} by {b}: {eq}"),
}


def arithmetic_line(rng: random.Random, s: PretrainSettings) -> str:
    """One line of pretraining text: an equation, alone or after a phrase naming the operation."""
    op = rng.choice("++--*")
    if op == "+":
        a, b = rng.randint(0, s.max_add), rng.randint(0, s.max_add)
        c = a + b
    elif op == "-":
        a = rng.randint(0, s.max_add)
        b = rng.randint(0, a)
        c = a - b
    else:
        a, b = rng.randint(1, s.max_mul_a), rng.randint(1, s.max_mul_b)
        c = a * b
    eq = f"{a}{op}{b}={c}"
    if rng.random() < 0.4:
        return eq
    return rng.choice(_PHRASES[op]).format(a=a, b=b, eq=eq)


def pretrain_batch(rng: random.Random, s: PretrainSettings, vocab: dict[str, int]) -> torch.Tensor:
    """(batch, seq_len + 1) token ids: lines joined by newlines, each row starting at a line start."""
    rows = []
    for _ in range(s.batch_size):
        text = ""
        while len(text) < s.seq_len + 1:
            text += arithmetic_line(rng, s) + "\n"
        rows.append([vocab[c] for c in text[: s.seq_len + 1]])
    return torch.tensor(rows, dtype=torch.long)


def pretrain(model, tokenizer, settings: PretrainSettings, seed: int, log=None) -> list[float]:
    """Train `model` (full precision, all parameters) as a character LM on `arithmetic_line` text.

    Deterministic in `seed`. Returns the loss of every step.
    """
    vocab = tokenizer.get_vocab()
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)

    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = pretrain_batch(rng, settings, vocab)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if log is not None and (step + 1) % max(1, settings.steps // 5) == 0:
            log(f"tiny model pretraining: step {step + 1}/{settings.steps}, loss {sum(losses[-20:]) / len(losses[-20:]):.3f}, "
                f"{time.perf_counter() - start:.0f}s")
    model.eval()
    return losses


def pretrain_key(layers: int, hidden: int, seed: int, settings: PretrainSettings) -> str:
    blob = json.dumps({"version": PRETRAIN_VERSION, "layers": layers, "hidden": hidden, "seed": seed, **asdict(settings)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def tiny_dir_name(layers: int, hidden: int, pretrain_steps: int = 0, seed: int = 0) -> str:
    name = f"tiny-qwen2-L{layers}-H{hidden}"
    if pretrain_steps > 0:
        name += f"-pt{pretrain_steps}-{pretrain_key(layers, hidden, seed, PretrainSettings(steps=pretrain_steps))}"
    return name


def ensure_tiny_model(cache_dir: str | Path, layers: int, hidden: int, seed: int = 0, pretrain_steps: int = 0,
                      log=print) -> Path:
    """Build (once) and return the directory of the tiny model + tokenizer. Safe against partial writes.

    `pretrain_steps > 0` pretrains the model on arithmetic text first (see the module docstring).
    """
    from transformers import Qwen2ForCausalLM

    target = Path(cache_dir) / tiny_dir_name(layers, hidden, pretrain_steps, seed)
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    tokenizer = _build_tokenizer()
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(layers, hidden, vocab_size))
        if pretrain_steps > 0:
            if log is not None:
                log(f"building the tiny model: pretraining {layers} layers x {hidden} on arithmetic text "
                    f"({pretrain_steps} steps, cached in {target})")
            with torch.enable_grad():
                pretrain(model, tokenizer, PretrainSettings(steps=pretrain_steps), seed, log)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
