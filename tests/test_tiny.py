"""The builtin tiny model: its tokenizer, its pretraining corpus and loop, and its cache."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from lowres_reft.tiny import (
    EOS,
    PretrainPhase,
    arithmetic_piece,
    build_tokenizer,
    char_vocab,
    ensure_tiny_model,
    pretrain,
    pretrain_batch,
    pretrain_settings,
    tiny_config,
    tiny_dir_name,
)

ROOT = Path(__file__).resolve().parents[1]
_EQ = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


def test_saved_tokenizer_round_trips_spaces_and_newlines_whichever_class_loads_it(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    tiny_config(2, 32, 128).save_pretrained(tmp_path)  # a qwen2 config: AutoTokenizer picks the Qwen2 class
    text = "Question: Tom has 3 pens.\nAnswer: 3+4=7."
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert loaded.decode(ids) == text
        assert ids == [char_vocab(tok)[c] for c in text]
        assert loaded.convert_tokens_to_ids(EOS) == 1 and loaded.pad_token_id == 0


def test_pieces_hold_true_equations_within_the_operand_ranges():
    settings = pretrain_settings(12)
    rng = random.Random(0)
    kinds = set()
    for phase in settings.phases:
        for _ in range(300):
            context, eq = arithmetic_piece(rng, settings, phase)
            a, op, b, c = _EQ.match(eq).groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 0
            assert max(a, b) <= (settings.max_add if op != "*" else settings.max_mul_b)
            kinds.add("bare" if not context else "scene" if "\n" in context else "phrase")
            if context:  # the context names both operands before the equation uses them
                assert str(a) in context and str(b) in context
    assert kinds == {"bare", "scene", "phrase"}


def test_batch_weights_equations_and_separators_and_rows_start_at_a_piece():
    settings = pretrain_settings(12)
    phase = PretrainPhase(steps=1, batch_size=4, seq_len=80, lr=1e-3, warmup=1, eq_fraction=0.0, scene_fraction=1.0,
                          context_loss_weight=0.0)
    vocab = char_vocab(build_tokenizer())
    inverse = {i: c for c, i in vocab.items()}
    ids, weight = pretrain_batch(random.Random(1), settings, phase, vocab)
    assert ids.shape == weight.shape == (4, 81)
    for row, w in zip(ids.tolist(), weight.tolist()):
        text = "".join(inverse[i] for i in row)
        assert text[0].isupper()  # a scene starts with a capitalized sentence
        weighted = "".join(ch if x == 1.0 else "_" for ch, x in zip(text, w))
        assert set(w) <= {0.0, 1.0}
        # Only the equations and the end-of-text after them carry loss; the prose carries none.
        for piece in weighted.replace(EOS, "\x00").split("\x00")[:-1]:
            assert _EQ.fullmatch(piece.strip("_")), piece


def test_pretraining_is_deterministic_lowers_the_loss_and_drops_middle_layers(monkeypatch):
    from transformers import Qwen2ForCausalLM

    from lowres_reft import nested

    tok = build_tokenizer()
    settings = pretrain_settings(24)
    calls: list[tuple[int, ...]] = []
    original = nested.skip_layers

    def spy(model, skip):
        calls.append(tuple(skip))
        return original(model, skip)

    def run():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_config(4, 32, 128))
        return model, pretrain(model, tok, settings, seed=0)

    with monkeypatch.context() as patch:
        patch.setattr(nested, "skip_layers", spy)
        model, losses = run()
    _, again = run()
    assert losses == again and len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # from ~ln(128) down
    assert all(set(s) <= {1, 2} and len(s) < 2 for s in calls)  # middle layers only, never both
    assert any(calls) and not model.training
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # restored after each step


def test_cache_dir_names_the_pretraining_and_a_built_model_is_reused(tmp_path):
    assert tiny_dir_name(4, 64) == "tiny-qwen2-L4-H64"
    a, b = tiny_dir_name(4, 64, 100), tiny_dir_name(4, 64, 200)
    assert a.startswith("tiny-qwen2-L4-H64-pt100-") and b.startswith("tiny-qwen2-L4-H64-pt200-") and a[-10:] != b[-10:]
    assert tiny_dir_name(4, 64, 100, seed=1) != a
    lines: list[str] = []
    path = ensure_tiny_model(tmp_path, 2, 32, pretrain_steps=3, log=lines.append)
    assert path.name == tiny_dir_name(2, 32, 3) and (path / "model.safetensors").is_file()
    assert any("pretraining" in line for line in lines)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert ensure_tiny_model(tmp_path, 2, 32, pretrain_steps=3, log=lines.append) == path
    assert not lines and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_negative_pretrain_steps_is_a_config_error():
    from lowres_reft.config import load_recipe
    from lowres_reft.errors import ConfigError

    with pytest.raises(ConfigError, match="tiny_pretrain_steps"):
        load_recipe(str(ROOT / "recipes" / "tiny-cpu.toml"), ["model.tiny_pretrain_steps=-1"])
