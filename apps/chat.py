"""The chat app: a person types a problem and watches the model write code, see the kernel's
output, correct itself and answer — streamed live in a Gradio chat.

One browser session = one ``ChatSession``: its own kernel leased from a ``KernelPool`` (so
variables persist across follow-up questions but never leak between sessions), released on
"New chat", when the page closes, or after ``idle_timeout_s``. Every turn runs the agent graph
with LangGraph's SQLite checkpointer under a thread id kept in the browser's local storage, so a
reloaded page shows the conversation again. Rendering agent state into chat messages is a set of
pure functions (``step_messages`` ...), unit-tested without a browser.
"""

import contextlib
import json
import os
import queue
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tirforge.agent.backends.base import Backend, Completion, Request, SamplingParams
from tirforge.agent.formats import FORMATS
from tirforge.agent.graph import AgentConfig, solve_stream
from tirforge.executors import ExecutorConfig, KernelPool
from tirforge.trajectories.schema import Step, Trajectory

# Gradio phones home for analytics and version checks by default; this app must run offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]
_CODE_OPEN = re.compile(r"```(?:python|py)[ \t]*\n", re.IGNORECASE)
Message = dict[str, Any]


@dataclass
class ChatConfig:
    """How the chat server runs."""

    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 keeps the app (and its kernels) off the network."""
    port: int = 7860
    max_sessions: int = 4
    """Warm kernels in the pool = browser sessions served at once; more sessions wait."""
    idle_timeout_s: float = 900.0
    """A session idle this long gives its kernel back (its variables are lost)."""
    db_path: str | None = None
    """SQLite file of the LangGraph checkpointer (None: a file in the temp dir)."""
    examples: list[str] = field(default_factory=list)
    """Example problems shown under the input box."""
    strategies: tuple[str, ...] = ("greedy",)
    """Inference strategies offered in the settings panel."""


# --------------------------------------------------------------------------- rendering


def _split_prose(text: str) -> tuple[str, str]:
    """(prose before the first ```python fence, the rest)."""
    m = _CODE_OPEN.search(text)
    return (text, "") if m is None else (text[: m.start()], text[m.start() :])


_BARE_BOX = re.compile(r"(?<![$\\(\[])\\boxed\{([^{}$]*)\}(?![$])")


def _math_boxes(text: str) -> str:
    """Models often write \\boxed{..} outside math mode; render it as math anyway."""
    return _BARE_BOX.sub(r"$\\boxed{\1}$", text)


def step_messages(step: Step, index: int, image_dir: str | None = None) -> list[Message]:
    """Chat messages for one model turn: its prose, its code cell with the kernel's output (a
    collapsible block), images the cell displayed, and any self-correction note."""
    out: list[Message] = []
    prose = _split_prose(step.text)[0] if step.code is not None else step.text
    if prose.strip():
        out.append({"role": "assistant", "content": _math_boxes(prose.strip())})
    if step.code is not None:
        body = f"```python\n{step.code.rstrip()}\n```"
        res = step.execution
        if res is None:
            title, status = f"Code cell {index} — running…", "pending"
        else:
            status = "done"
            if res.restarted:
                title = f"Code cell {index} — kernel restarted, variables lost"
            elif res.timed_out:
                title = f"Code cell {index} — timed out"
            elif res.error_name:
                title = f"Code cell {index} — {res.error_name}"
            else:
                title = f"Code cell {index}"
            body += f"\n\n**Output**\n```output\n{step.output or '(no output)'}\n```"
        out.append(
            {"role": "assistant", "content": body, "metadata": {"title": title, "status": status}}
        )
        if res is not None and res.images and image_dir is not None:
            for j, png in enumerate(res.images):
                path = Path(image_dir) / f"{uuid.uuid4().hex}-{index}-{j}.png"
                path.write_bytes(png)
                out.append({"role": "assistant", "content": {"path": str(path)}})
    if step.feedback and step.feedback.strip():
        out.append(
            {
                "role": "assistant",
                "content": step.feedback.strip(),
                "metadata": {"title": "Self-correction", "status": "done"},
            }
        )
    return out


def answer_message(final_answer: str | None, stop_reason: str | None) -> Message:
    """The highlighted final answer, or a clear note on why there is none."""
    if final_answer is not None:
        return {"role": "assistant", "content": f"### Final answer: $\\boxed{{{final_answer}}}$"}
    why = {
        "max_turns": "it used up its turn budget",
        "unclosed_code": "its last code block was never closed",
        "no_answer": "it stopped without stating one",
        "cancelled": "you stopped it",
    }.get(stop_reason or "", stop_reason or "it stopped")
    return {"role": "assistant", "content": f"**No final answer**: {why}."}


def turn_messages(
    problem: str,
    steps: list[Step],
    *,
    live_text: str = "",
    final: tuple[str | None, str | None] | None = None,
    image_dir: str | None = None,
) -> list[Message]:
    """All messages of one question: the user's problem, each step, the text being generated
    right now (``live_text``), and the answer once ``final`` = (answer, stop reason) is known."""
    msgs: list[Message] = [{"role": "user", "content": problem}]
    for i, step in enumerate(steps, 1):
        msgs += step_messages(step, i, image_dir)
    if live_text.strip():
        msgs.append({"role": "assistant", "content": live_text})
    if final is not None:
        msgs.append(answer_message(*final))
    return msgs


# --------------------------------------------------------------------------- sessions


class Cancelled(Exception):
    """The user pressed Stop."""


class _CancellableBackend:
    """Wraps a backend so that Stop ends generation at the next token and before the next turn."""

    def __init__(self, backend: Backend, cancel: threading.Event):
        self.backend, self.cancel = backend, cancel
        self.name = getattr(backend, "name", "model")

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        if self.cancel.is_set():
            raise Cancelled
        wrapped = [
            replace(r, stop=lambda t, s=r.stop: self.cancel.is_set() or (s is not None and s(t)))
            for r in requests
        ]
        out = self.backend.generate(wrapped, params)
        if self.cancel.is_set():
            raise Cancelled
        return out


@dataclass
class ChatSession:
    """One browser session: a kernel, the conversation so far, a Stop switch."""

    kernel: Any = None
    trajectories: list[Trajectory] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False


def _with_context(history: list[Trajectory], problem: str) -> str:
    """A follow-up question carries the earlier questions and answers of the conversation (the
    kernel already carries the variables)."""
    if not history:
        return problem
    lines = ["Earlier in this conversation (the Python session still holds its variables):"]
    for t in history[-4:]:
        lines.append(f"- Question: {t.problem}\n  Answer: {t.final_answer or '(none)'}")
    return "\n".join(lines) + f"\n\nNew question: {problem}"


class ChatServer:
    """Owns the model, the kernel pool, the checkpointer and the browser sessions."""

    def __init__(
        self,
        load_backend: Callable[[], Backend],
        executor_config: ExecutorConfig,
        agent_config: AgentConfig | None = None,
        config: ChatConfig | None = None,
        model_name: str = "",
    ):
        self.config = config or ChatConfig()
        self.agent_config = agent_config or AgentConfig()
        self.executor_config = executor_config
        self.model_name = model_name
        self.image_dir = tempfile.mkdtemp(prefix="tirforge-chat-img-")
        self.sessions: dict[str, ChatSession] = {}
        self._lock = threading.Lock()
        self._backend: Backend | None = None
        self._pool: KernelPool | None = None
        self.load_error: str | None = None
        self.sandbox_error: str | None = None
        self._load_started = time.monotonic()
        self._ready = threading.Event()
        db = self.config.db_path or os.path.join(tempfile.gettempdir(), "tirforge-chat.sqlite")
        self.checkpointer = _sqlite_checkpointer(db)
        # Model and kernels load in the background: the page is usable (and says so) at once.
        threading.Thread(target=self._load, args=(load_backend,), daemon=True).start()
        threading.Thread(target=self._reap_idle, daemon=True).start()

    # -- startup ---------------------------------------------------------------------------
    def _load(self, load_backend: Callable[[], Backend]) -> None:
        try:
            self._pool = KernelPool(self.executor_config, size=self.config.max_sessions).start()
        except Exception as e:  # no bwrap, no Docker daemon, no image: say how to fix it
            self.sandbox_error = _sandbox_help(self.executor_config, e)
        try:
            self._backend = load_backend()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self) -> None:
        with self._lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for s in sessions:
            s.cancel.set()
        if self._pool is not None:
            self._pool.close()

    # -- sessions --------------------------------------------------------------------------
    def session(self, key: str) -> ChatSession:
        with self._lock:
            s = self.sessions.get(key)
            if s is None:
                s = self.sessions[key] = ChatSession()
            s.last_used = time.monotonic()
            return s

    def release(self, key: str) -> None:
        """Give the session's kernel back to the pool (it is reset there)."""
        with self._lock:
            s = self.sessions.pop(key, None)
        if s is not None:
            s.cancel.set()
            if s.kernel is not None and self._pool is not None:
                s.kernel.interrupt()
                self._pool.release(s.kernel)
                s.kernel = None

    def _reap_idle(self) -> None:
        while True:
            time.sleep(min(30.0, self.config.idle_timeout_s / 2))
            now = time.monotonic()
            with self._lock:
                idle = [
                    k
                    for k, s in self.sessions.items()
                    if not s.busy and now - s.last_used > self.config.idle_timeout_s
                ]
            for key in idle:
                self.release(key)

    def stop(self, key: str) -> None:
        """Stop button: end generation and interrupt the running cell."""
        s = self.sessions.get(key)
        if s is not None:
            s.cancel.set()
            if s.kernel is not None:
                s.kernel.interrupt()

    # -- one question ----------------------------------------------------------------------
    def respond(
        self,
        key: str,
        problem: str,
        *,
        fmt: str | None = None,
        temperature: float | None = None,
        max_turns: int | None = None,
        thread_id: str | None = None,
    ) -> Iterator[list[Message]]:
        """Yield the question's messages as they grow; the last yield is the finished turn."""
        s = self.session(key)
        if not self._ready.is_set():
            while not self._ready.wait(0.5):
                waited = time.monotonic() - self._load_started
                yield [
                    {"role": "user", "content": problem},
                    {"role": "assistant", "content": f"Model still loading ({waited:.0f} s)…"},
                ]
        if self.load_error or self.sandbox_error:
            msg = self.load_error and f"**Error:** the model could not be loaded: {self.load_error}"
            yield [
                {"role": "user", "content": problem},
                {"role": "assistant", "content": msg or f"**Error:** {self.sandbox_error}"},
            ]
            return
        assert self._pool is not None and self._backend is not None
        if s.kernel is None:
            s.kernel = self._pool.lease()
        # A fresh switch per question: a stopped run that is still unwinding keeps its own.
        s.cancel = threading.Event()
        s.busy = True
        cfg = replace(
            self.agent_config,
            format=fmt or self.agent_config.format,
            max_turns=max_turns or self.agent_config.max_turns,
            sampling=replace(
                self.agent_config.sampling,
                temperature=self.agent_config.sampling.temperature
                if temperature is None
                else temperature,
            ),
        )
        events: queue.Queue = queue.Queue()
        backend = _CancellableBackend(self._backend, s.cancel)
        prompt = _with_context(s.trajectories, problem)

        def work() -> None:
            try:
                for item in solve_stream(
                    prompt, backend, s.kernel, cfg, model_name=self.model_name,
                    checkpointer=self.checkpointer, thread_id=thread_id, stream_tokens=True,
                ):
                    events.put(item)
            except Cancelled:
                events.put(("cancelled", None))
            except Exception as e:  # shown in the chat, never a silent hang
                events.put(("error", f"{type(e).__name__}: {e}"))
            events.put(("done", None))

        threading.Thread(target=work, daemon=True).start()
        steps: list[Step] = []
        live = ""
        try:
            while True:
                node, item = events.get()
                if node == "done":
                    break
                if node == "trajectory":
                    traj = item
                    traj.problem = problem  # the user's words, not the context-carrying prompt
                    s.trajectories.append(traj)
                    yield turn_messages(
                        problem, traj.steps, final=(traj.final_answer, traj.stop_reason),
                        image_dir=self.image_dir,
                    )
                elif node == "cancelled":
                    yield turn_messages(
                        problem, steps, final=(None, "cancelled"), image_dir=self.image_dir
                    )
                elif node == "error":
                    yield [*turn_messages(problem, steps, image_dir=self.image_dir),
                           {"role": "assistant", "content": f"**Error:** {item}"}]
                elif node == "event":
                    if item["kind"] == "token":
                        live += item["text"]
                        yield turn_messages(problem, steps, live_text=live,
                                            image_dir=self.image_dir)
                else:
                    if isinstance(item, dict) and item.get("steps") is not None:
                        steps = item["steps"]
                        live = ""
                        yield turn_messages(problem, steps, image_dir=self.image_dir)
        finally:
            s.busy = False
            s.last_used = time.monotonic()

    def export(self, key: str) -> str | None:
        """The session's trajectories as a JSONL file (the collection schema); its path."""
        s = self.sessions.get(key)
        if s is None or not s.trajectories:
            return None
        path = Path(tempfile.mkdtemp(prefix="tirforge-export-")) / "conversation.jsonl"
        path.write_text("".join(t.model_dump_json() + "\n" for t in s.trajectories))
        return str(path)

    def replay_thread(self, thread_id: str) -> Trajectory | None:
        """A finished turn saved by the checkpointer (after a page reload), or None."""
        from tirforge.agent.graph import build_graph, run_config, to_trajectory

        cfg = self.agent_config
        graph = build_graph(_NoModel(), None, cfg, checkpointer=self.checkpointer)
        values = graph.get_state(run_config(cfg, thread_id=thread_id)).values
        if not values or not values.get("stop_reason"):
            return None
        return to_trajectory(values, cfg, model_name=self.model_name)


class _NoModel:
    """Stands in for the model when only reading saved threads (never called)."""

    name = "none"

    def generate(self, requests, params):  # pragma: no cover - never reached
        raise RuntimeError("reading a saved thread must not generate")


def _sqlite_checkpointer(path: str):
    from langgraph.checkpoint.sqlite import SqliteSaver

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Gradio handlers run in worker threads; SqliteSaver serialises access itself.
    return SqliteSaver(sqlite3.connect(path, check_same_thread=False))


def _sandbox_help(cfg: ExecutorConfig, e: Exception) -> str:
    fix = (
        "start Docker and build the image: `tirforge sandbox build`"
        if cfg.backend == "docker"
        else "install bubblewrap (`apt-get install bubblewrap`) or start with `--sandbox none`"
    )
    return f"The code sandbox ({cfg.backend}) is unavailable: {e}. To fix: {fix}."


# --------------------------------------------------------------------------- the page


def build_app(server: ChatServer):
    """The Gradio Blocks page for ``server``."""
    import gradio as gr

    cfg = server.config
    with gr.Blocks(title="tirforge chat") as demo:
        gr.Markdown(
            "## tirforge — math with code\nThe model writes Python, a sandboxed Jupyter kernel "
            "runs it, the model reads the output, corrects itself and answers."
        )
        # Thread ids of this conversation, kept in the browser so a reload can show it again.
        saved = gr.BrowserState([], storage_key="tirforge-chat-threads")
        with gr.Row():
            with gr.Column(scale=4):
                chat = gr.Chatbot(
                    label="conversation", height=560, latex_delimiters=LATEX_DELIMITERS,
                    elem_id="chat", buttons=["copy"],
                )
                box = gr.Textbox(
                    placeholder="A math problem (any language, LaTeX welcome) …",
                    show_label=False, elem_id="problem", lines=2,
                )
                with gr.Row():
                    send = gr.Button("Solve", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    new = gr.Button("New chat", elem_id="new")
                    export = gr.Button("Export trajectory", elem_id="export")
                exported = gr.File(label="exported JSONL", visible=True, elem_id="exported")
                if cfg.examples:
                    gr.Examples(cfg.examples, inputs=box, label="examples from the benchmarks")
            with gr.Column(scale=1):
                with gr.Accordion("Settings", open=True):
                    fmt = gr.Dropdown(
                        list(FORMATS), value=server.agent_config.format, label="format"
                    )
                    temp = gr.Slider(
                        0.0, 1.5, value=server.agent_config.sampling.temperature, step=0.05,
                        label="temperature",
                    )
                    turns = gr.Slider(
                        1, 16, value=server.agent_config.max_turns, step=1, label="max turns"
                    )
                    gr.Radio(
                        list(cfg.strategies), value=cfg.strategies[0], label="strategy",
                        interactive=len(cfg.strategies) > 1,
                    )

        def on_submit(problem, history, fmt_, temp_, turns_, threads, request: gr.Request):
            problem = (problem or "").strip()
            if not problem:
                yield history, "", threads
                return
            thread_id = uuid.uuid4().hex
            threads = [*(threads or []), thread_id]
            for msgs in server.respond(
                request.session_hash, problem, fmt=fmt_, temperature=temp_,
                max_turns=int(turns_), thread_id=thread_id,
            ):
                yield [*history, *msgs], "", threads

        def on_load(threads, request: gr.Request):
            history: list[Message] = []
            s = server.session(request.session_hash)
            for tid in threads or []:
                with contextlib.suppress(Exception):
                    traj = server.replay_thread(tid)
                    if traj is not None:
                        s.trajectories.append(traj)
                        history += turn_messages(
                            _last_question(traj.problem), traj.steps,
                            final=(traj.final_answer, traj.stop_reason),
                            image_dir=server.image_dir,
                        )
            return history

        def on_new(request: gr.Request):
            server.release(request.session_hash)
            return [], [], None

        def on_stop(request: gr.Request):
            server.stop(request.session_hash)

        def on_export(request: gr.Request):
            return server.export(request.session_hash)

        def on_unload(request: gr.Request):
            server.release(request.session_hash)

        inputs = [box, chat, fmt, temp, turns, saved]
        # Sessions solve concurrently (each has its own kernel), up to the pool's size.
        limit = dict(concurrency_limit=cfg.max_sessions, concurrency_id="solve")
        run = send.click(on_submit, inputs, [chat, box, saved], **limit)
        run_enter = box.submit(on_submit, inputs, [chat, box, saved], **limit)
        # No `cancels=` here: the run notices the switch, unwinds and says it was stopped, so
        # the page never freezes on a half-drawn turn.
        stop.click(on_stop, None, None)
        new.click(on_new, None, [chat, saved, exported], cancels=[run, run_enter])
        export.click(on_export, None, exported)
        demo.load(on_load, [saved], [chat])
        demo.unload(on_unload)
    return demo


def _last_question(prompt: str) -> str:
    """The user's own question inside a follow-up prompt built by ``_with_context``."""
    marker = "\n\nNew question: "
    return prompt.rsplit(marker, 1)[-1] if marker in prompt else prompt


def benchmark_examples(data_dir: Path, n: int = 6) -> list[str]:
    """A few problems from the shared benchmark files (empty if they are not there)."""
    picks = [("gsm8k/test.jsonl", "question"), ("math500/test.jsonl", "problem")]
    out: list[str] = []
    for rel, key in picks:
        path = data_dir / rel
        if not path.exists():
            continue
        with path.open() as f:
            for _, line in zip(range(n // len(picks)), f, strict=False):
                out.append(json.loads(line)[key])
    return out
