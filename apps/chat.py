"""The chat app: a person types a problem and watches the model write code, see the kernel's
output, correct itself and answer — streamed live in a Gradio chat.

This module is the face: the page (``build_app``) and the rendering of a question's events into
chat messages (``ChatServer.respond``, with ``apps.chat_render``). Sessions, kernel pools,
sampling strategies and the checkpointer are ``agent.chat_service.ChatService``. One browser
session is one chat session; its thread ids are kept in the browser's local storage, so a
reloaded page shows the conversation again.
"""

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tirforge.agent.backends.base import Backend
from tirforge.agent.chat_service import ChatService, ChatServiceConfig
from tirforge.agent.chat_session import last_question
from tirforge.agent.formats import FORMATS
from tirforge.agent.graph import AgentConfig
from tirforge.agent.strategies import Scorer
from tirforge.apps.chat_render import (
    NO_RM,
    SCORED,
    Message,
    samples_summary,
    turn_messages,
)
from tirforge.executors import ExecutorConfig
from tirforge.trajectories.schema import Step

# Gradio phones home for analytics and version checks by default; this app must run offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]


@dataclass
class ChatConfig(ChatServiceConfig):
    """How the chat server runs: where it listens and what the page offers, plus the
    service settings (``ChatServiceConfig``)."""

    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 keeps the app (and its kernels) off the network."""
    port: int = 7860
    examples: list[str] = field(default_factory=list)
    """Example problems shown under the input box."""
    rm_path: str | None = None
    """Reward model folder (``tirforge train rm``) scoring best-of-n and offering
    weighted-majority; None: execution heuristics."""


def _reward_model(path: str) -> Callable[[], tuple[Scorer, str]]:
    def load() -> tuple[Scorer, str]:
        from tirforge.training.rm import RewardScorer  # torch and transformers only if asked

        return RewardScorer(path), f"the reward model {path}"

    return load


class ChatServer(ChatService):
    """The sessions of the chat app, rendered as chat messages."""

    config: ChatConfig

    def __init__(
        self,
        load_backend: Callable[[], Backend],
        executor_config: ExecutorConfig,
        agent_config: AgentConfig | None = None,
        config: ChatConfig | None = None,
        model_name: str = "",
        scorer: Scorer | None = None,
    ):
        config = config or ChatConfig()
        load_scorer = _reward_model(config.rm_path) if scorer is None and config.rm_path else None
        self.image_dir = tempfile.mkdtemp(prefix="tirforge-chat-img-")
        super().__init__(load_backend, executor_config, agent_config, config, model_name,
                         scorer=scorer, load_scorer=load_scorer)

    @property
    def scorer_label(self) -> str:
        """How samples are scored, in words for the page."""
        if self.has_scorer:
            return f"scored by {self.scorer_name}"
        if self.rm_error:
            return f"scored by execution heuristics (the RM failed to load: {self.rm_error})"
        if self.config.rm_path and not self.ready:
            return f"scored by the reward model {self.config.rm_path} (still loading)"
        return NO_RM

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
        """Yield the question's messages as they grow (``ask``'s events, rendered); the last
        yield is the finished turn. With a strategy other than greedy and ``n`` > 1 the question
        is sampled ``n`` times and the last yield shows the chosen sample plus a summary of all
        of them."""
        events = self.ask(key, problem, fmt=fmt, temperature=temperature,
                          max_turns=max_turns, thread_id=thread_id, strategy=strategy, n=n)
        steps: list[Step] = []
        live = ""
        status = ""  # sampling progress, shown above the sample being generated
        answers: list[str] = []
        sample, note = 0, ""

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

        user: Message = {"role": "user", "content": problem}
        with contextlib.closing(events):  # closing the page's run ends the question's too
            for node, item in events:
                if node == "loading":
                    text = f"Model still loading ({item:.0f} s)…"
                    yield [user, {"role": "assistant", "content": text}]
                elif node == "failed":
                    yield [user, {"role": "assistant", "content": f"**Error:** {item}"}]
                elif node == "start":
                    n, note = item
                elif node == "trajectory":
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
                            last_question(traj.problem), traj.steps,
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
