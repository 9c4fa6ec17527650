"""The builtin tiny model's tokenizers: one token per character, or with whole-word tokens for a known vocabulary.

Both are byte-level BPE tokenizers written in GPT-2's byte symbols ("Ġ" is a space, "Ċ" a newline), so the saved
tokenizer encodes the same whichever class loads it: `AutoTokenizer` picks `Qwen2Tokenizer` for a qwen2 config,
which rebuilds the tokenizer from the saved vocabulary and merges with its own pre-tokenizer (Qwen's split regex,
then ByteLevel).

- `build_tokenizer()`: no merges, one token per printable ASCII character or newline (the arithmetic demo's);
- `build_tokenizer(words)`: the same characters at the same ids, plus merges that make each of `words` (as the
  pre-tokenizer cuts them: a word with its leading space, "Ġapple", or without one, "Question") a single token.
  Why: a word problem of ~135 characters is ~40 tokens, so copying the right phrase out of the question attends
  over a few dozen positions, not a hundred. Its pre-tokenizer is Qwen's regex split (what `Qwen2Tokenizer`
  imposes on loading anyway): merges never cross a word, and digits stay one token each, as in Qwen's models.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

PAD, EOS = "<pad>", "<|endoftext|>"
# The tokenizer's characters, one token each (ids 2..97 in this order): printable ASCII and the newline.
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX): contractions, a letter run
# with at most one non-letter before it (" apple"), single digits, punctuation runs, whitespace.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# A word that gets merges: letters, after a space or nothing (byte symbols; "Ġ" is the space).
_WORD = re.compile(r"Ġ?[A-Za-z]+")


def _byte_symbol(char: str) -> str:
    """The byte-level BPE symbol of an ASCII character (GPT-2's bytes_to_unicode: " " -> "Ġ", "\\n" -> "Ċ")."""
    code = ord(char)
    if 33 <= code <= 126:
        return char
    return chr(256 + code) if code < 33 else chr(256 + code - 94)  # valid for the control range 0..32 only


def _word_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def text_words(texts: Iterable[str]) -> Counter[str]:
    """How often each word (in byte symbols, "Ġapple" or "Question") occurs in `texts`, cut as the word
    tokenizer's pre-tokenizer cuts them."""
    split = _word_pre_tokenizer().pre_tokenize_str
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in split(text) if _WORD.fullmatch(piece))
    return counts


def bpe_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Merges, in rank order, after which every one of `words` is a single token.

    BPE training until nothing is left to merge: each round merges the most frequent adjacent pair of symbols
    (counted over `words`, weighted by their counts; ties broken by the pair's text, so the result is
    deterministic) in every word. Encoding a word with these merges, lowest rank first, replays the rounds and
    ends in the word itself.
    """
    spelled = {word: list(word) for word in sorted(words)}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for symbols in spelled.values():
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [best[0] + best[1]]
                i += 1


def build_tokenizer(words: Counter[str] | None = None):
    """The tiny tokenizer: <pad> (id 0), end-of-text (1), one token per character of `CHARS` (ids 2..97).

    `words` (from `text_words`) given: plus one token per word (ids 98..., after the intermediate symbols its
    merges build), and Qwen's split regex before the ByteLevel pre-tokenizer. Without: no merges, a character
    tokenizer (ByteLevel pre-tokenizer only; byte-identical to what the arithmetic demo's cache holds).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1}
    for char in CHARS:
        vocab[_byte_symbol(char)] = len(vocab)
    merges = bpe_merges(words) if words else []
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    if merges:
        core.pre_tokenizer = _word_pre_tokenizer()
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD)


def char_vocab(tokenizer) -> dict[str, int]:
    """Character (and EOS) -> token id of the tiny tokenizer."""
    vocab = {c: tokenizer.convert_tokens_to_ids(_byte_symbol(c)) for c in CHARS}
    vocab[EOS] = tokenizer.convert_tokens_to_ids(EOS)
    return vocab
