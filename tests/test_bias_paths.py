"""The score-bias attention paths against a float64 textbook formula, forward and backward, and their memory shape.

posenc_sdpa picks the ALiBi column trick (causal, fp32, no padding) or query-chunked blocks (everything else); neither
may ever ask for a bias of the full (Q, K) size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_posenc.modeling import posenc_attention
from hf_posenc.modeling.posenc_attention import AlibiBias, ScoreBiasMask, T5RelativeBias, posenc_sdpa_attention


class Attention(nn.Module):
    """The attributes the attention functions read from a model's attention module."""

    def __init__(self, provider):
        super().__init__()
        self.training = False
        object.__setattr__(self, "posenc_bias", provider)


def reference(query, key, value, provider, masks: ScoreBiasMask, scaling):
    """Textbook attention in float64: softmax(q k^T * scale + bias, masked) v, heads repeated for GQA."""
    groups = query.shape[1] // key.shape[1]
    q, k, v = (t.double() for t in (query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)))
    bias = provider(masks.q_positions, masks.kv_positions).double()[None]
    scores = q @ k.transpose(-1, -2) * scaling + bias
    allowed = masks.block(slice(None))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def run(provider, masks, batch=2, heads=4, kv_heads=4, q_len=None, k_len=None, dtype=torch.float32, seed=0, spy=None):
    """posenc_sdpa vs the fp64 reference; `spy` keeps only the bias blocks the attention's forward asked for."""
    generator = torch.Generator().manual_seed(seed)
    q_len = q_len or len(masks.q_positions)
    k_len = k_len or len(masks.kv_positions)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(dtype).requires_grad_()  # noqa: E731
    query, key, value = (
        make(batch, heads, q_len, 16),
        make(batch, kv_heads, k_len, 16),
        make(batch, kv_heads, k_len, 16),
    )
    out, _ = posenc_sdpa_attention(Attention(provider), query, key, value, masks, scaling=0.25)
    asked = len(spy) if spy is not None else 0
    expected = reference(query, key, value, provider, masks, 0.25)
    grads = torch.autograd.grad(out.float().square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    if spy is not None:  # the forward's blocks (the backward recomputes the same ones)
        del spy[asked:]
    return out, expected, grads, expected_grads


def causal(q_len, k_len, mask=None, causal=True):
    return ScoreBiasMask(mask, causal, torch.arange(k_len - q_len, k_len), torch.arange(k_len))


def assert_close(actual, expected, tolerance):
    error = (actual.double() - expected.double()).abs().max() / expected.double().abs().max()
    assert error < tolerance, f"relative error {error:.2e} >= {tolerance}"


@pytest.mark.parametrize("block_bytes", [posenc_attention.COLUMN_BLOCK_BYTES, 1], ids=["all-heads", "head-by-head"])
def test_alibi_column_trick(spy, monkeypatch, block_bytes):
    """Causal ALiBi without padding in fp32: exact against fp64, forward and backward, and no bias tensor at all, with
    grouped keys; in inference whether all heads run in one call or one key head per call (reusing buffers)."""
    monkeypatch.setattr(posenc_attention, "COLUMN_BLOCK_BYTES", block_bytes)
    out, expected, grads, expected_grads = run(AlibiBias(4), causal(300, 300), kv_heads=2, spy=spy)
    assert spy == []  # the column trick never builds a bias block
    assert_close(out, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-4)
    with torch.no_grad():  # inference reuses one set of extended buffers for every group of heads
        query, key, value = (torch.randn(2, 4, 300, 16) for _ in range(3))
        masks = causal(300, 300)
        inference, _ = posenc_sdpa_attention(Attention(AlibiBias(4)), query, key, value, masks, scaling=0.25)
    assert_close(inference, reference(query, key, value, AlibiBias(4), masks, 0.25), 1e-5)


def test_alibi_continuation_after_a_cache(spy):
    """Several new queries after cached keys (a second prompt chunk, speculative decoding): SDPA's is_causal would
    align them with the first keys, so this runs chunked, exact against fp64."""
    out, expected, grads, expected_grads = run(AlibiBias(4), causal(20, 300), kv_heads=2, spy=spy)
    assert spy == [(20, 300)]
    assert_close(out, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-4)


def test_alibi_decode_step_is_one_bias_row(spy):
    """A decode step (one query against the cache) runs chunked: a single (1, K) bias row, exact against fp64."""
    out, expected, grads, expected_grads = run(AlibiBias(4), causal(1, 300), kv_heads=2, spy=spy)
    assert spy == [(1, 300)]
    assert_close(out, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-4)


def test_alibi_column_trick_static_cache_prefill():
    """A StaticCache prefill (keys past the queries not yet written) reads only the written keys."""
    masks = ScoreBiasMask(None, True, torch.arange(40), torch.arange(64))
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 4, n, 16, generator=generator) for n in (40, 64, 64))
    out, _ = posenc_sdpa_attention(Attention(AlibiBias(4)), query, key, value, masks, scaling=0.25)
    written = ScoreBiasMask(None, True, torch.arange(40), torch.arange(40))
    assert_close(out, reference(query, key[:, :, :40], value[:, :, :40], AlibiBias(4), written, 0.25), 1e-5)


@pytest.mark.parametrize("provider", [AlibiBias(4, max_bias=4.0), T5RelativeBias(4, 16, 64, bidirectional=False)])
def test_chunked_blocks_with_padding(spy, monkeypatch, provider):
    """With padding the mask is kept; the bias comes in blocks of rows (here forced small) and matches fp64."""
    monkeypatch.setattr(posenc_attention, "BIAS_BLOCK_BYTES", 2 * 4 * 4 * 300 * 20)  # 20 rows per block
    monkeypatch.setattr(ScoreBiasMask, "key_padding", lambda self: None)  # ALiBi: not the padded column trick
    padding = torch.ones(2, 1, 300, 300, dtype=torch.bool)
    padding[0, :, :, 270:] = False  # right padding: every row keeps some key, so every output and gradient counts
    causal_mask = torch.ones(300, 300, dtype=torch.bool).tril()
    masks = ScoreBiasMask(padding & causal_mask, True, torch.arange(300), torch.arange(300))
    out, expected, grads, expected_grads = run(provider, masks, kv_heads=2, spy=spy)
    assert_close(out, expected, 1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-4)
    # one request per block: its rows (ALiBi), or one row of the table by distance that the block gathers from (T5)
    assert max(rows for rows, _ in spy) == (20 if isinstance(provider, AlibiBias) else 1) and len(spy) == 15


@pytest.mark.parametrize("side", ["left", "right"])
def test_alibi_column_trick_with_padding(spy, side):
    """Causal ALiBi in fp32 whose mask is padding and nothing else runs the column trick with a second column that
    masks the padding keys: no bias tensor at all, exact against fp64 (forward and backward); a window or any other
    mask still runs chunked."""
    keep = torch.ones(2, 300, dtype=torch.bool)
    keep[0, :30] = False if side == "left" else True
    keep[1, 270:] = False if side == "right" else True
    if side == "left":
        keep[1, :5] = False
    causal_mask = torch.ones(300, 300, dtype=torch.bool).tril()
    mask = (causal_mask[None] & keep[:, None, :])[:, None]
    masks = ScoreBiasMask(mask, True, torch.arange(300), torch.arange(300))
    assert torch.equal(masks.key_padding(), keep)
    out, expected, grads, expected_grads = run(AlibiBias(4, max_bias=4.0), masks, kv_heads=2, spy=spy)
    rows = keep[:, :, None] if side == "right" else torch.ones(2, 300, 1, dtype=torch.bool)
    if side == "left":  # padding queries see only padding keys: their outputs are not compared (no path agrees)
        rows = keep[:, :, None]
    compared = rows[..., None].expand_as(out)
    assert_close(torch.where(compared, out, 0), torch.where(compared, expected, 0), 1e-5)
    assert spy == []
    windowed = mask & (torch.arange(300)[:, None] - torch.arange(300)[None] < 50)
    assert ScoreBiasMask(windowed, True, torch.arange(300), torch.arange(300)).key_padding() is None


def test_bidirectional_without_mask(spy):
    """Encoders without padding: no mask at all, symmetric ALiBi in blocks, equal to fp64."""
    out, expected, _, _ = run(AlibiBias(4), causal(200, 200, causal=False), spy=spy)
    assert_close(out, expected, 1e-5)
    assert spy == [(200, 200)]  # one block: 2 x 4 x 200 x 200 fp32 fits the budget


def test_bf16_keeps_an_fp32_bias():
    """bf16 inputs: the bias and the blocks run in fp32, so the error is that of rounding the inputs to bf16 only."""
    out, expected, _, _ = run(
        AlibiBias(4), causal(512, 512, mask=torch.ones(1, 1, 512, 512, dtype=torch.bool).tril()), dtype=torch.bfloat16
    )
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, 2e-2)


def test_long_sequences_never_build_a_full_bias(spy):
    """At 4096 tokens with a mask (here a window, which the padded column trick does not take), the largest bias
    block requested is a fraction of (Q, K)."""
    positions = torch.arange(4096)
    windowed = (positions[:, None] >= positions[None]) & (positions[:, None] - positions[None] < 1024)
    masks = ScoreBiasMask(windowed[None, None], True, positions, positions)
    query = torch.randn(1, 4, 4096, 16)
    with torch.no_grad():
        posenc_sdpa_attention(Attention(AlibiBias(4)), query, query, query, masks, scaling=0.25)
    assert max(rows for rows, _ in spy) * 4096 * 4 * 4 <= posenc_attention.BIAS_BLOCK_BYTES
    assert max(rows for rows, _ in spy) < 4096
