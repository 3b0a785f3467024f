"""Reading model output: instruction lists, verifier JSON, yes/no verdicts; static checks.

Everything here is pure text handling; a model's code is only parsed (``ast``), never run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

NETWORK_MODULES = frozenset({
    "socket", "urllib", "urllib2", "urllib3", "http", "httpx", "requests", "aiohttp", "ftplib",
    "smtplib", "telnetlib", "ssl", "subprocess", "multiprocessing", "ctypes", "asyncio",
})
"""Imports that make a verifier fail before it runs: a check on a response's text needs no
network, processes or foreign calls (the kernel has no network anyway; this is the cheap
first line)."""

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|\(\d+\))\s*")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
    """Dedup key of an instruction: lower case, runs of non-alphanumerics as one space."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def text_id(*parts: str) -> str:
    """A short stable id (12 hex digits of sha1) of normalised text parts."""
    return hashlib.sha1("\x1f".join(normalize(p) for p in parts).encode()).hexdigest()[:12]


def instruction_lines(text: str, min_chars: int = 12, max_chars: int = 300) -> list[str]:
    """Candidate instructions in a model's list: one a line, bullets/numbers stripped; lines
    too short or long to be one instruction, or that are headings, are dropped."""
    out = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip().strip('"').strip()
        if min_chars <= len(line) <= max_chars and not line.endswith(":"):
            out.append(line)
    return out


class BadJSON(ValueError):
    """The model's text holds no JSON object of the expected shape."""


def _json_candidates(text: str) -> list[str]:
    fenced = re.findall(r"```(?:json)?\s*\n(.*?)```", text, flags=re.S)
    cands = [f for f in fenced if f.strip().startswith("{")]
    start = text.find("{")
    if start >= 0:
        depth, in_str, esc = 0, False, False
        for i in range(start, len(text)):
            c = text[i]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
                continue
            if c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    cands.append(text[start : i + 1])
                    break
    return cands


@dataclass
class VerifierDraft:
    """One generation of stage 3: a function's source and its test cases."""

    function: str
    cases: list[tuple[str, bool]] = field(default_factory=list)


def parse_verifier(text: str) -> VerifierDraft:
    """``{"function": "def evaluate(response): ...", "cases": [{"input": str, "output":
    bool}, ...]}`` from a model's text (fenced or bare). Raises BadJSON when no candidate
    parses to that shape. Cases with a non-string input or non-bool output are dropped."""
    for cand in _json_candidates(text):
        try:
            obj: Any = json.loads(cand)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("function"), str):
            continue
        cases = []
        for c in obj.get("cases") or []:
            if isinstance(c, dict) and isinstance(c.get("input"), str) \
                    and isinstance(c.get("output"), bool):
                cases.append((c["input"], c["output"]))
        return VerifierDraft(obj["function"], cases)
    raise BadJSON("no JSON object with a 'function' string")


def static_reject(source: str) -> str | None:
    """Why ``source`` cannot be a verifier without running it (None: it may run): a syntax
    error, no top-level ``evaluate``, or an import of a network/process module."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:
        return f"syntax: {e.msg if isinstance(e, SyntaxError) else e}"
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            names = [a.value for a in node.args if isinstance(a, ast.Constant)
                     and isinstance(a.value, str)]
        bad = [n for n in names if n.split(".")[0] in NETWORK_MODULES]
        if bad:
            return f"imports {bad[0]}"
    if not any(isinstance(n, ast.FunctionDef) and n.name == "evaluate" for n in tree.body):
        return "no evaluate() function"
    return None


def canonical_source(source: str) -> str:
    """Source with formatting and comments removed (``ast.unparse``), to count distinct
    functions; the source itself when it does not parse."""
    try:
        return ast.unparse(ast.parse(source))
    except (SyntaxError, ValueError):
        return source.strip()


def yes_no(text: str) -> bool | None:
    """The first "yes" or "no" word of a judge's answer (None: neither)."""
    m = re.search(r"\b(yes|no)\b", text.lower())
    return None if m is None else m.group(1) == "yes"
