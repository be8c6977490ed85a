"""Batched generation: prefill, decode steps, sampling, detokenization and stop conditions.

A ``Sequence`` owns one slot of the KV cache (a row of ``KVCache``, a block table of ``PagedKVCache``).
``prefill`` and ``decode`` run the model on any set of sequences, whatever their lengths, so requests can join
and leave a running batch between steps (``runtime/scheduler.py`` does that).

Glossary: B sequences in the step, T tokens per row (padded), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field

import torch

from tierlm.errors import RequestError
from tierlm.runtime.sampling import Sampler, SamplingParams, StopChecker, batch_logprobs, sample_sequences

PREFILL_CHUNK = 512  # tokens per row per prefill pass: bounds the (B, H, T, S) attention scores


@dataclass
class TokenEvent:
    """One generated token of one sequence, with the text it makes safe to show."""

    seq: int  # index of the sequence in the batch passed to ``generate_batch``
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes out of the prefill; the rest out of decode steps
        return max(self.generated_tokens - 1, 0) / self.decode_s if self.decode_s else 0.0


@dataclass
class Sequence:
    """A prompt being continued: its cache slot, sampling state, and text-level stop handling."""

    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    sampler: Sampler
    decoder: object  # tokenizer StreamDecoder
    stops: StopChecker
    eos_ids: frozenset[int]
    max_len: int  # cache/context limit for this sequence
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def accept(self, token: int) -> tuple[str, str | None]:
        """Record a sampled token; return (text to emit, finish reason or None)."""
        self.output_ids.append(token)
        p = self.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish_reason = "stop"
            return self.stops.flush() + self._finish_text(), "stop"
        text, stopped = self.stops.feed(self.decoder.feed(token))
        if stopped:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_tokens or self.length >= self.max_len:
            self.finish_reason = "length"
            text += self.stops.feed(self.decoder.flush())[0] + self.stops.flush()
        return text, self.finish_reason

    def _finish_text(self) -> str:
        text, _ = self.stops.feed(self.decoder.flush())
        return text + self.stops.flush()


def _run(model, tokens: torch.Tensor, positions: torch.Tensor, cache, slots: torch.Tensor,
         pick: torch.Tensor) -> torch.Tensor:
    # Model.step: the forward pass that recovers from running out of GPU memory
    return model.step(tokens, positions, cache.view(slots), pick=pick)


@torch.inference_mode()
def prefill(model, cache, seqs: Seq[Sequence]) -> torch.Tensor:
    """Run every sequence's prompt (right-padded into one batch, in chunks); return logits (B, V) at each
    prompt's last token."""
    dev = model.device
    lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=dev)
    T = int(lengths.max())
    cache.ensure([s.slot for s in seqs], [len(s.prompt_ids) for s in seqs])
    tokens = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)  # (B, T), pad id 0 (never attended)
    for b, s in enumerate(seqs):
        tokens[b, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids, device=dev)
    positions = torch.arange(T, device=dev)[None].expand(len(seqs), T)
    slots = torch.tensor([s.slot for s in seqs], device=dev)
    last = lengths - 1  # (B,)
    out = torch.empty(len(seqs), model.config.vocab_size, dtype=torch.float32, device=dev)
    for c0 in range(0, T, PREFILL_CHUNK):
        c1 = min(c0 + PREFILL_CHUNK, T)
        logits = _run(model, tokens[:, c0:c1], positions[:, c0:c1], cache, slots, (last - c0).clamp(0, c1 - c0 - 1))
        here = (last >= c0) & (last < c1)
        out[here] = logits[here]
    return out


@torch.inference_mode()
def decode(model, cache, seqs: Seq[Sequence], graphs=None) -> torch.Tensor:
    """One step for every sequence: feed its last token at its position; return logits (B, V). ``graphs``
    (``runtime.graphs.DecodeGraphs`` over this cache): replay the step from a CUDA graph where it can."""
    dev = model.device
    cache.ensure([s.slot for s in seqs], [s.length for s in seqs])
    if graphs is not None:
        logits = graphs.step([s.slot for s in seqs], [s.output_ids[-1] for s in seqs], [s.length - 1 for s in seqs])
        if logits is not None:
            return logits
    tokens = torch.tensor([[s.output_ids[-1]] for s in seqs], device=dev)  # (B, 1)
    positions = torch.tensor([[s.length - 1] for s in seqs], device=dev)  # (B, 1)
    slots = torch.tensor([s.slot for s in seqs], device=dev)
    return _run(model, tokens, positions, cache, slots, torch.zeros(len(seqs), dtype=torch.long, device=dev))


def make_sequence(model, prompt_ids: list[int], params: SamplingParams, slot: int,
                  max_len: int | None = None) -> Sequence:
    """A validated sequence for ``prompt_ids``; ``max_len`` caps prompt + output (default: the model's context).
    Raises ``RequestError`` naming the bad input."""
    from tierlm.tokenizer import StreamDecoder

    try:
        params = params.validate()
    except ValueError as e:
        raise RequestError(str(e)) from None
    if not prompt_ids:
        raise RequestError("the prompt is empty: give at least one token")
    limit = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    if len(prompt_ids) >= limit:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}: shorten it")
    eos = frozenset(model.config.eos_token_ids) | ({model.tokenizer.eos_id} if model.tokenizer.eos_id is not None
                                                   else frozenset())
    return Sequence(list(prompt_ids), params, slot, Sampler(params, prompt_ids, device=model.device),
                    StreamDecoder(model.tokenizer), StopChecker(params.stop), eos, limit)


def next_tokens(model, seqs: Seq[Sequence], logits: torch.Tensor, ids: Seq[int]) -> list[TokenEvent]:
    """Sample one token per sequence from its row of ``logits`` (B, V), record it, and return the events
    (``TokenEvent.seq`` = ``ids[b]``) with text, finish reason and, where asked, logprobs."""
    n_text = model.tokenizer.vocab_size  # rows past the tokenizer's ids are padding of the embedding table
    if n_text < logits.shape[-1]:
        logits = logits[:, :n_text]
    tokens = sample_sequences([s.sampler for s in seqs], logits)
    top_n = max([s.params.logprobs or 0 for s in seqs] + [1])
    lp = (batch_logprobs(logits, torch.tensor(tokens, device=logits.device), top_n)
          if any(s.params.logprobs is not None for s in seqs) else None)
    events = []
    for row, (i, s, tok) in enumerate(zip(ids, seqs, tokens)):
        text, reason = s.accept(tok)
        ev = TokenEvent(i, tok, text, reason)
        if lp is not None and s.params.logprobs is not None:
            n = s.params.logprobs
            ev.logprob = float(lp[0][row])
            ev.top_logprobs = list(zip(lp[1][row, :n].tolist(), lp[2][row, :n].tolist()))
        events.append(ev)
    return events


def generate_batch(model, prompts: Seq[Seq[int]], params: Seq[SamplingParams] | SamplingParams,
                   stats: Stats | None = None) -> Iterator[list[TokenEvent]]:
    """Continue several token-id prompts together; yield, per step, one event per still-running sequence.

    Runs on the continuous-batching scheduler (the server's engine), driven step by step from this thread.
    """
    # Imported here: the scheduler builds on this module's prefill/decode/next_tokens.
    from tierlm.runtime.scheduler import Scheduler

    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    sched = Scheduler(model, max_batch=max(len(prompts), 1), max_prefill_tokens=None, stats=stats, raise_errors=True)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        sched.submit(list(p), sp, index=i)
    while sched.busy:
        events = sched.step()
        if events:
            yield events


def encode_prompt(model, prompt, chat_template: str | None = None) -> list[int]:
    """A prompt given as token ids, plain text (BOS added, special-token strings kept as text), or chat
    messages (rendered with the checkpoint's chat template)."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        return tok.encode(prompt, add_bos=True)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return tok.encode_chat(list(prompt), add_generation_prompt=True, template=chat_template)
    if isinstance(prompt, torch.Tensor):
        return prompt.flatten().tolist()
    return [int(t) for t in prompt]


def generate(model, prompt, *, max_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Seq[str] = (), logprobs: int | None = None, chat_template: str | None = None,
             stats: Stats | None = None) -> Iterator[TokenEvent]:
    """Stream one completion of ``prompt`` (text, token ids, or chat messages) token by token."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens,
                            stop=tuple(stop), logprobs=logprobs)
    ids = encode_prompt(model, prompt, chat_template)
    for events in generate_batch(model, [ids], params, stats):
        yield from events
