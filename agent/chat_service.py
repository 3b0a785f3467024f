"""The chat service: a model, two kernel pools, a checkpointer and one ``ChatSession`` per person.

Each session leases its own kernel (variables persist across follow-up questions but never leak
between sessions) until ``release`` or ``idle_timeout_s``. Every question runs the agent graph
with LangGraph's SQLite checkpointer, so a finished turn can be read back (``replay_thread``).
Besides greedy, a question can be sampled N times and one sample chosen (``agent.strategies``);
each sample runs on its own kernel -- the extras are forks of the session kernel taken before
the first sample runs (``Executor.fork``: the conversation's variables without re-running
its cells), or, where the executor cannot fork, kernels of a second pool that replay the
conversation's cells (``chat_samples``) -- and the chosen sample's kernel becomes the session's,
so follow-ups see the variables of the answer shown. ``ChatService.ask`` yields events;
``apps.chat`` renders them.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tirforge.agent.backends.base import Backend
from tirforge.agent.chat_samples import SampleKernels, sandbox_help
from tirforge.agent.chat_session import (
    CancellableBackend,
    Cancelled,
    ChatSession,
    with_context,
)
from tirforge.agent.graph import (
    AgentConfig,
    compiled_graph,
    run_config,
    solve_stream,
    to_trajectory,
)
from tirforge.agent.kernel_state import replay_cells
from tirforge.agent.strategies import STRATEGIES, ExecutionScorer, Scorer, choose
from tirforge.executors import ExecutorConfig, KernelPool
from tirforge.trajectories.schema import Step, Trajectory

ChatEvent = tuple[str, Any]
"""(kind, payload) of ``ChatService.ask``: see its docstring."""


@dataclass
class ChatServiceConfig:
    """How many sessions and samples are served, and where conversations are kept."""

    max_sessions: int = 4
    """Warm kernels in the pool = sessions served at once; more sessions wait."""
    idle_timeout_s: float = 900.0
    """A session idle this long gives its kernel back (its variables are lost)."""
    db_path: str | None = None
    """SQLite file of the LangGraph checkpointer (None: a file in the temp dir)."""
    strategies: tuple[str, ...] = ("greedy", "best-of-n", "majority")
    """Inference strategies offered (the first is the default); weighted-majority is added
    when a scorer is given or loaded."""
    samples: int = 4
    """Default N (samples per question) for the sampling strategies."""
    max_samples: int = 8
    """Largest N offered. The extra samples run on a second pool of ``max_samples - 1``
    kernels, started the first time someone picks a sampling strategy."""
    sample_temperature: float = 0.7
    """Temperature of the samples when the setting is 0 (N greedy samples would be identical)."""
    fork_samples: bool = True
    """Extra samples run on forks of the session kernel when its executor ``supports_fork``
    (no second pool, no replay); False, or a fork that fails: the second pool and replay."""


class ChatService(SampleKernels):
    """Owns the model, the kernel pools, the checkpointer and the sessions.

    ``load_backend`` (and ``load_scorer``, which returns a scorer and its name in words) run
    in a background thread, so a page can show itself while they load; ``wait_ready`` waits.
    Errors while loading are kept (``load_error``, ``sandbox_error``, ``rm_error``) and
    reported by ``ask``, never raised into a request handler.
    """

    def __init__(
        self,
        load_backend: Callable[[], Backend],
        executor_config: ExecutorConfig,
        agent_config: AgentConfig | None = None,
        config: ChatServiceConfig | None = None,
        model_name: str = "",
        scorer: Scorer | None = None,
        load_scorer: Callable[[], tuple[Scorer, str]] | None = None,
    ):
        self.config = config or ChatServiceConfig()
        self.agent_config = agent_config or AgentConfig()
        self.executor_config = executor_config
        self.model_name = model_name
        self.sessions: dict[str, ChatSession] = {}
        self._lock = threading.Lock()
        self._backend: Backend | None = None
        self._pool: KernelPool | None = None
        self.load_error: str | None = None
        self.sandbox_error: str | None = None
        self._load_started = time.monotonic()
        self._ready = threading.Event()
        # Scores best-of-n: an injected scorer, else `load_scorer`'s (loaded with the model).
        self._scorer: Scorer | None = scorer
        self._load_scorer = load_scorer
        self.scorer_name = type(scorer).__name__ if scorer is not None else ""
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
        self.checkpointer = sqlite_checkpointer(db)
        # Model and kernels load in the background: the page is usable (and says so) at once.
        threading.Thread(target=self._load, args=(load_backend,), daemon=True).start()
        threading.Thread(target=self._reap_idle, daemon=True).start()

    # -- startup ---------------------------------------------------------------------------
    def _load(self, load_backend: Callable[[], Backend]) -> None:
        try:
            self._pool = KernelPool(self.executor_config, size=self.config.max_sessions).start()
        except Exception as e:  # no bwrap, no Docker daemon, no image: say how to fix it
            self.sandbox_error = sandbox_help(self.executor_config, e)
        try:
            self._backend = load_backend()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
        if self._scorer is None and self._load_scorer is not None:
            try:
                self._scorer, self.scorer_name = self._load_scorer()
            except Exception as e:  # best-of-n still works, on the heuristics; the UI says so
                self.rm_error = f"{type(e).__name__}: {e}"
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        """The model, kernels and scorer have loaded (or failed to)."""
        return self._ready.is_set()

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
        has_scorer = self._scorer is not None or self._load_scorer is not None
        if not has_scorer:
            offered = [s for s in offered if s != "weighted-majority"]
        elif "weighted-majority" not in offered and self.config.max_samples > 1:
            offered.append("weighted-majority")
        return offered or ["greedy"]

    @property
    def scorer(self) -> Scorer:
        """The scorer of best-of-n: the given or loaded one, else execution heuristics."""
        return self._scorer if self._scorer is not None else ExecutionScorer()

    @property
    def has_scorer(self) -> bool:
        """A scorer was given or has loaded (not the execution heuristics)."""
        return self._scorer is not None

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
    def ask(
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
    ) -> Iterator[ChatEvent]:
        """Run one question in session ``key`` and yield its events as they happen.

        Before the run: ``("loading", seconds waited)`` every half second while the model
        loads; ``("failed", message)`` if the question cannot run (it ends there);
        ``("start", (n, note))`` with the number of samples and a note on adjusted settings.
        During it: ``solve_stream``'s items (``(node, state update)``, ``("event",
        AgentEvent)``, ``("trajectory", Trajectory)``), and with n > 1 ``("sample", i)``,
        ``("replay", cells)``, ``("status", text)``, ``("scoring", None)`` and
        ``("chosen", (samples, index))``. A run ends with ``("cancelled", None)`` after Stop or
        ``("error", message)`` if it failed. With a strategy other than greedy and ``n`` > 1
        the question is sampled ``n`` times (at most ``max_samples``)."""
        # Every run is checkpointed under a thread: a new one unless the caller names it
        # (``session(key).thread_id`` says which, for ``replay_thread``).
        thread_id = thread_id or uuid.uuid4().hex
        s = self.session(key)
        while not self._ready.wait(0.5):
            yield "loading", time.monotonic() - self._load_started
        error = (
            self.load_error and f"the model could not be loaded: {self.load_error}"
            or self.sandbox_error
            or (strategy not in ("greedy", *self.strategies) and f"unknown strategy {strategy!r}")
        )
        if error:
            yield "failed", error
            return
        assert self._pool is not None and self._backend is not None
        n = 1 if strategy == "greedy" else max(1, min(int(n), self.config.max_samples))
        if s.kernel is None:
            s.kernel = self._pool.lease()
        # A fresh switch per question: a stopped run that is still unwinding keeps its own.
        s.cancel = threading.Event()
        s.busy = True
        s.thread_id = thread_id
        try:
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
            yield "start", (n, note)
            events: queue.Queue = queue.Queue()
            backend = CancellableBackend(self._backend, s.cancel)
            prompt = with_context(s.trajectories, problem)
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
            while (item := events.get())[0] != "done":
                yield item
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
        the others on forks of it taken before the first sample runs, or (no fork) on kernels of
        the sample pool that first replay the conversation's code cells, so every sample starts
        from the same variables. Then ``choose``."""
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
        forked = self._fork_samples(s, n - 1)
        try:
            pool = self._wait_sample_pool(s, emit) if forked is None else None
            for i in range(n):
                if s.cancel.is_set():
                    raise Cancelled
                emit(("sample", i))
                if i and forked is not None:
                    kernel = forked.pop(0)
                    kernels.append(kernel)
                    s.sample_kernels.append(kernel)
                elif i:
                    assert pool is not None
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
            for k in forked or []:  # forks of samples that never ran (stopped)
                self._give_back(k)
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

    def export(self, key: str) -> str | None:
        """The session's trajectories as a JSONL file (the collection schema); its path."""
        s = self.sessions.get(key)
        return None if s is None else s.export()

    def replay_thread(self, thread_id: str) -> Trajectory | None:
        """A finished turn saved by the checkpointer (after a page reload), or None."""
        cfg = self.agent_config
        graph = compiled_graph("sync", self.checkpointer)
        values = graph.get_state(run_config(cfg, thread_id=thread_id)).values
        if not values or not values.get("stop_reason"):
            return None
        return to_trajectory(values, cfg, model_name=self.model_name)


def sqlite_checkpointer(path: str):
    from langgraph.checkpoint.sqlite import SqliteSaver

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Gradio handlers run in worker threads; SqliteSaver serialises access itself.
    return SqliteSaver(sqlite3.connect(path, check_same_thread=False))
