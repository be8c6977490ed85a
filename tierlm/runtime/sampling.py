"""Token sampling: per-request parameters, logit processors, seeded draws, logprobs and stop strings.

Order of operations follows vLLM and llama.cpp: penalties -> temperature -> top-k -> top-p -> min-p -> draw.
Each sequence owns a ``torch.Generator``, so its draws depend only on its seed and its own logits, never on
which other sequences share the batch.

Dimensions: B = sequences in the batch, V = vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Temperatures below this are treated as greedy: logits / 1e-6 overflow float32 softmax into NaN. Same cut as vLLM.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Field semantics match the OpenAI API (and vLLM for the extras)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/llama.cpp: over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI: over output tokens
    frequency_penalty: float = 0.0  # OpenAI: over output tokens
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        # HTTP requests carry lists (and OpenAI allows a bare string for stop); keep the dataclass hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self) -> SamplingParams:
        """Raise ``ValueError`` naming the first bad field and its allowed range; return self when all are valid."""

        def bad(name: str, allowed: str):
            raise ValueError(f"sampling parameter {name}={getattr(self, name)!r} is invalid: {allowed}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not (_is_int(self.top_k) and self.top_k >= -1):
            bad("top_k", "must be an integer >= 1, or 0 / -1 to turn it off")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if not (self.seed is None or _is_int(self.seed)):
            bad("seed", "must be an integer or null")
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            bad("max_tokens", "must be an integer >= 1")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must hold non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must hold integers >= 0")
        if not (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS)):
            bad("logprobs", f"must be null or an integer in [0, {MAX_LOGPROBS}]")
        return self


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one sequence: seeded from ``seed``, or from OS entropy when ``seed`` is None."""
    gen = torch.Generator(device=device)
    # OpenAI seeds may be negative; torch wants an unsigned 64-bit seed.
    gen.seed() if seed is None else gen.manual_seed(seed % 2**64)
    return gen


def _per_row(value, B: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(B) if t.dim() == 0 else t


def top_k_mask(logits: torch.Tensor, k) -> torch.Tensor:
    """Bool mask (B, V) of the tokens top-k keeps: each row's k highest logits, plus any tied with the k-th.

    ``k`` is an int or a (B,) tensor; k <= 0 keeps every token.
    """
    B, V = logits.shape
    k = _per_row(k, B, torch.long, logits.device)
    k = torch.where(k <= 0, V, k.clamp(max=V))
    top = logits.topk(int(k.max()), dim=-1).values  # (B, kmax), sorted descending
    kth = top.gather(-1, (k - 1)[:, None])  # (B, 1)
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p) -> torch.Tensor:
    """Bool mask (B, V) of the smallest set of most likely tokens whose probability mass reaches ``p``.

    ``p`` is a float or a (B,) tensor; the most likely token is always kept, p >= 1 keeps every token.
    """
    B, V = logits.shape
    p = _per_row(p, B, torch.float32, logits.device)
    probs, order = logits.float().softmax(-1).sort(dim=-1, descending=True)  # (B, V)
    mass_before = probs.cumsum(-1) - probs  # (B, V): mass of the more likely tokens
    keep_sorted = mass_before < p[:, None]
    keep_sorted[:, 0] = True
    keep_sorted |= (p >= 1)[:, None]  # float rounding must never drop a token when top-p is off
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)


def min_p_mask(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Bool mask (B, V) of the tokens with probability >= min_p * (probability of the most likely token)."""
    min_p = _per_row(min_p, logits.shape[0], torch.float32, logits.device)
    probs = logits.float().softmax(-1)  # (B, V)
    return probs >= min_p[:, None] * probs.max(-1, keepdim=True).values


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int] = (), output_ids: Sequence[int] = ()
) -> torch.Tensor:
    """Return one row of logits (V,) with the repetition, presence and frequency penalties applied."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.as_tensor([*prompt_ids, *output_ids], dtype=torch.long, device=logits.device).unique()
        picked = logits[seen]
        r = params.repetition_penalty
        logits[seen] = torch.where(picked > 0, picked / r, picked * r)
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids):
        out = torch.as_tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)  # (V,)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_batch(
    logits: torch.Tensor,
    params_list: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    token_histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V), each row with its own params and generator.

    ``token_histories[b]`` is ``(prompt_ids, output_ids)`` of row b, used by the penalties. Returns (B,) long.
    """
    B, V = logits.shape
    assert len(params_list) == B and len(generators) == B, "one SamplingParams and one generator per row"
    logits = logits.float()
    if any(p.penalized for p in params_list):
        if token_histories is None:
            raise ValueError("repetition/presence/frequency penalties need token_histories=(prompt_ids, output_ids)")
        logits = torch.stack([
            apply_penalties(logits[b], p, *token_histories[b]) if p.penalized else logits[b]
            for b, p in enumerate(params_list)
        ])  # (B, V)
    if all(p.greedy for p in params_list):
        return logits.argmax(-1)

    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params_list], device=logits.device)
    scaled = logits / temperature[:, None]  # (B, V)
    # Skip filters no row asks for: top-k and top-p sort the whole vocabulary.
    if any(p.top_k > 0 for p in params_list):
        scaled = scaled.masked_fill(~top_k_mask(scaled, [p.top_k for p in params_list]), -math.inf)
    if any(p.top_p < 1 for p in params_list):
        scaled = scaled.masked_fill(~top_p_mask(scaled, [p.top_p for p in params_list]), -math.inf)
    if any(p.min_p > 0 for p in params_list):
        scaled = scaled.masked_fill(~min_p_mask(scaled, [p.min_p for p in params_list]), -math.inf)
    probs = scaled.softmax(-1)  # (B, V)

    # Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p. Each row's noise comes from its own
    # generator, so a row's token does not depend on the batch around it.
    noise = torch.ones_like(probs)  # (B, V)
    for b, (p, g) in enumerate(zip(params_list, generators)):
        if not p.greedy:
            noise[b].exponential_(generator=g)
    noise.clamp_min_(1e-20)  # a zero draw would make 0/0
    greedy = torch.tensor([p.greedy for p in params_list], device=logits.device)
    return torch.where(greedy, logits.argmax(-1), (probs / noise).argmax(-1))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Pick a token from ``logits`` (V,) -> () or (B, V) -> (B,), all rows sharing ``params`` and ``generator``."""
    rows = logits[None] if logits.dim() == 1 else logits  # (B, V)
    B = len(rows)
    tokens = sample_batch(rows, [params] * B, [generator] * B, [(prompt_ids, output_ids)] * B)
    return tokens[0] if logits.dim() == 1 else tokens


class Sampler:
    """Sampling state of one sequence: its params, its seeded generator and the tokens it has produced."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (), device: torch.device | str = "cpu"):
        self.params = params.validate()
        self.generator = make_generator(params.seed, device)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []

    @property
    def history(self) -> tuple[list[int], list[int]]:
        return self.prompt_ids, self.output_ids

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from ``logits`` (V,) and record it in ``output_ids``."""
        token = int(sample(logits, self.params, self.generator, self.prompt_ids, self.output_ids))
        self.output_ids.append(token)
        return token


def sample_sequences(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[int]:
    """One batched draw for several sequences: row b of ``logits`` (B, V) belongs to ``samplers[b]``."""
    tokens = sample_batch(
        logits, [s.params for s in samplers], [s.generator for s in samplers], [s.history for s in samplers]
    ).tolist()
    for s, t in zip(samplers, tokens):
        s.output_ids.append(t)
    return tokens


def batch_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int):
    """Log-probabilities under the raw model distribution (log-softmax of the logits, as OpenAI and vLLM report).

    ``logits`` (B, V), ``tokens`` (B,) -> (chosen (B,), top_ids (B, top_n), top_logprobs (B, top_n)).
    """
    logp = logits.float().log_softmax(-1)  # (B, V)
    chosen = logp.gather(-1, tokens.to(logp.device).long()[:, None])[:, 0]  # (B,)
    top_lp, top_ids = logp.topk(top_n, dim=-1)  # (B, top_n)
    return chosen, top_ids, top_lp


def logprobs_of(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The logprob of ``token`` under ``logits`` (V,), and the ``top_n`` most likely (id, logprob) pairs."""
    chosen, top_ids, top_lp = batch_logprobs(logits[None], torch.tensor([int(token)]), top_n)
    return float(chosen[0]), list(zip(top_ids[0].tolist(), top_lp[0].tolist()))


class StopChecker:
    """Cut streamed text at the first stop string, holding back text that might be the start of one.

    Generation stops at the first point where the text ends with a stop string (as soon as one is complete,
    like OpenAI and vLLM); the text is cut just before it and the stop string itself is not emitted. When two
    stop strings complete at the same point, the longer one wins. The result never depends on how the text
    was split into deltas.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, delta: str) -> tuple[str, bool]:
        """Consume ``delta``; return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        # Every stop string that ends inside ``text`` also starts inside it: anything earlier that could begin
        # one was held back. So searching ``text`` alone finds the first completed stop string.
        found = [(text.find(s) + len(s), -len(s), s) for s in self.stop if s in text]  # earliest end, then longest
        if found:
            end, _, self.matched = min(found)
            self.stopped, self._held = True, ""
            return text[: end - len(self.matched)], True
        # Hold back the longest suffix that could still grow into a stop string.
        candidates = range(min(self._longest - 1, len(text)), 0, -1)
        hold = next((k for k in candidates if any(s.startswith(text[-k:]) for s in self.stop)), 0)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """At the end of generation, release the held-back text (it never completed a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
