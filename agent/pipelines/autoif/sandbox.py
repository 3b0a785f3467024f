"""Running model-written verifiers on responses, inside a kernel and never in this process.

Each function is defined in a fresh namespace of a freshly reset kernel, then called once per
response in its own cell with a time limit; the boolean comes back as the cell's value. A
function that times out, kills the kernel or floods the output on any call is disqualified (all
its results None); one that raises or returns a non-bool on a call gets None for that call.
Imports of network/process modules are refused before anything runs (``parse.static_reject``);
the sandbox (no network, rlimits) contains whatever slips past.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tirforge.agent.pipelines.autoif.parse import static_reject

AUTOIF_PRELOAD = "import re, json, string, collections, math\n"
"""What a verifier kernel preloads: the modules text checks use (no numpy/sympy start cost)."""

_DEFINE = '''
def _aif_define(src):
    ns = {"__name__": "verifier"}
    try:
        exec(compile(src, "<verifier>", "exec"), ns)
    except BaseException as e:
        return "error " + type(e).__name__
    f = ns.get("evaluate")
    if not callable(f):
        return "error no evaluate"
    globals()["_aif_fn"] = f
    return "ok"
_aif_define(SRC)
'''

_CALL = '''
_aif_r = _aif_fn(RESP)
"AIF:" + ("T" if _aif_r is True or (type(_aif_r).__name__ == "bool_" and bool(_aif_r))
          else "F" if _aif_r is False or type(_aif_r).__name__ == "bool_" else "X")
'''


@dataclass
class FunctionRun:
    """One verifier's results on a list of responses."""

    status: str = "ok"
    """ok | rejected: <why> (never ran) | error <exc> (definition raised) | timeout |
    flood (printed too much) | died (the kernel died or restarted)."""
    results: list[bool | None] = field(default_factory=list)
    """Per response: True/False, or None (raised, non-bool, or disqualified)."""
    errors: int = 0
    """Calls that raised or returned a non-bool."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _flooded(res: Any, max_chars: int) -> bool:
    out = (res.stdout or "") + (res.stderr or "")
    return len(out) > max_chars or "...[truncated " in out


def run_function(kernel: Any, source: str, responses: Sequence[str], *, timeout: float,
                 max_output_chars: int) -> FunctionRun:
    """``source``'s ``evaluate`` on each of ``responses`` in ``kernel`` (an Executor). The
    kernel is reset first, so no earlier function's state is visible."""
    n = len(responses)
    why = static_reject(source)
    if why is not None:
        return FunctionRun(status=f"rejected: {why}", results=[None] * n)
    kernel.reset()
    res = kernel.run(_DEFINE.replace("SRC", repr(source)), timeout=timeout)
    bad = _disqualify(res, max_output_chars)
    if bad:
        return FunctionRun(status=bad, results=[None] * n)
    if res.result != "'ok'":
        status = (res.result or "'error'").strip("'")
        return FunctionRun(status=status, results=[None] * n)
    run = FunctionRun()
    for resp in responses:
        res = kernel.run(_CALL.replace("RESP", repr(resp)), timeout=timeout)
        bad = _disqualify(res, max_output_chars)
        if bad:
            return FunctionRun(status=bad, results=[None] * n, errors=run.errors)
        value = {"'AIF:T'": True, "'AIF:F'": False}.get(res.result or "")
        run.errors += value is None
        run.results.append(value)
    return run


def _disqualify(res: Any, max_output_chars: int) -> str | None:
    if res.timed_out:
        return "timeout"
    if res.restarted or res.error_name == "KernelDied":
        return "died"
    if _flooded(res, max_output_chars):
        return "flood"
    return None


def run_functions(pool: Any, sources: Sequence[str], responses: Sequence[str], *,
                  timeout: float, max_output_chars: int) -> list[FunctionRun]:
    """Every function of ``sources`` on every response, on one kernel leased from ``pool``
    (a KernelPool)."""
    if not sources:
        return []
    with pool.kernel() as kernel:
        return [run_function(kernel, s, responses, timeout=timeout,
                             max_output_chars=max_output_chars) for s in sources]
