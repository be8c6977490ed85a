"""The chat page in headless Chromium: a message sent, the answer streamed back (reasoning shown apart on an
R1 server that needs a key), a screenshot taken.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ending in
NUL on fds 3 and 4), so no websocket library is needed. Needs Debian's ``chromium`` package.
"""

import base64
import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time

import pytest

from test_server_harness import ServerProcess, shared_server

CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                                         "(Debian: apt-get install -y chromium)")
KEY = "sk-page-test"


class Browser:
    """Headless Chromium and a minimal DevTools-protocol client over its pipe."""

    def __init__(self, profile):
        cmd_in, self._w = os.pipe()  # we write commands; chromium reads them on fd 3
        self._r, out = os.pipe()  # chromium writes replies on fd 4

        def wire():  # in the child: put the pipe ends on fds 3 and 4 (via high fds, so none clobbers another)
            os.dup2(cmd_in, 100)
            os.dup2(out, 101)
            os.dup2(100, 3)
            os.dup2(101, 4)
            os.close(100)
            os.close(101)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--no-default-browser-check", "--mute-audio",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1000,700", "about:blank"],
            # Python's own fds are not inheritable (PEP 446): only 3 and 4, made by dup2, reach chromium.
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_in)
        os.close(out)
        self._ids = itertools.count(1)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while chunk := os.read(self._r, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self._replies.put(json.loads(m))

    def send(self, method, session=None, **params):
        mid = next(self._ids)
        msg = {"id": mid, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            reply = self._replies.get(timeout=max(0.1, deadline - time.monotonic()))
            if reply.get("id") == mid:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url) -> str:
        target = self.send("Target.createTarget", url=url)["targetId"]
        return self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, session, expression):
        r = self.send("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def wait_for(self, session, expression, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(session, expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)

    def close(self):
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _screenshot(browser, session, path):
    data = base64.b64decode(browser.send("Page.captureScreenshot", session, format="png")["data"])
    path.write_bytes(data)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    return path


def test_page_sends_a_message_and_streams_the_answer(browser, tmp_path):
    server = shared_server()
    session = browser.open(server.url("/?q=Why%20is%20the%20sky%20blue%3F&max_tokens=24&temperature=0"))
    state = browser.wait_for(session, "['done', 'error'].includes(document.body.dataset.state) && "
                                      "document.body.dataset.state")
    assert state == "done", browser.js(session, "document.getElementById('log').innerText")
    answer = browser.js(session, "document.querySelector('.assistant .answer').textContent")
    user = browser.js(session, "document.querySelector('.user').textContent")
    assert user == "Why is the sky blue?"
    same = server.client().chat.completions.create(model="demo", max_tokens=24, temperature=0, stream=True,
                                                   messages=[{"role": "user", "content": "Why is the sky blue?"}])
    assert answer == "".join(c.choices[0].delta.content or "" for c in same if c.choices)
    assert "24 tokens" in browser.js(session, "document.querySelector('.stats').textContent")
    _screenshot(browser, session, tmp_path / "chat.png")


def test_page_shows_reasoning_apart_with_a_key(browser, tmp_path):
    server = ServerProcess("--chat-template", "r1", api_key=KEY)
    try:
        server.wait_ready()
        session = browser.open(server.url("/"))
        browser.wait_for(session, "location.protocol === 'http:' && document.readyState === 'complete'")
        browser.js(session, f"localStorage.setItem('tierlm-key', {json.dumps(KEY)})")
        browser.send("Page.navigate", session, url=server.url("/?q=Think%20first&max_tokens=12&temperature=0"))
        time.sleep(0.5)
        state = browser.wait_for(session, "['done', 'error'].includes(document.body.dataset.state) && "
                                          "document.body.dataset.state")
        assert state == "done", browser.js(session, "document.getElementById('log').innerText")
        reasoning = browser.js(session, "document.querySelector('.reasoning div').textContent")
        assert reasoning and not browser.js(session, "document.querySelector('.reasoning').hidden")
        # the demo's random weights never close </think>: all of it is reasoning, none of it the answer
        assert browser.js(session, "document.querySelector('.answer').textContent") == ""
        _screenshot(browser, session, tmp_path / "reasoning.png")
    finally:
        server.stop()
