"""Grading: is a model's final answer equal to the reference?

Grading runs in tiers, cheapest first, so the common case never touches sympy:

1. normalised string equality (``normalize``),
2. exact numeric comparison when both sides are plain numbers (integers, decimals, fractions,
   mixed numbers, repeating decimals),
3. element-wise comparison when both sides are lists (``1, -2`` = ``-2, 1``),
4. symbolic comparison (``symbolic.symbolic_equal``: math-verify's LaTeX -> sympy, where the
   whole answer must parse) for everything else.

Normalisation never glues tokens: ``1 2`` stays two numbers, ``32, 349`` a list and ``3 1/4``
a mixed number (13/4); only explicit thousands separators with 3-digit groups are removed
(``12,345``, ``12{,}345``, ``12\\,345``, ``12 345``). ``grade`` turns the outcome into a
``Verdict``; answer extraction lives in ``extraction``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache

from tirforge.trajectories.extraction import (
    extract_answer,
    extract_boxed,
    final_boxes,
    reference_answer,
    strip_markup,
)
from tirforge.trajectories.symbolic import symbolic_equal

__all__ = [
    "Verdict",
    "answers_equal",
    "extract_answer",
    "extract_boxed",
    "grade",
    "normalize",
    "reference_answer",
]


class Verdict(StrEnum):
    """Outcome of grading one answer against a reference."""

    correct = "correct"
    incorrect = "incorrect"
    no_answer = "no_answer"
    """The response contains no final answer (or an empty one)."""
    unparseable = "unparseable"
    """There is an answer but it is not a number or any expression math-verify can read."""


# --------------------------------------------------------------------------- normalisation

# A trailing unit in text, e.g. "5\text{ dollars}", "864 \mbox{ inches}^2".
_TEXT_UNIT_RE = re.compile(
    r"^(.*?[\d})])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .]*\}(\^\{?\d\}?)?$"
)
_BARE_UNIT_RE = re.compile(
    r"^(.*\d)\s+(?:dollars?|cents?|degrees?|hours?|minutes?|seconds?|days?|years?|"
    r"(?:square\s+|sq\.?\s+)?(?:units?|cm|m|km|mm|in|ft|inches|feet|meters?|miles?|yards?)"
    r"(?:\^2|\^3)?)$"
)
# "12 eggs", "3.5 liters": a plain number then words is a number with a unit (GSM8K answers).
_WORD_UNIT_RE = re.compile(
    r"^([+-]?\d[\d,]*(?:\.\d+)?)\s+(?!(?:sqrt|times|cdot|mod|pi)\b)[a-zA-Z]{3,}[a-zA-Z\s\-/]*$"
)
# Thousands separators that only ever mean one: "{,}", a thin space "\,", ",\!" (MATH's
# "10,\!080"), each between digit groups of exactly three.
_LATEX_THOUSANDS_RE = re.compile(
    r"(?<![\d.])\d{1,3}(?:(?:\{,\}|,\\!|\\!,|\\,|\\ |~)\d{3})+(?![\d])"
)
_LATEX_SEP_RE = re.compile(r"\{,\}|,\\!|\\!,|\\,|\\ |~")
# Plain "12,345" / "12 345" only when that is the whole answer: inside an expression a comma
# separates elements ("(1,234)") and a space separates tokens.
_THOUSANDS_RE = re.compile(
    r"^[+-]?\d{1,3}(?:(,)\d{3})+(?:\.\d+)?$|^[+-]?\d{1,3}(?:( )\d{3})+(?:\.\d+)?$"
)
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|~")
# "x = 5", "\theta = 5", "f(x) = 2x", "x \in [1, 2]": one name (maybe applied) on the left.
_ASSIGN_RE = re.compile(
    r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:\([a-zA-Z, ]*\))?\s*(?:=|\\in(?![a-zA-Z]))([^=]+)$"
)
_COMMAND_END_RE = re.compile(r"\\[a-zA-Z]+$")


def _squeeze(s: str) -> str:
    """Whitespace runs -> nothing, except between two word characters (a separator).

    ``x + 1`` -> ``x+1``, ``\\times 3`` -> ``\\times3``, but ``1 2`` and ``\\pi r`` keep their
    space: removing it would glue two tokens into another one.
    """

    def repl(m: re.Match) -> str:
        left = s[m.start() - 1] if m.start() else ""
        right = s[m.end()] if m.end() < len(s) else ""
        if not (left and right and (left.isalnum() or left == ".")):
            return ""
        if not (right.isalnum() or right == "."):
            return ""
        if _COMMAND_END_RE.search(s, 0, m.start()) and not right.isalpha():
            return ""  # "\times 3": a command name ends at its last letter anyway
        return " "

    return re.sub(r"\s+", repl, s)


_DOLLAR_RE = re.compile(r"\\?\$")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])")
_DTFRAC_RE = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_FRAC_DIGITS_RE = re.compile(r"\\frac\s*(\d)\s*(\d)")
_SQRT_TOKEN_RE = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")
_SQRT_PAREN_RE = re.compile(r"\\sqrt\s*\(([^()]*)\)")
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_WS_RE = re.compile(r"\s+")


@lru_cache(maxsize=65536)
def normalize(ans: str) -> str:
    """Cheap canonical string for an answer; equal outputs mean equal answers.

    Only rewrites that cannot change the meaning: markdown emphasis, dollar signs, trailing
    punctuation, spacing commands, ``\\left`` / ``\\right``, ``\\dfrac``, degrees, percent, text
    units, thousands separators (3-digit groups only), spaces that separate nothing, and a
    leading single-variable assignment (``x = 5`` -> ``5``). Cached: references repeat.
    """
    s = strip_markup(ans)
    s = _DOLLAR_RE.sub("", s)
    if "\\" in s or "~" in s or "{" in s:
        s = _LATEX_THOUSANDS_RE.sub(lambda m: _LATEX_SEP_RE.sub("", m.group(0)), s)
        s = s.replace("{,}", ",")
        s = _SPACING_RE.sub(" ", s)
        s = _LEFT_RIGHT_RE.sub("", s)
        s = _DTFRAC_RE.sub(r"\\frac", s)
        s = _FRAC_DIGITS_RE.sub(r"\\frac{\1}{\2}", s)  # \frac12 == \frac{1}{2}
        s = _SQRT_TOKEN_RE.sub(r"\\sqrt{\1}", s)  # \sqrt 2 == \sqrt{2}
        s = _SQRT_PAREN_RE.sub(r"\\sqrt{\1}", s)  # \sqrt(3) == \sqrt{3}
        s = _DEGREES_RE.sub("", s)
    elif "°" in s:
        s = s.replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = strip_markup(s)
    s = _TEXT_UNIT_RE.sub(r"\1", s)
    s = _BARE_UNIT_RE.sub(r"\1", s)
    s = _WORD_UNIT_RE.sub(r"\1", s)
    if "\\" in s:
        s = _TEXT_CMD_RE.sub(r"\1", s)  # \text{(C)} -> (C)
        s = s.replace("\\{", "{").replace("\\}", "}")
    s = _WS_RE.sub(" ", s).strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "").replace(" ", "")
    if " " in s:
        s = _squeeze(s)
    s = strip_markup(s)
    if m := _ASSIGN_RE.match(s):
        s = m.group(1)
    return s


def _for_parse(ans: str) -> str:
    """``ans`` ready for the LaTeX parser: markup, separators, typos resolved; nothing dropped."""
    s = strip_markup(ans)
    s = re.sub(r"(?<!\\)\$", "", s).replace("\\$", "")
    s = _LATEX_THOUSANDS_RE.sub(lambda m: _LATEX_SEP_RE.sub("", m.group(0)), s)
    if _THOUSANDS_RE.match(s.strip()):
        s = s.replace(",", "").replace(" ", "")
    s = re.sub(r"\\(?:mathrm|text|mathit)\{\s*([eiπ])\s*\}", r"\1", s)  # \mathrm{e} is e
    s = re.sub(r"\\sqrt\s*\(([^()]*)\)", r"\\sqrt{\1}", s)
    s = s.replace("\\%", "").replace("%", "")
    s = strip_markup(s)
    if (m := _ASSIGN_RE.match(s)) and "(" in s.split("=")[0]:
        s = m.group(1)  # "f(x) = 2x": the parser would read f(x) as a product f*x
    return s


# --------------------------------------------------------------------------- numbers

_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_FRACTION_RE = re.compile(r"^([+-]?)(?:\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|([+-]?\d+)/([+-]?\d+))$")
# "3 1/4", "3\frac{1}{4}": a whole number then a proper fraction is a mixed number, 13/4.
_MIXED_RE = re.compile(r"^([+-]?)(\d+)(?: (\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})$")
# "0.\overline{6}", "0.1\overline{6}", "1.\dot{3}": repeating decimals.
_REPEATING_RE = re.compile(r"^([+-]?)(\d*)\.(\d*)\\(?:overline|dot)\{?(\d+)\}?$")
_REL_TOL = Fraction(1, 10**6)
# Two numbers side by side with only a space between: no reading of that is safe.
# (A sub- or superscript digit is not a number of its own: "\log_2 8" is fine.)
_JUXTAPOSED_RE = re.compile(r"(?<![\d_^.])\d+(?:\.\d+)? \.?\d")


def _to_number(s: str) -> tuple[Fraction, bool] | None:
    """A normalised answer as (exact value, came from a decimal); None if not a plain number."""
    try:
        if _NUMBER_RE.match(s):
            return Fraction(s), any(c in s for c in ".eE")
        if m := _FRACTION_RE.match(s):
            sign, num, den = m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5)
            value = Fraction(int(num), int(den))
            return (-value if sign == "-" else value), False
        if m := _MIXED_RE.match(s):
            whole = int(m.group(2))
            num, den = int(m.group(3) or m.group(5)), int(m.group(4) or m.group(6))
            if 0 < num < den:
                value = whole + Fraction(num, den)
                return (-value if m.group(1) == "-" else value), False
        if m := _REPEATING_RE.match(s):
            sign, whole, fixed, rep = m.groups()
            value = int(whole or 0) + Fraction(
                int(fixed + rep) - int(fixed or 0), 10 ** len(fixed) * (10 ** len(rep) - 1)
            )
            return (-value if sign == "-" else value), False
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool], percent: bool) -> bool:
    """Exact equality, relative tolerance (1e-6) when a decimal is involved.

    With a percent sign on either side, ``x%`` may also have been written ``x/100`` (as in
    Qwen's grader), so the reference scaled by 100 either way counts too.
    """
    pred, inexact = a[0], a[1] or b[1]
    refs = [b[0], b[0] / 100, b[0] * 100] if percent else [b[0]]
    for ref in refs:
        if pred == ref:
            return True
        if inexact and abs(pred - ref) <= _REL_TOL * max(abs(pred), abs(ref)):
            return True
    return False


# --------------------------------------------------------------------------- lists

_OPEN, _CLOSE = "([{", ")]}"


def _top_level_items(s: str) -> list[str]:
    """``s`` split at commas outside brackets (``\\{``, ``(``, ``[``, ``{`` all nest)."""
    items, depth, start = [], 0, 0
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
        i += 1
    items.append(s[start:])
    return [x.strip() for x in items]


def _is_list(ans: str) -> bool:
    """A bare comma-separated list of several values (not a tuple, interval or set literal)."""
    return len(_top_level_items(normalize(ans))) > 1


def _lists_equal(pred: list[str], ref: list[str]) -> bool:
    """Same elements in any order (the reference lists solutions, e.g. ``1, -2``)."""
    if len(pred) != len(ref):
        return False
    unmatched = list(ref)
    for p in pred:
        hit = next((r for r in unmatched if _judge(p, r) is True), None)
        if hit is None:
            return False
        unmatched.remove(hit)
    return True


# --------------------------------------------------------------------------- comparison

_TIMEOUT_S = 5
"""Seconds the symbolic path may spend on one answer (parse + compare)."""


def _with_timeout(fn: Callable[[], bool | None]) -> bool | None:
    """``fn()`` with the per-answer timeout in any thread (collect grades in worker threads).

    In the main thread a SIGALRM interrupts ``fn`` after ``_TIMEOUT_S``; elsewhere signals are
    unavailable, so ``fn`` runs in a daemon thread that is abandoned after ``_TIMEOUT_S`` (sympy
    cannot be interrupted). A timeout counts as unequal.
    """
    if threading.current_thread() is threading.main_thread():
        from math_verify.errors import TimeoutException
        from math_verify.utils import timeout

        try:
            return timeout(timeout_seconds=max(1, round(_TIMEOUT_S)))(fn)()
        except TimeoutException:
            return False
    box: list = []
    worker = threading.Thread(target=lambda: box.append(fn()), daemon=True, name="math-verify")
    worker.start()
    worker.join(_TIMEOUT_S)
    return box[0] if box else False  # timed out, or fn raised (it guards itself; be safe)


def _judge(pred: str, ref: str) -> bool | None:
    """True/False for equal/unequal; None when ``pred`` cannot be read as math at all."""
    norm_pred, norm_ref = normalize(pred), normalize(ref)
    if norm_pred and norm_pred == norm_ref:
        return True
    if not norm_pred:
        return None
    num_pred, num_ref = _to_number(norm_pred), _to_number(norm_ref)
    if num_pred is not None and num_ref is not None:
        return _numbers_equal(num_pred, num_ref, percent="%" in pred + ref)
    items_pred, items_ref = _top_level_items(norm_pred), _top_level_items(norm_ref)
    if len(items_pred) > 1 and len(items_ref) > 1:
        return _lists_equal(items_pred, items_ref)
    if (len(items_pred) > 1) != (len(items_ref) > 1) and (num_pred or num_ref):
        return False  # a list is never a single number ("32, 349" is not 32349)
    glued = (_JUXTAPOSED_RE.search(norm_pred) and num_pred is None) or (
        _JUXTAPOSED_RE.search(norm_ref) and num_ref is None
    )
    if glued:
        return False  # "1 2": 12? 1*2? a list? Only the identical string above is equal.
    return _with_timeout(lambda: _symbolic(pred, ref, num_pred is not None))


def _symbolic(pred: str, ref: str, pred_is_number: bool) -> bool | None:
    """The slow path on both sides, prepared for parsing (see ``symbolic.symbolic_equal``)."""
    # _with_timeout bounds this call; nested SIGALRMs would cancel each other.
    outcome = symbolic_equal(_for_parse(pred), _for_parse(ref), None)
    if outcome is None and pred_is_number:
        return False  # a number is always a readable answer, just not this one
    return outcome


def answers_equal(pred: str, ref: str) -> bool:
    """Whether two bare answers are mathematically equal (never raises)."""
    try:
        return _judge(pred, ref) is True
    except Exception:
        return False


def grade(
    response_or_answer: str | None, reference: str | None, *, extract: bool = True
) -> Verdict:
    """Grade a response (or, with ``extract=False``, a bare answer) against a bare reference.

    Use ``reference_answer`` first for raw dataset fields such as GSM8K's ``... #### 18``. When
    the response's final statement boxes several values (``\\boxed{-2} and \\boxed{1}``) and the
    reference lists several (``1, -2``), they are compared as sets.

    Raises:
        ValueError: ``reference`` is None or blank.
    """
    if reference is None or not reference.strip():
        raise ValueError("cannot grade without a reference answer")
    answer = extract_answer(response_or_answer) if extract else response_or_answer
    if answer is None or not answer.strip():
        return Verdict.no_answer
    if extract and response_or_answer and "boxed" in response_or_answer:
        finals = final_boxes(response_or_answer)
        if len(finals) > 1 and _is_list(reference):
            answer = ", ".join(finals)
    try:
        outcome = _judge(answer, reference)
    except Exception:
        outcome = False
    if outcome is None:
        return Verdict.unparseable
    return Verdict.correct if outcome else Verdict.incorrect


