"""Tests for lowres_reft.data.rewards: answer extraction, equivalence, reward functions, registry, threads, score."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lowres_reft.data.answers import extract_answer, is_equivalent
from lowres_reft.data.rewards import (
    REWARDS,
    format_reward,
    get_reward_fn,
    math_correct,
    math_correct_final,
    score,
)
from lowres_reft.utils.errors import ConfigError

# (completion, gold, expected_correct)
CORRECT_CASES = [
    # GSM8K style
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", True),
    ("She pays 1,000 + 234 = 1,234 dollars.\n#### 1,234", "1234", True),
    ("#### 1234", "1,234", True),
    ("The total is 1,234,567 units.\n#### 1,234,567", "1234567", True),
    ("#### $18", "18", True),
    ("#### $18.00", "18", True),
    ("She makes 9 * 2 = $18 every day.\n#### 18 dollars", "18", True),
    ("The answer is 18 apples.", "18", True),
    ("So the answer is $18.", "18", True),
    ("the final answer is 42.", "42", True),
    ("THE ANSWER IS: 7", "7", True),
    ("The answer is **42**.", "42", True),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", True),
    ("First 3 then 5, finally we get 12", "12", True),  # last-number fallback
    ("The temperature drops to -5 degrees.", "-5", True),
    ("#### -12", "-12", True),
    # decimals, fractions
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{0.50}", "0.5", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\dfrac12}", "1/2", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("The answer is 3/4.", "\\frac{3}{4}", True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("\\boxed{2.0}", "2", True),
    # percentages (percent sign is a unit: "50%" == 50)
    ("The answer is 50%.", "50", True),
    ("\\boxed{50\\%}", "50", True),
    ("#### 25 percent", "25", True),
    # units and text wrappers
    ("\\boxed{18 \\text{ dollars}}", "18", True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{\\text{18}}", "18", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{12\\text{ cm}}", "12", True),
    # boxed variants and nesting
    ("We get $\\boxed{2^{10}}$.", "1024", True),
    ("\\boxed{1024}", "2^{10}", True),
    ("\\boxed 7", "7", True),
    ("\\fbox{7}", "7", True),
    ("First guess \\boxed{3}, corrected: \\boxed{4}", "4", True),  # last boxed wins
    ("Answer \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    # MATH-style LaTeX golds
    ("\\boxed{(1,2)}", "(1,2)", True),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{1+x^2}", "x^2+1", True),
    ("\\boxed{x+1}", "1+x", True),
    ("\\boxed{[1,2)}", "[1, 2)", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),
    ("\\boxed{\\pi}", "\\pi", True),
]

WRONG_CASES = [
    ("#### 73", "72", False),  # off by one
    ("The answer is 1,234.", "1243", False),  # digits swapped
    ("\\boxed{5}", "-5", False),  # wrong sign
    ("\\boxed{-5}", "5", False),
    ("\\boxed{\\frac{1}{2}}", "2", False),  # reciprocal
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{2}", False),
    ("We compute 72 clips. So \\boxed{71}", "72", False),  # boxed wrong though an earlier number is right
    ("\\boxed{72} hmm, no: \\boxed{70}", "72", False),  # last boxed wins, and it is wrong
    ("I don't know.", "72", False),  # no answer at all
    ("", "72", False),  # empty completion
    ("The answer is 50%.", "0.5", False),  # percent rule: 50% means 50
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    ("\\boxed{(2,1)}", "(1,2)", False),  # tuple order matters
    ("\\boxed{x^2-1}", "x^2+1", False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{3}}{2}", False),
    ("#### 18", "", False),  # empty gold never matches
    ("\\boxed{}", "0", False),  # empty box
    ("\\boxed{2^{2^{40}}}", "5", False),  # power tower: rejected up front, no hang
    ("\\boxed{2x}", "2", False),  # a variable is not a unit
    ("The answer is 17 apples.", "18", False),
]

ALL_CASES = CORRECT_CASES + WRONG_CASES


def test_case_table_size():
    assert len(ALL_CASES) >= 50
    assert sum(1 for *_, ok in ALL_CASES if not ok) >= 15


@pytest.mark.parametrize(("completion", "gold", "expected"), ALL_CASES)
def test_math_correct_table(completion, gold, expected):
    assert math_correct(completion, gold) == (1.0 if expected else 0.0)


# --------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{2^{10}}", "2^{10}"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("answer \\boxed{3} and a truncated \\boxed{12", "3"),  # unclosed box is ignored
        ("blah\n#### 1,234", "1,234"),
        ("#### $18.00", "18.00"),
        ("#### 72\n", "72"),
        ("The answer is 42.", "42"),
        ("the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("The answer is: 18 apples.", "18"),
        ("The answer is **42**", "42"),
        ("The answer is $2^{10}$", "2^{10}"),
        ("The answer is x^2+1.", "x^2+1"),
        ("The answer is 50%.", "50%"),
        ("The answer is -3.5.", "-3.5"),
        ("The answer is:\n\n$$\n\\frac{1}{2}\n$$", "\\frac{1}{2}"),
        ("The answer is \\(\\sqrt{2}\\).", "\\sqrt{2}"),
        ("The answer is\n42", "42"),
        ("\\boxed{4} The answer is 5", "4"),  # boxed has priority
        ("#### 4\nThe answer is 5", "4"),  # #### before "the answer is"
        ("#### 4\nso far.\n#### 6\nend", "6"),  # two markers: the last one
        ("\\boxed{\\boxed{4}} and \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last by command position
        ("\\boxed{4} then \\boxed{5", "4"),  # the unclosed one is not an answer
        ("\\boxed{3 \\} 4} ", "3 \\} 4"),  # escaped brace
        ("\\boxed{7} \\boxed{  }", "7"),  # blank box skipped
        ("I had 3 apples and 5-2 pears", "2"),  # '-' after a digit is an operator
        ("It is -7", "-7"),
        ("a total of 1,234 items", "1,234"),
        ("nothing here", None),
        ("", None),
        ("   ", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


ROOT = Path(__file__).resolve().parents[2]

# Completions that made extraction quadratic (N = 20,000 unclosed boxes took 78 s), checked with N = 50,000.
_ADVERSARIAL = r"""
from lowres_reft.data.rewards import extract_answer, math_correct
N = 50_000
assert extract_answer("\\boxed{" * N) is None
assert extract_answer("\\boxed{1} " + "\\boxed{" * N) == "1"
assert extract_answer("\\boxed{" * N + "7" + "}" * N) == "7"
assert extract_answer("\\boxed x" * N) == "x"
assert extract_answer("the answer is . " * N + "so 5") == "5"
assert extract_answer("#### . " * N + "so 5") == "5"
assert math_correct("\\boxed{5" + "." * N + "}", "5") == 1.0
print("done")
"""


def test_extraction_is_linear_on_adversarial_completions():
    # A hang guard, not a speed claim: the quadratic version needs many minutes for these inputs.
    proc = subprocess.run([sys.executable, "-c", _ADVERSARIAL], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "done"


def test_extract_answer_non_string():
    assert extract_answer(None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("1,234", "1234", True),
        ("1,234", "1243", False),
        ("50%", "50", True),
        ("50%", "0.5", False),
        ("$18", "18", True),
        ("18 dollars", "18", True),
        ("\\dfrac12", "0.5", True),
        ("\u22125", "-5", True),  # unicode minus
        (None, "5", False),
        ("5", None, False),
        ("", "", False),
        ("1/0", "1", False),
    ],
)
def test_is_equivalent(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected


# --------------------------------------------------------------------------------------------------
# Format reward


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so \\boxed{3}", 1.0),
        ("work\n#### 3", 1.0),
        ("The answer is 3.", 1.0),
        ("The final answer is $x+1$", 1.0),
        ("I think it's 3", 0.0),
        ("\\boxed{}", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, "3") == expected
    assert REWARDS["format"](completion, "3") == expected


# --------------------------------------------------------------------------------------------------
# Registry


def my_custom_reward(completion: str, gold: str) -> float:
    return 0.25 if gold in completion else 0.0


NOT_CALLABLE = 3


def test_registry_known_names():
    assert set(REWARDS) == {"math_correct", "format", "reasoning_gym"}
    assert get_reward_fn("math_correct") is math_correct
    assert get_reward_fn("format") is format_reward


def test_registry_unknown_name():
    with pytest.raises(ConfigError) as info:
        get_reward_fn("math_corect")
    msg = str(info.value)
    assert "math_corect" in msg and "math_correct" in msg and "format" in msg
    assert "package.module:function" in msg
    assert "\n" not in msg


def test_registry_dotted_path():
    fn = get_reward_fn(f"{__name__}:my_custom_reward")
    assert fn is my_custom_reward
    assert fn("the answer is 7", "7") == 0.25
    assert get_reward_fn("lowres_reft.data.rewards:math_correct") is math_correct


@pytest.mark.parametrize(
    "name",
    [
        "no_such_package_xyz.mod:fn",
        f"{__name__}:no_such_function",
        f"{__name__}:NOT_CALLABLE",
        ":fn",
        f"{__name__}:",
    ],
)
def test_registry_bad_dotted_path(name):
    with pytest.raises(ConfigError) as info:
        get_reward_fn(name)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# Threads: math-verify's signal timeouts must not break calls from worker threads


def test_rewards_from_other_threads_match_main_thread():
    main = [math_correct(c, g) for c, g, _ in ALL_CASES]
    errors: list[BaseException] = []
    from_thread: list[float] = []

    def worker():
        try:
            from_thread.extend(math_correct(c, g) for c, g, _ in ALL_CASES)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert not errors
    assert from_thread == main

    with ThreadPoolExecutor(max_workers=4) as pool:
        pooled = list(pool.map(lambda cg: math_correct(cg[0], cg[1]), [(c, g) for c, g, _ in ALL_CASES]))
    assert pooled == main
    assert main == [1.0 if ok else 0.0 for *_, ok in ALL_CASES]


def test_symbolic_check_in_thread_uncached():
    # Strings not seen elsewhere, so math-verify really runs in the worker thread (no parse cache hit).
    with ThreadPoolExecutor(max_workers=2) as pool:
        pairs = [("3+y", "y+3"), ("\\sqrt{12}", "2\\sqrt{3}"), ("y-3", "y+3")]
        got = list(pool.map(lambda cg: is_equivalent(*cg), pairs))
    assert got == [True, True, False]


def _in_thread(fn, *args, guard_s: float = 120):
    """fn(*args) in a daemon thread; a hang guard (not a speed claim) fails the test instead of hanging it."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(guard_s)
    assert not thread.is_alive(), f"{fn.__name__}{args} still running after {guard_s} s"
    return out[0]


def test_symbolic_check_time_is_bounded_in_threads():
    # Off the main thread math-verify has no timeout of its own: this one ran for minutes in a reward thread.
    assert _in_thread(is_equivalent, "2^{99999*99999}", "5") is False


def test_stuck_worker_is_killed_and_replaced(monkeypatch):
    from lowres_reft.data import verify_worker

    # A bound shorter than the check needs: the worker is killed, the check counts as wrong (and is not cached).
    monkeypatch.setattr(verify_worker, "CALL_TIMEOUT_S", 0.5)
    with pytest.raises(verify_worker.WorkerTimeout):
        verify_worker.equivalent("2^{99999*99999}", "6")
    assert _in_thread(is_equivalent, "2^{99999*99999}", "6") is False
    monkeypatch.undo()
    # A fresh worker serves the next checks.
    assert _in_thread(is_equivalent, "z+4", "4+z") is True
    assert verify_worker.equivalent("z-4", "4+z") is False


# --------------------------------------------------------------------------------------------------
# score


def test_score_totals_with_format_weight():
    completions = ["\\boxed{72}", "I think 72", "\\boxed{71}", ""]
    golds = ["72"] * 4
    totals, correct, _ = score(completions, golds, ("math_correct", "format"), format_weight=0.1)
    assert totals == pytest.approx([1.1, 1.0, 0.1, 0.0])
    assert correct == [True, True, False, False]

    totals, correct, _ = score(completions, golds, ("math_correct",), format_weight=0.1)
    assert totals == [1.0, 1.0, 0.0, 0.0]
    assert correct == [True, True, False, False]


def test_score_reports_correctness_without_math_correct():
    totals, correct, _ = score(["\\boxed{72}", "#### 3"], ["72", "72"], ("format",), format_weight=0.5)
    assert totals == [0.5, 0.5]
    assert correct == [True, False]


def test_score_custom_function_and_errors():
    totals, _, _ = score(["gold 7"], ["7"], (f"{__name__}:my_custom_reward", "math_correct"), format_weight=0.1)
    assert totals == [1.25]
    with pytest.raises(ConfigError):
        score(["x"], ["1"], ("nope",), format_weight=0.1)
    with pytest.raises(ValueError):
        score(["x", "y"], ["1"], ("math_correct",), format_weight=0.1)


# --------------------------------------------------------------------------------------------------
# [reward] require_final_answer

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
)


def test_require_final_answer_credits_only_a_stated_answer():
    unfinished = GSM8K_SOLUTION.rsplit("\n####", 1)[0]  # the reasoning ends on 72 but states no final answer
    assert extract_answer(unfinished) == "72"
    assert extract_answer(unfinished, require_final=True) is None
    assert math_correct(unfinished, "72") == 1.0
    assert math_correct_final(unfinished, "72") == 0.0
    for stated in (GSM8K_SOLUTION, unfinished + "\nThe answer is 72.", unfinished + " So \\boxed{72}."):
        assert math_correct_final(stated, "72") == 1.0, stated
    assert math_correct_final(unfinished + "\n#### 71", "72") == 0.0

    completions, golds = [unfinished, GSM8K_SOLUTION, "no idea"], ["72"] * 3
    assert score(completions, golds, ("math_correct",))[:2] == ([1.0, 1.0, 0.0], [True, True, False])
    strict = score(completions, golds, ("math_correct",), require_final_answer=True)
    assert strict[:2] == ([0.0, 1.0, 0.0], [False, True, False])
    # Correctness follows the strict check also when only the format reward is summed.
    scored = score(completions, golds, ("format",), 0.5, require_final_answer=True)
    assert scored[:2] == ([0.0, 0.5, 0.0], [False, True, False])
