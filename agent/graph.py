"""The tool-integrated reasoning loop as a LangGraph state machine.

    generate ──code──▶ execute ──ok──▶ generate ...
        │                 └──error──▶ reflect ──▶ generate
        ├──\\boxed{}──▶ finish
        └──no code, no answer / unclosed fence──▶ reflect ──▶ generate

State is a TypedDict, nodes are plain functions closed over the backend and executor, and routing
is a small function on the state. The model's turn ends as soon as a ```python block closes, so it
never writes the output itself: the kernel does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict

from langgraph.graph import END, START, StateGraph

from tirforge.agent import format as fmt
from tirforge.agent.backends.base import Backend, Request, SamplingParams
from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.grading import extract_boxed, grade
from tirforge.trajectories.schema import Step, Trajectory

Event = Literal["code", "answer", "unclosed", "no_answer", "ok", "error", "timeout", "restart"]


class CodeRunner(Protocol):
    """Anything that runs a cell in a stateful kernel (see ``tirforge.executors``)."""

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult: ...


@dataclass
class AgentConfig:
    """Budgets and policies of the loop."""

    max_turns: int = 6
    """Model turns (generations) at most, the answer nudge included."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    cell_timeout: float = 10.0
    """Seconds a code cell may run before the kernel is interrupted."""
    max_output_chars: int = 1000
    """Executor output shown to the model is cut to this many characters."""
    nudge_for_answer: bool = True
    """If the model stops with neither code nor answer, append "the final answer is \\boxed{"
    and let it complete that once (a standard answer trigger)."""
    tool_hint: bool = True
    """Add a one-line reminder of the ```python / ```output mechanics to the user turn."""
    system_prompt: str = fmt.SYSTEM_PROMPT


class AgentState(TypedDict, total=False):
    problem: str
    messages: list[dict]
    steps: list[Step]
    turns: int
    event: Event
    nudged: bool
    final_answer: str | None
    stop_reason: str | None


def _parse_turn(text: str) -> tuple[str, str | None, Event]:
    """Cut a model turn at its first closed code block; classify what the turn produced."""
    block = fmt.find_code_block(text)
    boxed_at = text.find("\\boxed")
    if block is not None:
        code, end = block
        if boxed_at == -1 or boxed_at > end:
            return text[:end], code, "code"
    if boxed_at != -1 and extract_boxed(text) is not None:
        return text, None, "answer"
    if fmt.has_open_code_block(text):
        return text, None, "unclosed"
    return text, None, "no_answer"


def build_graph(backend: Backend, executor: CodeRunner, config: AgentConfig | None = None):
    """Compile the solve loop for one backend and one (stateful) executor."""
    cfg = config or AgentConfig()

    def generate(state: AgentState) -> AgentState:
        steps = state["steps"]
        req = Request(
            messages=state["messages"],
            prefix=fmt.render_prefix(steps),
            stop=fmt.has_closed_code_block,
        )
        t0 = time.perf_counter()
        completion = backend.generate([req], cfg.sampling)[0]
        text, code, event = _parse_turn(completion.text)
        if state.get("nudged"):  # the model was completing "\boxed{": nothing more to run
            text, code, event = completion.text, None, "answer"
        step = Step(text=text, code=code, gen_s=time.perf_counter() - t0)
        return {"steps": [*steps, step], "turns": state["turns"] + 1, "event": event}

    def execute(state: AgentState) -> AgentState:
        *done, step = state["steps"]
        result = executor.run(step.code or "", timeout=cfg.cell_timeout)
        step = step.model_copy(
            update={"execution": result, "output": result.to_text(cfg.max_output_chars)}
        )
        if result.restarted:
            event: Event = "restart"
        elif result.timed_out:
            event = "timeout"
        else:
            event = "ok" if result.ok else "error"
        return {"steps": [*done, step], "event": event}

    def reflect(state: AgentState) -> AgentState:
        *done, step = state["steps"]
        event = state["event"]
        update: AgentState = {}
        if event == "unclosed":
            feedback = fmt.REFLECT_UNCLOSED + "\n"
        elif event == "no_answer":
            feedback, update["nudged"] = fmt.REFLECT_NO_ANSWER, True
        else:
            feedback = {
                "error": fmt.REFLECT_ERROR,
                "timeout": fmt.REFLECT_TIMEOUT,
                "restart": fmt.REFLECT_RESTART,
            }[event] + "\n"
        update["steps"] = [*done, step.model_copy(update={"feedback": feedback})]
        return update

    def finish(state: AgentState) -> AgentState:
        answer = extract_boxed(fmt.render_prefix(state["steps"]))
        if answer is not None:
            reason = "answer"
        elif state["event"] == "unclosed":
            reason = "unclosed_code"
        elif state["turns"] >= cfg.max_turns:
            reason = "max_turns"
        else:
            reason = "no_answer"
        return {"final_answer": answer, "stop_reason": reason}

    out_of_turns = lambda s: s["turns"] >= cfg.max_turns  # noqa: E731

    def after_generate(state: AgentState) -> str:
        event = state["event"]
        if event == "code":
            return "execute"  # even on the last turn: its output belongs to the trajectory
        if event == "answer" or out_of_turns(state):
            return "finish"
        if event == "no_answer" and not cfg.nudge_for_answer:
            return "finish"
        return "reflect"

    def after_execute(state: AgentState) -> str:
        if state["event"] != "ok":
            return "reflect"
        return "finish" if out_of_turns(state) else "generate"

    def after_reflect(state: AgentState) -> str:
        return "finish" if out_of_turns(state) else "generate"

    g = StateGraph(AgentState)
    g.add_node("generate", generate)
    g.add_node("execute", execute)
    g.add_node("reflect", reflect)
    g.add_node("finish", finish)
    g.add_edge(START, "generate")
    g.add_conditional_edges("generate", after_generate, ["execute", "reflect", "finish"])
    g.add_conditional_edges("execute", after_execute, ["reflect", "generate", "finish"])
    g.add_conditional_edges("reflect", after_reflect, ["generate", "finish"])
    g.add_edge("finish", END)
    return g.compile()


def initial_state(problem: str, cfg: AgentConfig) -> AgentState:
    messages = fmt.build_messages(problem, cfg.system_prompt, hint=cfg.tool_hint)
    return {"problem": problem, "messages": messages, "steps": [], "turns": 0, "nudged": False}


def solve_stream(
    problem: str,
    backend: Backend,
    executor: CodeRunner,
    config: AgentConfig | None = None,
    *,
    reference: str | None = None,
    model_name: str = "",
) -> Iterator[tuple[str, AgentState | Trajectory]]:
    """Run the loop, yielding (node name, state update) as each node finishes, then
    ("trajectory", Trajectory) with the graded result."""
    cfg = config or AgentConfig()
    graph = build_graph(backend, executor, cfg)
    state = initial_state(problem, cfg)
    t0 = time.perf_counter()
    # Each turn passes through at most 3 nodes (generate, execute, reflect), plus finish.
    limits = {"recursion_limit": 3 * cfg.max_turns + 5}
    for chunk in graph.stream(state, limits, stream_mode="updates"):
        for node, update in chunk.items():
            state = {**state, **(update or {})}
            yield node, update or {}
    traj = Trajectory(
        problem=problem,
        reference=reference,
        messages=state["messages"],
        steps=state["steps"],
        final_answer=state.get("final_answer"),
        stop_reason=state.get("stop_reason"),
        model=model_name or getattr(backend, "name", ""),
        format="qwen-tir",
        sampling=cfg.sampling.as_dict(),
    )
    if reference is not None:
        traj.verdict = str(grade(traj.final_answer, reference, extract=False))
    traj.timings = {
        "generate_s": sum(s.gen_s for s in traj.steps),
        "execute_s": sum(s.execution.duration_s for s in traj.steps if s.execution),
        "total_s": time.perf_counter() - t0,
    }
    yield "trajectory", traj


def solve(
    problem: str,
    backend: Backend,
    executor: CodeRunner,
    config: AgentConfig | None = None,
    *,
    reference: str | None = None,
    on_event: Callable[[str, AgentState], None] | None = None,
    model_name: str = "",
) -> Trajectory:
    """Solve one problem and return its graded trajectory."""
    for node, item in solve_stream(
        problem, backend, executor, config, reference=reference, model_name=model_name
    ):
        if isinstance(item, Trajectory):
            return item
        if on_event is not None:
            on_event(node, item)
    raise RuntimeError("graph ended without a trajectory")  # unreachable
