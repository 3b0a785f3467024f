"""The tool-integrated reasoning loop as a LangGraph state machine.

    [decompose] ─▶ generate ──code──▶ execute ──ok──▶ generate ...
                      │                  └──error / timeout / restart / empty──▶ reflect ─▶ generate
                      ├──\\boxed{}──▶ finish
                      └──no code, no answer / unclosed fence──▶ reflect ─▶ generate
    any budget (turns, tokens, model+kernel seconds) spent ─▶ finish

State is a TypedDict, nodes are plain functions, and routing is a small function on the state.
The prompt format (``tirforge.agent.formats``) renders the state for the model and parses what it
writes; the model's turn ends as soon as a ```python block closes, so it
never writes the output itself: the kernel does.

The same graph runs synchronously (``solve``) or as coroutines (``build_async_graph``, used by the
batched runner). Backend and kernel come from ``config["configurable"]`` when given, so one
compiled graph serves many trajectories. Nodes emit typed ``AgentEvent``s on LangGraph's
``custom`` stream mode.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph

from tirforge.agent.backends.base import Backend, Completion, Request, SamplingParams
from tirforge.agent.formats import Format, Reflection, get_format
from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.grading import extract_boxed, grade
from tirforge.trajectories.schema import Step, Trajectory

Event = Literal[
    "plan", "code", "answer", "unclosed", "no_answer", "ok", "error", "timeout", "restart",
    "empty_output",
]
EventKind = Literal["step_started", "token", "code", "output", "reflection", "answer"]


class AgentEvent(TypedDict):
    """One typed event on the ``custom`` stream (what the CLI and chat app render)."""

    kind: EventKind
    node: str
    text: str


class CodeRunner(Protocol):
    """Anything that runs a cell in a stateful kernel (see ``tirforge.executors``)."""

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult: ...


@dataclass
class AgentConfig:
    """Format, budgets and policies of the loop."""

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
    cell_timeout: float = 10.0
    """Seconds a code cell may run before the kernel is interrupted."""
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
AsyncRunFn = Callable[[Any, str, float], Awaitable[ExecutionResult]]


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


class _Nodes:
    """The node logic, split into request / apply halves so sync and async nodes share it."""

    def __init__(self, cfg: AgentConfig):
        self.cfg, self.fmt = cfg, cfg.fmt

    def _params(self, state: AgentState, cap: int) -> SamplingParams:
        left = cap
        if self.cfg.max_tokens is not None:
            left = min(left, self.cfg.max_tokens - state.get("tokens", 0))
        return replace(self.cfg.sampling, max_new_tokens=max(1, left), n=1)

    # decompose ------------------------------------------------------------------------------
    def decompose_request(self, state: AgentState) -> tuple[Request, SamplingParams]:
        _emit("step_started", "decompose")
        req = Request(
            messages=state["messages"],
            prefix=self.fmt.decompose_prompt or "",
            stop=lambda t: "```" in t or "\n\n" in t.strip("\n"),
            stop_strings=("```", "\n\n"),
        )
        return req, self._params(state, self.cfg.decompose_max_new_tokens)

    def decompose_apply(self, state: AgentState, c: Completion, dt: float) -> AgentState:
        plan = c.text
        for cut in ("```", "\n\n"):  # the plan ends where code or a blank line starts
            at = plan.find(cut, 1 if cut == "\n\n" else 0)
            plan = plan[:at] if at >= 0 else plan
        step = Step(
            text=(self.fmt.decompose_prompt or "") + plan.rstrip(),
            feedback=self.fmt.after_decompose,
            gen_s=_gen_s(c, dt),
        )
        _emit("reflection", "decompose", step.text)
        return {**self._counts(state, c, dt), "steps": [*state["steps"], step], "event": "plan"}

    # generate -------------------------------------------------------------------------------
    def generate_request(self, state: AgentState, stream: bool) -> tuple[Request, SamplingParams]:
        _emit("step_started", "generate")
        req = Request(
            messages=state["messages"],
            prefix=self.fmt.render_prefix(state["steps"]),
            stop=self.fmt.stop if self.fmt.uses_tools else None,
            stop_strings=self.fmt.stop_strings,
        )
        if stream:
            writer = get_stream_writer()
            req.on_text = lambda t: writer(AgentEvent(kind="token", node="generate", text=t))
        return req, self._params(state, self.cfg.sampling.max_new_tokens)

    def generate_apply(self, state: AgentState, c: Completion, dt: float) -> AgentState:
        text, code, event = self.fmt.parse_turn(c.text)
        if state.get("nudged"):  # the model was completing "\boxed{": nothing more to run
            text, code, event = c.text, None, "answer"
        if code is not None:
            _emit("code", "generate", code)
        step = Step(text=text, code=code, gen_s=_gen_s(c, dt))
        return {**self._counts(state, c, dt), "steps": [*state["steps"], step], "event": event}

    def _counts(self, state: AgentState, c: Completion, dt: float) -> AgentState:
        dt = _gen_s(c, dt)
        return {
            "turns": state["turns"] + 1,
            "tokens": state.get("tokens", 0) + c.n_tokens,
            "elapsed_s": state.get("elapsed_s", 0.0) + dt,
        }

    # execute --------------------------------------------------------------------------------
    def execute_apply(self, state: AgentState, result: ExecutionResult) -> AgentState:
        *done, step = state["steps"]
        output = result.to_text(self.cfg.max_output_chars)
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
        return {
            "steps": [*done, step],
            "event": event,
            "elapsed_s": state.get("elapsed_s", 0.0) + result.duration_s,
        }

    # reflect / finish -----------------------------------------------------------------------
    def reflect(self, state: AgentState) -> AgentState:
        *done, step = state["steps"]
        event = state["event"]
        update: AgentState = {}
        if event == "no_answer":
            update["nudged"] = True
        else:
            update["reflections"] = state.get("reflections", 0) + 1
        feedback = self.fmt.feedback[event]
        _emit("reflection", "reflect", feedback)
        update["steps"] = [*done, step.model_copy(update={"feedback": feedback})]
        return update

    def finish(self, state: AgentState) -> AgentState:
        answer = extract_boxed(self.fmt.render_prefix(state["steps"]))
        if answer is not None:
            reason = "answer"
        elif state.get("event") == "unclosed":
            reason = "unclosed_code"
        else:
            reason = _budget_spent(state, self.cfg) or "no_answer"
        _emit("answer", "finish", answer or "")
        return {"final_answer": answer, "stop_reason": reason}

    # routing --------------------------------------------------------------------------------
    def may_reflect(self, state: AgentState, reason: str) -> bool:
        cap = self.cfg.max_reflections
        return (
            reason in self.cfg.reflect_on
            and reason in self.fmt.feedback
            and (cap is None or state.get("reflections", 0) < cap)
        )

    def after_generate(self, state: AgentState) -> str:
        event = state["event"]
        if event == "code":
            return "execute"  # even on the last turn: its output belongs to the trajectory
        if event == "answer" or _budget_spent(state, self.cfg):
            return "finish"
        if event == "no_answer":
            return "reflect" if self.cfg.nudge_for_answer and not state.get("nudged") else "finish"
        return "reflect" if self.may_reflect(state, event) else "finish"  # unclosed

    def after_execute(self, state: AgentState) -> str:
        if _budget_spent(state, self.cfg):
            return "finish"
        return "reflect" if self.may_reflect(state, state["event"]) else "generate"

    def after_step(self, state: AgentState) -> str:  # after reflect and decompose
        return "finish" if _budget_spent(state, self.cfg) else "generate"


def _executor(config: RunnableConfig, default: Any) -> Any:
    runner = (config.get("configurable") or {}).get("executor", default)
    if runner is None:
        raise RuntimeError("the model wrote code but no executor was given")
    return runner


def _generator(config: RunnableConfig, default: Backend | GenerateFn | None) -> GenerateFn:
    backend = (config.get("configurable") or {}).get("backend", default)
    if backend is None:
        raise RuntimeError("no model backend was given")
    return backend if callable(backend) else (lambda r, p: backend.generate([r], p)[0])


def _assemble(
    n: _Nodes, nodes: dict[str, Callable], checkpointer: Any = None, asynchronous: bool = False
):
    after_generate, after_execute, after_step = n.after_generate, n.after_execute, n.after_step
    if asynchronous:  # LangGraph runs a sync router of an async graph in a worker thread

        async def after_generate(state: AgentState) -> str:  # type: ignore[misc]
            return n.after_generate(state)

        async def after_execute(state: AgentState) -> str:  # type: ignore[misc]
            return n.after_execute(state)

        async def after_step(state: AgentState) -> str:  # type: ignore[misc]
            return n.after_step(state)

    g = StateGraph(AgentState)
    for name, fn in nodes.items():
        if name not in ("reflect", "finish"):
            g.add_node(name, fn)
    g.add_node("reflect", nodes.get("reflect", n.reflect))
    g.add_node("finish", nodes.get("finish", n.finish))
    if n.cfg.decomposes:
        g.add_edge(START, "decompose")
        g.add_conditional_edges("decompose", after_step, ["generate", "finish"])
    else:
        g.add_edge(START, "generate")
    g.add_conditional_edges("generate", after_generate, ["execute", "reflect", "finish"])
    g.add_conditional_edges("execute", after_execute, ["reflect", "generate", "finish"])
    g.add_conditional_edges("reflect", after_step, ["generate", "finish"])
    g.add_edge("finish", END)
    return g.compile(checkpointer=checkpointer)


def build_graph(
    backend: Backend | GenerateFn | None = None,
    executor: CodeRunner | None = None,
    config: AgentConfig | None = None,
    *,
    checkpointer: Any = None,
    stream_tokens: bool = False,
):
    """Compile the solve loop (synchronous nodes).

    ``backend`` and ``executor`` are defaults: ``config["configurable"]["backend"]`` and
    ``["executor"]`` override them per run, so one compiled graph serves every run (compiling
    costs ~50x a turn). ``stream_tokens`` asks the backend for text chunks (``token`` events).
    """
    n = _Nodes(config or AgentConfig())

    def timed(config: RunnableConfig, req: Request, params: SamplingParams):
        gen = _generator(config, backend)
        t0 = time.perf_counter()
        c = gen(req, params)
        return c, time.perf_counter() - t0

    def decompose(state: AgentState, config: RunnableConfig) -> AgentState:
        return n.decompose_apply(state, *timed(config, *n.decompose_request(state)))

    def generate(state: AgentState, config: RunnableConfig) -> AgentState:
        req = n.generate_request(state, stream_tokens)
        return n.generate_apply(state, *timed(config, *req))

    def execute(state: AgentState, config: RunnableConfig) -> AgentState:
        _emit("step_started", "execute")
        code = state["steps"][-1].code or ""
        return n.execute_apply(state, _executor(config, executor).run(code, n.cfg.cell_timeout))

    nodes = {"generate": generate, "execute": execute}
    if n.cfg.decomposes:
        nodes["decompose"] = decompose
    return _assemble(n, nodes, checkpointer)


def build_async_graph(
    agenerate: AsyncGenerateFn | None = None,
    arun: AsyncRunFn | None = None,
    config: AgentConfig | None = None,
    *,
    checkpointer: Any = None,
):
    """Compile the solve loop with coroutine nodes, for many trajectories on one event loop.

    ``agenerate(request, params)`` returns one completion (e.g. through a micro-batcher);
    ``arun(executor, code, timeout)`` runs a cell without blocking the loop. Both are
    defaults: ``config["configurable"]["agenerate"]`` / ``["arun"]`` override them per run,
    so one compiled graph serves every run (see ``async_graph``).
    """
    n = _Nodes(config or AgentConfig())

    async def timed(
        config: RunnableConfig, req: Request, params: SamplingParams
    ) -> tuple[Completion, float]:
        # The run's seed and tag ride on the request, so one compiled graph serves every
        # trajectory and requests with different seeds can still share a batch.
        job = config.get("configurable") or {}
        req.seed, req.tag = job.get("seed", params.seed), job.get("tag", "")
        gen = job.get("agenerate", agenerate)
        if gen is None:
            raise RuntimeError("no model backend was given")
        t0 = time.perf_counter()
        c = await gen(req, params)
        return c, time.perf_counter() - t0

    async def decompose(state: AgentState, config: RunnableConfig) -> AgentState:
        return n.decompose_apply(state, *await timed(config, *n.decompose_request(state)))

    async def generate(state: AgentState, config: RunnableConfig) -> AgentState:
        return n.generate_apply(state, *await timed(config, *n.generate_request(state, False)))

    async def execute(state: AgentState, config: RunnableConfig) -> AgentState:
        _emit("step_started", "execute")
        code = state["steps"][-1].code or ""
        run = (config.get("configurable") or {}).get("arun", arun)
        if run is None:
            raise RuntimeError("no async cell runner was given")
        result = await run(_executor(config, None), code, n.cfg.cell_timeout)
        return n.execute_apply(state, result)

    # Coroutines, not plain functions: LangGraph would run sync nodes in a worker thread.
    async def reflect(state: AgentState) -> AgentState:
        return n.reflect(state)

    async def finish(state: AgentState) -> AgentState:
        return n.finish(state)

    nodes = {"generate": generate, "execute": execute, "reflect": reflect, "finish": finish}
    if n.cfg.decomposes:
        nodes["decompose"] = decompose
    return _assemble(n, nodes, checkpointer, asynchronous=True)


def initial_state(problem: str, cfg: AgentConfig) -> AgentState:
    messages = cfg.fmt.build_messages(problem, hint=cfg.tool_hint)
    if cfg.system_prompt is not None:
        messages[0] = {"role": "system", "content": cfg.system_prompt}
    return {
        "problem": problem, "messages": messages, "steps": [], "turns": 0, "tokens": 0,
        "elapsed_s": 0.0, "nudged": False, "reflections": 0,
    }


def run_config(
    cfg: AgentConfig,
    executor: Any = None,
    thread_id: str | None = None,
    backend: Any = None,
    *,
    seed: int | None = None,
    tag: str = "",
) -> dict:
    """LangGraph run config: recursion limit from the turn budget, kernel, backend, thread id,
    and (async graph) this run's sampling seed and trajectory tag."""
    configurable: dict[str, Any] = {"tag": tag}
    if seed is not None:
        configurable["seed"] = seed
    if executor is not None:
        configurable["executor"] = executor
    if backend is not None:
        configurable["backend"] = backend
    if thread_id is not None:
        configurable["thread_id"] = thread_id
    # Each turn passes through at most 3 nodes (generate, execute, reflect), plus finish.
    return {"recursion_limit": 3 * cfg.max_turns + 5, "configurable": configurable}


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


_GRAPHS: dict[tuple, Any] = {}


def async_graph(cfg: AgentConfig):
    """The compiled async graph of ``cfg``, compiled once per process (compiling costs ~50
    turns); pass ``agenerate`` / ``arun`` in ``configurable``."""
    key = ("async", repr(cfg))
    graph = _GRAPHS.get(key)
    if graph is None:
        if len(_GRAPHS) >= 64:
            _GRAPHS.clear()
        graph = _GRAPHS[key] = build_async_graph(None, None, cfg)
    return graph


def _cached_graph(cfg: AgentConfig, checkpointer: Any, stream_tokens: bool):
    """One compiled graph per (config, streaming); backend and kernel are per-run
    ``configurable`` values. Graphs with a checkpointer are not shared."""
    if checkpointer is not None:
        return build_graph(None, None, cfg, checkpointer=checkpointer,
                           stream_tokens=stream_tokens)
    key = (repr(cfg), stream_tokens)
    graph = _GRAPHS.get(key)
    if graph is None:
        if len(_GRAPHS) >= 64:
            _GRAPHS.clear()
        graph = _GRAPHS[key] = build_graph(None, None, cfg, stream_tokens=stream_tokens)
    return graph


def solve_stream(
    problem: str,
    backend: Backend,
    executor: CodeRunner | None,
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
    graph = _cached_graph(cfg, checkpointer, stream_tokens)
    rc = run_config(cfg, executor, thread_id, backend)
    saved = graph.get_state(rc).values if checkpointer is not None and thread_id else {}
    state: AgentState = dict(saved) if saved else initial_state(problem, cfg)
    t0 = time.perf_counter()
    if not saved.get("stop_reason"):
        for mode, chunk in graph.stream(
            None if saved else state, rc, stream_mode=["updates", "custom"]
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
    backend: Backend,
    executor: CodeRunner | None,
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
