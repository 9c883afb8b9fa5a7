"""The web chat page of `lmlab serve`, in headless Chromium (Debian's `chromium`, driven by
Playwright): it loads the models, streams a reply, sends the history on the next turn, and
shows model output that holds HTML as text, never as markup.

The model is a real checkpoint whose weights make its greedy reply a fixed string (see
`tests.serving.scripted_checkpoint`), so the page is tested on exactly the output that
would hurt: a `<script>`, an `<img onerror>`, markup inside inline code."""

from __future__ import annotations

import shutil
import time

import pytest

from lmlab.serve.app import create_app
from lmlab.serve.engine import EngineLimits, load_engine
from lmlab.serve.metrics import Metrics
from tests.serving import running, scripted_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)

PIECES = [
    "Hello ",
    "<script>window.pwned=1</script>",
    " ",
    "**bold**",
    " and ",
    "`x<b>y</b>`",
    " <img src=x onerror=window.pwned=2>",
]
REPLY = "".join(PIECES)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = scripted_checkpoint(tmp_path_factory.mktemp("page"), PIECES)
    engine = load_engine("scripted", str(ckpt), EngineLimits(max_concurrency=4), Metrics())
    step = engine.sched.step

    def slow_step():  # a slow model, so the page is seen while the reply is still coming
        time.sleep(0.12)
        return step()

    engine.sched.step = slow_step
    with running(create_app({"scripted": engine})) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/")
        yield page
        browser.close()
        assert not errors, errors


def test_a_reply_streams_renders_markdown_and_shows_html_as_text(page):
    page.wait_for_selector("#model option[value='scripted']", state="attached")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")  # the default 256 is over this small model's context
    page.fill("#system", "Be brief.")
    page.fill("#input", "hello there")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    body = sent.value.post_data_json
    assert body["model"] == "scripted" and body["stream"] is True and body["max_tokens"] == 40
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    reply = page.locator(".message.assistant .content").last
    seen = set()
    deadline = time.monotonic() + 30
    while "onerror" not in (text := reply.text_content() or ""):
        assert time.monotonic() < deadline, f"no full reply; last seen {text!r}"
        seen.add(text)
        time.sleep(0.03)
    assert len({t for t in seen if t}) >= 3, seen  # it grew piece by piece: streamed
    sync_api.expect(page.locator("#status")).to_contain_text("done")
    # every piece of markup arrived as text; only the markdown became elements
    text = reply.text_content()
    assert "<script>window.pwned=1</script>" in text
    assert "<img src=x onerror=window.pwned=2>" in text
    assert reply.locator("script, img, b").count() == 0
    assert reply.locator("strong").text_content() == "bold"
    assert reply.locator("code").text_content() == "x<b>y</b>"
    assert page.evaluate("window.pwned") is None


def test_the_second_turn_sends_the_history(page):
    page.fill("#input", "and again")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    assert sent.value.post_data_json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "and again"},
    ]
    # (waits through locators: the page's policy forbids the eval a wait_for_function needs)
    sync_api.expect(page.locator(".message.assistant")).to_have_count(2)
    sync_api.expect(page.locator("#status")).to_contain_text("done")
    assert page.locator(".message.assistant .content").last.text_content().endswith("pwned=2>")
    assert page.evaluate("window.pwned") is None
