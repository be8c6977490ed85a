"""The server in this process (uvicorn in a thread), where tests can reach into the model: a step that raises
mid-generation, a slow prefill, a full queue, a model still loading, the expert-cache metrics hook."""

import contextlib
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import tierlm
from test_server_harness import free_port, wait_until
from tierlm.serve.app import ServeOptions, create_app


@pytest.fixture(scope="module")
def demo():
    threads = torch.get_num_threads()
    yield tierlm.load(None, device="cpu", dtype="float32")
    torch.set_num_threads(threads)  # serving on the CPU lowers it


@contextlib.contextmanager
def serving(model=None, **options):
    port = free_port()
    app = create_app(ServeOptions(port=port, **options), model=model)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: server.started, timeout=30)
    try:
        yield base, app.state.tierlm, server
    finally:
        server.should_exit = True
        thread.join(30)


def _ready(base):
    return wait_until(lambda: httpx.get(base + "/health").status_code == 200, timeout=60)


def _client(base, **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60, **kw)


def slow_forward(model, seconds, monkeypatch):
    real = model.module.forward

    def forward(*args, **kw):
        time.sleep(seconds)
        return real(*args, **kw)

    monkeypatch.setattr(model.module, "forward", forward)


def test_a_step_that_raises_fails_in_flight_requests_and_the_next_succeeds(demo, monkeypatch):
    real = demo.module.forward
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # the prefill and two decode steps went well
            raise RuntimeError("injected fault in a decode step")
        return real(*args, **kw)

    with serving(demo) as (base, state, _):
        assert _ready(base)
        client = _client(base)
        monkeypatch.setattr(demo.module, "forward", flaky)
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=20, temperature=0, stream=True)
        received = []
        with pytest.raises(openai.APIError, match="injected fault"):
            for chunk in stream:
                received.append(chunk)
        assert len(received) >= 3  # the role chunk and the tokens before the fault
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            calls["n"] = 0
            client.completions.create(model="demo", prompt="Hi", max_tokens=8, temperature=0)
        monkeypatch.setattr(demo.module, "forward", real)
        after = client.completions.create(model="demo", prompt="Hi", max_tokens=8, temperature=0)
        assert after.usage.completion_tokens == 8
        s = state.engine.scheduler
        assert s.num_running == s.num_waiting == s.kv_blocks_used == 0
        assert 'finished_reason="error"' in httpx.get(base + "/metrics").text


def test_full_queue_gets_429_and_keepalive_during_slow_steps(demo, monkeypatch):
    with serving(demo, max_batch=1, max_waiting=1, keepalive_s=0.1) as (base, state, _):
        assert _ready(base)
        slow_forward(demo, 0.3, monkeypatch)
        body = {"model": "demo", "prompt": "Hi", "max_tokens": 6, "stream": True}
        results = {}

        def stream(name):
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
                results[name] = (r.status_code, r.read().decode())

        first = threading.Thread(target=stream, args=("running",))
        first.start()
        assert wait_until(lambda: state.engine.scheduler.num_running == 1, timeout=30)
        second = threading.Thread(target=stream, args=("waiting",))
        second.start()
        assert wait_until(lambda: state.engine.scheduler.num_waiting == 1, timeout=30)
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 429
        assert "busy" in r.json()["error"]["message"] and "retry" in r.json()["error"]["message"]
        first.join(60)
        second.join(60)
        for name in ("running", "waiting"):
            status, text = results[name]
            assert status == 200 and text.rstrip().endswith("data: [DONE]")
        assert ": keep-alive" in results["waiting"][1]  # it waited in the queue behind the first


def test_a_non_streaming_client_that_leaves_ends_its_handler(demo, monkeypatch):
    with serving(demo) as (base, state, server):
        assert _ready(base)
        slow_forward(demo, 0.2, monkeypatch)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 100}, timeout=1)
        sched = state.engine.scheduler
        assert wait_until(lambda: not sched.busy and sched.kv_blocks_used == 0, timeout=30)
        assert wait_until(lambda: not server.server_state.tasks, timeout=10)  # no handler left waiting


def test_health_is_503_while_loading_then_200(monkeypatch):
    release = threading.Event()
    real_load = tierlm.load
    threads = torch.get_num_threads()

    def slow_load(*args, **kw):
        release.wait(60)
        return real_load(*args, **kw)

    monkeypatch.setattr(tierlm, "load", slow_load)
    with serving() as (base, _, _):
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(base + "/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        assert _ready(base)
        assert _client(base).completions.create(model="demo", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    torch.set_num_threads(threads)


def test_a_model_that_fails_to_load_is_reported(monkeypatch):
    from tierlm.errors import CheckpointError

    def broken(*args, **kw):
        raise CheckpointError("shard model-00002-of-00002.safetensors is truncated; re-download it")

    monkeypatch.setattr(tierlm, "load", broken)
    with serving() as (base, state, _):
        assert wait_until(lambda: state.error is not None, timeout=30)
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and "truncated" in r.json()["error"]


def test_expert_tier_counters_and_gpu_memory_in_metrics(demo, monkeypatch):
    from tierlm.runtime.experts import TierStats

    stats = TierStats()
    monkeypatch.setattr(demo, "expert_stats", stats)
    with serving(demo) as (base, _, _):
        assert _ready(base)
        stats.hits.update(device=5, ram=2)  # what the tiered experts count as they serve tokens
        stats.bytes_read["disk"] = 1234
        text = httpx.get(base + "/metrics").text
    assert 'tierlm:expert_cache_hits_total{tier="device"} 5.0' in text
    assert 'tierlm:expert_cache_hits_total{tier="ram"} 2.0' in text
    assert 'tierlm:expert_bytes_read_total{tier="disk"} 1234.0' in text
    assert "tierlm:gpu_memory_used_bytes" in text  # no samples on a CPU server, but the family is there
