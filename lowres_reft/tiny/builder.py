"""The builtin tiny model: a Qwen2-architecture causal LM and its tokenizer (`tiny_tokenizer`), built locally.

It lets the whole pipeline (4-bit quantization, LoRA, nested rollouts, training, export) run on a laptop CPU with no
downloads. Built once per size (and pretraining setting) and cached under `<cache_dir>/` (the demo recipes' bases
are shipped in the package instead, `tiny_shipped`; `lowres-reft build-base` builds them):

- ``tiny-qwen2-L{layers}-H{hidden}/``: random init (``pretrain_steps = 0``, what the unit tests use);
- ``tiny-qwen2-L{layers}-H{hidden}-pt{steps}-{hash}/``: briefly pretrained (``pretrain_steps > 0``, the demo).
  ``hash`` covers `PRETRAIN_VERSION`, the seed and every pretraining setting, so a changed builder rebuilds
  instead of reusing a stale cache (or a stale shipped base).

Why pretrain: a random-init model cannot learn arithmetic word problems through LoRA adapters alone in minutes, so
RL on it shows nothing. A real Nested-ReFT run starts from an LLM that already "knows some math" but not the task's
format; the tiny model imitates that. It is trained in full precision for `pretrain_steps` AdamW steps as a
language model (one token per character; the "problems" corpus: word tokens) on generated arithmetic text that is
*not* the word-problem format of `lowres_reft.data.datasets` (`pretrain_settings`): bare equations ("7+5=12"), phrases that
state an operation and write it as an equation ("the sum of 7 and 5 is 7+5=12"), and "scenes" (random-word prose
holding two numbers, then a line "add: 7+5=12"), each followed by end-of-text; the "reasoning" corpus adds chains of
carried equations ("7+5=12. 12-3=9."), bare or after a text to read their operands from (notes "7. 5 more. Lost
3.", or a story where a cue word says what to do with each operand, mixed with sentences holding unused numbers);
the "problems" corpus adds builtin:reasoning's training-pool word problems with their chains (never a held-out
question, never in the "Question: ... Answer:" format). With LayerDrop (each middle layer skipped with probability
`[model] tiny_layerdrop` in each step, through the behavior policy's own `skip_layers`; 0 = never, like a real
checkpoint), the model still works as a nested model. So the base can copy numbers out of text and do the
arithmetic, but has never seen "Question: ... Answer:": the supervised warm-up (LoRA) teaches that format, RL
improves on it. Deterministic on one machine; 2 CPU cores (2026-12-06): 47 s tiny-cpu, 218 s tiny-reasoning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lowres_reft.tiny.corpus import (
    PretrainPhase,
    PretrainSettings,
    pretrain_batch,
    pretrain_settings,
    settings_tokenizer,
    text_encoder,
)
from lowres_reft.tiny.shipped import shipped_base
from lowres_reft.tiny.tokenizer import build_tokenizer
from lowres_reft.utils.fsutil import publish_dir
from lowres_reft.utils.schedules import warmup_cosine

# Bump when the corpus generator or the training loop changes (the cache key includes it).
PRETRAIN_VERSION = 4

def tiny_config(layers: int, hidden: int, vocab_size: int, heads: int = 0):
    """`heads` > 0: that many attention heads of hidden // heads units, each with its own key/value head; 0: one
    head per 32 units sharing hidden // 64 key/value heads (the original size)."""
    from transformers import Qwen2Config

    sized = {"head_dim": hidden // heads} if heads else {}
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads or max(1, hidden // 32),
        num_key_value_heads=heads or max(1, hidden // 64),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        **sized,
    )


def pretrain(model, tokenizer, settings: PretrainSettings, seed: int, log=None) -> list[float]:
    """Train `model` (full precision, all parameters) as an LM on `arithmetic_piece` text, phase by phase.

    Each phase has its own AdamW optimizer (lr warm-up, then cosine decay to 10%) and data stream
    (`random.Random(seed + phase index)`). With LayerDrop a random subset of the middle layers is skipped in each
    step through `lowres_reft.model.nested.skip_layers`, the behavior policy's own mechanism. Deterministic in `seed`
    (and the torch RNG state, for the initial weights). Returns the loss of every step.
    """
    from lowres_reft.model.layers import LayerStack
    from lowres_reft.model.nested import skip_layers

    encode = text_encoder(tokenizer)
    middle = list(range(1, LayerStack(model).count - 1))
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(phase.steps for phase in settings.phases)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for index, phase in enumerate(settings.phases):
        rng, drop_rng = random.Random(seed + index), random.Random(seed + index + 1)
        opt = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.98), weight_decay=0.0)

        def factor(step: int, phase: PretrainPhase = phase) -> float:
            return warmup_cosine(step, phase.warmup, phase.steps, floor=0.1)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        for step in range(phase.steps):
            batch, weight = pretrain_batch(rng, settings, phase, encode, tokenizer.eos_token_id)
            skip = [i for i in middle if drop_rng.random() < settings.layer_drop]
            if len(skip) == len(middle) and len(middle) > 1:
                skip.pop(drop_rng.randrange(len(skip)))
            with skip_layers(model, skip):
                logits = model(input_ids=batch[:, :-1]).logits
            token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         batch[:, 1:].reshape(-1), reduction="none")
            w = weight[:, 1:].reshape(-1)
            loss = (token_loss * w).sum() / w.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            done = len(losses)
            if log is not None and (done % max(1, total // 6) == 0 or done == total):
                recent = losses[-20:]
                log(f"tiny model pretraining: step {done}/{total} (phase {index + 1}), "
                    f"loss {sum(recent) / len(recent):.3f}, {time.perf_counter() - start:.0f}s")
    model.eval()
    return losses


def pretrain_key(layers: int, hidden: int, seed: int, settings: PretrainSettings) -> str:
    """Short hash of everything that determines the pretrained weights."""
    key = {"version": PRETRAIN_VERSION, "layers": layers, "hidden": hidden, "seed": seed, **asdict(settings)}
    del key["word_problems"], key["word_tokens"]  # absent unless used: the other corpora keep their keys (and caches)
    if settings.word_problems > 0:  # the task's own text is in the corpus: its format is part of the weights
        from lowres_reft.data.reasoning import TASK_VERSION

        key.update(word_problems=settings.word_problems, task_version=TASK_VERSION)
    if settings.word_tokens:
        key.update(word_tokens=True)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def tiny_dir_name(layers: int, hidden: int, pretrain_steps: int = 0, seed: int = 0, layer_drop: float = 0.3,
                  corpus: str = "arithmetic", heads: int = 0) -> str:
    """Cache directory name: `tiny-qwen2-L{layers}-H{hidden}`, plus `-A{heads}` with a head count given, plus
    `-pt{steps}-{hash}` when pretrained (the hash covers the LayerDrop rate and the corpus, with every other
    pretraining setting)."""
    name = f"tiny-qwen2-L{layers}-H{hidden}" + (f"-A{heads}" if heads else "")
    if pretrain_steps > 0:
        settings = pretrain_settings(pretrain_steps, layer_drop, corpus)
        name += f"-pt{pretrain_steps}-{pretrain_key(layers, hidden, seed, settings)}"
    return name


def ensure_tiny_model(cache_dir: str | Path, layers: int, hidden: int, seed: int = 0, pretrain_steps: int = 0,
                      log=print, layer_drop: float = 0.3, corpus: str = "arithmetic", heads: int = 0,
                      use_shipped: bool = True) -> Path:
    """Return the directory of the tiny model + tokenizer: the shipped copy when the package ships this base
    (`tiny_shipped`; `use_shipped=False` ignores it), else built once under `cache_dir`. Safe against partial writes.

    `pretrain_steps > 0` pretrains the model on arithmetic text first, with LayerDrop rate `layer_drop` (see
    the module docstring) and corpus `corpus` (`pretrain_settings`); both are ignored without pretraining.
    """
    from transformers import Qwen2ForCausalLM

    name = tiny_dir_name(layers, hidden, pretrain_steps, seed, layer_drop, corpus, heads)
    shipped = shipped_base(name) if use_shipped and pretrain_steps > 0 else None
    if shipped is not None:
        return shipped
    target = Path(cache_dir) / name
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    settings = pretrain_settings(pretrain_steps, layer_drop, corpus) if pretrain_steps > 0 else None
    tokenizer = settings_tokenizer(settings) if settings else build_tokenizer()
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(layers, hidden, vocab_size, heads))
        if pretrain_steps > 0:
            if log is not None:
                log(f"building the tiny model: pretraining {layers} layers x {hidden} ({model.config.num_attention_heads} "
                    f"heads) on generated text "
                    f"({pretrain_steps} steps, {corpus} corpus, LayerDrop {layer_drop:g}, cached in {target})")
            with torch.enable_grad():
                pretrain(model, tokenizer, settings, seed, log)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, target)  # another process may have won the race; its copy is identical
    return target
