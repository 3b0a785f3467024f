"""The nodes and routing of the solve loop (assembled in ``agent.graph``).

Every function takes what it needs from the run's ``RunContext`` (LangGraph's ``Runtime``), so
the same node functions serve every config, model and kernel. Requests and state updates are
shared by the two flavours: synchronous nodes and coroutine nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from langgraph.config import get_stream_writer
from langgraph.runtime import Runtime

from tirforge.agent.backends.base import Completion, Request, SamplingParams
from tirforge.agent.state import AgentConfig, AgentEvent, AgentState, Event, EventKind, RunContext
from tirforge.executors.result import ExecutionResult
from tirforge.trajectories.grading import extract_boxed
from tirforge.trajectories.schema import Step
from tirforge.trajectories.tokens import request_pieces


def _emit(kind: EventKind, node: str, text: str = "") -> None:
    get_stream_writer()(AgentEvent(kind=kind, node=node, text=text))


def budget_spent(state: AgentState, cfg: AgentConfig) -> str | None:
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
        pieces=request_pieces(state["steps"]),  # token in: earlier turns' sampled ids
    )
    return req, _params(state, cfg, cfg.sampling.max_new_tokens)


def decompose_request(state: AgentState, cfg: AgentConfig) -> tuple[Request, SamplingParams]:
    """The request of the ``decompose`` node: the plan ends where code or a blank line starts."""
    req = Request(
        messages=state["messages"],
        prefix=cfg.fmt.decompose_prompt or "",
        pieces=[(cfg.fmt.decompose_prompt, None)] if cfg.fmt.decompose_prompt else [],
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
    lead = fmt.decompose_prompt or ""
    step = Step(text=lead + plan.rstrip(), feedback=fmt.after_decompose, gen_s=_gen_s(c, dt),
                token_ids=c.token_ids, logprobs=c.logprobs, sampled_from=len(lead))
    _emit("reflection", "decompose", step.text)
    return {**_counts(state, c, dt), "steps": [*state["steps"], step], "event": "plan"}


def _apply_turn(state: AgentState, cfg: AgentConfig, c: Completion, dt: float) -> AgentState:
    text, code, event = cfg.fmt.parse_turn(c.text)
    if state.get("nudged"):  # the model was completing "\boxed{": nothing more to run
        text, code, event = c.text, None, "answer"
    if code is not None:
        _emit("code", "generate", code)
    step = Step(text=text, code=code, gen_s=_gen_s(c, dt), token_ids=c.token_ids,
                logprobs=c.logprobs)
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
        reason = budget_spent(state, cfg) or "no_answer"
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


def route_start(state: AgentState, runtime: Runtime[RunContext]) -> str:
    return "decompose" if runtime.context.agent.decomposes else "generate"


def after_generate(state: AgentState, runtime: Runtime[RunContext]) -> str:
    cfg, event = runtime.context.agent, state["event"]
    if event == "code":
        return "execute"  # even on the last turn: its output belongs to the trajectory
    if event == "answer" or budget_spent(state, cfg):
        return "finish"
    if event == "no_answer":
        return "reflect" if cfg.nudge_for_answer and not state.get("nudged") else "finish"
    return "reflect" if _may_reflect(state, cfg, event) else "finish"  # unclosed


def after_execute(state: AgentState, runtime: Runtime[RunContext]) -> str:
    cfg = runtime.context.agent
    if budget_spent(state, cfg):
        return "finish"
    return "reflect" if _may_reflect(state, cfg, state["event"]) else "generate"


def after_step(state: AgentState, runtime: Runtime[RunContext]) -> str:  # reflect, decompose
    return "finish" if budget_spent(state, runtime.context.agent) else "generate"


def _executor(ctx: RunContext) -> Any:
    if ctx.executor is None:
        raise RuntimeError("the model wrote code but no executor was given")
    return ctx.executor


# -- the two flavours of nodes ----------------------------------------------------------------
def sync_nodes() -> dict[str, Callable]:
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


def async_nodes() -> dict[str, Callable]:
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
            "reflect": coro(_reflect), "finish": coro(_finish), "route_start": coro(route_start),
            "after_generate": coro(after_generate), "after_execute": coro(after_execute),
            "after_step": coro(after_step)}
