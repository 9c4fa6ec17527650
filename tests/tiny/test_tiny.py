"""The builtin tiny model: its tokenizer, its pretraining corpus and loop, and its cache."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from lowres_reft.tiny.builder import ensure_tiny_model, pretrain, tiny_config, tiny_dir_name
from lowres_reft.tiny.corpus import PretrainPhase, arithmetic_piece, pretrain_batch, pretrain_settings, text_encoder
from lowres_reft.tiny.tokenizer import EOS, build_tokenizer, char_vocab

ROOT = Path(__file__).resolve().parents[2]
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


def _check_equation(eq: str, settings, chain: bool) -> tuple[int, str, int, int]:
    a, op, b, c = (int(x) if x.isdigit() else x for x in _EQ.fullmatch(eq).groups())
    assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 0
    if chain:
        assert c <= settings.max_value
        if op == "*":
            assert min(a, b) <= settings.max_multiplier and max(a, b) <= settings.max_factor
        else:
            assert b <= settings.max_operand and a <= settings.max_value
    else:
        assert max(a, b) <= (settings.max_add if op != "*" else settings.max_mul_b)
    return a, op, b, c


_CUE_WORDS = {"+": ("more", "added"), "-": ("lost", "fewer", "took away"), "*": ("times",)}


def _check_story(context: str, eqs: list[tuple[str, ...]], filler: bool) -> None:
    """The story's opening holds the chain's start ("7." or "5 rows of 3" for a first product); then every later
    operand in order, each in a sentence with its operation's cue; with filler, any other number is in a sentence
    without a cue (a distractor)."""
    sentences = context.strip().split(". ")
    first = eqs[0]
    rows = re.search(r"(\d+) rows of (\d+)", sentences[0])
    if rows:
        assert first[1] == "*" and rows.groups() == (first[0], first[2])
        cued_steps = eqs[1:]
    else:
        assert re.findall(r"\d+", sentences[0]) == [first[0]]
        cued_steps = eqs
    cued = [s.lower() for s in sentences[1:] if any(w in s.lower() for words in _CUE_WORDS.values() for w in words)]
    assert len(cued) == len(cued_steps)
    for sentence, (_, op, b, _) in zip(cued, cued_steps):
        assert re.findall(r"\d+", sentence) == [b] and any(w in sentence for w in _CUE_WORDS[op]), sentence
    if not filler:  # notes: nothing but the operands and their cues
        assert len(sentences) == 1 + len(cued)


@pytest.mark.parametrize("corpus", ["arithmetic", "reasoning"])
def test_pieces_hold_true_equations_and_carried_chains_within_the_ranges(corpus):
    settings = pretrain_settings(12, corpus=corpus)
    rng = random.Random(0)
    kinds = set()
    for phase in settings.phases:
        for _ in range(400):
            context, text = arithmetic_piece(rng, settings, phase)
            eqs = _EQ.findall(text)
            if len(eqs) > 1:  # a chain: "7+5=12. 12-3=9.", each equation starting from the previous result
                kinds.add("prose chain" if context else "chain")
                assert text == " ".join(f"{a}{op}{b}={c}." for a, op, b, c in eqs) and len(eqs) <= 4
                for prev, eq in zip(eqs, eqs[1:]):
                    assert eq[0] == prev[3]
                for a, op, b, c in eqs:
                    _check_equation(f"{a}{op}{b}={c}", settings, chain=True)
                if context:  # a story: the operands in order, each after the first with its operation's cue word
                    assert context.endswith("\n")
                    kinds.add("story" if phase.scene_fraction else "notes")
                    _check_story(context, eqs, filler=phase.scene_fraction > 0)
                continue
            a, _, b, _ = _check_equation(_EQ.match(text).group(0), settings, chain=False)
            kinds.add("bare" if not context else "scene" if "\n" in context else "phrase")
            if context:  # the context names both operands before the equation uses them
                assert str(a) in context and str(b) in context
    chains = {"chain", "prose chain", "story", "notes"} if corpus == "reasoning" else set()  # the arithmetic demo's corpus has none
    assert kinds == {"bare", "scene", "phrase"} | chains


def test_problems_corpus_holds_training_pool_word_problems_half_with_the_final_answer(monkeypatch):
    from lowres_reft.data import reasoning

    settings = pretrain_settings(12, corpus="problems")
    rng, found, stated = random.Random(0), 0, 0
    held_out = {p.question for p in reasoning.builtin_reasoning_eval(200)}
    for _ in range(300):
        context, text = arithmetic_piece(rng, settings, settings.phases[1])
        if context.startswith(tuple(name for name, _ in reasoning._PEOPLE)):
            found += 1
            question = context[:-1]
            assert context.endswith("?\n") and question not in held_out and not reasoning.in_eval_pool(question)
            assert ": " in text and "Question" not in context + text  # never the task's prompt format
            value = int(_EQ.findall(text)[-1][3])
            assert 1 <= value <= reasoning.MAX_VALUE
            stated += text.endswith(f" The answer is {value}.")
    assert found > 150  # 80% of the chains, themselves 80% of phase 2's pieces
    assert 0.35 * found < stated < 0.65 * found  # half state the answer: "answer" is a trained word
    # the task's text is in the weights: a new task format is a new cache key, for this corpus only
    a, plain = tiny_dir_name(6, 64, 100, corpus="problems"), tiny_dir_name(6, 64, 100, corpus="reasoning")
    monkeypatch.setattr(reasoning, "TASK_VERSION", reasoning.TASK_VERSION + 1)
    assert tiny_dir_name(6, 64, 100, corpus="problems") != a and tiny_dir_name(6, 64, 100, corpus="reasoning") == plain


def test_batch_weights_equations_and_separators_and_rows_start_at_a_piece():
    settings = pretrain_settings(12)
    phase = PretrainPhase(steps=1, batch_size=4, seq_len=80, lr=1e-3, warmup=1, eq_fraction=0.0, scene_fraction=1.0,
                          context_loss_weight=0.0)
    tok = build_tokenizer()
    vocab = char_vocab(tok)
    inverse = {i: c for c, i in vocab.items()}
    ids, weight = pretrain_batch(random.Random(1), settings, phase, text_encoder(tok), vocab[EOS])
    assert ids.shape == weight.shape == (4, 81)
    for row, w in zip(ids.tolist(), weight.tolist()):
        text = "".join(inverse[i] for i in row)
        assert text[0].isupper()  # a scene starts with a capitalized sentence
        weighted = "".join(ch if x == 1.0 else "_" for ch, x in zip(text, w))
        assert set(w) <= {0.0, 1.0}
        # Only the equations and the end-of-text after them carry loss; the prose carries none.
        for piece in weighted.replace(EOS, "\x00").split("\x00")[:-1]:
            assert _EQ.fullmatch(piece.strip("_")), piece


def test_pretraining_is_deterministic_lowers_the_loss_and_drops_middle_layers_at_the_layerdrop_rate(monkeypatch):
    from transformers import Qwen2ForCausalLM

    from lowres_reft.model import nested

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


def test_layerdrop_zero_never_drops_a_layer_and_a_high_rate_drops_often(monkeypatch):
    from transformers import Qwen2ForCausalLM

    from lowres_reft.model import nested

    tok = build_tokenizer()
    for rate, check in ((0.0, lambda calls: not any(calls)),
                        (0.9, lambda calls: sum(map(len, calls)) > 2 * len(calls) and all(len(c) < 4 for c in calls))):
        calls: list[tuple[int, ...]] = []
        original = nested.skip_layers

        def spy(model, skip):
            calls.append(tuple(skip))
            return original(model, skip)

        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_config(6, 32, 128))
        with monkeypatch.context() as patch:
            patch.setattr(nested, "skip_layers", spy)
            pretrain(model, tok, pretrain_settings(12, layer_drop=rate), seed=0)
        assert len(calls) == 12 and check(calls), (rate, calls)


def test_cache_dir_names_the_pretraining_and_a_built_model_is_reused(tmp_path):
    assert tiny_dir_name(4, 64) == "tiny-qwen2-L4-H64"
    a, b = tiny_dir_name(4, 64, 100), tiny_dir_name(4, 64, 200)
    assert a.startswith("tiny-qwen2-L4-H64-pt100-") and b.startswith("tiny-qwen2-L4-H64-pt200-") and a[-10:] != b[-10:]
    assert tiny_dir_name(4, 64, 100, seed=1) != a
    # the LayerDrop rate is part of the key: a base pretrained without it is another model
    assert tiny_dir_name(4, 64, 100, layer_drop=0.0) != a and tiny_dir_name(4, 64, 100, layer_drop=0.3) == a
    assert tiny_dir_name(4, 64, 100, corpus="reasoning") != a
    assert tiny_dir_name(4, 64, layer_drop=0.0) == "tiny-qwen2-L4-H64"  # no pretraining: nothing to drop
    assert tiny_dir_name(4, 64, heads=4) == "tiny-qwen2-L4-H64-A4"  # another shape is another model
    lines: list[str] = []
    path = ensure_tiny_model(tmp_path, 2, 32, pretrain_steps=3, log=lines.append)
    assert path.name == tiny_dir_name(2, 32, 3) and (path / "model.safetensors").is_file()
    assert any("pretraining" in line for line in lines)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert ensure_tiny_model(tmp_path, 2, 32, pretrain_steps=3, log=lines.append) == path
    assert not lines and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_tiny_heads_sets_full_attention_heads_and_the_default_keeps_the_original_shape():
    config = tiny_config(6, 64, 128, heads=4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 4, 16)
    config = tiny_config(6, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)


def test_negative_pretrain_steps_is_a_config_error():
    from lowres_reft.config import load_recipe
    from lowres_reft.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="tiny_pretrain_steps"):
        load_recipe(str(ROOT / "recipes" / "tiny-cpu.toml"), ["model.tiny_pretrain_steps=-1"])
    with pytest.raises(ConfigError, match="tiny_layerdrop"):
        load_recipe(str(ROOT / "recipes" / "tiny-cpu.toml"), ["model.tiny_layerdrop=1.0"])
    with pytest.raises(ConfigError, match="tiny_heads"):
        load_recipe(str(ROOT / "recipes" / "tiny-cpu.toml"), ["model.tiny_heads=3"])  # 64 / 3: not whole heads
