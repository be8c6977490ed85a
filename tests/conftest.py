import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

# Tests never write into the user's cache folder: the demo model is built once per run in a temp folder.
os.environ.setdefault("TIERLM_CACHE", tempfile.mkdtemp(prefix="tierlm-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tierlm.config import ModelConfig  # noqa: E402
from tierlm.weights.hf_writer import random_hf_tensors, write_hf_checkpoint  # noqa: E402

# Tiny DeepSeek-V3 configs that differ where the math differs: grouping, top-k, dense layers, q_lora, YaRN.
TINY_V3 = dict(
    model_type="deepseek_v3", vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=512, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)


# Row lengths are multiples of 256 so the K-quants apply (else llama.cpp's fallbacks would); three layers so
# that Q4_K_M's "more bits" rule gives Q6_K to layer 2's ffn_down only.
GGUF_TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=2, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                 v_head_dim=128, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, vocab_size=320,
                 num_hidden_layers=3)


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.from_hf({**TINY_V3, **changes})


def write_tiny(path, cfg: ModelConfig, seed: int = 0, dtype=torch.float32, **kw):
    return write_hf_checkpoint(path, cfg, random_hf_tensors(cfg, seed=seed, dtype=dtype, std=0.1), **kw)


def write_gguf_source(path, seed: int):
    """The tiny HF checkpoint (GGUF_TINY, weights N(0, 0.03²): activations stay O(1)) with a tokenizer, ready for
    ``convert``."""
    from tinytok import write_tiny_tokenizer

    cfg = tiny_config(**GGUF_TINY)
    src = write_hf_checkpoint(path, cfg, random_hf_tensors(cfg, seed=seed, dtype=torch.float32, std=0.03))
    write_tiny_tokenizer(src, cfg.vocab_size)
    return src


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny fp32 DeepSeek-V3 checkpoint with grouped routing."""
    return write_tiny(tmp_path_factory.mktemp("tiny"), tiny_config())


INTERPRETER_TEST = "test_triton_kernels_in_interpreter"
INTERPRETER_GROUPS = ("moe8k", "moe8", "aligned", "mmvq", "moe", "gemv", "tile")  # the longest first (two at a time
# on two cores here: 326, 294, 225, 144, 124, 44 (alone) and 11 s)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run on GPU machines only. The interpreter groups of test_kernels.py run last: their
    subprocesses start when collection ends (``interpreter_runs``), so the rest of the suite runs beside them."""
    items.sort(key=lambda item: getattr(item, "originalname", "") == INTERPRETER_TEST)  # stable: the order otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def interpreter_skip_reason() -> str | None:
    """Why the Triton interpreter groups cannot run here, or None."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
        # seen with triton 3.6 and numpy 2.4: its interpreter turns tensor loop bounds into ints
        # with int(array), which numpy now refuses; the compiled kernels are unaffected
        return f"triton {triton.__version__}'s interpreter cannot run these loops; needs triton >= 3.9"
    return None


class InterpreterRuns:
    """The Triton interpreter groups of tests/test_kernels.py (that file run as a script, since TRITON_INTERPRET must
    be set before the kernels are defined), in background threads started when collection ends (two on a machine of
    two cores or more, each taking the next group, the longest first), so that they run beside the rest of the suite.
    A group that was not started there (under pytest-xdist, or not collected at the start) runs when its test asks
    for it."""

    SCRIPT = Path(__file__).resolve().parent / "test_kernels.py"
    TIMEOUT = 1800  # a guard against a hang, not a speed check: on a loaded two-core machine a group took 15 minutes

    def __init__(self):
        self._done: dict[str, threading.Event] = {}
        self._results: dict[str, tuple[int, str]] = {}
        self._procs: list[subprocess.Popen] = []
        self._stop = False

    def start(self, groups, workers: int = 1) -> None:
        """Run ``groups`` in this order, on ``workers`` threads that each take the next one not yet taken."""
        queue = [g for g in groups if g not in self._done]
        for g in queue:
            self._done[g] = threading.Event()
        lock = threading.Lock()
        for _ in range(max(1, min(workers, len(queue)))):
            threading.Thread(target=self._work, args=(queue, lock), daemon=True).start()

    def _work(self, queue: list, lock: threading.Lock) -> None:
        while True:
            with lock:
                if not queue:
                    return
                g = queue.pop(0)
            self._results[g] = (-1, "not run: the session ended first") if self._stop else self._run(g)
            self._done[g].set()

    def _run(self, group: str) -> tuple[int, str]:
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(self.SCRIPT.parents[1])}
        p = subprocess.Popen([sys.executable, str(self.SCRIPT), "interpret", group], env=env,
                             cwd=self.SCRIPT.parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._procs.append(p)
        if self._stop:  # the session ended while it started
            p.kill()
        try:
            out, err = p.communicate(timeout=self.TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            return -1, f"timed out after {self.TIMEOUT} s\n{out[-3000:]}{err[-3000:]}"
        ok = p.returncode == 0 and out.rstrip().endswith("ok")
        return (0 if ok else p.returncode or 1), out[-3000:] + err[-3000:]

    def result(self, group: str) -> tuple[int, str]:
        """(0 if the group passed, its output's end)."""
        if group not in self._done:
            self.start([group])
        self._done[group].wait()
        return self._results[group]

    def stop(self) -> None:
        self._stop = True
        for p in self._procs:
            if p.poll() is None:
                p.kill()


_INTERPRETER = InterpreterRuns()


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    picked = {item.callspec.params["group"] for item in session.items
              if getattr(item, "originalname", "") == INTERPRETER_TEST and hasattr(item, "callspec")}
    if picked and not interpreter_skip_reason():  # triton imported only where its groups were collected
        _INTERPRETER.start([g for g in INTERPRETER_GROUPS if g in picked] + sorted(picked - set(INTERPRETER_GROUPS)),
                           workers=min(2, os.cpu_count() or 1))


def pytest_sessionfinish(session, exitstatus):
    _INTERPRETER.stop()


@pytest.fixture(scope="session")
def interpreter_runs() -> InterpreterRuns:
    return _INTERPRETER
