"""The tool-integrated reasoning loop as a LangGraph state machine.

    [decompose] ─▶ generate ──code──▶ execute ──ok──▶ generate ...
                      │                  └──error / timeout / restart / empty──▶ reflect ─▶ generate
                      ├──\\boxed{}──▶ finish
                      └──no code, no answer / unclosed fence──▶ reflect ─▶ generate
    any budget (turns, tokens, model+kernel seconds) spent ─▶ finish

State is a TypedDict, nodes are plain functions, and routing is a small function on the state.
The prompt format (``tirforge.agent.formats``) renders the state for the model and parses what it
writes; the model's turn ends as soon as a ```python block closes, so it never writes the output
itself: the kernel does.

Everything a run depends on — the ``AgentConfig`` (format, budgets, sampling), the model, the
kernel, the seed — is LangGraph runtime context (``RunContext``, passed as ``context=``), not part
of the compiled graph and never saved in a checkpoint. The graph's topology is the same for every
config (whether to decompose first is a routing decision), so each process compiles the loop
once per flavour: synchronous nodes (``solve``, step search, the chat app) and coroutine nodes
(the batched runner). Nodes emit typed ``AgentEvent``s on LangGraph's ``custom`` stream mode.

The pieces: ``agent.state`` (config, state, events, run context), ``agent.nodes`` (requests,
state updates, routing), this module (assembly, compiled-graph cache, ``solve``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph

from tirforge.agent.backends.base import Backend
from tirforge.agent.nodes import (
    after_execute,
    after_generate,
    after_step,
    async_nodes,
    decompose_request,
    generate_request,
    route_start,
    sync_nodes,
)
from tirforge.agent.state import (
    AgentConfig,
    AgentEvent,
    AgentState,
    AsyncGenerateFn,
    Event,
    EventKind,
    GenerateFn,
    RunContext,
)
from tirforge.executors.base import Executor
from tirforge.trajectories.grading import grade
from tirforge.trajectories.schema import Trajectory

__all__ = [
    "AgentConfig", "AgentEvent", "AgentState", "AsyncGenerateFn", "Event",
    "EventKind", "GenerateFn", "RunContext", "compiled_graph", "decompose_request",
    "generate_request", "initial_state", "run_config", "solve", "solve_stream", "to_trajectory",
]


def _compile(nodes: dict[str, Callable]):
    g = StateGraph(AgentState, context_schema=RunContext)
    for name in ("decompose", "generate", "execute", "reflect", "finish"):
        g.add_node(name, nodes[name])
    step_done = nodes.get("after_step", after_step)
    g.add_conditional_edges(START, nodes.get("route_start", route_start),
                            ["decompose", "generate"])
    g.add_conditional_edges("decompose", step_done, ["generate", "finish"])
    g.add_conditional_edges("generate", nodes.get("after_generate", after_generate),
                            ["execute", "reflect", "finish"])
    g.add_conditional_edges("execute", nodes.get("after_execute", after_execute),
                            ["reflect", "generate", "finish"])
    g.add_conditional_edges("reflect", step_done, ["generate", "finish"])
    g.add_edge("finish", END)
    return g.compile()


_GRAPHS: dict[str, Any] = {}


def compiled_graph(kind: Literal["sync", "async"] = "sync", checkpointer: Any = None):
    """The solve loop, compiled once per process and flavour: ``sync`` nodes, or coroutine
    nodes (``async``, for many trajectories on one event loop). Run it with a ``RunContext``
    as ``context=``. With a ``checkpointer`` it is a copy of the compiled graph that saves every
    step (a copy costs ~1/70 of a compile)."""
    if kind not in ("sync", "async"):
        raise ValueError(f"kind must be 'sync' or 'async', got {kind!r}")
    graph = _GRAPHS.get(kind)
    if graph is None:
        graph = _GRAPHS[kind] = _compile(sync_nodes() if kind == "sync" else async_nodes())
    return graph if checkpointer is None else graph.copy(update={"checkpointer": checkpointer})


def initial_state(problem: str, cfg: AgentConfig) -> AgentState:
    """The state a run starts from. Raises ValueError for a decomposition the format lacks."""
    cfg.decomposes  # noqa: B018 - raises before any model call
    messages = cfg.fmt.build_messages(problem, hint=cfg.tool_hint)
    if cfg.system_prompt is not None:
        messages[0] = {"role": "system", "content": cfg.system_prompt}
    return {
        "problem": problem, "messages": messages, "steps": [], "turns": 0, "tokens": 0,
        "elapsed_s": 0.0, "nudged": False, "reflections": 0,
    }


def run_config(cfg: AgentConfig, thread_id: str | None = None) -> dict:
    """LangGraph run config: the recursion limit from the turn budget, and the checkpointer's
    thread id (the one thing that stays in ``configurable``)."""
    # Each turn passes through at most 3 nodes (generate, execute, reflect), plus finish.
    rc: dict[str, Any] = {"recursion_limit": 3 * cfg.max_turns + 5, "configurable": {}}
    if thread_id is not None:
        rc["configurable"]["thread_id"] = thread_id
    return rc


def to_trajectory(
    state: AgentState,
    cfg: AgentConfig,
    *,
    reference: str | None = None,
    problem_id: str | None = None,
    model_name: str = "",
    total_s: float = 0.0,
) -> Trajectory:
    """The graded trajectory of a finished run."""
    traj = Trajectory(
        problem=state["problem"],
        problem_id=problem_id,
        reference=reference,
        messages=state["messages"],
        steps=state["steps"],
        final_answer=state.get("final_answer"),
        stop_reason=state.get("stop_reason"),
        model=model_name,
        format=cfg.format,
        sampling=cfg.sampling.as_dict(),
    )
    if reference is not None:
        traj.verdict = str(grade(traj.final_answer, reference, extract=False))
    traj.timings = {
        "generate_s": sum(s.gen_s for s in traj.steps),
        "execute_s": sum(s.execution.duration_s for s in traj.steps if s.execution),
        "total_s": total_s,
    }
    return traj


def solve_stream(
    problem: str,
    backend: Backend | GenerateFn,
    executor: Executor | None,
    config: AgentConfig | None = None,
    *,
    reference: str | None = None,
    problem_id: str | None = None,
    model_name: str = "",
    checkpointer: Any = None,
    thread_id: str | None = None,
    stream_tokens: bool = False,
) -> Iterator[tuple[str, AgentState | AgentEvent | Trajectory]]:
    """Run the loop, yielding ``(node, state update)`` as each node finishes, ``("event",
    AgentEvent)`` as nodes emit them, then ``("trajectory", Trajectory)``.

    With a ``checkpointer`` and ``thread_id`` every step is saved; calling again with the same
    thread id resumes an unfinished run (or returns a finished one) instead of starting over.
    """
    cfg = config or AgentConfig()
    graph = compiled_graph("sync", checkpointer)
    rc = run_config(cfg, thread_id)
    ctx = RunContext(agent=cfg, backend=backend, executor=executor, stream_tokens=stream_tokens)
    saved = graph.get_state(rc).values if checkpointer is not None and thread_id else {}
    state: AgentState = dict(saved) if saved else initial_state(problem, cfg)
    t0 = time.perf_counter()
    if not saved.get("stop_reason"):
        for mode, chunk in graph.stream(
            None if saved else state, rc, stream_mode=["updates", "custom"], context=ctx
        ):
            if mode == "custom":
                yield "event", chunk
                continue
            for node, update in chunk.items():
                state = {**state, **(update or {})}
                yield node, update or {}
    yield "trajectory", to_trajectory(
        state, cfg, reference=reference, problem_id=problem_id,
        model_name=model_name or getattr(backend, "name", ""), total_s=time.perf_counter() - t0,
    )


def solve(
    problem: str,
    backend: Backend | GenerateFn,
    executor: Executor | None,
    config: AgentConfig | None = None,
    *,
    reference: str | None = None,
    on_event: Callable[[str, AgentState | AgentEvent], None] | None = None,
    model_name: str = "",
    checkpointer: Any = None,
    thread_id: str | None = None,
) -> Trajectory:
    """Solve one problem and return its graded trajectory."""
    for node, item in solve_stream(
        problem, backend, executor, config, reference=reference, model_name=model_name,
        checkpointer=checkpointer, thread_id=thread_id,
    ):
        if isinstance(item, Trajectory):
            return item
        if on_event is not None:
            on_event(node, item)
    raise RuntimeError("graph ended without a trajectory")  # unreachable
