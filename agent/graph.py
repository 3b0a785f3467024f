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
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import InitVar, dataclass, field, replace
from typing import Any, Literal, TypedDict

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from tirforge.agent.backends.base import Backend, Completion, Request, SamplingParams
from tirforge.agent.formats import Format, Reflection, get_format
from tirforge.executors.base import AsyncExecutor, Executor
from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.grading import extract_boxed, grade
from tirforge.trajectories.schema import Step, Trajectory

Event = Literal[
    "plan", "code", "answer", "unclosed", "no_answer", "ok", "error", "timeout", "restart",
    "empty_output",
]
EventKind = Literal["step_started", "token", "code", "output", "reflection", "answer"]
CodeRunner = Executor
"""Deprecated alias: the graph runs cells on any ``tirforge.executors.Executor`` (it only calls
``run(code)``, so the kernel's own ``ExecutorConfig.timeout`` bounds every cell)."""


class AgentEvent(TypedDict):
    """One typed event on the ``custom`` stream (what the CLI and chat app render)."""

    kind: EventKind
    node: str
    text: str


@dataclass
class AgentConfig:
    """Format, budgets and policies of the loop. The cell timeout is the kernel's
    (``ExecutorConfig.timeout``), not the agent's."""

    format: str = "qwen-tir"
    """Prompt format: qwen-tir, qwen-cot or dotamath (see ``tirforge.agent.formats``)."""
    decompose: bool | None = None
    """Start with a decomposition turn. None: only if the format has one (dotamath)."""
    max_turns: int = 6
    """Model turns (generations) at most, decomposition and answer nudge included."""
    max_tokens: int | None = None
    """Generated tokens at most over the whole trajectory (None: no limit)."""
    max_time_s: float | None = None
    """Seconds of generation + execution at most (None: no limit). Counted from node
    durations, so a resumed session keeps its budget."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    decompose_max_new_tokens: int = 200
    """Tokens at most for the decomposition turn."""
    max_output_chars: int = 1000
    """Executor output shown to the model is cut to this many characters."""
    reflect_on: tuple[Reflection, ...] = ("error", "timeout", "restart", "unclosed")
    """Situations followed by a reflection line; add "empty_output" to question silent cells.
    An execution not listed here simply goes back to the model."""
    max_reflections: int | None = None
    """Reflections at most per trajectory (None: no limit); the answer nudge is not one."""
    nudge_for_answer: bool = True
    """If the model stops with neither code nor answer, append "the final answer is \\boxed{"
    and let it complete that once (a standard answer trigger)."""
    tool_hint: bool = True
    """Add the format's reminder of the ```python / ```output mechanics to the user turn."""
    system_prompt: str | None = None
    """Override the format's system prompt (None: the format's)."""
    cell_timeout: InitVar[float | None] = None
    """Deprecated and ignored (a DeprecationWarning says so): set ``ExecutorConfig.timeout``."""

    def __post_init__(self, cell_timeout: float | None) -> None:
        if cell_timeout is not None:
            warnings.warn(
                "AgentConfig.cell_timeout is deprecated and ignored: a cell's time limit is the "
                "kernel's ExecutorConfig.timeout; set it there",
                DeprecationWarning, stacklevel=3,
            )

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def decomposes(self) -> bool:
        can = self.fmt.decompose_prompt is not None
        if self.decompose and not can:
            raise ValueError(f"format {self.format!r} has no decomposition step")
        return can if self.decompose is None else self.decompose


class AgentState(TypedDict, total=False):
    problem: str
    messages: list[dict]
    steps: list[Step]
    turns: int
    tokens: int
    """Tokens generated so far."""
    elapsed_s: float
    """Seconds spent in generation and execution so far."""
    event: Event
    nudged: bool
    reflections: int
    final_answer: str | None
    stop_reason: str | None


GenerateFn = Callable[[Request, SamplingParams], Completion]
AsyncGenerateFn = Callable[[Request, SamplingParams], Awaitable[Completion]]


@dataclass
class RunContext:
    """What one run of the compiled loop depends on, passed as LangGraph runtime context
    (``graph.invoke(state, run_config(cfg), context=RunContext(...))``). Never compiled into
    the graph nor saved in a checkpoint: resuming a thread passes it again."""

    agent: AgentConfig = field(default_factory=AgentConfig)
    """Format, budgets, sampling and policies of this run."""
    backend: Backend | GenerateFn | None = None
    """Synchronous graph: the model, a ``Backend`` or a function (request, params) ->
    completion."""
    agenerate: AsyncGenerateFn | None = None
    """Coroutine graph: the model as a coroutine (request, params) -> completion (e.g. a
    micro-batcher's ``generate``)."""
    executor: Executor | AsyncExecutor | None = None
    """The kernel cells run on (coroutine graph: an ``AsyncExecutor``); None for formats
    without code. Its own timeout bounds each cell."""
    seed: int | None = None
    """This run's sampling seed, sent on every request (None: ``agent.sampling.seed``)."""
    tag: str = ""
    """This trajectory's tag on every request (see ``Request.tag``)."""
    stream_tokens: bool = False
    """Ask the backend for text chunks (``token`` events); synchronous graph only."""


def _emit(kind: EventKind, node: str, text: str = "") -> None:
    get_stream_writer()(AgentEvent(kind=kind, node=node, text=text))


def _budget_spent(state: AgentState, cfg: AgentConfig) -> str | None:
    """The stop reason of the first budget that is spent, or None."""
    if state["turns"] >= cfg.max_turns:
        return "max_turns"
    if cfg.max_tokens is not None and state.get("tokens", 0) >= cfg.max_tokens:
        return "max_tokens"
    if cfg.max_time_s is not None and state.get("elapsed_s", 0.0) >= cfg.max_time_s:
        return "max_time"
    return None


def _gen_s(c: Completion, dt: float) -> float:
    """The turn's generation time: measured by the node, or by whoever generated the turn
    ahead of it (step search samples all candidates in one batched call)."""
    return float(c.extra.get("gen_s", dt))


def _params(state: AgentState, cfg: AgentConfig, cap: int) -> SamplingParams:
    left = cap
    if cfg.max_tokens is not None:
        left = min(left, cfg.max_tokens - state.get("tokens", 0))
    return replace(cfg.sampling, max_new_tokens=max(1, left), n=1)


# -- requests: what the model is asked in a state ------------------------------------------------
def generate_request(state: AgentState, cfg: AgentConfig) -> tuple[Request, SamplingParams]:
    """The request and sampling of the ``generate`` node in ``state``: the transcript so far as
    prefix, stopping when a code block closes, within the turn and token budgets. Step search
    samples its candidates with exactly this request."""
    fmt = cfg.fmt
    req = Request(
        messages=state["messages"],
        prefix=fmt.render_prefix(state["steps"]),
        stop=fmt.stop if fmt.uses_tools else None,
        stop_strings=fmt.stop_strings,
    )
    return req, _params(state, cfg, cfg.sampling.max_new_tokens)


def decompose_request(state: AgentState, cfg: AgentConfig) -> tuple[Request, SamplingParams]:
    """The request of the ``decompose`` node: the plan ends where code or a blank line starts."""
    req = Request(
        messages=state["messages"],
        prefix=cfg.fmt.decompose_prompt or "",
        stop=lambda t: "```" in t or "\n\n" in t.strip("\n"),
        stop_strings=("```", "\n\n"),
    )
    return req, _params(state, cfg, cfg.decompose_max_new_tokens)


def _for_run(req: Request, ctx: RunContext) -> Request:
    # The run's seed and tag ride on the request, so requests of different runs can share a batch.
    req.seed, req.tag = ctx.seed, ctx.tag
    return req


# -- state updates: what a model turn, a cell, a reflection does to the state ------------------
def _counts(state: AgentState, c: Completion, dt: float) -> AgentState:
    return {
        "turns": state["turns"] + 1,
        "tokens": state.get("tokens", 0) + c.n_tokens,
        "elapsed_s": state.get("elapsed_s", 0.0) + _gen_s(c, dt),
    }


def _apply_plan(state: AgentState, cfg: AgentConfig, c: Completion, dt: float) -> AgentState:
    plan = c.text
    for cut in ("```", "\n\n"):  # the plan ends where code or a blank line starts
        at = plan.find(cut, 1 if cut == "\n\n" else 0)
        plan = plan[:at] if at >= 0 else plan
    fmt = cfg.fmt
    step = Step(text=(fmt.decompose_prompt or "") + plan.rstrip(), feedback=fmt.after_decompose,
                gen_s=_gen_s(c, dt))
    _emit("reflection", "decompose", step.text)
    return {**_counts(state, c, dt), "steps": [*state["steps"], step], "event": "plan"}


def _apply_turn(state: AgentState, cfg: AgentConfig, c: Completion, dt: float) -> AgentState:
    text, code, event = cfg.fmt.parse_turn(c.text)
    if state.get("nudged"):  # the model was completing "\boxed{": nothing more to run
        text, code, event = c.text, None, "answer"
    if code is not None:
        _emit("code", "generate", code)
    step = Step(text=text, code=code, gen_s=_gen_s(c, dt))
    return {**_counts(state, c, dt), "steps": [*state["steps"], step], "event": event}


def _apply_cell(state: AgentState, cfg: AgentConfig, result: ExecutionResult) -> AgentState:
    *done, step = state["steps"]
    output = result.to_text(cfg.max_output_chars)
    step = step.model_copy(update={"execution": result, "output": output})
    _emit("output", "execute", output)
    if result.restarted:
        event: Event = "restart"
    elif result.timed_out:
        event = "timeout"
    elif not result.ok:
        event = "error"
    else:
        event = "ok" if output.strip() else "empty_output"
    return {"steps": [*done, step], "event": event,
            "elapsed_s": state.get("elapsed_s", 0.0) + result.duration_s}


def _reflect(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
    *done, step = state["steps"]
    event = state["event"]
    update: AgentState = {}
    if event == "no_answer":
        update["nudged"] = True
    else:
        update["reflections"] = state.get("reflections", 0) + 1
    feedback = runtime.context.agent.fmt.feedback[event]
    _emit("reflection", "reflect", feedback)
    update["steps"] = [*done, step.model_copy(update={"feedback": feedback})]
    return update


def _finish(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
    cfg = runtime.context.agent
    answer = extract_boxed(cfg.fmt.render_prefix(state["steps"]))
    if answer is not None:
        reason = "answer"
    elif state.get("event") == "unclosed":
        reason = "unclosed_code"
    else:
        reason = _budget_spent(state, cfg) or "no_answer"
    _emit("answer", "finish", answer or "")
    return {"final_answer": answer, "stop_reason": reason}


# -- routing ----------------------------------------------------------------------------------
def _may_reflect(state: AgentState, cfg: AgentConfig, reason: str) -> bool:
    cap = cfg.max_reflections
    return (
        reason in cfg.reflect_on
        and reason in cfg.fmt.feedback
        and (cap is None or state.get("reflections", 0) < cap)
    )


def _route_start(state: AgentState, runtime: Runtime[RunContext]) -> str:
    return "decompose" if runtime.context.agent.decomposes else "generate"


def _after_generate(state: AgentState, runtime: Runtime[RunContext]) -> str:
    cfg, event = runtime.context.agent, state["event"]
    if event == "code":
        return "execute"  # even on the last turn: its output belongs to the trajectory
    if event == "answer" or _budget_spent(state, cfg):
        return "finish"
    if event == "no_answer":
        return "reflect" if cfg.nudge_for_answer and not state.get("nudged") else "finish"
    return "reflect" if _may_reflect(state, cfg, event) else "finish"  # unclosed


def _after_execute(state: AgentState, runtime: Runtime[RunContext]) -> str:
    cfg = runtime.context.agent
    if _budget_spent(state, cfg):
        return "finish"
    return "reflect" if _may_reflect(state, cfg, state["event"]) else "generate"


def _after_step(state: AgentState, runtime: Runtime[RunContext]) -> str:  # reflect, decompose
    return "finish" if _budget_spent(state, runtime.context.agent) else "generate"


def _executor(ctx: RunContext) -> Any:
    if ctx.executor is None:
        raise RuntimeError("the model wrote code but no executor was given")
    return ctx.executor


# -- the two flavours of nodes ----------------------------------------------------------------
def _sync_nodes() -> dict[str, Callable]:
    def call(ctx: RunContext, req: Request, params: SamplingParams) -> tuple[Completion, float]:
        backend = ctx.backend
        if backend is None:
            raise RuntimeError("no model backend was given")
        gen = backend if callable(backend) else (lambda r, p: backend.generate([r], p)[0])
        t0 = time.perf_counter()
        c = gen(_for_run(req, ctx), params)
        return c, time.perf_counter() - t0

    def decompose(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
        ctx = runtime.context
        _emit("step_started", "decompose")
        return _apply_plan(state, ctx.agent, *call(ctx, *decompose_request(state, ctx.agent)))

    def generate(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
        ctx = runtime.context
        _emit("step_started", "generate")
        req, params = generate_request(state, ctx.agent)
        if ctx.stream_tokens:
            writer = get_stream_writer()
            req.on_text = lambda t: writer(AgentEvent(kind="token", node="generate", text=t))
        return _apply_turn(state, ctx.agent, *call(ctx, req, params))

    def execute(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
        ctx = runtime.context
        _emit("step_started", "execute")
        result = _executor(ctx).run(state["steps"][-1].code or "")
        return _apply_cell(state, ctx.agent, result)

    return {"decompose": decompose, "generate": generate, "execute": execute,
            "reflect": _reflect, "finish": _finish}


def _async_nodes() -> dict[str, Callable]:
    async def call(ctx: RunContext, req: Request, params: SamplingParams):
        if ctx.agenerate is None:
            raise RuntimeError("no model backend was given")
        t0 = time.perf_counter()
        c = await ctx.agenerate(_for_run(req, ctx), params)
        return c, time.perf_counter() - t0

    async def decompose(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
        ctx = runtime.context
        _emit("step_started", "decompose")
        req = decompose_request(state, ctx.agent)
        return _apply_plan(state, ctx.agent, *await call(ctx, *req))

    async def generate(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
        ctx = runtime.context
        _emit("step_started", "generate")
        req = generate_request(state, ctx.agent)
        return _apply_turn(state, ctx.agent, *await call(ctx, *req))

    async def execute(state: AgentState, runtime: Runtime[RunContext]) -> AgentState:
        ctx = runtime.context
        _emit("step_started", "execute")
        result = await _executor(ctx).run(state["steps"][-1].code or "")
        return _apply_cell(state, ctx.agent, result)

    # Coroutines, not plain functions: LangGraph would run sync nodes and routers of an async
    # graph in a worker thread.
    def coro(fn: Callable) -> Callable:
        async def wrapped(state: AgentState, runtime: Runtime[RunContext]) -> Any:
            return fn(state, runtime)

        wrapped.__name__ = fn.__name__
        return wrapped

    return {"decompose": decompose, "generate": generate, "execute": execute,
            "reflect": coro(_reflect), "finish": coro(_finish), "route_start": coro(_route_start),
            "after_generate": coro(_after_generate), "after_execute": coro(_after_execute),
            "after_step": coro(_after_step)}


def _compile(nodes: dict[str, Callable]):
    g = StateGraph(AgentState, context_schema=RunContext)
    for name in ("decompose", "generate", "execute", "reflect", "finish"):
        g.add_node(name, nodes[name])
    after_step = nodes.get("after_step", _after_step)
    g.add_conditional_edges(START, nodes.get("route_start", _route_start),
                            ["decompose", "generate"])
    g.add_conditional_edges("decompose", after_step, ["generate", "finish"])
    g.add_conditional_edges("generate", nodes.get("after_generate", _after_generate),
                            ["execute", "reflect", "finish"])
    g.add_conditional_edges("execute", nodes.get("after_execute", _after_execute),
                            ["reflect", "generate", "finish"])
    g.add_conditional_edges("reflect", after_step, ["generate", "finish"])
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
        graph = _GRAPHS[kind] = _compile(_sync_nodes() if kind == "sync" else _async_nodes())
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
