"""Cached incremental decoding and batching against the full-sequence forward."""

import pytest
import torch

import tierlm


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return tierlm.load(tiny_ckpt, dtype="float32", device="cpu")


def _step(model, cache, tokens, positions, slots):
    return model.module(torch.tensor(tokens), torch.tensor(positions), cache.view(torch.tensor(slots)))


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_incremental_decode_equals_full_forward(model, impl):
    model.module.attn_impl = impl
    ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    full = model.logits(ids)  # (24, V)
    cache = model.new_cache(1, 10)  # exactly the prompt: reserve() must grow it and keep what is cached
    got = [_step(model, cache, [ids[:10]], [list(range(10))], [0])[0]]  # prefill 10, then one token at a time
    for p in range(10, 24):
        cache.reserve(p + 1)
        got.append(_step(model, cache, [[ids[p]]], [[p]], [0])[0])
    got = torch.cat(got)
    assert (got - full).abs().max() <= 1e-4


def test_absorbed_equals_naive(model):
    ids = torch.randint(0, model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    model.module.attn_impl = "naive"
    naive = model.logits(ids)
    model.module.attn_impl = "absorb"
    absorbed = model.logits(ids)
    assert (naive - absorbed).abs().max() <= 1e-4


def test_batch_of_different_lengths_equals_each_alone(model):
    from tierlm.runtime.generate import Sequence, decode, prefill

    model.module.attn_impl = "absorb"
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 7)]
    follow = [torch.randint(0, model.config.vocab_size, (4,), generator=g).tolist() for _ in prompts]

    def fake_seq(prompt, slot):
        s = Sequence.__new__(Sequence)
        s.prompt_ids, s.slot, s.output_ids = list(prompt), slot, []
        return s

    # the batch: slots in a different order than the rows, to check that rows follow their slot
    seqs = [fake_seq(p, slot) for p, slot in zip(prompts, (2, 0, 1))]
    cache = model.new_cache(3, 8)
    batched = [prefill(model, cache, seqs)]
    for k in range(4):
        for s, f in zip(seqs, follow):
            s.output_ids.append(f[k])
        batched.append(decode(model, cache, seqs))
    for b, (p, f) in enumerate(zip(prompts, follow)):
        alone = model.logits(p + f)  # (len, V)
        want = alone[len(p) - 1:]  # logits after the prompt, then after each followed token
        got = torch.stack([step[b] for step in batched])
        assert (got - want).abs().max() <= 1e-4, f"row {b}"


def test_fp16_overflow_is_a_clear_error(tiny_ckpt):
    from tierlm.errors import NumericalError

    m = tierlm.load(tiny_ckpt, dtype="float16", device="cpu")
    with torch.no_grad():
        m.module.model.layers[0].mlp.down_proj.weight.mul_(1e4)  # pushes that layer's output past 65504
        m.module.model.layers[0].mlp.up_proj.weight.mul_(1e3)
    with pytest.raises(NumericalError, match="layer 0.*float16.*bfloat16"):
        m.logits([1, 2, 3, 4])
