"""The `tierlm` command end to end, in subprocesses, on the built-in demo model."""

import json
import os
import subprocess
import sys

import pytest


def tierlm(*args, input=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "tierlm.cli", *args], input=input, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_run_streams_and_summarizes():
    r = tierlm("run", "-p", "Hello", "--max-tokens", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "prompt 4 tokens, generated 8 tokens" in r.stderr  # BOS <｜User｜> Hello <｜Assistant｜>
    assert "prefill" in r.stderr and "decode" in r.stderr and "tok/s" in r.stderr


def test_run_same_seed_same_text_and_greedy_is_deterministic():
    a = tierlm("run", "-p", "Tell me a story", "--max-tokens", "10", "--seed", "7", "--temperature", "1.0")
    b = tierlm("run", "-p", "Tell me a story", "--max-tokens", "10", "--seed", "7", "--temperature", "1.0")
    c = tierlm("run", "-p", "Tell me a story", "--max-tokens", "10", "--seed", "8", "--temperature", "1.0")
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_chat_keeps_history_and_exits():
    r = tierlm("chat", "--max-tokens", "5", "--temperature", "0", input="Hello\nAnd again\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">>> ") == 3
    assert r.stderr.count("5 tokens") == 2


def test_doctor_reports_environment():
    r = tierlm("doctor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["torch"]["version"] and "gpus" in report and report["ram"]["total_bytes"] > 0
    r = tierlm("doctor")
    assert r.returncode == 0 and "torch" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["run", "/no/such/model", "-p", "hi"], "does not exist"),
    (["run", "-p", "hi", "--temperature", "-1"], "temperature"),
    (["run", "-p", "hi", "--top-p", "0"], "top_p"),
    (["run", "-p", "hi", "--device", "cuda:7"], "no CUDA GPU"),
])
def test_bad_input_is_a_clear_error(args, message):
    r = tierlm(*args)
    assert r.returncode != 0
    assert message in r.stderr.replace("\n", " ")
    assert "Traceback" not in r.stderr
