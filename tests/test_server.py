"""The HTTP server end to end: `tierlm serve` in a subprocess on the demo model, driven by the official
`openai` client (and httpx where the SDK hides the wire)."""

import json

import httpx
import openai
import pytest

from test_server_harness import shared_server, wait_until

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_health_and_models(server, client):
    assert server.get("/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion(client):
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_chat_stream_matches_non_streaming_and_reports_usage(client):
    whole = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="demo", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert content[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(server):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_text_completion_and_stream(client):
    r = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="demo", prompt="Once upon a time", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5
    default = client.completions.create(model="demo", prompt=[1, 2, 3], temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for this API


def test_stop_strings(client):
    kw = dict(model="demo", prompt="The weather today", temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[6:9]
    assert stop and stop not in full[:6]
    cut = client.completions.create(**kw, stop=[stop, "never appears"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seed_determinism(client):
    kw = dict(model="demo", messages=CHAT, max_tokens=10, temperature=1.0)
    a = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=8).choices[0].message.content
    assert a == b and a != c


def test_n_choices(client):
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=1.0, seed=3, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == 18
    again = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    chunks = list(client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=1.0, seed=3,
                                                 n=3, stream=True))
    for i in range(3):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == r.choices[i].message.content
    texts = client.completions.create(model="demo", prompt=["a", "b"], max_tokens=2, temperature=0, n=2)
    assert sorted(c.index for c in texts.choices) == [0, 1, 2, 3]


def test_logprobs(client):
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 4
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)  # greedy picks the most likely
        assert bytes(e.bytes).decode(errors="replace") == e.token or "\ufffd" in e.token
    t = client.completions.create(model="demo", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(d) == 2 for d in lp.top_logprobs)


def test_generation_config_defaults_apply(server, client):
    # The demo ships generation_config.json with temperature 0.6: unseeded requests without a temperature
    # sample; asking temperature 0 is greedy and repeatable.
    kw = dict(model="demo", prompt="Hi", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = {client.completions.create(**kw, temperature=0).choices[0].text for _ in range(2)}
    sampled = {client.completions.create(**kw).choices[0].text for _ in range(3)}
    assert len(greedy) == 1 and len(sampled) > 1


def test_tokenize_round_trip(server):
    text = "Hello, wörld! <｜User｜> stays text"
    r = server.post("/tokenize", json={"model": "demo", "prompt": text})
    assert r.status_code == 200
    ids = r.json()["tokens"]
    assert r.json()["count"] == len(ids) and r.json()["max_model_len"] == 4096
    back = server.post("/detokenize", json={"model": "demo", "tokens": ids}).json()["prompt"]
    assert back == "<｜begin▁of▁sentence｜>" + text
    chat = server.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > len(ids) // 2
    assert server.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


@pytest.mark.parametrize("body,status,needle", [
    ({"messages": [{"role": "user", "content": "hi " * 5000}]}, 400, "maximum context length"),
    ({"messages": CHAT, "max_tokens": 4096}, 400, "maximum context length"),
    ({"messages": CHAT, "n": -1}, 400, "n:"),
    ({"messages": CHAT, "n": 10**6}, 400, "n:"),
    ({"messages": CHAT, "max_tokens": 10**30}, 400, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": CHAT, "top_k": 10**12}, 400, "top_k"),
    ({"messages": CHAT, "temperature": -1}, 400, "temperature"),
    ({"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"messages": CHAT, "seed": 10**40}, 400, "seed"),
    ({"messages": CHAT, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": CHAT, "stop": [""]}, 400, "stop"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user"}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"messages": "hello"}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": CHAT, "chat_template": "{{ 7 * 7 }}"}, 400, "chat template"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"messages": CHAT, "model": "gpt-4"}, 404, "does not exist"),
    ({"messages": CHAT, "stream_options": {"include_usage": True}}, 400, "stream"),
])
def test_client_mistakes_get_clear_4xx(server, body, status, needle):
    r = server.post("/v1/chat/completions", json={"model": "demo", **body} if "model" not in body else body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


@pytest.mark.parametrize("path,content,status", [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2, 3]", 400),
    ("/v1/chat/completions", b"\xff\xfe\x00garbage", 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400),
    ("/v1/completions", b'{"prompt": [1, 2, 99999999]}', 400),
    ("/v1/completions", b'{"prompt": "hi", "echo": true}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": Infinity}', 400),
    ("/tokenize", b'{}', 400),
    ("/v1/nothing", b'{}', 404),
])
def test_malformed_bodies(server, path, content, status):
    r = server.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_oversized_body_is_refused(server):
    r = server.post("/v1/completions", content=b'{"prompt": "' + b"a" * (9 << 20) + b'"}')
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunks():
        for _ in range(10):
            yield b"a" * (1 << 20)

    r = server.post("/v1/completions", content=chunks())  # chunked: no Content-Length to check up front
    assert r.status_code == 413


def test_cors_is_off_by_default(server):
    r = httpx.options(server.url("/v1/models"), headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


def test_metrics(server, client):
    client.completions.create(model="demo", prompt="Hello", max_tokens=3, temperature=0)
    text = server.get("/metrics").text
    for name in ("tierlm:num_requests_running", "tierlm:num_requests_waiting", "tierlm:prompt_tokens_total",
                 "tierlm:generation_tokens_total", "tierlm:time_to_first_token_seconds_bucket",
                 "tierlm:inter_token_latency_seconds_bucket", "tierlm:kv_cache_usage_perc",
                 "tierlm:kv_cache_total_blocks", "tierlm:e2e_request_latency_seconds_count",
                 "tierlm:request_success_total"):
        assert name in text, name
    m = server.metrics()
    assert m["tierlm:generation_tokens_total"] >= 3 and m["tierlm:prompt_tokens_total"] >= 2
    assert m["tierlm:kv_cache_total_blocks"] > 0


def test_disconnected_clients_are_cancelled_and_free_memory(server):
    body = {"model": "demo", "prompt": "Tell me everything", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    for _ in range(3):
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as r:
            next(r.iter_lines())  # the first event arrived: the request is running
    # a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", json={**body, "stream": False}, timeout=1.5)

    def idle():
        m = server.metrics()
        return (m["tierlm:num_requests_running"], m["tierlm:num_requests_waiting"],
                m["tierlm:kv_cache_used_blocks"]) == (0, 0, 0)

    assert wait_until(idle, timeout=30), server.metrics()
    assert 'finished_reason="cancelled"' in server.get("/metrics").text


def test_page_is_served(server):
    r = server.get("/")
    assert r.status_code == 200 and "tierlm" in r.text and "/static/app.js" in r.text
    assert "chat/completions" in server.get("/static/app.js").text
