"""A second `tierlm serve` with --api-key, --chat-template r1 and --allow-origin: keys, R1 reasoning fields,
CORS, then a SIGTERM that drains in-flight streams and exits 0. Plus the reasoning split itself, driven by
a forced generation."""

import asyncio
import json
import signal
import threading

import httpx
import openai
import pytest

from test_server_harness import ServerProcess, wait_until
from tierlm.runtime.generate import TokenEvent
from tierlm.serve.completions import ChoiceState, Job, collect, stream

KEY = "sk-test-123"
ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--chat-template", "r1", "--allow-origin", ORIGIN, "--served-model-name", "r1-demo",
                      api_key=KEY)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/completions"), ("POST", "/tokenize"),
                                         ("POST", "/detokenize"), ("GET", "/metrics")])
def test_every_route_but_health_needs_the_key(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, server.url(path), json={}, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert "API key" in r.json()["error"]["message"]
    assert httpx.get(server.url("/health")).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()


def test_r1_reasoning_fields_and_unknown_model(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["r1-demo"]
    r = client.chat.completions.create(model="r1-demo", messages=[{"role": "user", "content": "Think"}],
                                       max_tokens=5, temperature=0)
    message = r.choices[0].message.model_dump()
    # The R1 prompt opens <think>; the demo's random weights never close it, so all output is reasoning.
    assert "reasoning_content" in message and "reasoning" in message
    assert message["reasoning_content"] and message["content"] == ""
    chunks = list(client.chat.completions.create(model="r1-demo", messages=[{"role": "user", "content": "Think"}],
                                                 max_tokens=5, temperature=0, stream=True))
    streamed = "".join((c.choices[0].delta.model_dump().get("reasoning_content") or "") for c in chunks)
    assert streamed == message["reasoning_content"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)


def test_cors_when_allowed(server):
    r = httpx.options(server.url("/v1/chat/completions"),
                      headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.headers.get("access-control-allow-origin") == ORIGIN
    r = httpx.options(server.url("/v1/chat/completions"),
                      headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") != "http://elsewhere.example"


def test_sigterm_drains_in_flight_streams_and_exits_0(server):
    n = 150
    body = {"model": "r1-demo", "prompt": "Drain me", "max_tokens": n, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started = threading.Event()
    result = {}

    def read_stream():
        with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=server.headers(),
                          timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                started.set()
            result["lines"] = lines

    t = threading.Thread(target=read_stream)
    t.start()
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)

    def refused():
        try:
            httpx.get(server.url("/health"), timeout=2)
        except httpx.ConnectError:
            return True
        except httpx.TransportError:  # accepted just before the listener closed, answered slowly
            pass
        return False

    assert wait_until(refused, timeout=10)  # no new connections while draining...
    draining = t.is_alive()
    t.join(60)
    assert server.proc.wait(60) == 0, server.output()
    lines = [x for x in result["lines"] if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in lines[-3]
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == n  # ...and the stream in flight finished
    assert draining, "the stream ended before the server stopped accepting; lengthen it"


def _job(started_in_reasoning: bool) -> Job:
    return Job(chat=True, model="m", prompts=[[1]], params=[None], prompt_tokens=1,
               reasoning=[started_in_reasoning])


@pytest.mark.parametrize("pieces,started,reasoning,content", [
    (["Let me", " think.\n", "</th", "ink>\n\n", "The answer", " is 4."], True, "Let me think.", "The answer is 4."),
    (["<think>\nhm", "m</think>", "Yes."], False, "hmm", "Yes."),
    (["Plain ", "answer"], False, "", "Plain answer"),
    (["still thinking ", "when cut off"], True, "still thinking when cut off", ""),
])
def test_reasoning_split_from_a_forced_generation(pieces, started, reasoning, content):
    choice = ChoiceState(_job(started), 0, tok=None)
    deltas = []
    for k, text in enumerate(pieces):
        ev = TokenEvent(0, 100 + k, text, "stop" if k == len(pieces) - 1 else None)
        deltas.append(choice.add(ev)[:2])
    assert "".join(r for r, _ in deltas) == reasoning == "".join(choice.reasoning)
    assert "".join(c for _, c in deltas) == content == "".join(choice.content)
    assert not any("</think>" in r or "<think>" in r for r, _ in deltas)
    assert choice.finish_reason == "stop" and choice.tokens == len(pieces)


def test_reasoning_fields_in_responses_from_a_forced_generation():

    class FakeSubmission:
        def __init__(self, texts):
            self.items = [(0, TokenEvent(0, 7, t, "stop" if i == len(texts) - 1 else None))
                          for i, t in enumerate(texts)]

        async def next(self, timeout=None):
            return self.items.pop(0)

        def cancel(self):
            pass

    class FakeEngine:
        tokenizer = None

    texts = ["Two plus two", "</think>", "Four."]
    body = asyncio.run(collect(FakeEngine(), _job(True), FakeSubmission(texts)))
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "Two plus two"
    assert message["content"] == "Four."

    async def events():
        return [e async for e in stream(FakeEngine(), _job(True), FakeSubmission(texts), keepalive_s=5)]

    chunks = [json.loads(e[6:]) for e in asyncio.run(events()) if e.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two plus two"
    assert "".join(d.get("content", "") for d in deltas) == "Four."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sigterm_cuts_off_requests_past_the_grace_period_cleanly():
    server = ServerProcess("--shutdown-timeout", "1").wait_ready()
    try:
        body = {"model": "demo", "prompt": "Go on forever", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        lines = []
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        events = [x for x in lines if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert "shutting down" in json.loads(events[-2][6:])["error"]["message"]
        assert "Traceback" not in server.output()
    finally:
        server.stop()
