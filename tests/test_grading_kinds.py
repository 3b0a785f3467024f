"""Fault kinds of a verifier one trains against (issue 17): each kind, several instances.

Every instance states its expected value and why. False positives are rewards a policy would
learn to farm; false negatives throw correct paths away.
"""

from __future__ import annotations

import pytest

from tirforge.trajectories.grading import Verdict, answers_equal, extract_answer, grade

# (prediction, reference, expected, reason)
Case = tuple[str, str, bool, str]


def _params(cases: list[Case]):
    return [pytest.param(p, r, e, id=f"{p!r}~{r!r}") for p, r, e, _ in cases]


# --------------------------------------------------------------------------- token gluing
GLUING: list[Case] = [
    ("1 2", "12", False, "two numbers side by side are not one number"),
    ("32, 349", "32349", False, "comma then space separates list elements"),
    ("3 1/4", "31/4", False, "a mixed number: 3 + 1/4 = 13/4, not 31/4"),
    ("1,2,3", "123", False, "commas between non-3-digit groups separate a list"),
    ("12\\,34", "1234", False, "a thin space between groups not of 3 digits is only a space"),
    ("2 5", "10", False, "no implicit product of two numerals either"),
    ("12 345 6", "123456", False, "a 1-digit last group is not digit grouping"),
    ("1, 000", "1000", False, "', ' is a list separator even before 3 digits"),
    ("3 1/4", "13/4", True, "a whole number then a proper fraction is a mixed number"),
    ("2\\frac{1}{2}", "5/2", True, "LaTeX mixed number, as MATH writes them"),
    ("12{,}345", "12345", True, "{,} is LaTeX's thousands separator"),
    ("12\\,345", "12345", True, "a thin space between 3-digit groups is a thousands separator"),
    ("12,345", "12345", True, "a bare comma with 3-digit groups is a thousands separator"),
    ("1,234,567.5", "1234567.5", True, "several 3-digit groups and decimals"),
    ("10,\\!080", "10080", True, "MATH's ',\\!' separator"),
    # Debatable: SI / ISO 80000 group digits with a space; a list would use commas.
    ("1 000", "1000", True, "space-grouped 3-digit groups (SI style) are one number"),
]

# --------------------------------------------------------------------------- partial parses
PARTIAL: list[Case] = [
    ("3 + \\frac{1}{\\mathrm{e}}", "3", False, "the fraction term must not be dropped"),
    ("5\\sqrt(3)", "5", False, "\\sqrt(3) is a malformed \\sqrt{3}, not nothing"),
    ("3^{4}.", "3", False, "the exponent counts: 81"),
    ("2 - \\mathrm{e}", "2 + \\mathrm{e}", False, "the sign and the e both count"),
    ("2\\sqrt{2}", "2", False, "a coefficient is not the whole product"),
    ("5 + 2t", "5", False, "a trailing letter is a variable, not a unit to strip"),
    ("2^{10} - 1", "2", False, "the leading number of an expression is not its value"),
    ("\\frac{1}{2}x", "\\frac{1}{2}", False, "the variable factor counts"),
    ("4 \\cdot", "4", False, "an unfinished expression is not its first number"),
    ("3 + \\frac{1}{\\mathrm{e}}", "3 + e^{-1}", True, "\\mathrm{e} is Euler's e"),
    ("5\\sqrt(3)", "5\\sqrt{3}", True, "the malformed root is read as the root"),
    ("3^{4}.", "81", True, "trailing period dropped, power evaluated"),
    ("2 + \\mathrm{e}", "e + 2", True, "same sum in another order"),
]

# --------------------------------------------------------------------------- relations
RELATIONS: list[Case] = [
    ("2x + 5y - 7 = 0", "0", False, "an equation of a line is not the number 0"),
    ("x + y = 5", "5", False, "only a single variable on the left makes an assignment"),
    ("x^2 = 4", "4", False, "x^2 = 4 says x = ±2, not 4"),
    ("y = 2x + 1", "1", False, "the right side 2x + 1 is not 1"),
    ("x > 3", "3", False, "an inequality is not its bound"),
    ("x \\le 5", "5", False, "an inequality is not its bound"),
    ("0", "2x + 5y - 7 = 0", False, "the other way round too"),
    ("x = 2", "2", True, "an assignment states the value (conventionally correct)"),
    ("k = \\frac{1}{2}", "0.5", True, "an assignment, compared by value"),
    ("f(x) = 2x", "2x", True, "a function's definition states its value"),
    ("(-\\infty, 3]", "x \\le 3", True, "an interval and the inequality describing it"),
]

# --------------------------------------------------------------------------- tolerance
TOLERANCE: list[Case] = [
    ("\\frac{1}{100!}", "\\frac{1}{101!}", False, "exact values differ by a factor 101"),
    ("10^{-30}", "3 \\cdot 10^{-30}", False, "relative, not absolute, tolerance"),
    ("2^{-100}", "2^{-101}", False, "exact rationals compare exactly"),
    ("\\frac{1}{10^{12}}", "\\frac{2}{10^{12}}", False, "tiny but twice as large"),
    ("10^{20} + 1", "10^{20}", False, "exact integers: off by one is wrong"),
    ("e^{-50}", "0", False, "a tiny positive number is not zero"),
    ("1.4142 \\cdot 10^{-20}", "\\sqrt{2} \\cdot 10^{-20}", False, "1e-5 relative error"),
    ("\\frac{1}{100!}", "\\frac{1}{100 \\cdot 99!}", True, "the same exact value"),
    ("\\sqrt{8}", "2\\sqrt{2}", True, "equal irrationals"),
    ("10^{-3}", "0.001", True, "a decimal within 1e-6 relative"),
    ("0.3333333", "1/3", True, "a decimal within 1e-6 relative"),
]

# --------------------------------------------------------------------------- markdown
MARKDOWN: list[Case] = [
    ("**12**", "12", True, "bold"),
    ("__12__", "12", True, "bold, underscores"),
    ("*12*", "12", True, "italic"),
    ("***7***", "7", True, "bold italic"),
    ("`42`", "42", True, "inline code"),
    ("**\\frac{1}{2}**", "0.5", True, "bold LaTeX"),
    ("**$x = 3$**", "3", True, "bold math with an assignment"),
    ("**12** apples", "12", True, "bold number then a unit word"),
    ("x**2", "x2", False, "'**' inside an expression is a power, not bold"),
    ("**12**", "13", False, "markup removed, value still wrong"),
]

# --------------------------------------------------------------------------- repeating decimals
REPEATING: list[Case] = [
    ("0.\\overline{6}", "\\frac{2}{3}", True, "0.666... = 2/3"),
    ("0.\\overline{3}", "1/3", True, "0.333... = 1/3"),
    ("0.1\\overline{6}", "1/6", True, "0.1666... = 1/6"),
    ("0.\\overline{142857}", "\\frac{1}{7}", True, "period 6"),
    ("1.\\overline{3}", "4/3", True, "with an integer part"),
    ("-0.\\overline{09}", "-1/11", True, "negative, period 2"),
    ("2.\\overline{9}", "3", True, "2.999... = 3"),
    ("0.\\overline{6}", "0.6", False, "the bar matters"),
]

# --------------------------------------------------------------------------- exact constants
CONSTANTS: list[Case] = [
    ("\\cos(\\pi)", "-1", True, "cos π = -1"),
    ("e^{\\ln 5}", "5", True, "exp(ln 5) = 5"),
    ("\\sin(\\pi/6)", "\\frac12", True, "sin π/6 = 1/2"),
    ("\\log_2 8", "3", True, "log2 8 = 3 (a subscript digit is not a separate number)"),
    ("\\sqrt{16}", "4", True, "√16 = 4"),
    ("\\tan(\\pi/4)", "1", True, "tan π/4 = 1"),
    ("\\ln(e^3)", "3", True, "ln e^3 = 3"),
    ("\\binom{5}{2}", "10", True, "C(5,2) = 10"),
    ("5!", "120", True, "5! = 120"),
    ("\\cos(\\pi)", "1", False, "cos π is -1"),
    ("\\log_2 8", "2", False, "log2 8 is 3"),
]

# --------------------------------------------------------------------------- punctuation
PUNCTUATION: list[Case] = [
    ("\\frac{1}{3},", "\\frac{1}{3}", True, "trailing comma"),
    ("42.", "42", True, "trailing period"),
    ("x^2;", "x^2", True, "trailing semicolon"),
    ("\\sqrt{2}.", "\\sqrt{2}", True, "period after a command"),
    ("(1, 2),", "(1,2)", True, "comma after a tuple"),
    ("7。", "7", True, "Chinese full stop"),
    ("12:", "12", True, "trailing colon"),
    ("5!", "5", False, "'!' is a factorial, not punctuation"),
]

# --------------------------------------------------------------------------- debatable ones
ADVERSARIAL: list[Case] = [
    ("\\frac12", "\\frac{1}{2}", True, "brace-less \\frac of two digits"),
    ("[1, 2)", "[1,2)", True, "same half-open interval"),
    ("(1,2)", "[1,2]", False, "open and closed intervals differ"),
    # Kept from today's behaviour and Qwen's grader (the labelled sets rely on it).
    ("50\\%", "0.5", True, "x% may be written x/100"),
    ("50\\%", "50", True, "the percent sign is dropped"),
    ("1, -2", "-2, 1", True, "lists of solutions compare as sets"),
    ("\\{1, 2\\}", "2, 1", True, "a set literal and a list of its elements"),
]

ALL_KINDS = {
    "gluing": GLUING,
    "partial": PARTIAL,
    "relations": RELATIONS,
    "tolerance": TOLERANCE,
    "markdown": MARKDOWN,
    "repeating": REPEATING,
    "constants": CONSTANTS,
    "punctuation": PUNCTUATION,
    "adversarial": ADVERSARIAL,
}


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(GLUING))
def test_no_token_gluing(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(PARTIAL))
def test_no_partial_parse(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(RELATIONS))
def test_relation_is_not_a_number(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(TOLERANCE))
def test_relative_and_exact_tolerance(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected
    assert answers_equal(ref, pred) is expected  # symmetric


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(MARKDOWN))
def test_markdown_around_the_answer(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(REPEATING))
def test_repeating_decimals(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(CONSTANTS))
def test_exact_constants(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(PUNCTUATION))
def test_trailing_punctuation(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


@pytest.mark.parametrize(("pred", "ref", "expected"), _params(ADVERSARIAL))
def test_adversarial(pred: str, ref: str, expected: bool) -> None:
    assert answers_equal(pred, ref) is expected


# --------------------------------------------------------------------------- extraction
# (response, extracted answer, reason)
CUES: list[tuple[str, str, str]] = [
    ("**Answer:** 4.", "4", "markdown cue, trailing period"),
    ("Answer: $9$", "9", "cue then inline math"),
    ("Final Answer: The largest $n$ is 34.", "34", "the cue's sentence restates the question"),
    ("The answer is 72, which is the total.", "72", "a clause after a comma is not the answer"),
    ("所以答案是 5。", "5", "Chinese cue and full stop"),
    ("答案为 $\\frac{1}{2}$", "\\frac{1}{2}", "Chinese cue then math"),
    ("最终答案：12", "12", "Chinese cue with a full-width colon"),
    ("So the final answer is: 3/4.", "3/4", "'is:' cue"),
    ("The answer is Evelyn.", "Evelyn", "a word answer is kept"),
    ("The answer is: **8**.", "8", "bold answer after the cue"),
    ("**Final Answer**: 17", "17", "bold cue, colon outside the bold"),
    ("因此，答案是 12。", "12", "Chinese comma before the cue"),
    ("Thus we get 5 apples and then 7 more, so 12 in all.", "12", "no cue: the last number"),
    ("We find $x = 3$ here", "x = 3", "no cue: the last math span"),
]

ECHOED_BOXES: list[tuple[str, str, str]] = [
    ("So the answer is \\boxed{5}. Remember to put the answer in \\boxed{}.", "5",
     "an empty box echoed from the prompt"),
    ("\\boxed{7}\n\nNote: I used \\boxed at the end as asked.", "7", "\\boxed named in prose"),
    ("\\boxed{3}. (Please put your final answer within \\boxed{}.)", "3", "prompt echo"),
    ("\\boxed{12} and \\boxed{...}", "12", "a placeholder box"),
    ("\\boxed{4} \\boxed{answer}", "4", "a placeholder word"),
    ("\\boxed{\\frac{1}{2}} Remember: the \\boxed command must hold it", "\\frac{1}{2}",
     "'\\boxed command' is prose, not a brace-less box"),
    ("The answer is $\\boxed{5}$, written with \\boxed{ }", "5", "a blank box"),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=t[:40]) for t, e, _ in CUES])
def test_extraction_cues(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [pytest.param(t, e, id=t[:40]) for t, e, _ in ECHOED_BOXES]
)
def test_echoed_boxes_do_not_override(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


# (response, reference, verdict, reason)
SEVERAL_BOXES: list[tuple[str, str, str, str]] = [
    ("x = \\boxed{-2} and x = \\boxed{1}", "1, -2", "correct", "both roots, any order"),
    ("\\boxed{3} or \\boxed{\\frac{2}{5}}", "\\frac{2}{5}, 3", "correct", "joined by 'or'"),
    ("\\boxed{1}, \\boxed{2}, \\boxed{3}", "3,2,1", "correct", "three values"),
    ("$x=\\boxed{\\frac{\\pi}{4}}$ and $x=\\boxed{\\frac{5\\pi}{4}}$",
     "\\frac{\\pi}{4}, \\frac{5\\pi}{4}", "correct", "boxes inside separate math spans"),
    ("First try \\boxed{1}.\n\nActually the roots are \\boxed{-2} and \\boxed{3}", "-2, 3",
     "correct", "an earlier paragraph's box is not in the final statement"),
    ("\\boxed{-2} and \\boxed{5}", "1, -2", "incorrect", "one root wrong"),
    ("\\boxed{-2}", "1, -2", "incorrect", "a root missing"),
    ("\\boxed{-2} and \\boxed{1}", "1", "correct", "single reference: the last box, as before"),
]


@pytest.mark.parametrize(
    ("response", "reference", "verdict"),
    [pytest.param(t, r, v, id=t[:40]) for t, r, v, _ in SEVERAL_BOXES],
)
def test_several_boxes_against_a_set(response: str, reference: str, verdict: str) -> None:
    assert grade(response, reference) == Verdict(verdict)


def test_every_kind_has_enough_instances() -> None:
    counts = {k: len(v) for k, v in ALL_KINDS.items()}
    counts.update(cues=len(CUES), echoed_boxes=len(ECHOED_BOXES), several=len(SEVERAL_BOXES))
    assert min(counts.values()) >= 5, counts
