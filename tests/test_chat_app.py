"""The chat app in a real browser (Debian's Chromium driven by Playwright) against the real
Gradio server and real sandboxed kernels; the model is a scripted replay backend so the page's
content is deterministic. Plus unit tests of the state → message rendering."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tirforge.agent.backends.base import Completion
from tirforge.agent.graph import AgentConfig
from tirforge.apps.chat import ChatConfig, ChatServer, build_app
from tirforge.apps.chat_render import answer_message, step_messages, turn_messages
from tirforge.executors import ExecutionResult, ExecutorConfig
from tirforge.trajectories.schema import Step, Trajectory

pytestmark = pytest.mark.timeout(300)
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# Problem keyword -> the assistant turns the "model" plays, one per call; or a list of such
# scripts, which successive samples of the problem cycle through.
SCRIPTS: dict[str, list] = {
    "squares": [
        "I will add the squares with Python.\n```python\nx = sum(i**2 for i in range(1, 21))\n"
        "print(x)\n```",
        "The kernel printed 2870, so the answer is \\boxed{2870}.",
    ],
    "remember": ["```python\nsecret = 41\nprint('stored')\n```", "Stored: \\boxed{41}"],
    "recall": ["```python\nprint('secret' in dir())\n```", "Checked: \\boxed{0}"],
    "sleepy": ["```python\nimport time\ntime.sleep(120)\n```", "Done: \\boxed{1}"],
    "plot": [
        "```python\nimport matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "from IPython.display import Image, display\nimport io\nbuf = io.BytesIO()\n"
        "plt.plot([1, 2, 3]); plt.savefig(buf, format='png')\ndisplay(Image(buf.getvalue()))\n```",
        "\\boxed{3}",
    ],
    # Samples 1 and 3 answer 7 after a failed cell (execution score 1 + 0.5 * 1/2 - 0.1 = 1.15),
    # sample 2 answers 9 cleanly (1.5): majority picks sample 1, best-of-n sample 2. Each leaves
    # its own `picked` in its kernel, so a follow-up shows whose kernel the session kept.
    "vote": [
        ["```python\npicked = 7\nprint(undefined_name)\n```", "```python\nprint(picked)\n```",
         "So \\boxed{7}"],
        # (a short nap keeps the progress "sample 2/3" on screen long enough to be seen)
        ["```python\npicked = 9\nimport time\ntime.sleep(0.5)\nprint(picked)\n```",
         "So \\boxed{9}"],
        ["```python\npicked = 7\nprint(undefined_name)\n```", "```python\nprint(picked)\n```",
         "So \\boxed{7}"],
    ],
    "chosen": ["```python\nprint('picked', picked)\n```", "\\boxed{0}"],
    # The first sample answers at once, the second runs a long cell (for Stop).
    "nap": [["\\boxed{1}"], ["```python\nimport time\ntime.sleep(120)\n```", "\\boxed{2}"]],
}


class ScriptedBackend:
    """Picks the script by the problem's keyword (a new sample of a problem with several
    scripts takes the next one); the turn by the outputs already seen."""

    name = "scripted"

    def __init__(self) -> None:
        self.starts: dict[str, int] = {}

    def generate(self, requests, params):
        out = []
        for r in requests:
            user = r.messages[-1]["content"].rsplit("New question:", 1)[-1]
            key, script = next((k, v) for k, v in SCRIPTS.items() if k in user)
            if isinstance(script[0], list):  # several samples
                if "```output" not in r.prefix:  # a sample starts
                    i = self.starts[key] = self.starts.get(key, -1) + 1
                    script = script[i % len(script)]
                else:
                    script = next(v for v in script if v[0] in r.prefix)
            text = script[min(r.prefix.count("```output"), len(script) - 1)]
            if r.on_text is not None:  # stream it in chunks, like a model would
                for i in range(0, len(text), 16):
                    r.on_text(text[i : i + 16])
            out.append(Completion(text=text, finish_reason="stop", n_tokens=len(text.split())))
        return out


# --------------------------------------------------------------------------- rendering


def _step(**kw) -> Step:
    return Step(**{"text": "Prose first.\n```python\nprint(1)\n```", "code": "print(1)\n", **kw})


def test_step_renders_prose_code_output_and_feedback(tmp_path):
    res = ExecutionResult(stdout="1\n", images=[b"\x89PNG fake"])
    msgs = step_messages(
        _step(execution=res, output="1", feedback="The code raised an error. Fix it."), 2,
        str(tmp_path),
    )
    assert msgs[0] == {"role": "assistant", "content": "Prose first."}
    assert msgs[1]["metadata"]["title"] == "Code cell 2"
    assert "```python\nprint(1)\n```" in msgs[1]["content"] and "```output\n1\n```" in msgs[1][
        "content"]
    assert Path(msgs[2]["content"]["path"]).read_bytes() == b"\x89PNG fake"
    assert msgs[3]["metadata"]["title"] == "Self-correction"


def test_bare_boxed_answers_in_prose_render_as_math():
    msgs = step_messages(Step(text="So the answer is \\boxed{42}."), 1)
    assert msgs[0]["content"] == "So the answer is $\\boxed{42}$."
    kept = step_messages(Step(text="Already math: $\\boxed{7}$"), 1)
    assert kept[0]["content"] == "Already math: $\\boxed{7}$"


def test_step_titles_say_what_went_wrong():
    err = ExecutionResult(error_name="NameError", error_value="x")
    assert step_messages(_step(execution=err, output="NameError"), 1)[1]["metadata"]["title"] \
        .endswith("NameError")
    restarted = ExecutionResult(error_name="KernelDied", restarted=True)
    assert "variables lost" in step_messages(_step(execution=restarted), 1)[1]["metadata"]["title"]
    timed = ExecutionResult(timed_out=True)
    assert "timed out" in step_messages(_step(execution=timed), 1)[1]["metadata"]["title"]
    pending = step_messages(_step(), 1)[1]["metadata"]
    assert pending["status"] == "pending" and "running" in pending["title"]


def test_answer_and_no_answer_messages():
    assert "\\boxed{42}" in answer_message("42", "answer")["content"]
    assert "turn budget" in answer_message(None, "max_turns")["content"]
    assert "stopped it" in answer_message(None, "cancelled")["content"]
    msgs = turn_messages("Q?", [Step(text="thinking")], live_text="more…", final=("1", "answer"))
    assert [m["content"] for m in msgs[:3]] == ["Q?", "thinking", "more…"]
    assert "Final answer" in msgs[-1]["content"]


# --------------------------------------------------------------------------- browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    db = tmp_path_factory.mktemp("chat") / "threads.sqlite"
    server = ChatServer(
        ScriptedBackend,
        ExecutorConfig(backend="local", sandbox="bwrap", timeout=60),
        AgentConfig(max_turns=4),
        ChatConfig(max_sessions=3, db_path=str(db), examples=["What is 2 + 2?"],
                   max_samples=3, samples=3),
        model_name="scripted",
    )
    assert server.wait_ready(120) and not server.sandbox_error and not server.load_error
    port = _free_port()
    demo = build_app(server)
    demo.queue().launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
        quiet=True,
    )
    yield f"http://127.0.0.1:{port}/", server
    demo.close()
    server.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield b
        b.close()


def ask(page, problem: str) -> None:
    page.locator("#problem textarea").fill(problem)
    page.locator("#send").click()


def chat_text(page) -> str:
    return page.locator("#chat").inner_text()


def wait_for(page, text: str, timeout: float = 60) -> None:
    page.locator("#chat").get_by_text(text, exact=False).first.wait_for(timeout=timeout * 1000)


def wait_idle(server, timeout: float = 10) -> None:
    """Until no session is running a question (its generator's cleanup has run)."""
    deadline = time.monotonic() + timeout
    while any(s.busy for s in server.sessions.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(s.busy for s in server.sessions.values())


def test_solve_in_the_browser(app_url, browser):
    url, server = app_url
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(url)
    ask(page, "What is the sum of the squares of 1..20?")
    wait_for(page, "Final answer")
    text = chat_text(page)
    assert "I will add the squares with Python." in text
    assert "Code cell 1" in text
    wait_idle(server)  # the last redraw is done, so expanding the cell sticks
    page.locator("#chat").get_by_text("Code cell 1").first.click()  # expand the cell
    page.wait_for_timeout(500)  # the accordion animates open
    page.locator("#chat").get_by_text("x = sum(i**2").first.wait_for(state="visible")
    # The kernel's output, in its own code block under the code.
    page.locator("#chat pre", has_text="2870").first.wait_for(state="visible")
    assert page.locator("#chat .katex").count() >= 1  # the boxed answer is rendered LaTeX
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-solved.png"), full_page=True)
    # Export: one JSONL line in the collection schema, with the real kernel output.
    page.locator("#export").click()
    link = page.locator("#exported a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as dl:
        link.click()
    line = Path(dl.value.path()).read_text().splitlines()[0]
    traj = Trajectory.model_validate_json(line)
    assert traj.final_answer == "2870" and traj.steps[0].execution.stdout.strip() == "2870"
    assert json.loads(line)["problem"].startswith("What is the sum")
    ctx.close()


def test_sessions_have_isolated_kernels_and_follow_ups_share_one(app_url, browser):
    url, _ = app_url
    a, b = browser.new_context(), browser.new_context()
    pa, pb = a.new_page(), b.new_page()
    pa.goto(url)
    pb.goto(url)
    ask(pa, "Please remember a number")
    wait_for(pa, "Final answer")
    ask(pb, "Now recall it")  # another browser: its kernel must not know `secret`
    wait_for(pb, "Final answer")
    pb.get_by_text("Code cell 1").first.click()
    wait_for(pb, "False")
    ask(pa, "Now recall it")  # same browser, follow-up: same kernel, variable still there
    wait_for(pa, "Code cell 1")
    pa.locator("#chat").get_by_text("Final answer").nth(1).wait_for(timeout=60_000)
    pa.get_by_text("Code cell 1").nth(1).click()
    wait_for(pa, "True")
    a.close()
    b.close()


def test_stop_interrupts_a_long_cell(app_url, browser):
    url, server = app_url
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(url)
    ask(page, "A sleepy computation")
    wait_for(page, "running")  # the cell is in the kernel now
    time.sleep(1.0)
    t0 = time.monotonic()
    page.locator("#stop").click()
    wait_for(page, "you stopped it", timeout=30)
    assert time.monotonic() - t0 < 15  # the 120 s cell was interrupted, not waited out
    # The kernel is free again: a new question in the same session gets its answer.
    ask(page, "sum of the squares again")
    wait_for(page, "Final answer")
    wait_idle(server)
    ctx.close()


def test_kernel_images_appear_inline(app_url, browser):
    url, _ = app_url
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(url)
    ask(page, "Make a plot of 1, 2, 3")
    wait_for(page, "Final answer")
    img = page.locator("#chat img").first
    img.wait_for(timeout=30_000)
    assert img.evaluate("i => i.naturalWidth") > 100  # a real PNG from matplotlib, loaded
    ctx.close()


def test_reload_shows_the_conversation_again(app_url, browser):
    url, _ = app_url
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(url)
    ask(page, "The sum of squares, to be saved")
    wait_for(page, "Final answer")
    page.reload()
    wait_for(page, "to be saved", timeout=30)
    wait_for(page, "Final answer", timeout=30)
    ctx.close()


def test_best_of_n_in_the_browser(app_url, browser):
    """Best-of-n from the settings panel: progress while sampling, then the chosen sample's
    steps and answer, and a collapsed summary of all samples saying which won and why."""
    url, server = app_url
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(url)
    assert not page.locator("#n-samples").is_visible()  # greedy: no N
    page.locator("#strategy").get_by_text("best-of-n").click()
    page.locator("#n-samples").wait_for(state="visible")
    page.locator("#scorer-note").get_by_text("no RM loaded").wait_for()
    # The progress line lives a fraction of a second with the scripted model: record it as
    # the page draws it rather than hoping a poll lands on it.
    page.evaluate("""() => {
        const chat = document.querySelector('#chat');
        window.progress = [];
        new MutationObserver(() => {
            const m = chat.textContent.match(/sample \\d\\/3/);
            if (m && !window.progress.includes(m[0])) window.progress.push(m[0]);
        }).observe(chat, {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, "Let the samples vote")
    wait_for(page, "picked sample 2 of 3")
    wait_idle(server)
    assert "sample 2/3" in page.evaluate("window.progress")
    text = chat_text(page)
    assert "Final answer" in text and "Code cell 1" in text
    page.locator("#chat").get_by_text("picked sample 2 of 3").click()  # open the summary
    page.locator("#chat").get_by_text("execution heuristics").first.wait_for(state="visible")
    page.locator("#chat").get_by_text("Code cell 1").first.click()
    page.locator("#chat").get_by_text("picked = 9").first.wait_for(state="visible")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-best-of-n.png"), full_page=True)
    s = next(s for s in server.sessions.values() if s.samples)
    assert [t.final_answer for t in s.samples] == ["7", "9", "7"]
    assert s.trajectories[-1].final_answer == "9"
    ctx.close()


@pytest.mark.slow
def test_real_default_model_in_the_browser(browser, tmp_path):
    """The embedded SmolLM2 model behind the page: its code runs in the kernel, it answers."""
    from tirforge.agent.backends.base import SamplingParams
    from tirforge.agent.backends.hf import TransformersBackend
    from tirforge.agent.models import resolve_model

    server = ChatServer(
        lambda: TransformersBackend(resolve_model("smollm2")),
        ExecutorConfig(backend="local", sandbox="bwrap", timeout=30),
        AgentConfig(max_turns=4, sampling=SamplingParams(max_new_tokens=256)),
        ChatConfig(max_sessions=1, db_path=str(tmp_path / "t.sqlite")),
        model_name="smollm2",
    )
    port = _free_port()
    demo = build_app(server)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                        ssr_mode=False, quiet=True)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        ask(page, "What is 17 * 23 + 5?")  # answered while the model may still be loading
        wait_for(page, "answer", timeout=240)  # "Final answer" or "No final answer"
        assert "Code cell 1" in chat_text(page)
        traj = next(iter(server.sessions.values())).trajectories[-1]
        assert traj.steps[0].execution is not None and traj.steps[0].execution.ok
        assert traj.steps[0].execution.stdout.strip() == "396"
        page.close()
    finally:
        demo.close()
        server.close()
