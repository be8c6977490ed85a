"""Starting `tierlm serve` in a subprocess for the black-box server tests (no tests here).

``shared_server()`` starts one demo-model server for every test module that uses it, stopped when the test
run ends: starting one costs seconds on a 2-core machine, so the server tests share it.
"""

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.api_key = api_key
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="tierlm-serve-", suffix=".log", delete=False)
        atexit.register(lambda: os.path.exists(self.log.name) and os.unlink(self.log.name))
        cmd = [sys.executable, "-m", "tierlm.cli", "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready in {timeout} s:\n{self.output()}")

    def url(self, path: str) -> str:
        return self.base + path

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none", max_retries=0,
                                  timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url(path), headers={**self.headers(), **kw.pop("headers", {})},
                          timeout=kw.pop("timeout", 120), **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url(path), headers={**self.headers(), **kw.pop("headers", {})},
                         timeout=kw.pop("timeout", 30), **kw)

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics, by name."""
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_shared: ServerProcess | None = None


def shared_server() -> ServerProcess:
    """The demo-model server the black-box tests share (started on first use, stopped at exit)."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = ServerProcess()
        atexit.register(_shared.stop)
        _shared.wait_ready()
    return _shared


def wait_until(predicate, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
