"""The paged KV cache and the continuous-batching scheduler, in process on tiny models."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierlm
from tierlm.errors import RequestError
from tierlm.runtime.generate import Sequence, decode, generate_batch, prefill
from tierlm.runtime.kv_cache import BlockAllocator, CacheFullError, PagedKVCache
from tierlm.runtime.sampling import SamplingParams
from tierlm.runtime.scheduler import GenerationFailed, QueueFullError, Scheduler


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return tierlm.load(tiny_ckpt, dtype="float32", device="cpu")


def _fake_seq(prompt, slot):
    s = Sequence.__new__(Sequence)
    s.prompt_ids, s.slot, s.output_ids = list(prompt), slot, []
    return s


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_paged_cache_gives_the_slot_cache_logits(tiny, impl):
    tiny.module.attn_impl = impl
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,), generator=g).tolist() for n in (3, 21, 9, 1)]
    follow = torch.randint(0, tiny.config.vocab_size, (7,), generator=g).tolist()
    slot_seqs = [_fake_seq(p, i) for i, p in enumerate(prompts)]
    paged_seqs = [_fake_seq(p, 100 + i) for i, p in enumerate(prompts)]  # slots are keys, not rows
    slots = tiny.new_cache(len(prompts), 4)
    paged = PagedKVCache(tiny.config, 40, 4, tiny.dtype, tiny.device)  # blocks of 4: tables cross many blocks
    for s in paged_seqs:
        paged.admit(s.slot)
    pairs = [(prefill(tiny, slots, slot_seqs), prefill(tiny, paged, paged_seqs))]
    for t in follow:
        for s in slot_seqs + paged_seqs:
            s.output_ids.append(t)
        pairs.append((decode(tiny, slots, slot_seqs), decode(tiny, paged, paged_seqs)))
    tiny.module.attn_impl = "absorb"
    for a, b in pairs:
        assert torch.equal(a, b)
    # sequences of different lengths hold different numbers of blocks from one pool
    held = [len(paged.blocks.tables[s.slot]) for s in paged_seqs]
    assert held == [-(-s.length // 4) for s in paged_seqs]
    for s in paged_seqs:
        paged.release(s.slot)
    assert paged.blocks.used == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "grow", "release"]), st.integers(0, 5), st.integers(0, 40)),
                max_size=60))
def test_block_allocator_never_double_books(ops):
    alloc = BlockAllocator(n_blocks=12, block_size=4)
    promised = {}
    for op, slot, tokens in ops:
        if op == "admit" and slot not in alloc.tables:
            try:
                alloc.admit(slot, tokens)
                promised[slot] = tokens
            except CacheFullError:
                assert -(-tokens // 4) > alloc.free
        elif op == "grow" and slot in alloc.tables:
            try:
                alloc.grow(slot, tokens)
            except CacheFullError:
                assert tokens > promised[slot]  # growing within the promise never fails
        elif op == "release":
            alloc.release(slot)
            promised.pop(slot, None)
        held = [b for t in alloc.tables.values() for b in t]
        assert len(held) == len(set(held)) == alloc.used
        assert 0 not in held  # the scratch block is never handed out
        assert alloc.free >= 0 and alloc.used <= alloc.usable


def test_requests_join_and_leave_mid_batch_and_match_alone(tiny):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 12, 2, 8)]
    params = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=1.0, seed=5, max_tokens=9),
              SamplingParams(temperature=0.7, top_k=20, seed=1, max_tokens=3),
              SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.3)]
    alone = [[e.token_id for step in generate_batch(tiny, [p], sp) for e in step] for p, sp in zip(prompts, params)]
    sched = Scheduler(tiny, max_batch=3, kv_tokens=3 * 64, ctx=64, block_size=4)
    reqs = [sched.submit(prompts[0], params[0])]
    sched.step()
    reqs.append(sched.submit(prompts[1], params[1]))  # joins a running batch
    sched.step()
    sched.step()
    reqs += [sched.submit(prompts[2], params[2]), sched.submit(prompts[3], params[3])]  # one must wait
    assert sched.num_running == 3 or sched.num_waiting >= 1
    sizes = []
    while sched.busy:
        sched.step()
        sizes.append(sched.num_running)
    assert max(sizes) <= 3
    assert [r.output_ids for r in reqs] == alone
    assert sched.kv_blocks_used == 0 and sched.num_running == sched.num_waiting == 0


def test_prefill_groups_bound_padding():
    from types import SimpleNamespace

    from tierlm.runtime.scheduler import _prefill_groups

    reqs = [SimpleNamespace(prompt_ids=[0] * n) for n in (3, 400, 5, 380, 4, 2)]
    groups = [[len(r.prompt_ids) for r in g] for g in _prefill_groups(reqs)]
    assert sorted(n for g in groups for n in g) == [2, 3, 4, 5, 380, 400]
    for g in groups:
        assert max(g) * len(g) <= 2 * sum(g)  # padding at most doubles a pass's work
    assert len(groups) == 2 and groups[0][:2] == [400, 380]  # one pass for all would compute 6 x 400 tokens


def test_admission_waits_for_free_memory(tiny):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sched = Scheduler(tiny, max_batch=8, kv_tokens=32, ctx=64, block_size=4)  # room for two 16-token budgets
    reqs = [sched.submit([1, 2, 3, 4], sp) for _ in range(3)]
    sched.step()
    assert [r.state for r in reqs] == ["running", "running", "waiting"]
    while reqs[0].state != "done":
        sched.step()
    sched.step()
    assert reqs[2].state in ("running", "done")
    while sched.busy:
        sched.step()
    assert all(len(r.output_ids) == 12 for r in reqs)
    with pytest.raises(RequestError, match="KV cache"):
        sched.submit([1] * 30, SamplingParams(max_tokens=20))  # 50 tokens can never fit a 32-token pool


def test_queue_limit_and_cancel_free_memory_at_once(tiny):
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    sched = Scheduler(tiny, max_batch=1, max_waiting=2, kv_tokens=128, ctx=128, block_size=4)
    running = sched.submit([1, 2, 3], sp)
    sched.step()
    waiting = [sched.submit([4, 5], sp), sched.submit([6], sp)]
    with pytest.raises(QueueFullError, match="limit 2"):
        sched.submit([7], sp)
    assert sched.kv_blocks_used > 0
    sched.cancel(waiting[0])  # leaves the queue now
    assert sched.num_waiting == 1 and waiting[0].finish_reason == "cancelled"
    sched.cancel(running)  # leaves the batch at the next step
    sched.step()
    assert running.state == "done" and running.finish_reason == "cancelled"
    sched.cancel(waiting[1])
    while sched.busy:
        sched.step()
    assert sched.kv_blocks_used == 0 and sched.num_running == sched.num_waiting == 0


def test_a_failing_step_fails_its_requests_and_the_next_request_succeeds(tiny, monkeypatch):
    got = {0: [], 1: []}
    sched = Scheduler(tiny, max_batch=4, kv_tokens=256, ctx=64)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reqs = [sched.submit([1, 2, 3], sp, sink=got[i].append, index=i) for i in range(2)]
    sched.step()
    sched.step()
    calls = {"n": 0}
    real = tiny.module.forward

    def boom(*args, **kw):
        calls["n"] += 1
        raise RuntimeError("injected fault")

    monkeypatch.setattr(tiny.module, "forward", boom)
    assert sched.step() == []
    monkeypatch.setattr(tiny.module, "forward", real)
    for i, r in enumerate(reqs):
        assert r.state == "done" and r.finish_reason == "error"
        assert isinstance(got[i][-1], GenerationFailed) and "injected fault" in str(got[i][-1])
        assert len(got[i]) == 3  # two tokens, then the failure
    assert calls["n"] == 1 and sched.kv_blocks_used == 0
    after = sched.submit([1, 2, 3], sp)
    while sched.busy:
        sched.step()
    assert after.output_ids[:2] == reqs[0].output_ids and len(after.output_ids) == 8


def test_generate_batch_raises_a_failing_step(tiny, monkeypatch):
    def boom(*args, **kw):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(tiny.module, "forward", boom)
    with pytest.raises(RuntimeError, match="injected fault"):
        list(generate_batch(tiny, [[1, 2]], SamplingParams(max_tokens=2)))


def test_thread_mode_serves_and_stop_fails_leftovers(tiny):
    sched = Scheduler(tiny, max_batch=2, kv_tokens=512, ctx=256).start()
    done = threading.Event()
    events = []

    def sink(item):
        events.append(item)
        if isinstance(item, GenerationFailed) or item.finish_reason:
            done.set()

    sched.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), sink=sink)
    assert done.wait(60)
    assert [e.finish_reason for e in events] == [None, None, None, "length"]
    failures = []
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    sched.submit([1, 2], long, sink=lambda item: isinstance(item, GenerationFailed) and failures.append(item))
    sched.stop()
    assert len(failures) == 1 and "shutting down" in str(failures[0])
    assert sched.kv_blocks_used == 0 and not sched.busy


def test_bad_token_ids_are_request_errors(tiny):
    sched = Scheduler(tiny, max_batch=1)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        sched.submit([1, 300], SamplingParams())
    with pytest.raises(RequestError, match="top_p"):
        sched.submit([1], SamplingParams(top_p=0))


@pytest.mark.gpu
def test_paged_cache_and_scheduler_on_gpu(tiny_ckpt):
    """On a GPU: the paged cache gives the slot cache's logits, the pool is sized from free GPU memory, and
    batched generation equals each request alone; the metrics report the GPU's memory."""
    from tierlm.runtime.scheduler import kv_pool_tokens
    from tierlm.serve.metrics import Metrics

    model = tierlm.load(tiny_ckpt, dtype="bfloat16", device="cuda")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (4, 33, 17)]
    slot_seqs = [_fake_seq(p, i) for i, p in enumerate(prompts)]
    paged_seqs = [_fake_seq(p, 50 + i) for i, p in enumerate(prompts)]
    slots = model.new_cache(len(prompts), 8)
    paged = PagedKVCache(model.config, 64, 16, model.dtype, model.device)
    for s in paged_seqs:
        paged.admit(s.slot)
    pairs = [(prefill(model, slots, slot_seqs), prefill(model, paged, paged_seqs))]
    for t in (5, 9, 11):
        for s in slot_seqs + paged_seqs:
            s.output_ids.append(t)
        pairs.append((decode(model, slots, slot_seqs), decode(model, paged, paged_seqs)))
    for a, b in pairs:
        assert torch.equal(a, b)

    tokens = kv_pool_tokens(model, max_batch=8, ctx=256)
    assert tokens == 8 * 256  # the GPU has room for the whole budget
    metrics = Metrics()
    sched = Scheduler(model, max_batch=8, kv_tokens=tokens, ctx=256, events=metrics)
    metrics.bind(sched)
    sp = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0.8, seed=3, max_tokens=9)]
    alone = [[e.token_id for step in generate_batch(model, [p], s) for e in step] for p, s in zip(prompts, sp)]
    reqs = [sched.submit(p, s) for p, s in zip(prompts, sp)]
    while sched.busy:
        sched.step()
    assert [r.output_ids for r in reqs] == alone
    assert sched.kv_blocks_used == 0
    text = metrics.render().decode()
    assert 'tierlm:gpu_memory_used_bytes{device="cuda:0"}' in text
    assert 'tierlm:gpu_memory_total_bytes{device="cuda:0"}' in text
