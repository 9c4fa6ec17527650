"""Final answers of math completions: extraction and equivalence (the checks the math rewards use).

Extraction (`extract_answer`) looks, in this order, for
  1. the last complete `\\boxed{...}` / `\\fbox{...}` (nested and escaped braces handled; `\\boxed 5` too),
  2. the last GSM8K-style `#### N`,
  3. the last "the (final) answer is N" / "final answer: N" (case-insensitive; trailing period, `$`,
     markdown `**` and unit words after a number are dropped),
  4. the last number anywhere in the text (fallback; not with `[reward] require_final_answer`).

Equivalence (`is_equivalent`) first normalises the surface form of both sides (`$` / `\\$`, `\\text{}` wrappers,
thousands commas, `^\\circ`, trailing unit words such as "dollars" or "apples", LaTeX spacing), then
  * fast path: when both sides are plain numbers (integers, decimals, `a/b`, `\\frac{a}{b}`, `\\dfrac12`, signs)
    they are compared exactly as fractions -- no sympy, which covers nearly every GSM8K case;
  * otherwise math-verify (`parse` + `verify`) compares them symbolically (`\\sqrt`, `x+1` vs `1+x`, tuples,
    intervals, sets, `2^{10}` vs 1024, equations like `x=3` vs 3, ...).

Percent rule (GSM8K-friendly): the percent sign is treated as a unit and dropped, so "50%" == "50" == "50 percent",
but "50%" != "0.5". GSM8K golds are written without the sign ("what percent ...? #### 50").

Time and threads: math-verify runs in worker processes (`verify_worker`) with a hard time bound per check, so a
reward called from any thread returns in bounded time; a check that runs past the bound counts as wrong. Inputs
that would only run into the bound (power towers, huge factorials/binomials, very long answers) are rejected up
front as wrong. No exception ever leaves a reward function: a failure while checking counts as wrong.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator
from fractions import Fraction

from lowres_reft.data import verify_worker

# Inputs rejected up front as wrong: they would only run into the math-verify worker's time bound.
_MAX_ANSWER_CHARS = 400
_MAX_EXPONENT = 100_000
_MAX_RESULT_DIGITS = 1_000_000
_MAX_FACTORIAL = 1_000
_MAX_BINOM_ARG = 10_000

# --------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"####")
_ANSWER_IS_RE = re.compile(r"\banswer\s+is\b\s*:?|\bfinal\s+answer\s*:", re.IGNORECASE)
# A number as written in prose: sign, thousands commas, decimals, optional simple fraction.
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|\.\d+"
_LEAD_NUM_RE = re.compile(
    r"(?:\\?\$\s*)?(?P<num>[+-]?(?:" + _NUM + r"))(?P<pct>\s*\\?%)?(?=$|[\s.,;:!?*$)\]]|\\?%)"
)
_ANY_NUM_RE = re.compile(r"(?P<sign>-?)(?P<num>" + _NUM + r")")
_MATH_OPERATOR_START = re.compile(r"\s*[+\-*/^=<>\\{\d]")
_PHRASE_SKIP_RE = re.compile(r"[ \t\r\n*:]*")
_PHRASE_WINDOW = 2_000


def _brace_pairs(text: str, start: int = 0) -> Iterator[tuple[int, int]]:
    """(open, close) indices of every matched `{...}` from `start` on, in closing order, in one linear pass;
    escaped chars (\\{, \\}, \\\\) never count and a `}` with nothing open is skipped."""
    stack: list[int] = []
    j = start
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            yield stack.pop(), j
        j += 1


def _read_braced(text: str, i: int) -> tuple[str, int] | None:
    """`text[i]` is '{': return (content, index after the matching '}'), or None if it never closes."""
    for open_, close in _brace_pairs(text, i):
        if open_ == i:
            return text[i + 1 : close], close + 1
    return None


_TOKEN_END_RE = re.compile(r"[\s$]")  # `\boxed 5`: the token after the command ends at whitespace or `$`


def _last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed N` (by command position), or None.

    Linear time, whatever the input: one pass finds the commands, one left-to-right pass matches braces with a
    stack (escaped `\\{`, `\\}`, `\\\\` never count), and only the chosen content is copied. (Reading every box from
    its own `{` to the end made N unclosed `\\boxed{` quadratic.)
    """
    spans: list[tuple[int, int, int, bool]] = []  # (command start, content start, content end, braced)
    opens: dict[int, int] = {}  # index of a box's '{' -> its command's start
    token_ends: list[int] | None = None
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            continue
        if text[i] == "{":
            opens[i] = m.start()
        elif text[i] != "$":
            if token_ends is None:  # every token end once, not a scan per command
                token_ends = [e.start() for e in _TOKEN_END_RE.finditer(text)] + [len(text)]
            spans.append((m.start(), i, token_ends[bisect.bisect_left(token_ends, i)], False))
    for start, close in _brace_pairs(text):
        if start in opens:
            spans.append((opens[start], start + 1, close, True))
    # Blank contents hold no other box, so the blank ones skipped here are disjoint: still linear.
    for _, lo, hi, braced in sorted(spans, reverse=True):
        content = text[lo:hi].strip() if braced else text[lo:hi].rstrip(".,;")
        if content:
            return content
    return None


def _phrase_after(text: str, i: int) -> str:
    """What follows a marker ending at `i`, cut to _PHRASE_WINDOW characters after the leading spaces/`*`/`:`.

    The cut keeps extraction linear when many markers are followed by no answer (each would copy the rest of
    the text); an answer that does not fit is never a right one (math-verify sees at most _MAX_ANSWER_CHARS).
    """
    start = _PHRASE_SKIP_RE.match(text, i).end()
    return text[start : start + _PHRASE_WINDOW]


def _answer_from_phrase(rest: str) -> str | None:
    """The answer at the start of `rest` (what follows "####" or "the answer is")."""
    rest = rest.lstrip(" \t\r\n*:")
    # Display math may span lines: $$ ... $$ / \[ ... \]
    for open_, close in (("$$", "$$"), ("\\[", "\\]")):
        if rest.startswith(open_):
            end = rest.find(close, len(open_))
            if end > len(open_):
                return _strip_period(rest[len(open_) : end]) or None
    rest = rest.split("\n", 1)[0].strip()
    if not rest:
        return None
    m = _LEAD_NUM_RE.match(rest)
    if m and not _MATH_OPERATOR_START.match(rest[m.end() :]):
        num = re.sub(r"\s+", "", m.group("num"))
        return num + ("%" if m.group("pct") else "")
    # Inline math: $...$, \(...\)
    for open_, close in (("\\(", "\\)"), ("$", "$")):
        if rest.startswith(open_):
            end = rest.find(close, len(open_))
            if end > len(open_):
                return _strip_period(rest[len(open_) : end]) or None
            break
    # Anything else: up to the end of the sentence.
    phrase = re.split(r"\.(?=\s|$)", rest, maxsplit=1)[0]
    phrase = phrase.strip().strip("*").strip().strip("$").strip()
    return _strip_period(phrase) or None


def _strip_period(s: str) -> str:
    """Strip spaces and trailing sentence periods (and the spaces between them), in linear time."""
    s = s.strip()
    end = len(s)
    while end and (s[end - 1] in ".\u3002" or s[end - 1].isspace()):
        end -= 1  # s ends with a non-space, so this only runs when it ends with a period
    return s[:end]


def explicit_answer(text: str) -> str | None:
    """The answer stated in an explicit form (boxed, ####, "the answer is"), or None."""
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    for m in reversed(list(_HASH_RE.finditer(text))):
        ans = _answer_from_phrase(_phrase_after(text, m.end()))
        if ans:
            return ans
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        ans = _answer_from_phrase(_phrase_after(text, m.end()))
        if ans:
            return ans
    return None


def _last_number(text: str) -> str | None:
    last = None
    for m in _ANY_NUM_RE.finditer(text):
        sign = m.group("sign")
        # "3-5": the minus is an operator, not a sign
        if sign and m.start() > 0 and (text[m.start() - 1].isalnum() or text[m.start() - 1] in ")}]"):
            sign = ""
        last = sign + re.sub(r"\s+", "", m.group("num"))
    return last


def extract_answer(text: str, require_final: bool = False) -> str | None:
    """The final answer of a completion (see the module docstring for the priority), or None.

    require_final: only an explicitly stated answer (steps 1-3), never the last number of the text.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        return explicit_answer(text) or (None if require_final else _last_number(text))
    except Exception:  # a regex on odd input must never crash a reward
        return None


# --------------------------------------------------------------------------------------------------
# Normalisation and equivalence

_TEXT_WRAP_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|textnormal|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}"
)
_UNIT_TAIL_RE = re.compile(r"(?P<head>.*?[\d})\]])(?P<tail>(?:\s+[A-Za-z]{2,}\.?)+)")
_NOT_UNITS = {"pi", "and", "or", "to", "sqrt", "inf", "infty", "infinity", "mod", "times"}
_PLAIN_NUM_RE = re.compile(r"([+-]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_SLASH_FRAC_RE = re.compile(r"([+-]?)(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)")
_FRAC_CMD_RE = re.compile(r"([+-]?)\\[dt]?frac")


def normalize(answer: str) -> str:
    """Surface normalisation: drop `$`, `\\text{}` wrappers, percent signs, degrees, unit words, spacing."""
    s = answer.strip().replace("\u2212", "-").replace("\u00a0", " ")
    for d in ("\\(", "\\)", "\\[", "\\]", "\\displaystyle"):
        s = s.replace(d, " ")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"\\[,!;:]", "", s)
    s = s.replace("\\ ", " ").replace("~", " ")
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_WRAP_RE.sub(lambda m: " " + m.group(1) + " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\circ", "").replace("\\degree", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", " ", s).strip()
    s = _strip_period(s)
    m = _UNIT_TAIL_RE.fullmatch(s)
    if m and not any(w.strip(".").lower() in _NOT_UNITS for w in m.group("tail").split()):
        s = m.group("head").strip()
    return s


def _plain_number(s: str) -> Fraction | None:
    m = _PLAIN_NUM_RE.fullmatch(s)
    if m:
        body = m.group(2).replace(",", "")
        if body.endswith("."):
            body = body[:-1]
        value = Fraction(body)
        return -value if m.group(1) == "-" else value
    m = _SLASH_FRAC_RE.fullmatch(s)
    if m:
        den = Fraction(m.group(3))
        if den == 0:
            return None
        value = Fraction(m.group(2)) / den
        return -value if m.group(1) == "-" else value
    return None


def _latex_arg(s: str, i: int) -> tuple[str, int] | None:
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        return _read_braced(s, i)
    return s[i], i + 1


def _as_number(s: str) -> Fraction | None:
    """Exact value of a plain number (`1,234`, `-0.50`, `3/4`, `\\frac{1}{2}`, `\\dfrac12`), else None."""
    s = s.replace(" ", "")
    if s.startswith("{") and s.endswith("}") and _read_braced(s, 0) == (s[1:-1], len(s)):
        s = s[1:-1]
    value = _plain_number(s)
    if value is not None:
        return value
    m = _FRAC_CMD_RE.match(s)
    if not m:
        return None
    num = _latex_arg(s, m.end())
    if num is None:
        return None
    den = _latex_arg(s, num[1])
    if den is None or den[1] != len(s):
        return None
    n, d = _plain_number(num[0]), _plain_number(den[0])
    if n is None or d is None or d == 0:
        return None
    value = n / d
    return -value if m.group(1) == "-" else value


def _arg_after(s: str, i: int) -> tuple[str, int]:
    """The argument of `^` ending at s[i-1] (a braced or parenthesised group, or one token) and its end."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return "", i
    if s[i] in "{(":
        close = "}" if s[i] == "{" else ")"
        depth = 0
        for j in range(i, len(s)):
            depth += s[j] == s[i]
            depth -= s[j] == close
            if depth == 0:
                return s[i + 1 : j], j + 1
        return s[i:], len(s)
    tok = re.match(r"\d+|\\?[A-Za-z]+|.", s[i:])
    return tok.group(0), i + len(tok.group(0))


def _base_before(s: str, i: int) -> str:
    """The base of the `^` at s[i] when it is a group ending in ')' / '}' / ']', else ''."""
    j = i - 1
    while j >= 0 and s[j] == " ":
        j -= 1
    if j < 0 or s[j] not in ")}]":
        return ""
    close = s[j]
    open_ = {")": "(", "}": "{", "]": "["}[close]
    depth = 0
    for k in range(j, -1, -1):
        depth += s[k] == close
        depth -= s[k] == open_
        if depth == 0:
            return s[k + 1 : j]
    return s[:j]


def _max_int(s: str) -> int:
    return max((int(n) for n in re.findall(r"\d+", s)), default=0)


def _too_expensive(s: str) -> bool:
    """Inputs that can make sympy run (nearly) forever: power towers, huge exponents/factorials/binomials."""
    if len(s) > _MAX_ANSWER_CHARS:
        return True
    for m in re.finditer(r"\^|\*\*", s):
        arg, end = _arg_after(s, m.end())
        if "^" in arg or "**" in arg:
            return True  # power tower: 2^{2^{40}}
        exponent = _max_int(arg)
        if exponent > _MAX_EXPONENT:
            return True
        rest = s[end:].lstrip()
        if rest.startswith(("^", "**")):
            return True  # chained powers: 2^{9}^{9}
        digits = re.search(r"(\d+)\s*$", s[: m.start()])
        if digits and len(digits.group(1)) * exponent > _MAX_RESULT_DIGITS:
            return True  # 99999999999^{99999}
        base = _base_before(s, m.start())
        if ("^" in base or "**" in base) and max(exponent, 1) * _max_int(base) > _MAX_EXPONENT:
            return True  # (2^{1000})^{1000}
    for m in re.finditer(r"!", s):
        before = s[: m.start()].rstrip()
        if before.endswith((")", "}", "]")):
            return True  # factorial of an expression
        digits = re.search(r"(\d+)$", before)
        if digits and int(digits.group(1)) > _MAX_FACTORIAL:
            return True
    if re.search(r"binom|choose|\\Gamma|gamma", s):
        if any(int(n) > _MAX_BINOM_ARG for n in re.findall(r"\d+", s)) or "^" in s:
            return True
    return False


@functools.lru_cache(maxsize=8192)  # a timed-out check raises, so it is not cached
def _mv_equivalent(pred: str, gold: str) -> bool:
    if _too_expensive(pred) or _too_expensive(gold):
        return False  # cheaper than starting a worker that will time out
    return verify_worker.equivalent(pred, gold)


def is_equivalent(pred: str | None, gold: str | None) -> bool:
    """Whether the answer `pred` equals the gold answer `gold` (numerically or symbolically). Never raises."""
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        p, g = normalize(pred), normalize(gold)
        if not p or not g:
            return False
        p_num, g_num = _as_number(p), _as_number(g)
        if p_num is not None and g_num is not None:
            return p_num == g_num
        if p.replace(" ", "") == g.replace(" ", ""):
            return True
        return _mv_equivalent(p, g)
    except BaseException as e:  # math-verify's TimeoutException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        return False
