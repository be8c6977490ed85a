"""Fuzzing the HTTP API with hypothesis: random JSON bodies and field values never get a 5xx, errors are
OpenAI-shaped, and the server stays healthy."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server_harness import shared_server, wait_until

ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=40), st.sampled_from(["", "demo", "user", "assistant", "system", "text", "\u0000", "<think>",
                                           "<｜User｜>", "{{ 7 * 7 }}", "{% for x in range(10**9) %}{% endfor %}"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)
message = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"]), json_values),
    "content": st.one_of(st.text(max_size=60), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=20)}), max_size=3), json_values),
    "tool_calls": json_values, "name": json_values,
})
small_int = st.one_of(st.integers(-3, 4), st.sampled_from([0, -1, 10**9, 2**63, 10**30]), json_values)
fields = {
    "model": st.one_of(st.just("demo"), json_values),
    "messages": st.one_of(st.lists(message, max_size=4), json_values),
    "prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 130000), max_size=8),
                        st.lists(st.text(max_size=10), max_size=3), st.lists(st.lists(st.integers(0, 1000),
                                                                                       max_size=4), max_size=3),
                        json_values),
    "tokens": st.one_of(st.lists(st.integers(-5, 2**40), max_size=8), json_values),
    "max_tokens": small_int, "max_completion_tokens": small_int, "n": small_int, "top_k": small_int,
    "logprobs": st.one_of(st.booleans(), small_int), "top_logprobs": small_int, "seed": st.one_of(st.integers(),
                                                                                                  json_values),
    "temperature": st.one_of(st.floats(-2, 5), json_values), "top_p": st.one_of(st.floats(-1, 2), json_values),
    "min_p": st.one_of(st.floats(-1, 2), json_values),
    "presence_penalty": st.one_of(st.floats(-3, 3), json_values),
    "frequency_penalty": st.one_of(st.floats(-3, 3), json_values),
    "repetition_penalty": st.one_of(st.floats(-1, 3), json_values),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5), json_values),
    "stop_token_ids": st.one_of(st.lists(st.integers(-3, 2**33), max_size=3), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "echo": json_values, "suffix": json_values, "best_of": small_int, "ignore_eos": json_values,
    "add_special_tokens": json_values, "add_generation_prompt": json_values,
    "chat_template": json_values, "tools": json_values, "response_format": json_values,
}
random_bodies = st.fixed_dictionaries({}, optional=fields).flatmap(
    lambda d: st.dictionaries(st.text(max_size=10), json_values, max_size=2).map(lambda extra: {**extra, **d}))

# Valid requests with a few fields changed to plausible, often valid, values: these get past validation and
# exercise generation with odd parameter mixes.
plausible = {
    "n": st.integers(1, 4), "max_tokens": st.integers(1, 4), "max_completion_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 200000),
    "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 3), "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "stop_token_ids": st.lists(st.integers(0, 130000), max_size=3), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "ignore_eos": st.booleans(),
    "logprobs": st.one_of(st.booleans(), st.integers(0, 5)), "top_logprobs": st.integers(0, 20),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                                "content": st.text(max_size=80)}), min_size=1, max_size=4),
    "prompt": st.one_of(st.text(min_size=1, max_size=80), st.lists(st.integers(0, 129279), min_size=1, max_size=8)),
}
BASE = {
    "/v1/chat/completions": {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "demo", "prompt": "Hi", "max_tokens": 2},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2, 3]},
}
mutations = st.dictionaries(st.sampled_from(sorted(plausible)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: plausible[k] for k in keys}))


@pytest.fixture(scope="module")
def server():
    return shared_server()


def _bounded(body: dict) -> dict:
    # A valid request without a token limit would generate up to the context; keep fuzzed ones short.
    if isinstance(body, dict) and "max_tokens" not in body and "max_completion_tokens" not in body:
        body = {**body, "max_tokens": 3}
    return body


def _check(r: httpx.Response, body_text: str) -> None:
    assert r.status_code < 500, f"{r.status_code} for {body_text[:500]}: {r.text[:500]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), body=random_bodies, mutated=mutations, valid_base=st.booleans())
def test_random_bodies_never_get_5xx(server, route, body, mutated, valid_base):
    body = {**BASE[route], **mutated} if valid_base else _bounded(body)
    text = json.dumps(body)  # NaN and Infinity go out as the non-standard tokens JSON parsers may accept
    headers = {**server.headers(), "content-type": "application/json"}
    with httpx.stream("POST", server.url(route), content=text, headers=headers, timeout=60) as r:
        r.read()
        if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert not any('"error"' in e[:12] for e in events), r.text[:500]
            return
    _check(r, text)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES + ["/v1/models", "/metrics", "/health"]), raw=st.binary(max_size=200),
       method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
       content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data", ""]))
def test_random_bytes_never_get_5xx(server, route, raw, method, content_type):
    r = httpx.request(method, server.url(route), content=raw, headers={"content-type": content_type}, timeout=60)
    _check(r, repr(raw))


def test_server_is_healthy_after_fuzzing(server):
    assert server.get("/health").status_code == 200
    r = server.post("/v1/completions", json={"model": "demo", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

    def idle():
        m = server.metrics()
        return m["tierlm:num_requests_running"] == m["tierlm:num_requests_waiting"] == 0

    assert wait_until(idle, timeout=30)
