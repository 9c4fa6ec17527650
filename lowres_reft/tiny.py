"""The builtin tiny model: a Qwen2-architecture causal LM and a character-level tokenizer, built locally.

It lets the whole pipeline (4-bit quantization, LoRA, nested rollouts, training, export) run on a laptop
CPU with no downloads. Built once per size and cached under `<cache_dir>/tiny-qwen2-L{layers}-H{hidden}/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_NAME = "builtin:tiny"
PAD, EOS = "<pad>", "<|endoftext|>"


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


def ensure_tiny_model(cache_dir: str | Path, layers: int, hidden: int, seed: int = 0) -> Path:
    """Build (once) and return the directory of the tiny model + tokenizer. Safe against partial writes."""
    from transformers import Qwen2ForCausalLM

    target = Path(cache_dir) / f"tiny-qwen2-L{layers}-H{hidden}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    tokenizer = _build_tokenizer()
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(layers, hidden, vocab_size))
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
