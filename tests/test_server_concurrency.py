"""Continuous batching under load: 32 concurrent streaming clients, several requests each. Every response is
complete and equal to what the same request gives alone (greedy, or seeded), none lost or mixed up."""

import asyncio
import threading
import time

import pytest

from test_server_harness import shared_server

CLIENTS, REQUESTS_EACH = 32, 3

# Distinct requests (greedy and seeded, chat and text, different lengths); client c's k-th request is
# SPECS[(c + k) % len(SPECS)], so requests of different lengths join and leave the batch at different steps.
SPECS = [
    ("chat", {"messages": [{"role": "user", "content": f"Question {i}: " + "why " * i}], "temperature": 0,
              "max_tokens": 4 + i})
    for i in range(4)
] + [
    ("text", {"prompt": f"Story {i} begins" + " and then" * (3 * i), "temperature": 0.9, "seed": 100 + i,
              "top_p": 0.95, "max_tokens": 10 - i})
    for i in range(4)
]


async def _run(client, kind, spec):
    """Stream one request; returns (text, finish reason, completion tokens)."""
    extra = {"stream": True, "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}
    text, finish, usage = [], None, None
    if kind == "chat":
        stream = await client.chat.completions.create(model="demo", **spec, **extra)
        async for chunk in stream:
            for c in chunk.choices:
                text.append(c.delta.content or "")
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
    else:
        stream = await client.completions.create(model="demo", **spec, **extra)
        async for chunk in stream:
            for c in chunk.choices:
                text.append(c.text)
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
    return "".join(text), finish, usage.completion_tokens


@pytest.fixture(scope="module")
def server():
    return shared_server()


def test_concurrent_streams_are_complete_and_equal_to_alone(server):
    async def alone():
        client = server.async_client()
        return [await _run(client, kind, spec) for kind, spec in SPECS]

    reference = asyncio.run(alone())
    for (_, spec), (_, finish, tokens) in zip(SPECS, reference):
        assert finish == "length" and tokens == spec["max_tokens"]

    peak = {"running": 0}
    stop = threading.Event()

    def watch():  # the batch really holds many sequences at once
        while not stop.is_set():
            peak["running"] = max(peak["running"], server.metrics()["tierlm:num_requests_running"])
            time.sleep(0.05)

    async def one_client(client, c):
        out = []
        for k in range(REQUESTS_EACH):
            i = (c + k) % len(SPECS)
            out.append((i, await _run(client, *SPECS[i])))
        return out

    async def everyone():
        client = server.async_client()
        return await asyncio.wait_for(asyncio.gather(*(one_client(client, c) for c in range(CLIENTS))), 180)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        results = asyncio.run(everyone())
    finally:
        stop.set()
        watcher.join()
    elapsed = time.perf_counter() - t0
    got = [r for per_client in results for r in per_client]
    assert len(got) == CLIENTS * REQUESTS_EACH
    for i, result in got:
        assert result == reference[i], f"request {SPECS[i]} differs from the same request alone"
    assert peak["running"] >= 8, peak
    print(f"{len(got)} streamed requests from {CLIENTS} clients in {elapsed:.1f} s (peak batch {peak['running']:.0f})")
