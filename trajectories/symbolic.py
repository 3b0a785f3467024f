"""The slow path of grading: LaTeX -> sympy with math-verify's parser, and nothing dropped.

math-verify's ``parse`` is built to find *an* answer in free text: when the LaTeX parser fails it
falls back to the first number it can match, and its unit normalisation strips trailing letters
(``3t`` -> ``3``). On a bare answer both turn a wrong answer into a right one
(``3 + \\frac{1}{\\mathrm{e}}`` -> ``3``). Here the whole string must parse: the ANTLR parser has
to reach the end of its input, else the answer is unreadable (``None``). Comparison adds three
guards before math-verify's ``verify``:

- a relation equals a value only when it is an assignment (``x = 2`` vs ``2``; not
  ``2x + 5y - 7 = 0`` vs ``0``);
- numbers (and tuples / sets / intervals of numbers) compare exactly when both are exact
  (rationals exactly, other constants to 1e-30 relative at 60 digits) and to 1e-6 relative when
  a decimal is involved, never with math-verify's absolute rounding (which makes ``10^{-30}``
  equal ``3 \\cdot 10^{-30}``);
- anything else goes to ``verify``.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["MAX_CHARS", "parse_strict", "symbolic_equal"]

MAX_CHARS = 1000
"""Longer "answers" are prose; sympy on them can hang."""

_REL_TOL_DECIMAL = 1e-6  # as the numeric fast path of grading.py
_REL_TOL_EXACT = 1e-30
_DIGITS = 60


@lru_cache(maxsize=8192)
def parse_strict(latex: str) -> tuple:
    """``(sympy_object, normalised_latex)`` for a bare LaTeX answer, or ``()`` if unreadable.

    Uses math-verify's LaTeX normalisation without its unit stripping, then its ANTLR parser,
    which must consume the whole string (a trailing unparsed part makes the answer unreadable).
    Raises nothing; cached because references repeat.
    """
    if not latex or len(latex) > MAX_CHARS:
        return ()
    # Imported here: math-verify pulls in sympy and antlr (~1 s), which the fast path and
    # every CLI start-up can do without.
    from antlr4 import Token
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, _Latex2Sympy
    from latex2sympy2_extended.math_normalization import normalize_latex
    from math_verify.grader import should_treat_as_complex

    config = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all"
    )
    try:
        text = normalize_latex(latex, config).strip()
        if not text:
            return ()
        converter = _Latex2Sympy(is_real=not should_treat_as_complex(text))
        parser = converter.create_parser(text)
        tree = parser.math()
        if parser.getCurrentToken().type != Token.EOF:
            return ()  # the parser stopped early: part of the answer would be dropped
        if tree.set_relation():
            expr = converter.convert_set_relation(tree.set_relation())
        elif tree.set_elements():
            expr = converter.convert_set_elements(tree.set_elements())
        elif tree.set_elements_relation():
            expr = converter.convert_set_elements_relation(tree.set_elements_relation())
        else:
            return ()
    except Exception:
        return ()
    return (expr, text)


def _has_float(expr) -> bool:
    import sympy

    try:
        return bool(expr.atoms(sympy.Float))
    except Exception:
        return False


def _number_equal(a, b, inexact: bool) -> bool:
    """Two sympy numbers (``is_number``): exact, or relative tolerance when a decimal is in play."""
    import sympy

    if a.is_Rational and b.is_Rational and not inexact:
        return bool(a == b)
    va, vb = sympy.N(a, _DIGITS), sympy.N(b, _DIGITS)
    scale = max(abs(va), abs(vb))
    if not scale.is_finite:  # oo, zoo, nan: only identical objects are equal
        return bool(a == b)
    if scale == 0:
        return True
    tol = _REL_TOL_DECIMAL if inexact else _REL_TOL_EXACT
    return bool(abs(va - vb) <= tol * scale)


def _numeric_equal(a, b, inexact: bool) -> bool | None:
    """Equality of numbers or same-kind tuples / sets / intervals of numbers; None: not numeric."""
    import sympy

    def is_num(x) -> bool:
        return isinstance(x, sympy.Expr) and bool(x.is_number) and not x.has(sympy.UnevaluatedExpr)

    if is_num(a) and is_num(b):
        return _number_equal(a, b, inexact)
    if isinstance(a, sympy.Tuple) and isinstance(b, sympy.Tuple):
        if len(a) != len(b) or not all(is_num(x) for x in (*a, *b)):
            return None
        return all(_number_equal(x, y, inexact) for x, y in zip(a, b, strict=True))
    if isinstance(a, sympy.FiniteSet) and isinstance(b, sympy.FiniteSet):
        xs, ys = list(a), list(b)
        if len(xs) != len(ys) or not all(is_num(x) for x in (*xs, *ys)):
            return None
        unmatched = list(ys)
        for x in xs:  # order-free matching; sets are small
            hit = next((y for y in unmatched if _number_equal(x, y, inexact)), None)
            if hit is None:
                return False
            unmatched.remove(hit)
        return True
    if isinstance(a, sympy.Interval) and isinstance(b, sympy.Interval):
        ends = (a.start, a.end, b.start, b.end)
        if not all(is_num(x) for x in ends):
            return None
        return (
            a.left_open == b.left_open
            and a.right_open == b.right_open
            and _number_equal(a.start, b.start, inexact)
            and _number_equal(a.end, b.end, inexact)
        )
    return None


def _is_assignment(rel) -> bool:
    """``x = ...`` (or a chain ``x = ... = ...``): one symbol on the left of an equation.

    Stricter than math-verify's ``is_assignment_relation``, which also counts ``x + y = 5``.
    """
    import sympy
    from math_verify.grader import is_equation, take_first_relation

    return is_equation(rel) and isinstance(take_first_relation(rel).lhs, sympy.Symbol)


def symbolic_equal(pred: str, ref: str, timeout: int | None) -> bool | None:
    """Whether two bare LaTeX answers are equal; None when ``pred`` cannot be read at all.

    ``timeout``: seconds for math-verify's ``verify`` (signal based, so None off the main
    thread, where the caller enforces its own). Raises nothing.
    """
    from math_verify.grader import is_relation, take_last_relation

    target = parse_strict(pred)
    if not target:
        return None
    gold = parse_strict(ref)
    if not gold:
        return False
    try:
        import math_verify.grader
        import sympy
        from math_verify import verify

        # The caller bounds this call (grading._with_timeout); math-verify would warn about it.
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True

        g, t = gold[0], target[0]
        g_rel, t_rel = is_relation(g), is_relation(t)
        if g_rel != t_rel:
            rel, other = (g, t) if g_rel else (t, g)
            if not isinstance(other, sympy.Set) and not _is_assignment(rel):
                return False  # "2x + 5y - 7 = 0" (or "x + y = 5") is not the number 0 (or 5)
            if not isinstance(other, sympy.Set):
                rhs = take_last_relation(rel).rhs
                g, t = (rhs, t) if g_rel else (g, rhs)
        numeric = _numeric_equal(t, g, _has_float(g) or _has_float(t))
        if numeric is not None:
            return numeric
        return bool(verify([g, gold[1]], [t, target[1]], timeout_seconds=timeout))
    except Exception:
        return False
