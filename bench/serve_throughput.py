"""Serving throughput with continuous batching against one request at a time.

Starts `tierlm serve` (the demo model unless --model is given), sends the same set of streaming completion
requests twice: all at once (they share the running batch) and one after another, and writes tokens per
second, time to first token and request latency for both to a JSON file.

    python bench/serve_throughput.py --out bench/results/serve-throughput-cpu.json

Requests are greedy with ``ignore_eos`` so every run generates exactly the same tokens. The two modes
alternate (--rounds times each) and the median round is reported, so load from other processes on the
machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch)]
    if args.model:
        cmd.insert(4, args.model)
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {shlex.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become ready in 300 s")


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft_s": first, "latency_s": time.perf_counter() - t0, "tokens": tokens}


async def run_mode(client, model: str, prompts: list[str], max_tokens: int, concurrent: bool) -> dict:
    t0 = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(one(client, model, p, max_tokens) for p in prompts))
    else:
        results = [await one(client, model, p, max_tokens) for p in prompts]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": round(wall, 3), "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "requests_per_s": round(len(prompts) / wall, 3),
            "ttft_s_median": round(statistics.median(r["ttft_s"] for r in results), 4),
            "latency_s_median": round(statistics.median(r["latency_s"] for r in results), 3),
            "latency_s_max": round(max(r["latency_s"] for r in results), 3)}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    port = free_port()
    load_before = os.getloadavg()
    proc = start_server(args, port)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=600)
        model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        prompts = [f"Request {i}: tell me about the number {i * 7919 % 1000}." for i in range(args.requests)]

        async def bench():
            await run_mode(client, model, prompts[:2], 4, concurrent=False)  # warm-up
            rounds = {"batched": [], "sequential": []}
            for _ in range(args.rounds):
                rounds["sequential"].append(await run_mode(client, model, prompts, args.max_tokens, False))
                rounds["batched"].append(await run_mode(client, model, prompts, args.max_tokens, True))
            return rounds

        rounds = asyncio.run(bench())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    def median_round(rs):
        return sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]

    batched, sequential = median_round(rounds["batched"]), median_round(rounds["sequential"])
    report = {
        "benchmark": "serve throughput: continuous batching vs one request at a time",
        "date": datetime.date.today().isoformat(),
        "command": "python bench/serve_throughput.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model": args.model or "demo (built-in, DeepSeek-V3 architecture, random weights)",
        "device": args.device or "default (cpu here)",
        "workload": {"requests": args.requests, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                     "sampling": "greedy, ignore_eos, streaming", "rounds": args.rounds},
        "batched": batched,
        "sequential": sequential,
        "speedup_tokens_per_s": round(batched["tokens_per_s"] / sequential["tokens_per_s"], 2),
        "all_rounds": rounds,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
