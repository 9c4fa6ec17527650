"""The tiny base's pretraining text and settings: what `tiny.pretrain` trains on, generated procedurally.

Pieces (`arithmetic_piece`): bare equations ("7+5=12"), phrases that state an operation and write it as an
equation ("the sum of 7 and 5 is 7+5=12"), "scenes" (random-word prose holding two numbers, then a line
"add: 7+5=12"), and chains of carried equations ("7+5=12. 12-3=9."), bare or after notes or a story to read their
operands from; the "problems" corpus adds builtin:reasoning's training-pool word problems with their chains.
`pretrain_settings` gives the mix per phase for each corpus; `pretrain_batch` packs pieces into rows with loss
weights; `settings_tokenizer` is the tokenizer a base pretrained with given settings reads and writes.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowres_reft.tiny.tokenizer import EOS, build_tokenizer, char_vocab, text_words


@dataclass(frozen=True)
class PretrainPhase:
    """One phase of the tiny model's pretraining: AdamW with linear warm-up then cosine decay to 10%."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    # Mix of the pieces of text: bare equations, scenes (prose, then the equation on the next line), chains
    # (2-4 equations, each starting from the previous result, bare or after notes / a story holding their operands), and
    # phrases (the rest: "the sum of 7 and 5 is 7+5=12").
    eq_fraction: float
    scene_fraction: float
    # Loss weight of the context tokens (phrases, prose) relative to the equations (which always have weight 1).
    context_loss_weight: float = 1.0
    # Fraction of phrases and scenes whose equation is followed by the restated result ("7+5=12, that is 12.").
    restate_fraction: float = 0.0
    chain_fraction: float = 0.0


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the pretrained weights besides the size and the seed (all in the cache key)."""

    phases: tuple[PretrainPhase, ...]
    # LayerDrop: in each step every middle layer (not the first or the last) is skipped with this probability
    # (never all of them), so the model also works with layers skipped, as the nested behavior policy runs it.
    # 0 = never: a base that never saw a layer skipped, like a real pretrained checkpoint.
    layer_drop: float = 0.3
    # Single equations: those of builtin:arithmetic (sums and differences of numbers up to 20, products of 1..5 by
    # 1..10), so a minute of training learns the facts the tasks need.
    max_add: int = 20
    max_mul_a: int = 5
    max_mul_b: int = 10
    # Chains (the reasoning corpus only): values up to those of lowres_reft.data.reasoning (20). Sums and differences:
    # results and minuends <= max_value, the other operand <= max_operand; products: a factor <= max_factor times
    # a multiplier <= max_multiplier, at most max_value. (At values up to 40 a 6 x 64 base gets only ~15% of bare
    # equations right after 1200 steps; at 20, ~90%.)
    max_value: int = 20
    max_operand: int = 20
    max_factor: int = 10
    max_multiplier: int = 5
    # Fraction of the phase-2 chains replaced by a training-pool word problem of builtin:reasoning and its chain,
    # half of them with "The answer is N." ("problems" corpus: a real base read worked word problems and the phrase).
    word_problems: float = 0.0
    # What follows each piece of text: the end-of-text token (each piece is a document of its own, so the model
    # learns to end a text after its result, as the task's completions do).
    separator: str = EOS
    # Word tokens (`tiny_tokenizer.build_tokenizer(words)`, the words of this corpus and of builtin:reasoning's
    # prompts and solutions) instead of one token per character; row lengths (`seq_len`) are in tokens.
    word_tokens: bool = False


CORPORA = ("arithmetic", "reasoning", "problems")


def pretrain_settings(steps: int, layer_drop: float = 0.3, corpus: str = "arithmetic") -> PretrainSettings:
    """The builtin recipe for `steps` steps in all: 7/12 of them in phase 1, the rest in phase 2.

    corpus "arithmetic" (the 4-layer arithmetic demo's base; no chains): phase 1 (short rows of 64 characters,
    32 per batch): bare equations and phrases, loss on every token (the model learns the arithmetic facts and to
    copy numbers within a line; without the short, dense rows first it does not learn the arithmetic in the same
    time). Phase 2 (rows of 128, 16 per batch): half of the pieces are scenes, loss on the equations only (the
    prose is random words: predicting it would only waste capacity), so the model learns to find the numbers in
    a paragraph across a line break and to do arithmetic after prose.

    corpus "reasoning" (for builtin:reasoning): the same, plus chains of 2-4 carried equations ("7+5=12. 12-3=9.")
    in both phases: bare, or after a text to read their operands from: in phase 1 (rows of 96, 24 per batch) short
    notes ("7. 5 more. Lost 3."), in phase 2 (rows of 224, 8 per batch, so that a chain after its story fits in a
    row) stories with filler words and sentences holding numbers the chain does not use (`_story`). Without the
    notes and the cue words a 6 x 64 base never learned to copy the operands out of prose (0 of 60 chains in order
    after 1200 steps), and wrote the same chain whatever the question.

    corpus "problems": word tokens (`tiny_tokenizer`; rows of 48 and 128 tokens, ~2.5-3 characters each); phase 1
    (40%) as "reasoning"; phase 2: 80% training-pool word problems with their chains (`reasoning.pretraining_piece`).
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    first = round(steps * 7 / 12)
    if corpus == "arithmetic":
        return PretrainSettings(layer_drop=layer_drop, phases=(
            PretrainPhase(steps=first, batch_size=32, seq_len=64, lr=5e-3, warmup=30, eq_fraction=0.5,
                          scene_fraction=0.0, context_loss_weight=1.0, restate_fraction=0.3),
            PretrainPhase(steps=steps - first, batch_size=16, seq_len=128, lr=3e-3, warmup=10, eq_fraction=0.4,
                          scene_fraction=0.5, context_loss_weight=0.0, restate_fraction=0.0),
        ))
    if corpus == "problems":
        first = round(steps * 0.4)
        return PretrainSettings(layer_drop=layer_drop, word_problems=1.0, word_tokens=True, phases=(
            PretrainPhase(steps=first, batch_size=24, seq_len=48, lr=5e-3, warmup=30, eq_fraction=0.4,
                          scene_fraction=0.0, context_loss_weight=1.0, restate_fraction=0.3, chain_fraction=0.4),
            PretrainPhase(steps=steps - first, batch_size=8, seq_len=128, lr=3e-3, warmup=10, eq_fraction=0.5,
                          scene_fraction=0.5, context_loss_weight=0.0, restate_fraction=0.0, chain_fraction=0.8),
        ))
    return PretrainSettings(layer_drop=layer_drop, phases=(
        PretrainPhase(steps=first, batch_size=24, seq_len=96, lr=5e-3, warmup=30, eq_fraction=0.4, scene_fraction=0.0,
                      context_loss_weight=1.0, restate_fraction=0.3, chain_fraction=0.4),
        PretrainPhase(steps=steps - first, batch_size=8, seq_len=224, lr=3e-3, warmup=10, eq_fraction=0.2,
                      scene_fraction=0.4, context_loss_weight=0.0, restate_fraction=0.0, chain_fraction=0.6),
    ))


# --------------------------------------------------------------------------------------------------
# Pretraining corpus: arithmetic text, not the word-problem format
# --------------------------------------------------------------------------------------------------

_PHRASES = {
    "+": ("the sum of {a} and {b} is {eq}", "{a} plus {b}: {eq}"),
    "-": ("the difference of {a} and {b} is {eq}", "{a} minus {b}: {eq}"),
    "*": ("the product of {a} and {b} is {eq}", "{a} times {b}: {eq}"),
}
# Scenes: a sentence or two of filler prose holding two numbers, then a line "label: a op b=c" using them, so the
# model learns to do arithmetic after prose and to copy numbers across a line break. Vocabulary deliberately
# unlike the word problems' (no names, objects, "has", "gets", "gives away", "each", "How many", ...).
_WORDS = ("the", "a", "old", "red", "big", "small", "green", "fox", "river", "boat", "tree", "stone", "house", "road",
          "saw", "found", "near", "by", "over", "under", "and", "then", "two", "blue", "hill", "town", "bird", "sun",
          "walked", "sat", "was", "were", "of", "to", "on", "at", "far", "quiet", "cold", "warm", "lake", "field")
_RESTATE = ("that is", "so", "which makes", "giving")
_LABELS = {"+": ("add", "sum", "total"), "-": ("subtract", "difference", "minus"),
           "*": ("multiply", "product", "times")}


def _sentence(rng: random.Random, numbers: tuple[int | str, ...] = (), words: tuple[int, int] = (4, 10)) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(*words))]
    slots = sorted(rng.sample(range(1, len(words) + 1), len(numbers)))
    for offset, (slot, number) in enumerate(zip(slots, numbers)):
        words.insert(slot + offset, str(number))
    return " ".join(words).capitalize() + "."


def _scene(rng: random.Random, a: int, b: int, op: str, eq: str) -> str:
    if rng.random() < 0.5:
        prose = _sentence(rng, (a, b))
    else:  # one number per sentence, sometimes after a sentence without numbers
        prose = _sentence(rng, (a,)) + " " + _sentence(rng, (b,))
        if rng.random() < 0.3:
            prose = _sentence(rng) + " " + prose
    return f"{prose}\n{rng.choice(_LABELS[op])}: {eq}"


def _single_operation(rng: random.Random, s: PretrainSettings) -> tuple[int, str, int, int]:
    """A single equation's (a, op, b, c) in builtin:arithmetic's ranges."""
    op = rng.choice("++--*")
    if op == "+":
        a, b = rng.randint(0, s.max_add), rng.randint(0, s.max_add)
        return a, op, b, a + b
    if op == "-":
        a = rng.randint(0, s.max_add)
        b = rng.randint(0, a)
        return a, op, b, a - b
    a, b = rng.randint(1, s.max_mul_a), rng.randint(1, s.max_mul_b)
    return a, op, b, a * b


def random_operation(rng: random.Random, s: PretrainSettings, a: int | None = None) -> tuple[int, str, int, int]:
    """(a, op, b, c) with c = a op b within the settings' chain ranges; `a` given: an operation on that value (a chain's
    next step), whose op is one that keeps the result in range."""
    ops = "++--*"
    if a is not None:
        ops = "".join(op for op in ops if (op != "*" or 2 * a <= s.max_value and a <= s.max_factor)
                      and (op != "+" or a < s.max_value) and (op != "-" or a > 0))
    op = rng.choice(ops)
    if op == "+":
        b = rng.randint(0, min(s.max_operand, s.max_value - (a or 0)))
        a = rng.randint(0, s.max_value - b) if a is None else a
        return a, op, b, a + b
    if op == "-":
        if a is None:
            b = rng.randint(0, s.max_operand)
            a = rng.randint(b, s.max_value)
        else:
            b = rng.randint(0, min(s.max_operand, a))
        return a, op, b, a - b
    if a is not None:
        b = rng.randint(1, min(s.max_multiplier, s.max_value // max(1, a)))
        return a, op, b, a * b
    a, b = rng.randint(1, s.max_factor), rng.randint(1, s.max_multiplier)
    while a * b > s.max_value:
        a, b = rng.randint(1, s.max_factor), rng.randint(1, s.max_multiplier)
    return (a, op, b, a * b) if rng.random() < 0.5 else (b, op, a, a * b)


def _chain(rng: random.Random, s: PretrainSettings) -> tuple[list[tuple[int, str, int, int]], str]:
    """2-4 equations, each starting from the previous result: their (a, op, b, c) and the text
    "7+5=12. 12-3=9. 9*2=18."."""
    steps = [random_operation(rng, s)]
    for _ in range(rng.randint(1, 3)):
        steps.append(random_operation(rng, s, steps[-1][3]))
    return steps, " ".join(f"{a}{op}{b}={c}." for a, op, b, c in steps)


# Stories (the reasoning corpus): reading practice. Prose whose first sentence holds the chain's start and whose
# later sentences each hold one more operand with a word that says what to do with it, mixed with sentences holding
# numbers that the chain does not use (no such word), then the chain. Plain words, not the word problems' wording
# (no names, objects, "buys", "gives away", "bags with ... each", "How many"): the warm-up maps those onto these.
_CUES = {"+": ("{n} more", "{n} more came", "added {n}"), "-": ("lost {n}", "{n} fewer", "took away {n}"),
         "*": ("{n} times as many", "{n} times")}


def _cued(rng: random.Random, n: int, op: str) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 4))]
    cue = rng.choice(_CUES[op]).format(n=n)
    return (" ".join(words).capitalize() + " " + cue if rng.random() < 0.7 else cue.capitalize() + " " +
            " ".join(words)) + "."


def _opening(rng: random.Random, steps: list[tuple[int, str, int, int]]) -> tuple[str, list]:
    """The start of a chain's story and the steps whose operand comes later, each with its cue: a first product's
    operands together ("5 rows of 3"), else the first operand alone."""
    a, op, b, _ = steps[0]
    if op == "*" and rng.random() < 0.7:
        return f"{a} rows of {b}", steps[1:]
    return str(a), steps


def _notes(rng: random.Random, steps: list[tuple[int, str, int, int]]) -> str:
    """A chain's story without filler: "16. Lost 4. 1 more. 2 times." (short, dense reading practice)."""
    opening, cued = _opening(rng, steps)
    return " ".join([opening + "."] + [rng.choice(_CUES[op]).format(n=b).capitalize() + "." for _, op, b, _ in cued])


def _story(rng: random.Random, steps: list[tuple[int, str, int, int]]) -> str:
    """The prose of a chain's story: the opening holds the first equation's operands when it is a product
    ("5 rows of 3 ..."), else its first operand; each later operand comes in a cued sentence (`_CUES`), in order;
    0-2 sentences with unused numbers go anywhere after the opening; sometimes a closing sentence without numbers."""
    opening, cued = _opening(rng, steps)
    sentences = [_sentence(rng, (opening,), words=(2, 5))] + [_cued(rng, b, op) for _, op, b, _ in cued]
    for _ in range(rng.choice((0, 1, 1, 2))):
        sentences.insert(rng.randint(1, len(sentences)), _sentence(rng, (rng.randint(2, 20),), words=(2, 5)))
    if rng.random() < 0.5:
        sentences.append(_sentence(rng, words=(3, 7)))
    return " ".join(sentences)


def arithmetic_piece(rng: random.Random, s: PretrainSettings, phase: PretrainPhase) -> tuple[str, str]:
    """One piece of pretraining text as (context, equations): a bare equation (empty context), an equation after
    a phrase naming the operation, the last line of a scene, or a chain of equations (bare, or after prose that
    holds its operands in order, one per sentence); a single equation sometimes restates its result. The text is
    context + equations."""
    if phase.chain_fraction > 0 and rng.random() < phase.chain_fraction:  # no extra draw without chains
        steps, chain = _chain(rng, s)
        if rng.random() < 0.2:
            return "", chain
        if phase.scene_fraction == 0.0:  # short rows: the operands with their cues only, no filler words
            return _notes(rng, steps) + "\n", chain
        if s.word_problems > 0 and rng.random() < s.word_problems:
            from lowres_reft.data.reasoning import pretraining_piece

            return pretraining_piece(rng)
        return _story(rng, steps) + "\n", chain
    a, op, b, c = _single_operation(rng, s)
    eq = f"{a}{op}{b}={c}"
    kind = rng.random()
    if kind < phase.eq_fraction:
        return "", eq
    if kind < phase.eq_fraction + phase.scene_fraction:
        text = _scene(rng, a, b, op, eq)
    else:
        text = rng.choice(_PHRASES[op]).format(a=a, b=b, eq=eq)
    if rng.random() < phase.restate_fraction:
        return text[: -len(eq)], f"{eq}, {rng.choice(_RESTATE)} {c}."
    return text[: -len(eq)], eq


def pretrain_batch(rng: random.Random, s: PretrainSettings, phase: PretrainPhase,
                   encode: Callable[[str], list[int]], separator_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq_len + 1) token ids of pieces each followed by `separator_id` (`encode`: text -> ids), every
    row starting at a piece start, and (batch, seq_len + 1) float loss weights: 1 on the equations and the
    separator, `phase.context_loss_weight` on the context. Context and equations are encoded apart: every
    context ends at a split of the word tokenizer's pre-tokenizer (a newline or a space before a number), so
    their tokens are those of the whole text."""
    rows, weights = [], []
    for _ in range(phase.batch_size):
        ids: list[int] = []
        weight: list[float] = []
        while len(ids) < phase.seq_len + 1:
            context, eq = (encode(text) for text in arithmetic_piece(rng, s, phase))
            ids += context + eq + [separator_id]
            weight += [phase.context_loss_weight] * len(context) + [1.0] * (len(eq) + 1)
        rows.append(ids[: phase.seq_len + 1])
        weights.append(weight[: phase.seq_len + 1])
    return torch.tensor(rows, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def text_encoder(tokenizer) -> Callable[[str], list[int]]:
    """Text -> token ids of a tiny tokenizer: a character lookup for the character tokenizer (fast, and the ids
    the arithmetic demo's base was trained on), else the tokenizer's own encoding."""
    vocab = char_vocab(tokenizer)
    if len(tokenizer) == len(vocab) + 1:  # the characters, EOS and <pad>: no merges
        return lambda text: [vocab[c] for c in text]
    core = tokenizer.backend_tokenizer
    return lambda text: core.encode(text, add_special_tokens=False).ids


def corpus_words(settings: PretrainSettings, samples: int = 3000) -> Counter[str]:
    """The words of the pretraining text (`samples` pieces of each phase) and of builtin:reasoning's prompts and
    solutions (`samples` problems), with their counts: the vocabulary of the word tokenizer. Fixed seeds, so the
    same settings give the same tokenizer."""
    from lowres_reft.data.prompts import PLAIN_PROMPT_TEMPLATE, format_solution
    from lowres_reft.data.reasoning import generate_problem

    texts = []
    for index, phase in enumerate(settings.phases):
        rng = random.Random(index)
        texts += ["".join(arithmetic_piece(rng, settings, phase)) for _ in range(samples)]
    rng = random.Random(0)
    for _ in range(samples):
        problem = generate_problem(rng)
        texts.append(PLAIN_PROMPT_TEMPLATE.format(question=problem.question) + format_solution(problem.solution))
    return text_words(texts)


def settings_tokenizer(settings: PretrainSettings):
    """The tokenizer a base pretrained with `settings` reads and writes."""
    return build_tokenizer(corpus_words(settings)) if settings.word_tokens else build_tokenizer()
