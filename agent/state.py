"""What one run of the solve loop is made of: its config (``AgentConfig``), its state
(``AgentState``), the events it emits (``AgentEvent``) and the run-scoped dependencies it is given
as LangGraph runtime context (``RunContext``)."""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable
from dataclasses import InitVar, dataclass, field
from typing import Literal, TypedDict

from tirforge.agent.backends.base import Backend, Completion, Request, SamplingParams
from tirforge.agent.formats import Format, Reflection, get_format
from tirforge.executors.base import AsyncExecutor, Executor
from tirforge.trajectories.schema import Step

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
