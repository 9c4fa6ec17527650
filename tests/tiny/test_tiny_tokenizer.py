"""The tiny model's tokenizers: the character one (unchanged) and the word one of the "problems" corpus."""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache

import pytest

from lowres_reft.data.prompts import PLAIN_PROMPT_TEMPLATE, format_solution
from lowres_reft.data.reasoning import builtin_reasoning, builtin_reasoning_eval
from lowres_reft.tiny.builder import tiny_config, tiny_dir_name
from lowres_reft.tiny.corpus import pretrain_batch, pretrain_settings, settings_tokenizer, text_encoder
from lowres_reft.tiny.tokenizer import CHARS, EOS, bpe_merges, build_tokenizer, text_words

_EQ = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


@lru_cache(maxsize=1)
def _word_tokenizer():
    return settings_tokenizer(pretrain_settings(120, 0.0, "problems"))


def _task_texts() -> list[tuple[str, str]]:
    """(prompt, completion) of training and held-out problems of builtin:reasoning."""
    problems = builtin_reasoning(300, seed=1) + builtin_reasoning_eval(100)
    return [(PLAIN_PROMPT_TEMPLATE.format(question=p.question), format_solution(p.solution)) for p in problems]


def test_bpe_merges_make_every_word_one_token_and_are_deterministic():
    words = Counter({"Ġapples": 3, "Ġas": 5, "as": 1, "Ġaway": 2, "papa": 1, "aaaa": 1})
    merges = bpe_merges(words)
    assert merges == bpe_merges(Counter(dict(reversed(words.items()))))  # not the order of the counter
    assert len(merges) <= sum(len(w) - 1 for w in words)
    tok = build_tokenizer(words)
    for word in words:  # each word alone, and after a word
        assert tok.tokenize(word.replace("Ġ", " ")) == [word]
        assert tok.tokenize("as" + word.replace("Ġ", " ")) == ["as", word]
    assert tok.tokenize("as as papa pa") == ["as", "Ġas", "Ġ", "papa", "Ġ", "pa"]  # "Ġpapa" is no word, "pa" a part
    assert text_words(["Question: Tom has 12 apples.\nAnswer: 3"]) == Counter(
        {"Question": 1, "ĠTom": 1, "Ġhas": 1, "Ġapples": 1, "Answer": 1})


def test_character_tokenizer_is_unchanged():
    """The arithmetic demo's tokenizer and cache keys: the ids and names of before the word tokenizer."""
    tok = build_tokenizer()
    text = "Question: Tom has 3 pens.\nAnswer: 3+4=7."
    assert tok(text, add_special_tokens=False)["input_ids"] == [2 + CHARS.index(c) for c in text]
    assert len(tok) == 98 and tok.convert_tokens_to_ids(EOS) == 1 and tok.pad_token_id == 0
    assert tiny_dir_name(4, 64, 600, layer_drop=0.3) == "tiny-qwen2-L4-H64-pt600-c2f3d592f3"
    assert tiny_dir_name(6, 64, 1200, layer_drop=0.0, corpus="reasoning", heads=4) == \
        "tiny-qwen2-L6-H64-A4-pt1200-cb377cb0db"
    # the word tokens are a new base: the problems corpus's cache key changed
    assert tiny_dir_name(6, 64, 1200, layer_drop=0.0, corpus="problems", heads=4) != \
        "tiny-qwen2-L6-H64-A4-pt1200-ef685fd5fb"


def test_word_tokenizer_round_trips_the_task_through_autotokenizer_with_words_and_digits_one_token_each(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = _word_tokenizer()
    tok.save_pretrained(tmp_path)
    tiny_config(2, 32, 512).save_pretrained(tmp_path)  # a qwen2 config: AutoTokenizer picks the Qwen2 class
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    plain = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    chars = tokens = question_chars = question_tokens = 0
    for prompt, completion in _task_texts():
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        assert loaded(prompt + completion, add_special_tokens=False)["input_ids"] == ids
        assert plain(prompt + completion, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == prompt + completion
        # the prompt's tokens followed by the completion's are the text's (what rollouts and warm-up rely on)
        assert tok(prompt, add_special_tokens=False)["input_ids"] + \
            tok(completion, add_special_tokens=False)["input_ids"] == ids
        pieces = loaded.convert_ids_to_tokens(ids)
        assert all(len(p) == 1 for p in pieces if re.search(r"\d", p))  # every digit a token of its own
        assert all(re.fullmatch(r"Ġ?[A-Za-z]+|[^A-Za-z]", p) for p in pieces)  # whole words, else one character
        question_chars += len(prompt)
        question_tokens += len(tok(prompt, add_special_tokens=False)["input_ids"])
        chars, tokens = chars + len(prompt + completion), tokens + len(ids)
    assert question_tokens * 3 < question_chars  # ~49 tokens for ~154 characters
    assert tokens * 2.4 < chars  # the chains are mostly digits and signs: one token each
    assert loaded.convert_tokens_to_ids(EOS) == 1 and loaded.pad_token_id == 0


def test_word_batches_weight_the_equation_tokens_and_the_end_of_text():
    tok = _word_tokenizer()
    settings = pretrain_settings(120, 0.0, "problems")
    phase = settings.phases[1]
    assert phase.context_loss_weight == 0.0
    eos = tok.convert_tokens_to_ids(EOS)
    ids, weight = pretrain_batch(random.Random(3), settings, phase, text_encoder(tok), eos)
    assert ids.shape == weight.shape == (phase.batch_size, phase.seq_len + 1)
    pieces = 0
    for row, w in zip(ids.tolist(), weight.tolist()):
        ends = [i for i, t in enumerate(row) if t == eos]
        start = 0
        for end in ends:
            assert w[end] == 1.0
            weighted = [t for t, x in zip(row[start:end], w[start:end]) if x == 1.0]
            text = tok.decode(weighted).strip()
            # the weighted tokens are the equations: a bare one, or a chain with or without its quoted phrases
            assert _EQ.search(text) and (text.endswith(".") or _EQ.fullmatch(text)), text
            assert "Question" not in text and "?" not in text
            start, pieces = end + 1, pieces + 1
    assert pieces >= phase.batch_size


@pytest.mark.parametrize("corpus", ["arithmetic", "reasoning"])
def test_other_corpora_keep_the_character_tokenizer(corpus):
    assert len(settings_tokenizer(pretrain_settings(120, 0.0, corpus))) == 98
