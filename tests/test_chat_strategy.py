"""Sampling strategies in the chat app (best-of-n, majority, RM-weighted majority), without a
browser: ``ChatServer.respond`` against real sandboxed kernels and the scripted model of
``test_chat_app``, whose samples of one problem give different answers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tirforge.agent.graph import AgentConfig
from tirforge.apps.chat import ChatConfig, ChatServer
from tirforge.apps.chat_render import NO_RM, samples_summary
from tirforge.executors import ExecutorConfig
from tirforge.trajectories.schema import Trajectory

from .test_chat_app import ScriptedBackend

pytestmark = pytest.mark.timeout(120)


def make_server(tmp_path: Path, **kw) -> ChatServer:
    server = ChatServer(
        ScriptedBackend,
        ExecutorConfig(backend="local", sandbox="bwrap", timeout=60),
        AgentConfig(max_turns=4),
        ChatConfig(max_sessions=2, db_path=str(tmp_path / "threads.sqlite"), max_samples=3),
        model_name="scripted",
        **kw,
    )
    assert server.wait_ready(120) and not server.sandbox_error and not server.load_error
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = make_server(tmp_path_factory.mktemp("strategy"))
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _release_sessions(request):
    """Each test's sessions give their kernels back (the pool has two)."""
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        for key in list(srv.sessions):
            srv.release(key)


def ask(server: ChatServer, key: str, problem: str, **kw) -> list[list[dict]]:
    """Every yield of one question."""
    server._backend.starts.clear()  # type: ignore[union-attr]  # sample 1 plays script 1
    return list(server.respond(key, problem, thread_id=f"{key}-{time.monotonic()}", **kw))


def text(msgs: list[dict]) -> str:
    return "\n".join(m["content"] for m in msgs if isinstance(m["content"], str))


@pytest.mark.parametrize(
    ("strategy", "answer", "picked", "why"),
    [
        ("majority", "7", 0, "$7$ got 2 of 3 votes"),
        ("best-of-n", "9", 1, "highest score, 1.50"),
    ],
)
def test_majority_and_best_of_n_pick_differently(server, strategy, answer, picked, why):
    key = f"pick-{strategy}"
    yields = ask(server, key, "Let the samples vote", strategy=strategy, n=3, temperature=0.0)
    s = server.sessions[key]
    assert [t.final_answer for t in s.samples] == ["7", "9", "7"]
    assert s.trajectories[-1] is s.samples[picked]
    assert s.trajectories[-1].final_answer == answer
    # Progress while sampling; at the end the chosen steps, its answer, then the summary.
    assert any("sample 2/3" in text(y) for y in yields)
    last = yields[-1]
    assert f"Final answer: $\\boxed{{{answer}}}$" in last[-2]["content"]
    summary = last[-1]
    assert summary["metadata"]["title"] == f"{strategy}: picked sample {picked + 1} of 3 — {why}"
    assert "temperature 0.7" in summary["content"]  # 0 was asked for; the samples say why not
    assert all(t.sampling["temperature"] == 0.7 for t in s.samples)
    if strategy == "best-of-n":
        assert NO_RM in summary["content"]
        assert [round(t.score, 2) for t in s.samples] == [1.15, 1.5, 1.15]


@pytest.mark.parametrize(("strategy", "kept"), [("majority", 7), ("best-of-n", 9)])
def test_follow_ups_see_the_chosen_samples_variables(server, strategy, kept):
    key = f"follow-{strategy}"
    ask(server, key, "Let the samples vote", strategy=strategy, n=3)
    yields = ask(server, key, "Which value was chosen?")
    s = server.sessions[key]
    assert s.trajectories[-1].steps[0].execution.stdout.strip() == f"picked {kept}"
    assert "Final answer" in text(yields[-1])
    # Closing the page gives every kernel back to the pool it came from: both are whole again.
    server.release(key)
    pools_whole(server)


def pools_whole(server: ChatServer, timeout: float = 20) -> None:
    # (The sample pool starts only where samples cannot fork the session kernel.)
    pools = [p for p in (server._pool, server._sample_pool) if p is not None]
    deadline = time.monotonic() + timeout
    # Whole: every kernel the pool keeps (its leases and its spares) is back and reset.
    while any(p.idle < p.capacity for p in pools) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.idle for p in pools] == [p.capacity for p in pools]


def test_samples_of_a_follow_up_start_from_the_conversations_variables(server):
    key = "replay"
    ask(server, key, "Please remember a number")
    ask(server, key, "Now recall it", strategy="majority", n=3)
    s = server.sessions[key]
    assert len(s.samples) == 3
    # Samples 2 and 3 ran on forks of the session kernel, which holds `secret = 41`.
    assert [t.steps[0].execution.stdout.strip() for t in s.samples] == ["True"] * 3
    assert any("secret = 41" in c for c in s.kernel_cells)
    assert server._sample_pool is None  # forks: no second pool was needed


def test_export_and_reload_have_the_chosen_trajectory(server):
    key = "export"
    thread = "export-thread"
    server._backend.starts.clear()  # type: ignore[union-attr]
    list(server.respond(key, "Let the samples vote", strategy="best-of-n", n=3, thread_id=thread))
    s = server.sessions[key]
    lines = Path(server.export(key)).read_text().splitlines()
    assert len(lines) == 1
    traj = Trajectory.model_validate_json(lines[0])
    assert traj.final_answer == "9" and traj.sample == 1 and traj.problem == "Let the samples vote"
    # The page keeps the chosen sample's checkpointer thread; a reload replays that one.
    assert s.thread_id == f"{thread}-2"
    assert server.replay_thread(s.thread_id).final_answer == "9"


def test_stop_cancels_the_remaining_samples_and_interrupts_their_kernel(server):
    key = "stop"
    server._backend.starts.clear()  # type: ignore[union-attr]
    t0 = None
    last: list[dict] = []
    for msgs in server.respond(key, "Take a nap", strategy="majority", n=3, thread_id="nap"):
        last = msgs
        if t0 is None and "sample 2/3" in text(msgs) and "running" in str(msgs):
            time.sleep(0.5)  # the 120 s cell is in the second sample's kernel now
            t0 = time.monotonic()
            server.stop(key)
    assert t0 is not None and time.monotonic() - t0 < 15
    assert "stopped at sample 2/3" in text(last) and "you stopped it" in text(last)
    assert server._backend.starts["nap"] == 1  # type: ignore[union-attr]  # no third sample
    s = server.sessions[key]
    assert s.sample_kernels == [] and s.trajectories == []
    # The session still works; then, released, every kernel is back (and reset).
    assert "Final answer" in text(ask(server, key, "Please remember a number")[-1])
    server.release(key)
    pools_whole(server)


class FavourNine:
    """A stand-in reward model that is sure 9 is right."""

    def score(self, trajectories: list[Trajectory]) -> list[float]:
        return [5.0 if t.final_answer == "9" else 1.0 for t in trajectories]


def test_weighted_majority_uses_the_scorer(tmp_path):
    server = make_server(tmp_path, scorer=FavourNine())
    try:
        assert server.strategies == ["greedy", "best-of-n", "majority", "weighted-majority"]
        assert server.scorer_label == "scored by FavourNine"
        yields = ask(server, "w", "Let the samples vote", strategy="weighted-majority", n=3)
        s = server.sessions["w"]
        assert s.trajectories[-1].final_answer == "9"  # 5 outweighs 1 + 1
        title = yields[-1][-1]["metadata"]["title"]
        assert title == "weighted-majority: picked sample 2 of 3 — $9$ has the highest total " \
            "score, 5.00"
    finally:
        server.close()


def test_strategies_offered_without_a_scorer(server):
    assert server.strategies == ["greedy", "best-of-n", "majority"]
    assert server.scorer_label == NO_RM
    yields = list(server.respond("x", "Let the samples vote", strategy="weighted-majority", n=3))
    assert "unknown strategy" in text(yields[-1])


def test_summary_when_nobody_answers():
    samples = [Trajectory(problem="p", stop_reason="max_turns") for _ in range(2)]
    msg = samples_summary(samples, 0, "majority")
    assert msg["metadata"]["title"].endswith("no sample answered, so the first is shown")
    assert msg["content"].count("| — |") >= 2 and "**picked**" in msg["content"]


def test_the_service_streams_events_and_never_compiles(server, monkeypatch):
    """``ChatService.ask`` (the library under the page) yields the run's events; whatever the
    settings, every question runs the one compiled graph of the process."""
    from langgraph.graph import StateGraph

    from tirforge.agent.graph import compiled_graph

    compiled_graph("sync")  # the process's one compile (an earlier test may have done it)
    compiles: list[int] = []
    original = StateGraph.compile
    monkeypatch.setattr(StateGraph, "compile",
                        lambda self, *a, **kw: compiles.append(1) or original(self, *a, **kw))
    for i, (fmt, temp) in enumerate([("qwen-tir", 0.0), ("dotamath", 0.9), ("qwen-cot", 0.4)]):
        server._backend.starts.clear()  # type: ignore[union-attr]
        events = list(server.ask("svc", "What are the squares?", fmt=fmt, temperature=temp,
                                 thread_id=f"svc-{i}-{time.monotonic()}"))
        kinds = [k for k, _ in events]
        assert kinds[0] == "start" and events[0][1] == (1, "")
        assert "trajectory" in kinds and "event" in kinds and kinds[-1] == "trajectory"
        traj = events[-1][1]
        assert traj.format == fmt and traj.sampling["temperature"] == temp
    assert compiles == []
    assert not server.sessions["svc"].busy


def test_loading_then_a_load_error_is_shown_not_raised(tmp_path):
    import threading

    release = threading.Event()

    def broken_model():
        release.wait(30)
        raise OSError("no weights in /nowhere")

    server = ChatServer(broken_model, ExecutorConfig(backend="local", sandbox="bwrap", timeout=60),
                        AgentConfig(max_turns=2),
                        ChatConfig(max_sessions=1, db_path=str(tmp_path / "t.sqlite")))
    try:
        yields = server.respond("k", "What is 1 + 1?")
        first = next(yields)
        assert first[0] == {"role": "user", "content": "What is 1 + 1?"}
        assert "Model still loading" in first[1]["content"]
        release.set()
        last = list(yields)[-1]
        assert last[-1]["content"] == (
            "**Error:** the model could not be loaded: OSError: no weights in /nowhere")
        assert server.load_error and not server.sessions["k"].busy
    finally:
        release.set()
        server.close()


def test_a_question_asked_without_a_thread_id_gets_one(server):
    """Library use: ``ask`` with no ``thread_id`` runs (the checkpointer needs one) under a new
    thread, which the session names and ``replay_thread`` reads back."""
    server._backend.starts.clear()  # type: ignore[union-attr]
    events = list(server.ask("no-thread", "Let the samples vote"))
    assert not [e for e in events if e[0] in ("error", "failed")], events
    s = server.sessions["no-thread"]
    assert s.thread_id and s.trajectories[-1].final_answer == "7"
    first = s.thread_id
    assert server.replay_thread(first).final_answer == "7"
    server._backend.starts.clear()  # type: ignore[union-attr]
    list(server.ask("no-thread", "Let the samples vote"))
    assert server.sessions["no-thread"].thread_id not in (None, first)  # a new thread per run
