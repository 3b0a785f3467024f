"""Reference answers from solutions that box more than one value (MATH).

About 90 of the 5,000 MATH test solutions box more than once. Reading all of them
(``python -m tirforge.trajectories.references ../shared/data/math/test.jsonl`` lists them) gives
three cases:

1. every box holds the same answer (alternative solutions, "- OR -"): the last box;
2. the problem asks for several values ("Find all solutions", "Enter all possible values,
   separated by commas", "Enter the angles ...") and the boxes differ: the distinct boxes joined
   with ", " in order (problem 414: ``\\boxed{-2}`` and ``\\boxed{1}`` -> ``-2, 1``);
3. otherwise the last box, which is the final result after an intermediate one (problem 91).

``MATH_EXCEPTIONS`` lists, by MATH ``idx``, the solutions no rule reads right. MATH500's
``answer`` field agrees with this rule on all 500 problems the sets share.
"""

from __future__ import annotations

import re

from tirforge.trajectories.extraction import boxes

__all__ = ["MATH_EXCEPTIONS", "boxed_reference", "multi_box_solutions"]

# Asks for every value: "all solutions/values/roots", "separated by commas", "Enter the angles".
_ASKS_FOR_SEVERAL_RE = re.compile(
    r"\ball\s+(?:the\s+)?(?:possible\s+|real\s+|complex\s+|integer\s+)*"
    r"(?:solutions|values|roots|zeros)\b|separated\s+by\s+commas?|separated\s+by\s+comma\(s\)",
    re.IGNORECASE,
)

MATH_EXCEPTIONS: dict[int, tuple[str, str]] = {
    # idx: (start of the problem, reference). Checked against the problem text so that another
    # ordering of the rows (a Hub copy) never applies an override to the wrong problem.
    # "Note: \boxed{3} is also accepted" comes after the answer -3.
    333: ("The sum of a 15-term arithmetic series", "-3"),
    # Either focus / vertex / point is accepted and both are boxed.
    2716: ("Find the coordinates of one of the foci", "(10, 0)"),
    2912: ("Find the coordinates of either of the vertices", "(\\tfrac32, -\\tfrac52)"),
    2936: ("The graph of $y = f(x)$ passes through the point $(-3,5)", "(3,-5)"),
    # \boxed{N} is the problem's own notation; the answer 6 is not boxed.
    4060: ("Let $\\boxed{N}$ mean the number of whole number divisors", "6"),
}
"""Solutions no rule reads right, by MATH ``idx``. 333, 2716, 2912, 2936 accept several answers
and box each (the reference keeps the first, which a grader then requires); 4060 uses ``\\boxed``
as the problem's own notation and leaves the answer (6) unboxed."""


def boxed_reference(solution: str, problem: str = "", idx: int | None = None) -> str | None:
    """The reference answer of a boxed solution under the rule of the module doc.

    ``idx``: the MATH row's ``idx`` (for ``MATH_EXCEPTIONS``); None for other sets. Returns None
    when the solution has no box.
    """
    if idx is not None and idx in MATH_EXCEPTIONS:
        start, answer = MATH_EXCEPTIONS[idx]
        if problem.startswith(start):
            return answer
    found = [c for _, _, c in boxes(solution)]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    from tirforge.trajectories.grading import answers_equal  # grading imports extraction

    distinct: list[str] = []
    for c in found:
        if not any(answers_equal(c, d) for d in distinct):
            distinct.append(c)
    if len(distinct) > 1 and _ASKS_FOR_SEVERAL_RE.search(problem):
        return ", ".join(distinct)
    return found[-1]


def multi_box_solutions(rows: list[dict]) -> list[tuple[int, list[str], str | None]]:
    """(idx, boxes, reference) of every row whose solution boxes more than once."""
    out = []
    for i, r in enumerate(rows):
        found = [c for _, _, c in boxes(r["solution"])]
        if len(found) > 1:
            idx = r.get("idx", i)
            out.append((idx, found, boxed_reference(r["solution"], r["problem"], idx)))
    return out


if __name__ == "__main__":
    import json
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/math/test.jsonl"
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    listed = multi_box_solutions(data)
    for idx, found, ref in listed:
        mark = " (exception)" if idx in MATH_EXCEPTIONS else ""
        print(f"{idx:>5}  boxes={found}  ->  {ref!r}{mark}")
    print(f"{len(listed)} of {len(data)} solutions box more than once")
