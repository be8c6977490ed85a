"""Loading a checkpoint onto a device and running it: ``tierlm.load(path) -> Model``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.errors import CheckpointError, ConfigError, OutOfMemory
from tierlm.model.attention import AttnImpl
from tierlm.model.deepseek import DeepseekForCausalLM
from tierlm.runtime.kv_cache import KVCache

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but no CUDA GPU is available; use --device cpu "
                          "(or run `tierlm doctor` to see what torch finds)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: bf16 on GPUs that have it, fp16 on older GPUs (Turing), fp32 on the CPU."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if not isinstance(dtype, torch.dtype):
        try:
            dtype = DTYPES[dtype]
        except KeyError:
            raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"{name} has no bfloat16 support (it needs compute capability 8.0+); "
                          "use --dtype float16")
    return dtype


class Model:
    """A loaded model on one device: full-sequence logits and streamed generation."""

    def __init__(self, module: DeepseekForCausalLM, device: torch.device, path: Path,
                 tokenizer_factory: Callable[[], object]):
        self.module, self.device, self.path = module, device, path
        self.folder = path if path.is_dir() else path.parent
        self.config: ModelConfig = module.config
        self._tokenizer_factory, self._tokenizer = tokenizer_factory, None
        self.expert_stats = None  # TierStats when routed experts are tiered
        self.oom_events = 0

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (built on first use: logits() needs none)."""
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def new_cache(self, n_slots: int, capacity: int) -> KVCache:
        return KVCache(self.config, n_slots, capacity, self.dtype, self.layer_devices)

    @property
    def layer_devices(self) -> list[torch.device]:
        """The device of each layer (one device, or a pipeline over GPUs); the KV cache follows it."""
        return self.module.layer_devices or [self.device] * self.config.num_hidden_layers

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits (T, V) for every position of one sequence, computed in one forward pass."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).view(1, -1)
        if ids.numel() == 0:
            raise ValueError("logits() needs at least one token")
        cache = self.new_cache(1, ids.shape[1])
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        slots = torch.zeros(1, dtype=torch.long, device=self.device)
        return self.step(ids, positions, cache.view(slots))[0]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache_view, pick: torch.Tensor | None = None,
             max_retries: int = 3) -> torch.Tensor:
        """One forward pass (see DeepseekForCausalLM.forward) that survives running out of GPU memory: the
        step's memory is released, the expert cache on the device is halved, and the step runs again. Rewriting
        the same cache positions makes the retry exact."""
        for attempt in range(max_retries + 1):
            try:
                return self.module(tokens, positions, cache_view, pick=pick)
            except torch.OutOfMemoryError as e:
                freed = self._recover_from_oom()
                if attempt == max_retries or not freed:
                    raise OutOfMemory(f"out of memory on {self.device} and nothing left to free ({e}); use a smaller "
                                      "--gpus budget so the plan leaves room, a shorter context, or fewer "
                                      "concurrent requests") from None
        raise AssertionError("unreachable")

    def _recover_from_oom(self) -> int:
        """Free device memory after an out-of-memory error: returns the bytes given up (0: nothing to give)."""
        import logging

        from tierlm.runtime.experts import TieredExperts

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        freed = 0
        for layer in self.module.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if isinstance(experts, TieredExperts) and len(experts.expert_in):
                per_slot = experts.expert_bytes
                freed += per_slot * experts.shrink(len(experts.expert_in) // 2)
        if self.expert_stats is not None:
            self.expert_stats.oom_events += 1
        self.oom_events += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logging.getLogger("tierlm").warning("out of memory on %s: gave up %.1f MB of cached experts and retried",
                                            self.device, freed / 1e6)
        return freed

    def generate(self, prompt, **kwargs) -> Iterator:
        """Stream a completion; see ``tierlm.runtime.generate.generate`` for the arguments."""
        from tierlm.runtime.generate import generate

        return generate(self, prompt, **kwargs)


def load(path: str | Path | None = None, *, device=None,
         dtype: str | torch.dtype | None = None, attn_impl: AttnImpl = "absorb",
         progress: Callable[[int, int], None] | None = None, placement=None) -> Model:
    """Load a checkpoint: an HF folder (safetensors, bf16/fp16/fp32 or FP8-block), a GGUF file, or None for the
    built-in demo model. ``progress(done_bytes, total_bytes)`` is called as tensors are loaded.
    ``device``: one device, or a runtime.placement.DeviceMap running the layers as a pipeline over GPUs.
    ``placement`` (runtime.placement.Placement, GGUF only): routed experts spread over the device, RAM and disk."""
    from tierlm.runtime.placement import DeviceMap

    from tierlm.weights.loader import load_hf_weights
    from tierlm.weights.safetensors_io import SafetensorsCheckpoint

    if path is None:
        from tierlm.runtime.demo import ensure_demo

        path = ensure_demo()
    path = Path(path)
    if not path.exists():
        from tierlm.presets import KNOWN_MODELS

        if str(path) in KNOWN_MODELS:
            raise CheckpointError(f"{path} is a known model name, but its weights are not here: download the "
                                  "checkpoint and pass its folder (`tierlm plan` accepts the name alone)")
        raise CheckpointError(f"{path} does not exist: pass a checkpoint folder (config.json + *.safetensors)")
    device_map = device if isinstance(device, DeviceMap) else None
    if device_map is not None:
        for d in device_map.devices:
            resolve_device(d)
        device = device_map
        first = torch.device(device_map.embed)
    else:
        device = first = resolve_device(device)
    dtype = resolve_dtype(dtype, first)
    done = 0

    def tick(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress:
            progress(done, total)

    if path.suffix == ".gguf":
        from tierlm.weights.gguf_config import config_from_gguf
        from tierlm.weights.gguf_io import GGUFFile
        from tierlm.weights.gguf_loader import load_gguf_weights
        from tierlm.weights.gguf_tokenizer import tokenizer_from_gguf

        gf = GGUFFile.open(path)
        cfg = config_from_gguf(gf.metadata, gf.tensors)
        with torch.device("meta"):
            module = DeepseekForCausalLM(cfg, attn_impl=attn_impl)
        total = sum(t.nbytes for t in gf.tensors.values())
        stats = None
        if placement is not None:
            from tierlm.runtime.experts import TierStats, link_layers

            placement.check(cfg)
            stats = TierStats()
        load_gguf_weights(module, gf, device, dtype, progress=tick, placement=placement, stats=stats)
        if placement is not None:
            link_layers(module)
        metadata = gf.metadata
        gf.close()
        factory = lambda: tokenizer_from_gguf(metadata, path.name)  # noqa: E731
    else:
        from tierlm.tokenizer import Tokenizer

        if placement is not None:
            raise ConfigError(f"{path.name}: spreading experts over RAM and disk needs a GGUF file; convert it "
                              f"first: tierlm convert {path} model.gguf --quant Q4_K_M")
        stats = None
        folder = path if path.is_dir() else path.parent
        cfg = ModelConfig.from_json(folder / "config.json")
        ckpt = SafetensorsCheckpoint(path)
        with torch.device("meta"):
            module = DeepseekForCausalLM(cfg, attn_impl=attn_impl)
        total = sum(p.numel() for p in module.parameters()) * dtype.itemsize
        load_hf_weights(module, ckpt, device, dtype, progress=tick)
        has_own = (folder / "tokenizer.json").exists()
        factory = (lambda: Tokenizer.from_dir(folder)) if has_own else Tokenizer.default
    module.eval()
    if device_map is not None:
        module.layer_devices = [torch.device(d) for d in device_map.layers]
    model = Model(module, first, path, factory)
    model.expert_stats = stats
    return model
