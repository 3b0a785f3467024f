"""LangGraph's SQLite checkpointer: an interrupted session resumes by thread id."""

import sqlite3

import pytest
from langgraph.checkpoint.sqlite import SqliteSaver

from tirforge.agent.backends.replay import ReplayBackend, ReplayExhausted
from tirforge.agent.graph import AgentConfig, solve
from tirforge.executors import LocalKernelExecutor

CODE = "```python\nx = 6 * 7\nprint(x)\n```"


def test_resume_by_thread_id(tmp_path):
    db = tmp_path / "sessions.sqlite"
    with LocalKernelExecutor(timeout=10) as kernel:
        # First process: the model dies (script runs out) after the code ran.
        with sqlite3.connect(db, check_same_thread=False) as conn:
            with pytest.raises(ReplayExhausted):
                solve("6*7?", ReplayBackend([CODE]), kernel,
                      checkpointer=SqliteSaver(conn), thread_id="chat-1")
        # A new connection (as after a restart) picks the session up where it stopped.
        with sqlite3.connect(db, check_same_thread=False) as conn:
            saver = SqliteSaver(conn)
            backend = ReplayBackend(["Uses x: \\boxed{42}"])
            traj = solve("ignored: the saved problem wins", backend, kernel,
                         checkpointer=saver, thread_id="chat-1", reference="42")
            assert traj.problem == "6*7?"
            assert [s.output.strip() if s.output else None for s in traj.steps] == ["42", None]
            assert "```output\n42\n```" in backend.calls[0].prefix
            assert traj.verdict == "correct"
            # A finished thread is returned as is, without calling the model again.
            again = solve("6*7?", ReplayBackend([]), kernel, checkpointer=saver,
                          thread_id="chat-1")
            assert again.final_answer == "42" and len(again.steps) == 2
            # Another thread id is a fresh session.
            other = solve("1+1?", ReplayBackend(["\\boxed{2}"]), kernel, checkpointer=saver,
                          thread_id="chat-2", config=AgentConfig())
            assert other.final_answer == "2" and len(other.steps) == 1
