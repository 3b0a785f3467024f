"""Chat app: time from pressing Solve to the first streamed token, and what a graph compile costs.

    .venv/bin/python bench/chat_first_token.py [--questions 20]

Drives ``ChatServer.respond`` (what the Solve button calls) with a model that streams its first
token at once, so the time measured is the app's own path: session, kernel lease, graph
(compile or cache), checkpointer, backend call. Questions alternate temperature and format as a
person changing the settings would. Kernels are real (local sandbox) but no cell runs before
the first token. Printed: median and p90 time to first token, the number of graph compiles while
answering, the cost of one graph compile measured in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langgraph.graph import StateGraph  # noqa: E402

from tirforge.agent.backends.base import Completion, Request, SamplingParams  # noqa: E402
from tirforge.agent.graph import AgentConfig  # noqa: E402
from tirforge.apps.chat import ChatConfig, ChatServer  # noqa: E402
from tirforge.executors import ExecutorConfig  # noqa: E402


class FirstTokenBackend:
    """Streams one token through ``Request.on_text`` and answers: the first token is instant."""

    name = "first-token"

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        out = []
        for r in requests:
            if r.on_text is not None:
                r.on_text("The")
            out.append(Completion(text="The answer is \\boxed{4}.", finish_reason="eos",
                                  n_tokens=6))
        return out


def compile_graph() -> None:
    """One compile of the solve loop, through whichever API this checkout has."""
    try:  # before issue 15: one compile per question (config in the cache key, checkpointer)
        from tirforge.agent.graph import build_graph

        build_graph(None, None, AgentConfig())
    except ImportError:  # after: compiled once per process
        from tirforge.agent import graph
        from tirforge.agent.nodes import sync_nodes

        graph._compile(sync_nodes())


COMPILES = [0]
_compile = StateGraph.compile


def _counted_compile(self, *a, **kw):
    COMPILES[0] += 1
    return _compile(self, *a, **kw)


StateGraph.compile = _counted_compile  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ChatServer(
            FirstTokenBackend,
            ExecutorConfig(backend="local", sandbox="auto", timeout=30),
            AgentConfig(max_turns=4),
            ChatConfig(max_sessions=1, db_path=os.path.join(tmp, "threads.sqlite")),
            model_name="first-token",
        )
        assert server.wait_ready(120), "server did not start"
        assert not server.sandbox_error and not server.load_error, (
            server.sandbox_error or server.load_error
        )
        compiled_before = COMPILES[0]
        ttft: list[float] = []
        try:
            for i in range(args.questions):
                settings = {"temperature": (0.0, 0.7)[i % 2],
                            "fmt": ("qwen-tir", "qwen-cot")[(i // 2) % 2]}
                t0 = time.perf_counter()
                first = None
                for msgs in server.respond("bench", f"What is 2 + {i}?",
                                           thread_id=f"bench-{i}-{time.time_ns()}", **settings):
                    if first is None and any(m.get("content") == "The" for m in msgs):
                        first = time.perf_counter() - t0
                assert first is not None, "no token was streamed"
                ttft.append(first)
        finally:
            server.close()
    compiles = COMPILES[0] - compiled_before
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        compile_graph()
    compile_s = (time.perf_counter() - t0) / reps
    warm = ttft[1:] or ttft
    med = statistics.median(warm)
    p90 = sorted(warm)[int(0.9 * (len(warm) - 1))]
    print(f"questions: {len(ttft)} (first, cold: {ttft[0] * 1e3:.1f} ms); "
          f"graph compiles while answering them: {compiles}")
    print(f"time to first token, median {med * 1e3:.1f} ms, p90 {p90 * 1e3:.1f} ms")
    print(f"one graph compile: {compile_s * 1e3:.1f} ms "
          f"(first token / compile = {med / compile_s:.2f})")


if __name__ == "__main__":
    main()
