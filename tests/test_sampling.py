import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tierlm.runtime.sampling import (
    Sampler,
    SamplingParams,
    StopChecker,
    apply_penalties,
    logprobs_of,
    make_generator,
    min_p_mask,
    sample,
    sample_batch,
    sample_sequences,
    top_k_mask,
    top_p_mask,
)

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-20, 20, allow_nan=False, width=32)
rows = st.lists(finite, min_size=2, max_size=40)


def row(values):
    return torch.tensor(values, dtype=torch.float32)[None]  # (1, V)


@FAST
@given(rows, st.integers(1, 50))
def test_top_k_keeps_the_k_highest(values, k):
    logits = row(values)
    keep = top_k_mask(logits, k)[0]
    V = len(values)
    kth = sorted(values, reverse=True)[min(k, V) - 1]
    assert keep.tolist() == [v >= kth for v in values]
    assert int(keep.sum()) >= min(k, V)
    assert int(keep.sum()) == min(k, V) or sum(v == kth for v in values) > 1  # more only through ties


@FAST
@given(rows, st.sampled_from([0, -1]))
def test_top_k_off_keeps_everything(values, k):
    assert bool(top_k_mask(row(values), k).all())


@FAST
@given(rows, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(values, p):
    logits = row(values)
    keep = top_p_mask(logits, p)[0]
    probs = logits[0].double().softmax(-1)
    kept = probs[keep]
    assert keep.any()
    # The kept tokens are the most likely ones: nothing dropped is more likely than something kept.
    if (~keep).any():
        assert probs[~keep].max() <= kept.min() + 1e-7
    tol = 1e-5
    assert float(kept.sum()) >= p - tol or bool(keep.all())
    assert len(kept) == 1 or float(kept.sum() - kept.min()) < p + tol  # dropping any kept token falls below p


@FAST
@given(rows, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_above_the_scaled_max(values, min_p):
    logits = row(values)
    keep = min_p_mask(logits, min_p)[0]
    probs = logits[0].double().softmax(-1)
    threshold = min_p * float(probs.max())
    for pr, kp in zip(probs.tolist(), keep.tolist()):
        if abs(pr - threshold) > 1e-6 * max(threshold, 1e-30):
            assert kp == (pr >= threshold)
    assert bool(keep[probs.argmax()])


def test_masks_take_per_row_values():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 2)
    assert top_k_mask(logits, torch.tensor([1, 3])).sum(-1).tolist() == [1, 3]
    assert top_p_mask(logits, torch.tensor([0.1, 1.0])).sum(-1).tolist() == [1, 4]


@FAST
@given(rows, st.integers(0, 2**32))
def test_greedy_is_argmax(values, seed):
    logits = torch.tensor(values)
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)
    assert int(sample(logits, params, make_generator(seed))) == int(logits.argmax())


@FAST
@given(st.lists(st.integers(-200, 200), min_size=2, max_size=30, unique=True), st.integers(0, 2**32))
def test_tiny_temperature_matches_greedy(ints, seed):
    logits = torch.tensor(ints, dtype=torch.float32) / 10  # distinct logits at least 0.1 apart
    params = SamplingParams(temperature=1e-3)
    assert int(sample(logits, params, make_generator(seed))) == int(logits.argmax())


def draws(seed, n=40, V=50):
    logits = torch.linspace(-1, 1, V)
    s = Sampler(SamplingParams(seed=seed))
    return [s.sample(logits) for _ in range(n)]


def test_same_seed_same_draws_different_seeds_differ():
    assert draws(1234) == draws(1234)
    assert draws(1234) != draws(1235)  # 40 draws over 50 tokens: a full collision has probability ~1e-60
    assert len({tuple(draws(s)) for s in range(5)}) == 5


def test_unseeded_samplers_differ():
    assert draws(None) != draws(None)


@FAST
@given(st.integers(0, 2**32), st.integers(1, 5), st.integers(0, 5))
def test_row_draws_do_not_depend_on_the_batch(seed, before, after):
    V = 64
    mine = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=seed)
    other = SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=1.2, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1 + before + after, V, generator=g)
    alone_gen = make_generator(seed)
    alone = [int(sample_batch(logits[before : before + 1], [mine], [alone_gen])[0]) for _ in range(3)]

    gens = [make_generator(i) for i in range(before)] + [make_generator(seed)]
    gens += [make_generator(i) for i in range(after)]
    params = [other] * before + [mine] + [other] * after
    hist = [([1, 2, 3], [4, 5])] * len(params)
    batched = [int(sample_batch(logits, params, gens, hist)[before]) for _ in range(3)]
    assert batched == alone


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    gen = make_generator(7)
    params = SamplingParams()
    tokens = sample(probs.log().expand(20000, 3).contiguous(), params, gen)
    freq = torch.bincount(tokens, minlength=3).float() / len(tokens)
    assert torch.allclose(freq, probs, atol=0.02)


def test_filters_exclude_tokens_from_draws():
    logits = torch.tensor([2.0, 1.9, 1.8, -5.0, -6.0]).expand(2000, 5).contiguous()
    gen = make_generator(0)
    assert set(sample(logits, SamplingParams(top_k=2), gen).tolist()) == {0, 1}
    assert set(sample(logits, SamplingParams(min_p=0.5), gen).tolist()) == {0, 1, 2}
    assert set(sample(logits, SamplingParams(top_p=0.5), gen).tolist()) == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 3.0, -1.0, 0.5])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], output_ids=[1, 1])
    assert out.tolist() == [1.0, -4.0, 3.0, -1.0, 0.5]


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.zeros(4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[3, 3, 3], output_ids=[0, 1, 1, 1])
    assert out.tolist() == pytest.approx([-0.75, -1.25, 0.0, 0.0])
    assert logits.tolist() == [0.0] * 4  # input untouched


@FAST
@given(rows, st.lists(st.integers(0, 39), max_size=10), st.floats(0.1, 3.0))
def test_repetition_penalty_property(values, seen, r):
    logits = torch.tensor(values)
    seen = [i for i in seen if i < len(values)]
    out = apply_penalties(logits, SamplingParams(repetition_penalty=r), output_ids=seen)
    for i, (a, b) in enumerate(zip(logits.tolist(), out.tolist())):
        expect = (a / r if a > 0 else a * r) if i in seen else a
        assert b == pytest.approx(expect, rel=1e-6, abs=1e-6)


def test_penalties_steer_greedy_choice():
    logits = torch.tensor([1.0, 0.9])
    assert int(sample(logits, SamplingParams(temperature=0), output_ids=[0])) == 0
    assert int(sample(logits, SamplingParams(temperature=0, frequency_penalty=0.5), output_ids=[0])) == 1


def test_sequences_record_their_outputs():
    a, b = Sampler(SamplingParams(temperature=0)), Sampler(SamplingParams(seed=3), prompt_ids=[1])
    tokens = sample_sequences([a, b], torch.randn(2, 10))
    assert a.output_ids == tokens[:1] and b.output_ids == tokens[1:]


def test_logprobs_use_raw_log_softmax():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    lp, top = logprobs_of(logits, 2, 2)
    ref = logits.log_softmax(-1)
    assert lp == pytest.approx(float(ref[2]))
    assert [t for t, _ in top] == [1, 2]
    assert [v for _, v in top] == pytest.approx([float(ref[1]), float(ref[2])])


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("max_tokens", 0),
        ("logprobs", 21),
        ("logprobs", -1),
        ("stop", ("",)),
        ("stop_token_ids", (-1,)),
        ("seed", 1.5),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_valid_params_pass_and_lists_become_tuples():
    p = SamplingParams(temperature=0, top_k=-1, top_p=1.0, min_p=1.0, seed=-5, stop=["a"], logprobs=20)
    assert p.validate() is p
    assert p.stop == ("a",) and SamplingParams(stop="x").stop == ("x",)
    hash(p)


# ---- stop strings -----------------------------------------------------------------------------------------------


def reference_stop(text, stops):
    """Scan left to right; stop where the text first ends with a stop string (longest one on a tie)."""
    for end in range(1, len(text) + 1):
        for s in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(s):
                return text[: end - len(s)], True
    return text, False


def run_checker(stops, chunks):
    checker = StopChecker(stops)
    emitted, stopped = "", False
    for c in chunks:
        out, stopped = checker.feed(c)
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += checker.flush()
    return emitted, stopped


alphabet = st.text("abc", max_size=30)
stop_lists = st.lists(st.text("abc", min_size=1, max_size=4), max_size=3)


@settings(max_examples=300, deadline=None)
@given(alphabet, stop_lists, st.data())
def test_any_chunking_matches_feeding_whole(text, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    whole = run_checker(stops, [text])
    assert run_checker(stops, chunks) == whole
    assert whole == reference_stop(text, stops)


@FAST
@given(alphabet, stop_lists)
def test_char_by_char_never_emits_text_after_a_stop(text, stops):
    expect, _ = reference_stop(text, stops)
    checker, emitted = StopChecker(stops), ""
    for ch in text:
        out, stopped = checker.feed(ch)
        emitted += out
        assert expect.startswith(emitted)
        if stopped:
            break


def test_stop_examples():
    checker = StopChecker(["</end>"])
    assert checker.feed("hello </") == ("hello ", False)
    assert checker.feed("en") == ("", False)
    assert checker.feed("d> more") == ("", True)
    assert checker.matched == "</end>"
    assert checker.feed("x") == ("", True)

    checker = StopChecker(["</end>"])
    assert checker.feed("a </e") == ("a ", False)
    assert checker.feed("x") == ("</ex", False)
    assert checker.flush() == ""
    assert StopChecker([]).feed("anything") == ("anything", False)
