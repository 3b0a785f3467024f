"""Answer extraction and grading: is a model's final answer equal to the reference?

Grading runs in three tiers, cheapest first, so the common case never touches sympy:

1. normalised string equality (``normalize``),
2. exact numeric comparison when both sides are plain numbers,
3. symbolic comparison with math-verify (LaTeX -> sympy) for everything else.

``grade`` turns the outcome into a ``Verdict`` for a trajectory.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache

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


# --------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# "#### 18" but not a markdown heading such as "#### Step 1": the answer starts with a number.
_GSM8K_RE = re.compile(r"####[ \t]*(\$?[ \t]*[-+]?\.?\d[^\n]*)")
# OpenAI's GSM8K model solutions end on a line "A: 18" (a number, so prose "A: ..." is left alone).
_A_LINE_RE = re.compile(r"\n[ \t]*A:[ \t]*(\$?[ \t]*[-+]?\.?\d[^\n]*?)[ \t]*\Z")
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)\s*(?:is\s*:?|:)\s*", re.IGNORECASE)


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start``; None when its braces never close."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        j = i
        while j < len(text):
            ch = text[j]
            if ch == "\\":  # \{ and \} are literal braces, not grouping
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None
    # Brace-less form, e.g. "\boxed 5": the argument runs to the end of the math or line.
    rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
    return rest or None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in ``text``.

    Nested braces are matched properly. A box whose braces never close (a truncated generation)
    is skipped in favour of the last complete one.
    """
    for m in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, m.end())
        if content is not None:
            return content.strip()
    return None


def _answer_after(rest: str) -> str:
    """The answer that follows "the answer is": inline math, or the rest of the sentence."""
    math_m = re.match(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", rest, re.DOTALL)
    if math_m:
        return next(g for g in math_m.groups() if g is not None).strip()
    line = rest.split("\n", 1)[0]
    line = re.split(r"\.\s", line, maxsplit=1)[0]  # sentence end; "3.5" has no space after "."
    return line.strip().strip("*").strip().rstrip(".").strip("$").strip()


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model response, or None.

    Priority: last ``\\boxed{}``; else GSM8K-style ``#### N``; else a closing "A: N" line (OpenAI's
    GSM8K solutions); else "the answer is X" / "final answer is X" (last occurrence).
    """
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    hashes = _GSM8K_RE.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    if m := _A_LINE_RE.search("\n" + text.rstrip()):
        return m.group(1).strip()
    said = list(_ANSWER_IS_RE.finditer(text))
    if said:
        return _answer_after(text[said[-1].end() :]) or None
    return None


def reference_answer(solution: str) -> str:
    """The gold answer in a dataset's solution/answer field.

    GSM8K ``... #### 1,234`` -> ``"1234"``; a MATH solution -> its last boxed content; anything
    else is taken as the answer itself.
    """
    hashes = _GSM8K_RE.findall(solution)
    if not hashes and (m := _A_LINE_RE.search("\n" + solution.rstrip())):
        hashes = [m.group(1)]
    if hashes:
        return hashes[-1].strip().replace(",", "").replace("$", "").strip()
    boxed = extract_boxed(solution)
    return boxed if boxed is not None else solution.strip()


# --------------------------------------------------------------------------- normalisation

# A trailing unit in text, e.g. "5\text{ dollars}", "864 \mbox{ inches}^2".
_TEXT_UNIT_RE = re.compile(
    r"^(.+?)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .]*\}(\^\{?\d\}?)?$"
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
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGN_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:=|\\in(?![a-zA-Z]))([^=]+)$")


def normalize(ans: str) -> str:
    """Cheap canonical string for an answer; equal outputs mean equal answers.

    Only rewrites that cannot change the meaning: dollar signs, spacing commands, ``\\left`` /
    ``\\right``, ``\\dfrac``, degrees, percent, text units, thousands separators and a leading
    single-variable assignment (``x = 5`` -> ``5``).
    """
    s = ans.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[!,;:]|\{,\}", "", s)  # spacing; "10{,}000" is a thousands separator
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\displaystyle(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 == \frac{1}{2}
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt 2 == \sqrt{2}
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    s = _TEXT_UNIT_RE.sub(r"\1", s)
    s = _BARE_UNIT_RE.sub(r"\1", s)
    s = _WORD_UNIT_RE.sub(r"\1", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)  # \text{(C)} -> (C)
    s = s.replace("\\{", "{").replace("\\}", "}")
    # Drop whitespace, but keep "\pi r" from turning into the unknown command "\pir".
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", lambda m: m.group(1) + "\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    s = s.rstrip(".")
    if m := _ASSIGN_RE.match(s):
        s = m.group(1)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


# --------------------------------------------------------------------------- comparison

_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_FRACTION_RE = re.compile(r"^([+-]?)(?:\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|([+-]?\d+)/([+-]?\d+))$")
_REL_TOL = Fraction(1, 10**6)
_MAX_VERIFY_CHARS = 1000  # longer "answers" are prose; sympy on them can hang without a timeout


def _to_number(s: str) -> tuple[Fraction, bool] | None:
    """A normalised answer as (exact value, came from a decimal); None if not a plain number."""
    try:
        if _NUMBER_RE.match(s):
            return Fraction(s), any(c in s for c in ".eE")
        if m := _FRACTION_RE.match(s):
            sign, num, den = m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5)
            value = Fraction(int(num), int(den))
            return (-value if sign == "-" else value), False
    except (ValueError, ZeroDivisionError):
        pass
    return None


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool], percent: bool) -> bool:
    """Exact equality, relative tolerance when a decimal is involved.

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


_TIMEOUT_S = 5
"""Seconds math-verify may spend on one answer (parse + compare)."""


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _with_timeout(fn: Callable[[], bool | None]) -> bool | None:
    """``fn()`` with the per-answer timeout in any thread (collect grades in worker threads).

    Off the main thread signal.alarm is unavailable, so ``fn`` runs in a daemon thread that is
    abandoned after ``_TIMEOUT_S`` (sympy cannot be interrupted); a timeout counts as unequal.
    """
    if threading.current_thread() is threading.main_thread():
        return fn()
    box: list = []
    worker = threading.Thread(target=lambda: box.append(fn()), daemon=True, name="math-verify")
    worker.start()
    worker.join(_TIMEOUT_S)
    return box[0] if box else False  # timed out, or fn raised (it guards itself; be safe)


@lru_cache(maxsize=8192)
def _mv_parse(ans: str) -> tuple:
    """math-verify parse of a bare answer (wrapped as inline LaTeX); cached: references repeat."""
    if len(ans) > _MAX_VERIFY_CHARS:
        return ()
    # Imported here: math-verify pulls in sympy and antlr (~1 s), which the fast path and
    # every CLI start-up can do without.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    latex = "$" + re.sub(r"(?<!\\)\$", "", ans) + "$"
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(latex, extraction_config=config, parsing_timeout=_timeout()))


def _judge(pred: str, ref: str) -> bool | None:
    """True/False for equal/unequal; None when ``pred`` cannot be read as math at all."""
    norm_pred, norm_ref = normalize(pred), normalize(ref)
    if norm_pred and norm_pred == norm_ref:
        return True
    num_pred, num_ref = _to_number(norm_pred), _to_number(norm_ref)
    if num_pred is not None and num_ref is not None:
        return _numbers_equal(num_pred, num_ref, percent="%" in pred + ref)
    return _with_timeout(lambda: _symbolic(pred, ref, num_pred is not None))


def _symbolic(pred: str, ref: str, pred_is_number: bool) -> bool | None:
    """The slow path: math-verify (LaTeX -> sympy) on both sides."""
    # A grader must never crash a pipeline: a parse that errors is "unparseable", a comparison
    # that errors is "not equal".
    try:
        target = _mv_parse(pred)
    except Exception:
        target = ()
    if not pred_is_number and all(isinstance(t, str) for t in target):
        return None  # math-verify found nothing, or only fell back to the raw string
    try:
        from math_verify import verify

        gold = _mv_parse(ref)
        return bool(
            gold and target and verify(list(gold), list(target), timeout_seconds=_timeout())
        )
    except Exception:
        return False


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

    Use ``reference_answer`` first for raw dataset fields such as GSM8K's ``... #### 18``.
    """
    if reference is None or not reference.strip():
        raise ValueError("cannot grade without a reference answer")
    answer = extract_answer(response_or_answer) if extract else response_or_answer
    if answer is None or not answer.strip():
        return Verdict.no_answer
    outcome = _judge(answer, reference)  # guards math-verify itself; the rest is plain regex
    if outcome is None:
        return Verdict.unparseable
    return Verdict.correct if outcome else Verdict.incorrect
