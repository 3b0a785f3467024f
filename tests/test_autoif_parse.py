"""AutoIF's readers of model text (no model, no kernel)."""

from __future__ import annotations

import pytest

from tirforge.agent.pipelines.autoif.parse import (
    BadJSON,
    canonical_source,
    instruction_lines,
    normalize,
    parse_verifier,
    static_reject,
    yes_no,
)


def test_parse_verifier_bare_and_fenced_with_braces_in_strings():
    bare = 'Sure! {"function": "def evaluate(r):\\n    return \'}\' not in r", ' \
           '"cases": [{"input": "a}b", "output": false}, {"input": 3, "output": true}, ' \
           '{"input": "x", "output": "yes"}]} trailing'
    d = parse_verifier(bare)
    assert d.function.startswith("def evaluate") and d.cases == [("a}b", False)]
    fenced = '```json\n{"function": "def evaluate(r): return True", "cases": []}\n```'
    assert parse_verifier(fenced).cases == []


@pytest.mark.parametrize("text", ["", "no json here", '{"function": 3}', '["function"]',
                                  '{"function": "x", "cases": [}'])
def test_parse_verifier_bad_json(text):
    with pytest.raises(BadJSON):
        parse_verifier(text)


def test_static_reject_kinds():
    assert static_reject("def evaluate(r):\n    return True") is None
    src = "import urllib.request\ndef evaluate(r): return 1"
    assert static_reject(src) == "imports urllib.request"
    assert static_reject("from http import client\ndef evaluate(r): return 1") == "imports http"
    assert static_reject("def evaluate(r):\n    return __import__('socket')") == "imports socket"
    assert static_reject("def check(r): return 1") == "no evaluate() function"
    assert static_reject("def evaluate(r:\n").startswith("syntax")


def test_text_helpers():
    assert instruction_lines("Here are some:\n1. Use exactly two words.\n- short\n* End with a "
                             "question mark.") == ["Use exactly two words.",
                                                   "End with a question mark."]
    assert normalize("Answer in LOWERCASE!") == normalize("answer in lowercase")
    assert canonical_source("def evaluate(r):  # c\n    return  True") == \
        canonical_source("def evaluate(r):\n    return True")
    assert yes_no("Yes, they do.") is True and yes_no("no") is False and yes_no("maybe") is None
