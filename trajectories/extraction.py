"""Finding the final answer in a model response or a dataset solution.

Priority, as in math-verify and Qwen2.5-Math's evaluation: the last real ``\\boxed{}``; else
GSM8K's ``#### N``; else a closing ``A: N`` line (OpenAI's GSM8K solutions); else the answer
after the last cue ("the answer is", "Answer:", "Final Answer:", 答案是 / 答案为 / 答案：); else
the last math span or number in the text.
"""

from __future__ import annotations

import re

__all__ = [
    "boxes",
    "extract_answer",
    "extract_boxed",
    "final_boxes",
    "reference_answer",
    "strip_markup",
]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# Box contents that are not answers: a prompt echoed after the real box ("put your answer in
# \boxed{}"), a placeholder, or MATH's \boxed{\phantom{2}} blanks.
_PLACEHOLDER_RE = re.compile(
    r"^(?:\s*|\.\.\.|\\[lc]?dots|\\phantom\{[^{}]*\}|(?:your |the |final )*answer(?: here)?|"
    r"ANSWER|\\text\{\s*(?:your |final )*answer\s*\})$",
    re.IGNORECASE,
)
# Brace-less "\boxed 5" / "\boxed A": one number or one letter, as TeX would read it; a word
# ("\boxed at the end", prose about the command) is not a box.
_BARE_BOX_ARG_RE = re.compile(r"[-+]?(?:\d[\d.,/]*\d|\d|\.\d+)|[A-Za-z](?![A-Za-z])")
# "#### 18" but not a markdown heading such as "#### Step 1": the answer starts with a number.
_GSM8K_RE = re.compile(r"####[ \t]*(\$?[ \t]*[-+]?\.?\d[^\n]*)")
# OpenAI's GSM8K model solutions end on a line "A: 18" (a number, so prose "A: ..." is left alone).
_A_LINE_RE = re.compile(r"\n[ \t]*A:[ \t]*(\$?[ \t]*[-+]?\.?\d[^\n]*?)[ \t]*\Z")
# Cues before a stated answer; markdown emphasis may wrap the cue ("**Answer:** 4").
_MD = r"(?:\*\*|__|\*|_)?"
_CUE_RE = re.compile(
    rf"{_MD}(?:(?:final answer|the answer|answer){_MD}\s*(?:is\b\s*:?|[:：=])|"
    rf"(?:最终|最后)?答案\s*(?:应该|应)?\s*(?:是|为|：|:|=))",
    re.IGNORECASE,
)
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|[-+]?\.\d+%?")
# Bold that opens and closes around text, never "x**2" (a Python power): "**12** apples".
_INLINE_BOLD_RE = re.compile(r"(?<![\w*])(\*\*|__)(?=\S)(.+?)(?<=\S)\1(?![\w*])")
_MARKDOWN_WRAP_RE = re.compile(r"^(\*\*|__|\*|_|`)(.+)\1$", re.DOTALL)
_MARKUP_END = set(".,;:。，；：*_`$)]")
_MARKUP_START = set("*_`$\\")
_TRAILING_PUNCT_RE = re.compile(r"[\s.,;:。，；：]+$")  # not "!" (factorial) or "?"


def strip_markup(ans: str) -> str:
    """``ans`` without markdown emphasis around it, math delimiters and trailing punctuation.

    ``**12**`` / ``__12__`` / ``*12*`` -> ``12``; ``\\frac{1}{3},`` -> ``\\frac{1}{3}``; a dollar
    before a number (``$18.90``) is kept for the unit stripping of ``normalize``.
    """
    s = ans.strip()
    if not s or (s[-1] not in _MARKUP_END and s[0] not in _MARKUP_START and "**" not in s
                 and "__" not in s):
        return s
    s = _INLINE_BOLD_RE.sub(r"\2", s)
    while True:
        prev = s
        s = _TRAILING_PUNCT_RE.sub("", s)
        if m := _MARKDOWN_WRAP_RE.match(s):
            s = m.group(2).strip()
        if len(s) > 1 and s.startswith("$") and s.endswith("$") and not s.startswith("$$$"):
            s = s.strip("$").strip()
        elif s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2].strip()
        if s == prev:
            return s


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start``; None when it has none or never closes."""
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
    m = _BARE_BOX_ARG_RE.match(text, i)
    return m.group(0) if m else None


def boxes(text: str) -> list[tuple[int, int, str]]:
    """Every real box in ``text`` as (start, end, stripped content), in order.

    Skipped: boxes whose braces never close (a truncated generation), empty boxes and
    placeholders (``\\boxed{}``, ``\\boxed{...}``, ``\\boxed{answer}``, ``\\boxed{\\phantom{2}}``)
    and brace-less mentions that are not one number or letter (``\\boxed at the end``).
    """
    out = []
    for m in _BOX_RE.finditer(text):
        content = _box_content(text, m.end())
        if content is None or _PLACEHOLDER_RE.match(content.strip()):
            continue
        end = text.find(content, m.end()) + len(content)
        out.append((m.start(), end, content.strip()))
    return out


def extract_boxed(text: str) -> str | None:
    """Content of the last real ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in ``text``.

    Nested braces are matched properly; see ``boxes`` for what does not count as a box.
    """
    found = boxes(text)
    return found[-1][2] if found else None


_BOX_JOINER_RE = re.compile(r",|;|\band\b|\bor\b|\\\\")  # ", and or ; \\" (align rows)


def final_boxes(text: str) -> list[str]:
    """The boxes of the final statement: the last box and those just before it.

    Two boxes belong to the same statement when the text between them has no blank line, is at
    most 80 characters and joins them (a comma, "and", "or", a line break of an ``align``):
    ``x = \\boxed{-2} and x = \\boxed{1}`` gives ``["-2", "1"]``; an earlier box in another
    paragraph (a first attempt, an intermediate result) is not part of it.
    """
    found = boxes(text)
    if not found:
        return []
    run = [found[-1]]
    for prev in reversed(found[:-1]):
        gap = text[prev[1] : run[0][0]].lstrip("}")
        if "\n\n" in gap or len(gap) > 80:
            break
        if not _BOX_JOINER_RE.search(gap):  # anywhere: "$ and $x = " joins too
            break
        run.insert(0, prev)
    return [c for _, _, c in run]


def _last_math_or_number(text: str) -> str | None:
    """The last inline math span or number in ``text`` (math-verify's un-anchored fallback)."""
    best: tuple[int, str] | None = None
    for m in _MATH_SPAN_RE.finditer(text):
        content = next(g for g in m.groups() if g is not None).strip()
        if content:
            best = (m.end(), content)
    outside = _MATH_SPAN_RE.sub(lambda m: " " * len(m.group(0)), text)
    for m in _NUMBER_RE.finditer(outside):
        if best is None or m.end() > best[0]:
            best = (m.end(), m.group(0))
    return best[1] if best else None


# End of the stated answer: a sentence end (not a decimal point), a Chinese full stop or
# comma, or a comma before a clause ("72, which is the total"; a list "1, 2" goes on).
_SENTENCE_END_RE = re.compile(r"[.!?;](?:\s|$)|[。！？；，]|,\s+(?=[^\W\d_])|\n")


def _answer_after(rest: str) -> str | None:
    """The answer that follows a cue: leading inline math, else the rest of the sentence.

    A sentence that restates the question ("The largest $n$ is 34.") gives its last math span
    or number; a bare word ("Evelyn") is kept as a text answer.
    """
    rest = rest.lstrip(" \t")
    if rest[:2] in ("**", "__") and rest[2:3].isspace():
        rest = rest[2:].lstrip(" \t")  # the closing bold of "**Answer:** 4"
    if rest.startswith(("**", "__")) and (m := _INLINE_BOLD_RE.match(rest)):
        rest = m.group(2) + rest[m.end() :]  # "**8**." -> "8."
    math_m = _MATH_SPAN_RE.match(rest)
    if math_m:
        return next(g for g in math_m.groups() if g is not None).strip() or None
    cut = _SENTENCE_END_RE.search(rest)
    sentence = rest[: cut.start()] if cut else rest
    sentence = strip_markup(sentence)
    if re.match(r"[^\W\d_]", sentence) and re.search(r"\s", sentence):
        # Prose ("The largest $n$ is 34"): the answer is its last math span or number.
        return _last_math_or_number(sentence) or sentence or None
    return sentence or None


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model response, or None when there is none (see module doc)."""
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
    said = list(_CUE_RE.finditer(text))
    if said and (ans := _answer_after(text[said[-1].end() :])):
        return strip_markup(ans) or None
    last = _last_math_or_number(text)
    return strip_markup(last) if last else None


def reference_answer(solution: str) -> str:
    """The gold answer in a dataset's solution/answer field.

    GSM8K ``... #### 1,234`` -> ``"1234"``; a MATH solution -> its last boxed content (for
    several boxes see ``tirforge.trajectories.references``); anything else is taken as the
    answer itself.
    """
    hashes = _GSM8K_RE.findall(solution)
    if not hashes and (m := _A_LINE_RE.search("\n" + solution.rstrip())):
        hashes = [m.group(1)]
    if hashes:
        return hashes[-1].strip().replace(",", "").replace("$", "").strip()
    boxed = extract_boxed(solution)
    return boxed if boxed is not None else solution.strip()
