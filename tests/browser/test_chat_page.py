"""The chat page in headless Chromium against the real server on the bundled model.

Needs the `playwright` Python package and Debian's `chromium` at /usr/bin/chromium (Playwright's own
browser download is not used). The server runs as `gla-serve serve` in a subprocess on a free
loopback port, exactly as a user starts it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("GLA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
READY_TIMEOUT_S = 240
TURN_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # `-c` keeps this independent of where the console script was installed.
    cmd = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
           "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server_url: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server_url}/")
    expect(page.locator("#model-info")).to_contain_text("Model:")
    # Greedy and short: a deterministic, quick reply from the bundled model on a CPU.
    page.click(".settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _watch_reply_lengths(page: Page) -> None:
    """Record every text a reply was shown with, to see that it grew delta by delta.

    Per mutation record, not per observer callback: when several SSE events arrive in one network
    read, the page applies them in one task and the observer runs once for all of them (a fast
    machine then saw only the final length). Each `textContent =` adds a new text node holding the
    text of that moment, so the records keep every length the page rendered."""
    page.evaluate(
        """() => {
            window.__lengths = [];
            new MutationObserver((records) => {
                for (const r of records) {
                    if (!(r.target instanceof Element) || !r.target.matches('.msg.assistant .content')) continue;
                    for (const n of r.addedNodes) {
                        if (n.nodeType === Node.TEXT_NODE) window.__lengths.push(n.data.length);
                    }
                }
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }"""
    )


def _send(page: Page, text: str, nth: int) -> None:
    page.fill("#prompt", text)
    page.keyboard.press("Enter")
    reply = page.locator(".msg.assistant").nth(nth)
    expect(reply).to_have_attribute("data-state", "done", timeout=TURN_TIMEOUT_MS)


def test_two_turns_stream_and_the_second_resumes_from_cached_state(page: Page) -> None:
    _watch_reply_lengths(page)
    _send(page, "Hello! Tell me about gated linear attention.", 0)
    first = page.locator(".msg.assistant").nth(0)
    stats = first.locator(".turn-stats")
    tokens = int(re.search(r"(\d+) tokens", stats.inner_text()).group(1))  # type: ignore[union-attr]
    assert tokens >= 1
    # Streamed: the reply was shown at two or more lengths before it was complete (one per delta).
    steps = {n for n in page.evaluate("window.__lengths") if n > 0}
    assert len(steps) >= min(tokens, 2), steps
    expect(stats.locator(".stat-tps")).to_have_text(re.compile(r"^(\d+(\.\d)? tok/s|– tok/s)$"))
    expect(stats.locator(".stat-ttft")).to_have_text(re.compile(r"^TTFT \d+ ms$"))
    expect(stats).to_have_attribute("data-cached", "false")

    _send(page, "And how does it keep a conversation?", 1)
    second = page.locator(".msg.assistant").nth(1).locator(".turn-stats")
    expect(second).to_have_attribute("data-cached", "true")
    expect(second.locator(".badge")).to_contain_text("resumed from cached state")
    assert page.locator(".msg.user").count() == 2
    assert page.locator(".msg.error").count() == 0
    if screenshot := os.environ.get("GLA_CHAT_SCREENSHOT"):  # regenerates docs/images/chat-page.png
        page.screenshot(path=screenshot)


def test_a_rejected_turn_shows_the_error_and_keeps_the_text(page: Page) -> None:
    page.fill("#max-tokens", "-5")
    page.fill("#prompt", "this turn is rejected")
    page.click("#send")
    expect(page.locator(".msg.assistant .error-text")).to_contain_text(re.compile(r"Error: 4\d\d"))
    expect(page.locator("#prompt")).to_have_value("this turn is rejected")
    expect(page.locator("#send")).to_be_enabled()


def test_page_sse_decoder_handles_any_chunking(page: Page) -> None:
    events = page.evaluate(
        """() => {
            const stream = 'data: {"a":1}\\r\\n\\r\\n: ping\\nevent: error\\ndata: x\\ndata: y\\n\\ndata: [DONE]\\r\\r';
            const out = [];
            for (const size of [1, 2, 3, 7, stream.length]) {
                const d = new SSEDecoder();
                const got = [];
                for (let i = 0; i < stream.length; i += size) got.push(...d.feed(stream.slice(i, i + size)));
                out.push(JSON.stringify(got));
            }
            return out;
        }"""
    )
    expected = (
        '[{"event":"message","data":"{\\"a\\":1}"},{"event":"error","data":"x\\ny"},'
        '{"event":"message","data":"[DONE]"}]'
    )
    assert events == [expected] * 5
