"""The math helpers and the RoPE module, checked against transformers' own implementations (live oracles)."""

import math

import pytest
import torch
from conftest import wide_config
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.t5.modeling_t5 import T5Attention

import hf_posenc
from hf_posenc.modeling.posenc_layers import PairRotaryEmbedding, PosencRotaryEmbedding

HEAD_DIM = 16  # 64 / 4 heads in both tiny configs


def stock_llama(max_position_embeddings, rope_parameters, head_dim=HEAD_DIM):
    """A stock LlamaConfig with the given RoPE settings: the oracle transformers computes frequencies from."""
    return AutoConfig.for_model(
        "llama",
        hidden_size=64,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )


def rope_config(arch, **params):
    """A posenc config of `arch` with `{"type": "rope", **params}`."""
    return hf_posenc.with_posenc(wide_config(arch), {"type": "rope", **params})


def rotary_module(arch, **params):
    """The module that computes a posenc model's RoPE tables: the plugin's own on GPT-2 (its rotary step is the
    plugin's), the stock LlamaRotaryEmbedding fed the derived `rope_parameters` on Llama."""
    config = rope_config(arch, **params)
    if arch == "gpt2":
        return PosencRotaryEmbedding(config)
    return AutoModelForCausalLM.from_config(config).model.rotary_emb


def rotated(inv_freq, width):
    """The frequencies of the first `width // 2` pairs, checking that any further ones are zero (pass-through)."""
    assert torch.equal(inv_freq[width // 2 :], torch.zeros_like(inv_freq[width // 2 :]))
    return inv_freq[: width // 2]


# ---------------------------------------------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("n", range(1, 65))
def test_alibi_slopes_match_bloom(n):
    """alibi_slopes(n) equals BLOOM's slopes (the bias at key position 1) for every head count 1..64."""
    bloom = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]
    slopes = hf_posenc.alibi_slopes(n)
    assert slopes.shape == (n,) and slopes.dtype == torch.float32
    torch.testing.assert_close(slopes, bloom, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("max_bias", [8.0, 4.0, 12.5, 1.0])
def test_alibi_slopes_max_bias(n, max_bias):
    """For a power-of-two head count, slope k is 2**(-max_bias*k/n) (MPT's generalisation), k = 1..n."""
    expected = torch.tensor([2.0 ** (-max_bias * k / n) for k in range(1, n + 1)], dtype=torch.float64)
    slopes = hf_posenc.alibi_slopes(n, max_bias=max_bias)
    assert slopes.dtype == torch.float32
    torch.testing.assert_close(slopes.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 3, 4, 6, 8, 12, 16])
def test_alibi_bias_softmax_equivalent_to_bloom(n):
    """-m*|i-j| differs from BLOOM's m*j by a per-row constant on the causal part, so causal softmax is identical."""
    length = 24
    slopes = hf_posenc.alibi_slopes(n)
    positions = torch.arange(length)
    ours = hf_posenc.alibi_bias(slopes, positions, positions)  # (H, Q, K)
    bloom = build_alibi_tensor(torch.ones(1, length), n, torch.float32).expand(n, length, length)
    assert ours.shape == (n, length, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(length):
        diff = (ours - bloom)[:, i, : i + 1]  # (H, i+1)
        torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-5)
    ours_p = ours.masked_fill(~causal, float("-inf")).softmax(-1)
    bloom_p = bloom.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(ours_p, bloom_p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("offset", [0, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_alibi_bias_symmetric_and_float32(offset, dtype):
    """With q_pos == kv_pos the bias is symmetric in (i, j), and it is float32 whatever the slopes' dtype."""
    slopes = hf_posenc.alibi_slopes(8).to(dtype)
    positions = torch.arange(offset, offset + 12)
    bias = hf_posenc.alibi_bias(slopes, positions, positions)
    assert bias.dtype == torch.float32
    assert torch.equal(bias, bias.transpose(1, 2))
    assert torch.equal(bias.diagonal(dim1=1, dim2=2), torch.zeros(8, 12))
    assert (bias[:, 0, 1:] < 0).all()


@pytest.mark.parametrize("heads", [1, 6, 12])
def test_alibi_module_equals_alibi_bias(heads):
    """The provider the models use gives `alibi_bias` (the function checked against BLOOM) bit for bit, for cache
    offsets too, and its table of distances holds the same values."""
    from hf_posenc.modeling.posenc_attention import AlibiBias

    provider = AlibiBias(heads, max_bias=8.0, slope_multiplier=0.5)
    q_positions, kv_positions = torch.arange(90, 100), torch.arange(100)
    expected = hf_posenc.alibi_bias(hf_posenc.alibi_slopes(heads) * 0.5, q_positions, kv_positions)
    assert torch.equal(provider(q_positions, kv_positions), expected)
    table = provider.by_distance(kv_positions - 90)  # every key against the first query, at position 90
    assert torch.equal(table, expected[:, 0])


# ------------------------------------------------------------------------------------------------------------ T5 bias


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 64), (64, 256), (8, 20), (4, 3), (10, 7)])
def test_t5_bucket_matches_t5(bidirectional, num_buckets, max_distance):
    """t5_relative_position_bucket equals T5Attention._relative_position_bucket for every relative position."""
    rel = torch.arange(-600, 600)
    ours = hf_posenc.t5_relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    t5 = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert ours.dtype == torch.int64
    assert torch.equal(ours, t5)


# ----------------------------------------------------------------------------------------------------------------- RoPE

ROPE_SPECS = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {"original_max_position_embeddings": 64},  # short/long factors added per rotary width
}


def rope_params(rope_type, rotary_dim):
    """The parameters of `rope_type` for a rotary width (longrope needs rotary_dim / 2 factors of each kind)."""
    params = {"rope_type": rope_type, **ROPE_SPECS[rope_type]}
    if rope_type == "longrope":
        params["short_factor"] = [1.0 + 0.1 * i for i in range(rotary_dim // 2)]
        params["long_factor"] = [2.0 + 0.3 * i for i in range(rotary_dim // 2)]
    return params


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("rope_type", list(ROPE_SPECS))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rope_frequencies_match_transformers(arch, rope_type, partial):
    """A posenc model's RoPE frequencies and attention_scaling are transformers' ROPE_INIT_FUNCTIONS[rope_type] over
    the rotary width (Llama rotates the whole head: its partial rotation zero-pads them, except longrope, refused)."""
    width = int(HEAD_DIM * partial)
    params = rope_params(rope_type, width)
    if arch == "llama" and partial < 1 and rope_type == "longrope":
        with pytest.raises(ValueError, match="rotates the whole head.*not 'longrope'"):
            rope_config(arch, partial_rotary_factor=partial, **params)
        return
    module = rotary_module(arch, partial_rotary_factor=partial, **params)
    # the config handed transformers the user's settings: a stock Llama config with them gives the same frequencies
    stock = stock_llama(module.config.max_position_embeddings, {**params, "partial_rotary_factor": partial})
    stock_inv_freq, stock_scaling = ROPE_INIT_FUNCTIONS[rope_type](stock)
    assert torch.equal(rotated(module.inv_freq, width), stock_inv_freq)
    assert module.attention_scaling == pytest.approx(stock_scaling, rel=1e-12)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_p_rope_drops_the_lowest_frequencies(arch, p):
    """p-RoPE (Barbero et al. 2025, "Round and round we go!"), as transformers' `proportional` rope_type with
    `partial_rotary_factor` p: of the head's d/2 RoPE frequencies theta**(-2k/d) (denominator the whole head), the
    int(p * d / 2) highest keep turning and the others are set to 0 (those pairs pass through unrotated), written
    out here from the paper's definition."""
    module = rotary_module(arch, rope_type="proportional", partial_rotary_factor=p, rope_theta=500.0)
    kept = int(p * HEAD_DIM / 2)
    expected = [500.0 ** (-2 * k / HEAD_DIM) if k < kept else 0.0 for k in range(HEAD_DIM // 2)]
    torch.testing.assert_close(module.inv_freq.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    if arch == "llama":  # the tables the attention applies: the dropped pairs have cos 1, sin 0 at every position
        cos, sin = module(torch.zeros(1), torch.arange(50)[None])
        assert torch.equal(cos[..., kept : HEAD_DIM // 2], torch.ones_like(cos[..., kept : HEAD_DIM // 2]))
        assert torch.equal(sin[..., kept : HEAD_DIM // 2], torch.zeros_like(sin[..., kept : HEAD_DIM // 2]))
        assert (sin[0, 1:, :kept] != 0).all()


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rope_default_matches_llama_bitwise(arch, theta):
    """Plain RoPE frequencies are bitwise those of the stock LlamaRotaryEmbedding."""
    module = rotary_module(arch, rope_theta=theta)
    stock = LlamaRotaryEmbedding(stock_llama(256, {"rope_type": "default", "rope_theta": theta}))
    assert module.rope_type == "default" and module.attention_scaling == 1.0
    assert torch.equal(module.inv_freq, stock.inv_freq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_default_cos_sin_match_llama(dtype):
    """A posenc Llama's rotary module returns exactly the stock LlamaRotaryEmbedding's cos and sin."""
    config = wide_config("llama")
    model = AutoModelForCausalLM.from_config(config, posenc="rope")
    stock = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=dtype)
    position_ids = torch.stack((torch.arange(300), torch.arange(5, 305)))  # (B=2, T), past max_position_embeddings
    cos, sin = model.model.rotary_emb(x, position_ids)
    stock_cos, stock_sin = stock(x, position_ids)
    assert cos.shape == (2, 300, HEAD_DIM) and cos.dtype == dtype
    assert torch.equal(cos, stock_cos) and torch.equal(sin, stock_sin)


@pytest.mark.parametrize("rope_type", list(ROPE_SPECS))
def test_rope_scaled_cos_sin_match_llama(rope_type):
    """For every scaled rope_type, cos/sin match a stock LlamaRotaryEmbedding, past the original length too."""
    params = rope_params(rope_type, HEAD_DIM)
    module = rotary_module("llama", **params)
    stock = LlamaRotaryEmbedding(stock_llama(256, params))
    x = torch.zeros(1)
    for length in (32, 512):  # 512 triggers dynamic NTK / longrope's long factors
        position_ids = torch.arange(length)[None]
        cos, sin = module(x, position_ids)
        stock_cos, stock_sin = stock(x, position_ids)
        assert torch.equal(cos, stock_cos) and torch.equal(sin, stock_sin)


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_ntk(arch, theta, partial, factor):
    """Static NTK sets theta*factor**(d/(d-2)): the lowest frequency is divided by factor, the highest is kept."""
    d = int(HEAD_DIM * partial)
    config = rope_config(arch, rope_type="ntk", factor=factor, rope_theta=theta, partial_rotary_factor=partial)
    expected = theta * factor ** (d / (d - 2))
    partial_type = "posenc_partial_default" if arch == "llama" and partial < 1 else "default"  # Llama: see above
    assert config.rope_parameters["rope_type"] == partial_type
    assert config.rope_parameters["rope_theta"] == pytest.approx(expected, rel=1e-12)
    assert hf_posenc.ntk_scaled_rope_theta(theta, factor, d) == pytest.approx(expected, rel=1e-12)
    ntk = rotated(
        rotary_module(arch, rope_type="ntk", factor=factor, rope_theta=theta, partial_rotary_factor=partial).inv_freq, d
    )
    plain = rotated(rotary_module(arch, rope_theta=theta, partial_rotary_factor=partial).inv_freq, d)
    assert ntk.shape == plain.shape == (d // 2,)
    assert (plain[-1] / ntk[-1]).item() == pytest.approx(factor, rel=1e-5)
    assert ntk[0] == plain[0]


@pytest.mark.parametrize("partial", [0.5, 0.25])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_partial_rotary_passes_through(arch, partial):
    """With partial rotary, pass-through pairs get cos=1, sin=0; rotated pairs are plain RoPE over the rotary width."""
    rotary_dim = int(HEAD_DIM * partial)
    module = rotary_module(arch, partial_rotary_factor=partial)
    position_ids = torch.arange(64)[None].expand(2, 64)
    cos, sin = module(torch.zeros(1), position_ids)
    assert cos.shape == sin.shape == (2, 64, HEAD_DIM)
    frequency_index = torch.arange(HEAD_DIM) % (HEAD_DIM // 2)  # emb = cat(freqs, freqs)
    passed = frequency_index >= rotary_dim // 2
    assert torch.equal(cos[..., passed], torch.ones_like(cos[..., passed]))
    assert torch.equal(sin[..., passed], torch.zeros_like(sin[..., passed]))
    # the rotated pairs are a stock Llama rotary of head_dim = rotary_dim (which lays out cat(freqs, freqs) too)
    stock_cos, stock_sin = LlamaRotaryEmbedding(stock_llama(256, {"rope_type": "default"}, head_dim=rotary_dim))(
        torch.zeros(1), position_ids
    )
    assert torch.equal(cos[..., ~passed], stock_cos) and torch.equal(sin[..., ~passed], stock_sin)
    assert sin[..., ~passed].abs().amax() > 0.5


# ----------------------------------------------------------------------------------------------------------- sinusoidal


def vaswani_table(positions, dim, base):
    """Float64 textbook table: PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim))."""
    table = torch.empty(len(positions), dim, dtype=torch.float64)
    for i in range(dim // 2):
        angle = positions.double() / base ** (2 * i / dim)
        table[:, 2 * i], table[:, 2 * i + 1] = angle.sin(), angle.cos()
    return table


@pytest.mark.parametrize("base", [10000.0, 500.0])
@pytest.mark.parametrize("dim", [2, 16, 64, 128])
def test_sinusoidal_matches_vaswani(dim, base):
    """The float32 table is Vaswani's interleaved sin/cos within 1e-6 for every position up to 4096."""
    positions = torch.arange(4097)
    table = hf_posenc.sinusoidal_position_embedding(positions, dim, base)
    assert table.shape == (4097, dim) and table.dtype == torch.float32
    torch.testing.assert_close(table.double(), vaswani_table(positions, dim, base), rtol=0, atol=1e-6)


def test_sinusoidal_any_shape():
    """Positions of any shape give (..., dim), position 0 is [0, 1, 0, 1, ...]."""
    table = hf_posenc.sinusoidal_position_embedding(torch.arange(6).view(2, 3), 8)
    assert table.shape == (2, 3, 8)
    assert torch.equal(table[0, 0], torch.tensor([0.0, 1.0] * 4))
    assert math.isclose(table[0, 1, 0].item(), math.sin(1.0), rel_tol=1e-6)


def _rope_reference_pair(dtype, partial):
    """Strided (B, H, T, D) q/k as attention modules make them and the YaRN turns (modulus > 1) of per-row
    positions."""
    config = hf_posenc.with_posenc(
        AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=64),
        {"type": "rope", "rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": partial},  # attention_scaling > 1
    )
    positions = torch.stack([torch.arange(5, 45), torch.arange(40)])
    torch.manual_seed(0)
    query, key = (torch.randn(2, 40, 4, 16, dtype=torch.float64).transpose(1, 2).to(dtype) for _ in range(2))
    return query.requires_grad_(), key.requires_grad_(), PairRotaryEmbedding(config)(query, positions)


def _outputs_and_grads(rotate, query, key):
    outputs = rotate(query, key)
    grads = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(outputs, (1.0, 2.0))), (query, key))
    return (*outputs, *grads)


ROPE_TOLERANCE = {torch.bfloat16: dict(atol=2e-2, rtol=1e-2), torch.float16: dict(atol=2e-3, rtol=1e-3)}


def assert_rope_equals_gptj(dtype, partial, device="cpu"):
    """The plugin's rotary step on `device` against transformers' GPT-J rotary step on the same angles, forward and
    backward (tests/test_gpu.py runs it on CUDA)."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rotary

    from hf_posenc.modeling.posenc_layers import apply_rope

    query, key, turns = _rope_reference_pair(dtype, partial)
    query, key = (t.detach().to(device).requires_grad_() for t in (query, key))
    turns = turns.to(device)
    ours = _outputs_and_grads(lambda q, k: apply_rope(q, k, turns), query, key)
    cos, sin = turns.to(dtype).unbind(-1)  # the same angles, in GPT-J's form

    def gptj(q, k):  # GPT-J: (B, T, H, D) tensors and (B, T, D/2) tables
        return tuple(gptj_rotary(x.transpose(1, 2), sin, cos).transpose(1, 2) for x in (q, k))

    theirs = _outputs_and_grads(gptj, query, key)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device.type == torch.device(device).type
        torch.testing.assert_close(a, b, **ROPE_TOLERANCE.get(dtype, {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_rope_equals_transformers_gptj(dtype, partial):
    """The plugin's rotary step (GPT-2, BERT) turns adjacent pairs: it equals transformers' GPT-J rotary step, forward
    and backward, on strided q/k, per-row positions and padded partial-rotary tables."""
    assert_rope_equals_gptj(dtype, partial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_rope_is_llama_rope_on_permuted_dimensions(dtype):
    """Adjacent pairs vs Llama's half-split pairs differ by one fixed permutation of the head dimensions: applying it
    to q and k before Llama's apply_rotary_pos_emb gives the plugin's result permuted the same way, so q.k is equal."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from hf_posenc.modeling.posenc_layers import apply_rope

    query, key, turns = _rope_reference_pair(dtype, 1.0)
    halves = torch.cat((torch.arange(0, 16, 2), torch.arange(1, 16, 2)))  # adjacent-pair layout -> half-split layout
    cos, sin = (torch.cat((t, t), dim=-1).to(dtype) for t in turns.unbind(-1))  # the same angles, Llama's form
    ours = apply_rope(query, key, turns)
    theirs = apply_rotary_pos_emb(query[..., halves], key[..., halves], cos, sin)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a[..., halves], b)
    torch.testing.assert_close(ours[0] @ ours[1].transpose(-1, -2), theirs[0] @ theirs[1].transpose(-1, -2))


def test_apply_rope_any_layout():
    """q/k whose memory cannot be viewed as complex pairs (odd offset or stride, a non-unit last stride) are rotated
    all the same."""
    from hf_posenc.modeling.posenc_layers import apply_rope

    query, key, turns = _rope_reference_pair(torch.float64, 1.0)
    query, key = query.detach(), key.detach()
    expected = apply_rope(query.contiguous(), key.contiguous(), turns)
    odd_offset = torch.randn(1 + query.numel(), dtype=torch.float64)[1:].view(query.shape).copy_(query)
    transposed_last = key.transpose(-1, -2).contiguous().transpose(-1, -2)
    for a, b in zip(apply_rope(odd_offset, transposed_last, turns), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_rope_blocks_of_rows(monkeypatch, dtype):
    """bf16/fp16 q/k go through fp32 in blocks of rows on the CPU: any block size gives the same result, forward and
    backward, down to the bit."""
    from hf_posenc.modeling import posenc_layers

    query, key, turns = _rope_reference_pair(dtype, 1.0)
    rotate = lambda q, k: posenc_layers.apply_rope(q, k, turns)  # noqa: E731
    whole = _outputs_and_grads(rotate, query, key)
    monkeypatch.setattr(posenc_layers, "TURN_STACK_BYTES", 0)
    monkeypatch.setattr(posenc_layers, "TURN_BLOCK_BYTES", 3 * 4 * query[..., :1, :].numel())  # 3 rows, 40 = 13*3+1
    for a, b in zip(_outputs_and_grads(rotate, query, key), whole):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "rope",
    [{}, {"rope_type": "yarn", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope"}],
)
def test_pair_rotary_turns_are_the_cos_sin_tables(rope):
    """PairRotaryEmbedding's turns are the (cos, sin) pairs of PosencRotaryEmbedding's tables (attention_scaling and
    dynamic growth included), in fp32 for a bf16 model and fp64 for an fp64 one."""
    if rope.get("rope_type") == "longrope":
        rope = {
            "rope_type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 32,
        }
    config = hf_posenc.with_posenc(
        AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=64),
        {"type": "rope", **rope},
    )
    positions = torch.stack([torch.arange(100, 180), torch.arange(80)])  # past 64: dynamic grows, longrope goes long
    for dtype, expected in (
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ):
        x = torch.zeros(1, dtype=dtype)
        turns = PairRotaryEmbedding(config)(x, positions)
        cos, sin = PosencRotaryEmbedding(config)(x.float() if dtype == torch.bfloat16 else x, positions)
        assert turns.dtype == expected and turns.shape == (2, 80, 8, 2)
        torch.testing.assert_close(turns[..., 0], cos[..., :8].to(expected))
        torch.testing.assert_close(turns[..., 1], sin[..., :8].to(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_traced(dtype):
    """Under torch.compile the rotary step is real arithmetic (which inductor fuses); it gives the eager result,
    forward and backward."""
    from hf_posenc.modeling.posenc_layers import apply_rope

    torch._dynamo.reset()
    query, key, turns = _rope_reference_pair(dtype, 0.5)
    compiled = torch.compile(apply_rope, fullgraph=True, backend="aot_eager")
    traced = _outputs_and_grads(lambda q, k: compiled(q, k, turns), query, key)
    for a, b in zip(traced, _outputs_and_grads(lambda q, k: apply_rope(q, k, turns), query, key)):
        torch.testing.assert_close(a, b, **ROPE_TOLERANCE.get(dtype, {}))


def test_apply_rope_mixed_dtypes_and_empty():
    """The step computes in fp64 when q/k or the turns are fp64 (eager, like the traced form), otherwise in fp32, and
    rounds once to q's dtype; bf16 turns are accepted; zero-length q/k give zero-length results."""
    from hf_posenc.modeling.posenc_layers import _turn_traced, apply_rope

    query, key, turns = _rope_reference_pair(torch.float64, 1.0)
    query, key = query.detach(), key.detach()
    reference = [_turn_traced(x, turns.unsqueeze(1)) for x in (query, key)]  # real arithmetic, fp64
    for a, b in zip(
        apply_rope(query, key, turns.float()),
        [_turn_traced(x, turns.float().double().unsqueeze(1)) for x in (query, key)],
    ):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # fp64 arithmetic on the fp32 turns' values
    for a, b in zip(apply_rope(query.float(), key.float(), turns), reference):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=0, atol=1e-6)  # computed in fp64, rounded once
    for a, b in zip(apply_rope(query.bfloat16(), key.bfloat16(), turns.bfloat16()), reference):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=2e-2)
    empty = query[..., :0, :]
    assert all(r.shape == empty.shape for r in apply_rope(empty, empty, turns[:, :0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_outputs_are_not_views(dtype):
    """Rotated q and k are tensors of their own: an attention function may change them in place under autograd."""
    from hf_posenc.modeling.posenc_layers import apply_rope

    query, key, turns = _rope_reference_pair(dtype, 1.0)
    q_rot, k_rot = apply_rope(query, key, turns)
    expected = torch.autograd.grad((q_rot.float() * 2).sum() + k_rot.float().sum(), (query, key))
    q_rot, k_rot = apply_rope(query, key, turns)
    q_rot.mul_(2)
    for a, b in zip(torch.autograd.grad(q_rot.float().sum() + k_rot.float().sum(), (query, key)), expected):
        assert torch.equal(a, b)


def test_apply_rope_gradient_to_turns():
    """Turns that need a gradient (a learned rotary table, say) get it: gradcheck in fp64, with q and k."""
    from hf_posenc.modeling.posenc_layers import apply_rope

    query, key, turns = _rope_reference_pair(torch.float64, 1.0)
    inputs = (query[:1, :, :6], key[:1, :, :6], turns[:1, :6].clone().requires_grad_())
    assert torch.autograd.gradcheck(apply_rope, inputs)


def test_apply_rope_inductor():
    """Compiled with inductor (the real-arithmetic form) the step gives the eager result, forward and backward."""
    from hf_posenc.modeling.posenc_layers import apply_rope

    torch._dynamo.reset()
    query, key, turns = _rope_reference_pair(torch.float32, 1.0)
    compiled = torch.compile(apply_rope, fullgraph=True)
    traced = _outputs_and_grads(lambda q, k: compiled(q, k, turns), query, key)
    for a, b in zip(traced, _outputs_and_grads(lambda q, k: apply_rope(q, k, turns), query, key)):
        torch.testing.assert_close(a, b)
