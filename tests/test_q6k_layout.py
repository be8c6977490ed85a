"""The aligned Q6_K layout (``kernels.q6k_layout``): its byte order, the in-place conversions, bad input, and the
layers that hold their Q6_K weights in it on a GPU (here made to do so on the CPU, whose products convert back)."""

from __future__ import annotations

import pytest
import torch

from tierlm.kernels import q6k_layout
from tierlm.kernels.q6k_layout import LayoutError, align_, alignable, aligns, from_aligned, to_aligned, unalign_
from tierlm.kernels.quant_matmul import KernelInputError, q6k_words, quant_matmul
from tierlm.model.quantized import AlignsQ6K, QuantLinear, QuantRoutedExperts
from tierlm.weights.formats import GGMLType, quantize

T = GGMLType


def _bytes(rows: int, nb: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, nb * 210), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("nb", [1, 2, 28])
def test_aligned_layout_byte_order(nb):
    """Row r's block b: its 208-byte body at 208 b, its d at 208 nb + 2 b; rows stay where they were."""
    w = _bytes(5, nb)
    a = to_aligned(w)
    assert a.shape == w.shape and a.dtype == torch.uint8
    for r in range(5):
        for b in range(nb):
            blk = w[r, 210 * b:210 * (b + 1)]
            assert torch.equal(a[r, 208 * b:208 * (b + 1)], blk[:208])
            assert torch.equal(a[r, 208 * nb + 2 * b:208 * nb + 2 * b + 2], blk[208:])
    assert torch.equal(from_aligned(a), w)
    assert torch.equal(a, w) == (nb == 1)  # one block per row: the same order


def test_in_place_conversions_work_in_chunks(monkeypatch):
    monkeypatch.setattr(q6k_layout, "CHUNK_BYTES", 3 * 210 * 4)  # three rows per chunk: 7 rows is 3 chunks
    w = _bytes(7 * 2, 4, seed=1).view(2, 7, -1)  # stacked experts
    orig = w.clone()
    assert align_(w) is w and torch.equal(w, to_aligned(orig))
    assert unalign_(w) is w and torch.equal(w, orig)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 210, dtype=torch.int8), "uint8"),
    (torch.zeros(3, 144, dtype=torch.uint8), "210-byte"),
    (torch.zeros(4, 420, dtype=torch.uint8)[:, :210], "contiguous"),
])
def test_layout_rejects_what_is_not_q6k_rows(bad, match):
    with pytest.raises(LayoutError, match=match):
        to_aligned(bad)


def test_which_rows_are_aligned():
    assert alignable(2048) and alignable(7168) and alignable(512)
    assert not alignable(256) and not alignable(1280)  # an odd number of blocks: rows on 2-byte boundaries
    assert aligns((T.Q4_K, T.Q4_K, T.Q6_K), (7168, 7168, 2048))
    assert not aligns((T.Q4_K, T.Q4_K, T.Q4_K), (7168, 7168, 2048))  # nothing to align
    assert not aligns((T.Q6_K, T.Q6_K, T.Q6_K), (7168, 7168, 1280))  # one flag for the layer: all or none


def test_cpu_product_reads_the_aligned_layout():
    g = torch.Generator().manual_seed(2)
    w = quantize(torch.randn(40, 1024, generator=g) * 0.05, T.Q6_K)
    x = torch.randn(3, 1024, generator=g)
    assert torch.equal(quant_matmul(x, to_aligned(w), T.Q6_K, 1024, aligned=True), quant_matmul(x, w, T.Q6_K, 1024))


@pytest.fixture
def aligned_on_cpu(monkeypatch):
    """Layers hold their Q6_K weights aligned on the CPU as they would on a GPU."""
    monkeypatch.setattr(AlignsQ6K, "ALIGNED_ON", ("cpu",))


def test_linear_layer_keeps_q6k_aligned_and_speaks_gguf(aligned_on_cpu):
    g = torch.Generator().manual_seed(3)
    w = quantize(torch.randn(24, 512, generator=g) * 0.05, T.Q6_K)
    layer = QuantLinear(w.clone(), T.Q6_K, 512, 24)
    assert layer.aligned and torch.equal(layer.qweight, to_aligned(w))
    x = torch.randn(2, 512, generator=g)
    assert torch.equal(layer(x), quant_matmul(x, w, T.Q6_K, 512))
    assert torch.equal(layer.dequantized(), QuantLinear(w.clone(), T.Q6_K, 512, 24).dequantized())
    assert torch.equal(layer.state_dict()["qweight"], w)  # GGUF's layout out
    other = QuantLinear(torch.zeros_like(w), T.Q6_K, 512, 24)
    other.load_state_dict({"qweight": w})  # and in
    assert torch.equal(other.qweight, to_aligned(w)) and torch.equal(other(x), layer(x))
    q4 = QuantLinear(quantize(torch.randn(8, 512, generator=g), T.Q4_K), T.Q4_K, 512, 8)
    assert not q4.aligned  # one layout only


def test_layer_leaves_unalignable_rows_alone(aligned_on_cpu):
    w = quantize(torch.randn(8, 256), T.Q6_K)
    layer = QuantLinear(w.clone(), T.Q6_K, 256, 8)
    assert not layer.aligned and torch.equal(layer.qweight, w)


def test_routed_experts_keep_q6k_aligned(aligned_on_cpu):
    g = torch.Generator().manual_seed(4)
    E, I, D = 4, 512, 256 * 2
    mats = [quantize(torch.randn(E * r, c, generator=g) * 0.05, t)
            for r, c, t in ((I, D, T.Q4_K), (I, D, T.Q4_K), (D, I, T.Q6_K))]
    types = (T.Q4_K, T.Q4_K, T.Q6_K)
    moe = QuantRoutedExperts(*(m.clone() for m in mats), types, E, D, I)
    assert moe.aligned and torch.equal(moe.down_q, to_aligned(mats[2].view(E, D, -1)))
    assert torch.equal(moe.gate_q.view(-1), mats[0].view(-1))  # Q4_K untouched
    x = torch.randn(3, D, generator=g)
    ids = torch.tensor([[0, 2], [1, 3], [2, 2]])
    wts = torch.rand(3, 2, generator=g)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(AlignsQ6K, "ALIGNED_ON", ())
        plain = QuantRoutedExperts(*mats, types, E, D, I)
    assert not plain.aligned
    assert torch.equal(moe(x, ids, wts), plain(x, ids, wts))
    assert torch.equal(moe.state_dict()["down_q"], plain.state_dict()["down_q"])


def test_words_per_load_follow_the_rows_alignment():
    """The aligned int8 step reads 4 words at once where rows are 16-byte multiples (and the bytes start on one), 2
    on 8-byte ones, 1 on 4-byte ones; bytes off a 4-byte boundary are refused with the fix."""
    buf = torch.zeros(4 * 210 * 8 + 16, dtype=torch.uint8)
    assert buf.data_ptr() % 16 == 0
    rows = buf[:4 * 210 * 8].view(4, -1)
    assert q6k_words(2048, rows) == 4 and q6k_words(1024, rows) == 2 and q6k_words(512, rows) == 1
    assert q6k_words(2048, buf[8:8 + 4 * 210 * 8]) == 2  # 8 bytes off a 16-byte boundary
    with pytest.raises(KernelInputError, match="2-byte boundaries"):
        q6k_words(768, rows)
    with pytest.raises(KernelInputError, match=r"\.clone\(\)"):
        q6k_words(2048, buf[2:2 + 4 * 210 * 8])
