"""The chat app: a person types a problem and watches the model write code, see the kernel's
output, correct itself and answer — streamed live in a Gradio chat.

One browser session = one ``ChatSession``: its own kernel leased from a ``KernelPool`` (so
variables persist across follow-up questions but never leak between sessions), released on
"New chat", when the page closes, or after ``idle_timeout_s``. Every turn runs the agent graph
with LangGraph's SQLite checkpointer under a thread id kept in the browser's local storage, so a
reloaded page shows the conversation again. Rendering agent state into chat messages is
``apps.chat_render``.

Besides greedy, a question can be sampled N times and one sample chosen (``agent.strategies``):
majority vote, best-of-n by a scorer (the reward model of ``--rm``, else execution heuristics),
or RM-weighted majority. Each sample runs on its own kernel; the chosen sample's kernel becomes
the session's, so follow-up questions see exactly the variables of the answer shown.
"""

import contextlib
import json
import os
import queue
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
from tirforge.agent.graph import (
    AgentConfig,
    compiled_graph,
    run_config,
    solve_stream,
    to_trajectory,
)
from tirforge.agent.kernel_state import replay_cells
from tirforge.agent.strategies import STRATEGIES, ExecutionScorer, Scorer, choose
from tirforge.apps.chat_render import (
    NO_RM,
    SCORED,
    Message,
    samples_summary,
    turn_messages,
)
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
    strategies: tuple[str, ...] = ("greedy", "best-of-n", "majority")
    """Inference strategies offered in the settings panel (the first is the default);
    weighted-majority is added when a reward model is configured (``rm_path``)."""
    samples: int = 4
    """Default N (samples per question) for the sampling strategies."""
    max_samples: int = 8
    """Largest N offered. The extra samples run on a second pool of ``max_samples - 1``
    kernels, started the first time someone picks a sampling strategy."""
    sample_temperature: float = 0.7
    """Temperature of the samples when the setting is 0 (N greedy samples would be identical)."""
    rm_path: str | None = None
    """Reward model folder (``tirforge train rm``) scoring best-of-n; None: execution heuristics."""


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
    """The conversation: one (the chosen) trajectory per question."""
    cancel: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    kernel_cells: list[str] = field(default_factory=list)
    """Code whose effects the session kernel holds; replayed on the kernels of extra samples."""
    sample_kernels: list[Any] = field(default_factory=list)
    """Kernels leased for the extra samples of the question running now (Stop interrupts them)."""
    samples: list[Trajectory] = field(default_factory=list)
    """All samples of the last sampled question."""
    thread_id: str | None = None
    """Checkpointer thread of the last question's shown (chosen) trajectory."""


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
    """Owns the model, the kernel pools, the checkpointer and the browser sessions."""

    def __init__(
        self,
        load_backend: Callable[[], Backend],
        executor_config: ExecutorConfig,
        agent_config: AgentConfig | None = None,
        config: ChatConfig | None = None,
        model_name: str = "",
        scorer: Scorer | None = None,
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
        # Scores best-of-n: an injected scorer, else the RM of `rm_path` (loaded with the model).
        self._scorer: Scorer | None = scorer
        self._scorer_name = type(scorer).__name__ if scorer is not None else ""
        self.rm_error: str | None = None
        # Extra samples run on their own pool (size max_samples - 1), so sampling rarely takes a
        # kernel a new browser session waits for; one question samples at a time (`_sampling`),
        # so its leases never deadlock with another's. A kernel always goes back to the pool it
        # came from (each pool resets and closes only its own); `_from_samples` says which.
        self._sample_pool: KernelPool | None = None
        self._from_samples: set[int] = set()
        self._sample_start: threading.Thread | None = None
        self._samples_ready = threading.Event()
        self.sample_error: str | None = None
        self._sampling = threading.Lock()
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
        if self._scorer is None and self.config.rm_path:
            try:  # lazy: torch and transformers only when an RM is asked for
                from tirforge.training.rm import RewardScorer

                self._scorer = RewardScorer(self.config.rm_path)
                self._scorer_name = f"the reward model {self.config.rm_path}"
            except Exception as e:  # best-of-n still works, on the heuristics; the UI says so
                self.rm_error = f"{type(e).__name__}: {e}"
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self) -> None:
        with self._lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for s in sessions:
            s.cancel.set()
        for pool in (self._pool, self._sample_pool):
            if pool is not None:
                pool.close()

    # -- strategies ------------------------------------------------------------------------
    @property
    def strategies(self) -> list[str]:
        """Strategies the settings panel offers: RM-weighted voting only with a scorer."""
        offered = [
            s for s in self.config.strategies
            if s in STRATEGIES and (s == "greedy" or self.config.max_samples > 1)
        ]
        has_scorer = self._scorer is not None or bool(self.config.rm_path)
        if not has_scorer:
            offered = [s for s in offered if s != "weighted-majority"]
        elif "weighted-majority" not in offered and self.config.max_samples > 1:
            offered.append("weighted-majority")
        return offered or ["greedy"]

    @property
    def scorer(self) -> Scorer:
        return self._scorer if self._scorer is not None else ExecutionScorer()

    @property
    def scorer_label(self) -> str:
        """How samples are scored, in words for the page."""
        if self._scorer is not None:
            return f"scored by {self._scorer_name}"
        if self.rm_error:
            return f"scored by execution heuristics (the RM failed to load: {self.rm_error})"
        if self.config.rm_path and not self._ready.is_set():
            return f"scored by the reward model {self.config.rm_path} (still loading)"
        return NO_RM

    def warm_samples(self) -> None:
        """Start the sample pool in the background (once), e.g. when a sampling strategy is
        picked, so that its kernels are warm by the time the question comes."""
        with self._lock:
            if self._sample_start is not None:
                return
            self._sample_start = threading.Thread(target=self._start_samples, daemon=True)
        self._sample_start.start()

    def _start_samples(self) -> None:
        try:
            size = max(1, self.config.max_samples - 1)
            self._sample_pool = KernelPool(self.executor_config, size=size).start()
        except Exception as e:
            self.sample_error = _sandbox_help(self.executor_config, e)
        self._samples_ready.set()

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
        with self._lock:  # under the lock: a finishing sampled run swaps kernels under it too
            s = self.sessions.pop(key, None)
            kernel = None
            if s is not None:
                kernel, s.kernel = s.kernel, None
        if s is not None:
            s.cancel.set()
            for k in list(s.sample_kernels):  # the sampled run gives these back itself
                k.interrupt()
            if kernel is not None:
                kernel.interrupt()
                self._give_back(kernel)

    def _give_back(self, kernel: Any) -> None:
        """Return a kernel to the pool it was leased from (it is reset there)."""
        with self._lock:
            sampled = id(kernel) in self._from_samples
            self._from_samples.discard(id(kernel))
        pool = self._sample_pool if sampled else self._pool
        if pool is not None:
            pool.release(kernel)

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
        """Stop button: end generation (no further samples) and interrupt the running cells."""
        s = self.sessions.get(key)
        if s is not None:
            s.cancel.set()
            for k in [s.kernel, *s.sample_kernels]:
                if k is not None:
                    k.interrupt()

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
        strategy: str = "greedy",
        n: int = 1,
    ) -> Iterator[list[Message]]:
        """Yield the question's messages as they grow; the last yield is the finished turn.

        With a strategy other than greedy and ``n`` > 1 the question is sampled ``n`` times and
        the last yield shows the chosen sample plus a summary of all of them."""
        s = self.session(key)
        if not self._ready.is_set():
            while not self._ready.wait(0.5):
                waited = time.monotonic() - self._load_started
                yield [
                    {"role": "user", "content": problem},
                    {"role": "assistant", "content": f"Model still loading ({waited:.0f} s)…"},
                ]
        error = (
            self.load_error and f"the model could not be loaded: {self.load_error}"
            or self.sandbox_error
            or (strategy not in ("greedy", *self.strategies) and f"unknown strategy {strategy!r}")
        )
        if error:
            yield [
                {"role": "user", "content": problem},
                {"role": "assistant", "content": f"**Error:** {error}"},
            ]
            return
        assert self._pool is not None and self._backend is not None
        n = 1 if strategy == "greedy" else max(1, min(int(n), self.config.max_samples))
        if s.kernel is None:
            s.kernel = self._pool.lease()
        # A fresh switch per question: a stopped run that is still unwinding keeps its own.
        s.cancel = threading.Event()
        s.busy = True
        s.thread_id = thread_id
        temp = self.agent_config.sampling.temperature if temperature is None else temperature
        note = ""
        if n > 1 and temp <= 0:
            temp = self.config.sample_temperature
            note = f"Sampled at temperature {temp:g}: at 0 all {n} samples would be the same."
        cfg = replace(
            self.agent_config,
            format=fmt or self.agent_config.format,
            max_turns=max_turns or self.agent_config.max_turns,
            sampling=replace(self.agent_config.sampling, temperature=temp),
        )
        events: queue.Queue = queue.Queue()
        backend = _CancellableBackend(self._backend, s.cancel)
        prompt = _with_context(s.trajectories, problem)
        if n == 1:
            run, args = self._run_greedy, ()
        else:
            run, args = self._run_sampled, (strategy, n)

        def work() -> None:
            try:
                run(s, prompt, problem, cfg, backend, thread_id, events.put, *args)
            except Cancelled:
                events.put(("cancelled", None))
            except Exception as e:  # shown in the chat, never a silent hang
                events.put(("error", f"{type(e).__name__}: {e}"))
            events.put(("done", None))

        threading.Thread(target=work, daemon=True).start()
        steps: list[Step] = []
        live = ""
        status = ""  # sampling progress, shown above the sample being generated
        answers: list[str] = []
        sample = 0

        def view(final: tuple[str | None, str | None] | None = None) -> list[Message]:
            msgs = turn_messages(problem, steps, live_text=live, final=final,
                                 image_dir=self.image_dir)
            if status:
                msgs.insert(1, {"role": "assistant", "content": status})
            return msgs

        def progress(extra: str = "") -> str:
            done = f" Answers so far: {', '.join(answers)}." if answers else ""
            text = f"**{strategy}** — sample {sample + 1}/{n} …{extra}{done}"
            return f"{text}\n\n{note}" if note else text

        try:
            while True:
                node, item = events.get()
                if node == "done":
                    break
                if node == "trajectory":
                    if n == 1:
                        yield turn_messages(
                            problem, item.steps, final=(item.final_answer, item.stop_reason),
                            image_dir=self.image_dir,
                        )
                    else:  # one sample done; the next one (or the scoring) follows
                        answers.append(f"${item.final_answer}$" if item.final_answer else "none")
                elif node == "sample":
                    sample, steps, live = item, [], ""
                    status = progress()
                    yield view()
                elif node == "replay":
                    status = progress(f" restoring the conversation's variables ({item} cells)")
                    yield view()
                elif node == "status":
                    status = item
                    yield view()
                elif node == "scoring":
                    steps, live = [], ""
                    how = self.scorer_label if strategy in SCORED else "counting votes"
                    status = f"**{strategy}** — {n} samples done ({', '.join(answers)}); {how} …"
                    yield view()
                elif node == "chosen":
                    samples, chosen = item
                    pick = samples[chosen]
                    yield [
                        *turn_messages(problem, pick.steps,
                                       final=(pick.final_answer, pick.stop_reason),
                                       image_dir=self.image_dir),
                        samples_summary(samples, chosen, strategy, self.scorer_label, note),
                    ]
                elif node == "cancelled":
                    if n > 1:
                        status = f"**{strategy}** — stopped at sample {sample + 1}/{n}."
                    yield view(final=(None, "cancelled"))
                elif node == "error":
                    live = ""
                    yield [*view(), {"role": "assistant", "content": f"**Error:** {item}"}]
                elif node == "event":
                    if item["kind"] == "token":
                        live += item["text"]
                        yield view()
                elif isinstance(item, dict) and item.get("steps") is not None:
                    steps = item["steps"]
                    live = ""
                    yield view()
        finally:
            s.busy = False
            s.last_used = time.monotonic()

    def _run_greedy(
        self, s: ChatSession, prompt: str, problem: str, cfg: AgentConfig,
        backend: Backend, thread_id: str | None, emit: Callable[[tuple], None],
    ) -> None:
        """One trajectory on the session kernel; the events go to ``emit``."""
        history, steps = s.kernel_cells, []
        try:
            for node, item in solve_stream(
                prompt, backend, s.kernel, cfg, model_name=self.model_name,
                checkpointer=self.checkpointer, thread_id=thread_id, stream_tokens=True,
            ):
                if isinstance(item, Trajectory):
                    item.problem = problem  # the user's words, not the context-carrying prompt
                    s.trajectories.append(item)
                    steps = item.steps
                elif isinstance(item, dict) and item.get("steps") is not None:
                    steps = item["steps"]
                emit((node, item))
        finally:  # stopped or not, the kernel now holds what these cells did
            s.kernel_cells = replay_cells(steps, before=history)

    def _run_sampled(
        self, s: ChatSession, prompt: str, problem: str, cfg: AgentConfig,
        backend: Backend, thread_id: str | None, emit: Callable[[tuple], None],
        strategy: str, n: int,
    ) -> None:
        """``n`` samples one after another (a local model uses the whole device anyway, and the
        person watches each one stream), each on its own kernel: the first on the session kernel,
        the others on kernels of the sample pool that first replay the conversation's code
        cells, so every sample starts from the same variables. Then ``choose``."""
        if not self._sampling.acquire(blocking=False):
            emit(("status", "Waiting for another conversation's samples to finish …"))
            while not self._sampling.acquire(timeout=0.5):
                if s.cancel.is_set():
                    raise Cancelled
        history = list(s.kernel_cells)
        kernels = [s.kernel]
        samples: list[Trajectory] = []
        first_steps: list[Step] = []  # what the session kernel ran, kept if we stop early
        chosen: int | None = None
        try:
            pool = self._wait_sample_pool(s, emit)
            for i in range(n):
                if s.cancel.is_set():
                    raise Cancelled
                emit(("sample", i))
                if i:
                    kernel = self._lease(pool, s)
                    kernels.append(kernel)
                    s.sample_kernels.append(kernel)
                    if history:
                        emit(("replay", len(history)))
                    for code in history:
                        if s.cancel.is_set():
                            raise Cancelled
                        kernel.run(code)
                seed = cfg.sampling.seed
                scfg = cfg if seed is None else replace(
                    cfg, sampling=replace(cfg.sampling, seed=seed + i)
                )
                for node, item in solve_stream(
                    prompt, backend, kernels[i], scfg, model_name=self.model_name,
                    checkpointer=self.checkpointer, stream_tokens=True,
                    thread_id=f"{thread_id}-{i + 1}" if thread_id else None,
                ):
                    if isinstance(item, Trajectory):
                        item.problem, item.sample = problem, i
                        samples.append(item)
                    if i == 0 and isinstance(item, (dict, Trajectory)):
                        got = item.steps if isinstance(item, Trajectory) else item.get("steps")
                        first_steps = got if got is not None else first_steps
                    emit((node, item))
            emit(("scoring", None))
            pick = choose(samples, strategy, self.scorer)
            chosen = next(i for i, t in enumerate(samples) if t is pick)
        finally:
            self._sampling.release()
            kept = self._settle(s, kernels, chosen)
            if kept:
                steps = samples[chosen].steps if chosen is not None else first_steps
                s.kernel_cells = replay_cells(steps, before=history)
        assert chosen is not None  # reached only when choose() ran
        s.trajectories.append(samples[chosen])
        s.samples = samples
        s.thread_id = f"{thread_id}-{chosen + 1}" if thread_id else None
        emit(("chosen", (samples, chosen)))

    def _settle(self, s: ChatSession, kernels: list[Any], chosen: int | None) -> bool:
        """The chosen sample's kernel becomes the session's (after a stop: the first sample's);
        the others go back to their pools. Swapping, rather than re-running the chosen code in
        the session kernel, keeps exactly the state whose outputs the person saw (no re-run of
        random or slow code) at no cost. False if the session was released meanwhile."""
        keep = kernels[chosen] if chosen is not None else kernels[0]
        with self._lock:
            s.sample_kernels = []
            intact = s.kernel is kernels[0]
            if intact:
                s.kernel = keep
        # Released meanwhile (page closed, New chat): the session kernel went back already.
        for k in [k for k in kernels if k is not keep] if intact else kernels[1:]:
            self._give_back(k)
        return intact

    def _wait_sample_pool(self, s: ChatSession, emit: Callable[[tuple], None]) -> KernelPool:
        self.warm_samples()
        if not self._samples_ready.is_set():
            emit(("status", "Starting the kernels for the extra samples …"))
            while not self._samples_ready.wait(0.5):
                if s.cancel.is_set():
                    raise Cancelled
        if self._sample_pool is None:
            raise RuntimeError(self.sample_error or "the sample kernels did not start")
        return self._sample_pool

    def _lease(self, pool: KernelPool, s: ChatSession) -> Any:
        """A kernel for an extra sample: from the sample pool, or an idle one of the session
        pool while a session holds a sample-pool kernel it was swapped; waits (for a reset)
        but not past a Stop."""
        while True:
            if s.cancel.is_set():
                raise Cancelled
            with contextlib.suppress(TimeoutError):
                kernel = pool.lease(timeout=0.25)
                with self._lock:
                    self._from_samples.add(id(kernel))
                return kernel
            if self._pool is not None:
                with contextlib.suppress(TimeoutError):
                    return self._pool.lease(timeout=0)

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
        cfg = self.agent_config
        graph = compiled_graph("sync", self.checkpointer)
        values = graph.get_state(run_config(cfg, thread_id=thread_id)).values
        if not values or not values.get("stop_reason"):
            return None
        return to_trajectory(values, cfg, model_name=self.model_name)


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
                    offered = server.strategies
                    strategy = gr.Radio(
                        offered, value=offered[0], label="inference strategy",
                        interactive=len(offered) > 1, elem_id="strategy",
                    )
                    top = max(2, cfg.max_samples)
                    n_samples = gr.Slider(
                        2, top, value=min(max(2, cfg.samples), top), step=1,
                        label="samples (N)", visible=offered[0] != "greedy", elem_id="n-samples",
                    )
                    scorer_note = gr.Markdown(
                        server.scorer_label, visible=offered[0] in SCORED, elem_id="scorer-note"
                    )

        def on_strategy(choice):
            if choice != "greedy":
                server.warm_samples()  # the extra kernels start while the question is typed
            return (
                gr.update(visible=choice != "greedy"),
                gr.update(value=server.scorer_label, visible=choice in SCORED),
            )

        def on_submit(
            problem, history, fmt_, temp_, turns_, strategy_, n_, threads, request: gr.Request
        ):
            problem = (problem or "").strip()
            if not problem:
                yield history, "", threads
                return
            thread_id = uuid.uuid4().hex
            threads = [*(threads or []), thread_id]
            msgs: list[Message] = []
            for msgs in server.respond(
                request.session_hash, problem, fmt=fmt_, temperature=temp_,
                max_turns=int(turns_), thread_id=thread_id, strategy=strategy_ or "greedy",
                n=int(n_),
            ):
                yield [*history, *msgs], "", threads
            # A sampled question is saved under the chosen sample's thread: a reload shows it.
            s = server.sessions.get(request.session_hash)
            if s is not None and s.thread_id and s.thread_id != thread_id:
                yield [*history, *msgs], "", [*threads[:-1], s.thread_id]

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

        strategy.change(on_strategy, strategy, [n_samples, scorer_note])
        inputs = [box, chat, fmt, temp, turns, strategy, n_samples, saved]
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
