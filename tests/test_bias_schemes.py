"""KERPLE, Sandwich and FIRE: each provider against its paper's formula written out in float64, and every attention
path (posenc_sdpa's chunked blocks, posenc_eager, flex) against float64 attention, forward and backward, including
the gradient of the bias's own parameters; with padding, position ids of each row's own, and cached keys."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, build
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_posenc.modeling import posenc_attention
from hf_posenc.modeling.posenc_attention import (
    FireBias,
    KerpleBias,
    SandwichBias,
    ScoreBiasMask,
    posenc_eager_attention,
    posenc_flex_attention,
    posenc_sdpa_attention,
    score_bias_modules,
)
from hf_posenc.modeling.posenc_schemes import normalize_posenc

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# --------------------------------------------------------------------------------------------------------------------
# The formulas, written out in float64 from the papers
# --------------------------------------------------------------------------------------------------------------------


def kerple_reference(r1, r2, variant, q, k):
    """Chi et al. 2022, eq. (log) -r1 log(1 + r2 |m - n|) and (power) -r1 |m - n|^r2, parameters projected into
    [0.01, inf) (and the power's exponent into [0.01, 2]) as the paper's code does."""
    r1 = r1.double().clamp(min=0.01)
    r2 = r2.double().clamp(min=0.01, max=2.0 if variant == "power" else None)
    distance = (q[:, None] - k[None, :]).abs().double()
    if variant == "log":
        return -r1[:, None, None] * torch.log(1 + r2[:, None, None] * distance)
    return -r1[:, None, None] * distance ** r2[:, None, None]


def sandwich_reference(heads, dim, q, k):
    """Chi et al. 2023: p_m . p_n of Vaswani's sinusoidal embeddings (sin at 2i, cos at 2i + 1, frequency
    10000^(-2i/dim)), minus its value at distance 0, divided by the head's ratio 8h/H."""
    out = torch.zeros(heads, len(q), len(k), dtype=torch.float64)
    for a, m in enumerate(q.tolist()):
        for b, n in enumerate(k.tolist()):
            dot = 0.0
            for i in range(dim // 2):
                w = 10000.0 ** (-2 * i / dim)
                dot += math.sin(m * w) * math.sin(n * w) + math.cos(m * w) * math.cos(n * w)
            for h in range(heads):
                out[h, a, b] = (dot - dim / 2) / (8 * (h + 1) / heads)
    return out


def fire_reference(provider: FireBias, q, k, causal=True):
    """Li et al. 2024: f(psi(i - j) / psi(max(L, i))), psi(x) = log(|c x| + 1), f = Linear -> ReLU -> Linear, L the
    learned multiple of the initial threshold; 1e-6 in the denominator as the reference code."""
    p = {name: value.detach().double() for name, value in provider.named_parameters()}
    i, j = q.double()[:, None], k.double()[None, :]
    distance = i - j if causal else (i - j).abs()
    threshold = (p["threshold_multiplier"] * provider.init_threshold).abs()
    x = torch.log((p["c"] * distance).abs() + 1) / (torch.log((p["c"] * torch.maximum(i, threshold)).abs() + 1) + 1e-6)
    hidden = torch.relu(x[..., None] * p["w1"] + p["b1"])
    return (hidden @ p["w2"].T + p["b2"]).permute(2, 0, 1)


def test_kerple_log_and_power_match_the_paper():
    q, k = torch.arange(40, 70), torch.arange(70)
    for variant in ("log", "power"):
        provider = KerpleBias(4, variant)
        with torch.no_grad():  # values in range, below the floor and (power) above the exponent's ceiling
            provider.r1.copy_(torch.tensor([0.5, 1.7, -0.3, 0.001]))
            provider.r2.copy_(torch.tensor([0.2, 1.9, 3.0, -1.0]))
        expected = kerple_reference(provider.r1, provider.r2, variant, q, k)
        got = provider(q, k)
        assert got.dtype == torch.float32 and got.shape == (4, 30, 70)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_kerple_initialisation_and_projection():
    """The paper's starting ranges per variant; parameters an optimizer step pushed past a bound are projected back
    onto it before the next attention call uses them (so the next step in the other direction moves them off it at
    once, as the paper's projection); the power variant's exponent has a finite gradient at distance 0."""
    torch.manual_seed(0)
    log, power = KerpleBias(512, "log"), KerpleBias(512, "power")
    for r, high in ((log.r1, 2), (log.r2, 1), (power.r1, 1), (power.r2, 2)):
        assert 0 <= r.min() and r.max() <= high and r.max() > 0.9 * high
    provider = KerpleBias(4, "power")
    optimizer = torch.optim.SGD(provider.parameters(), lr=1.0)
    query, key, value = (torch.randn(1, 4, 16, 8) for _ in range(3))
    masks = masks_case("causal", 16)
    for direction, steps in ((1.0, 6), (-1.0, 1)):  # push r1 down past 0.01 and r2 up past 2, then back once
        for _ in range(steps):
            out, _ = posenc_sdpa_attention(Attention(provider), query, key, value, masks, scaling=0.3)
            (direction * (provider.r1.sum() - provider.r2.sum()) + 0 * out.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        posenc_sdpa_attention(Attention(provider), query, key, value, masks, scaling=0.3)
        if direction > 0:
            assert torch.equal(provider.r1.detach(), torch.full((4,), 0.01))
            assert torch.equal(provider.r2.detach(), torch.full((4,), 2.0))
    assert torch.allclose(provider.r1.detach(), torch.full((4,), 1.01)) and (provider.r2 < 2).all()
    provider(torch.arange(6), torch.arange(6)).sum().backward()
    for r in (provider.r1, provider.r2):
        assert torch.isfinite(r.grad).all() and (r.grad != 0).all()


def test_sandwich_is_the_inner_product_of_sinusoids():
    q, k = torch.arange(5, 17), torch.arange(17)
    for heads, dim in ((4, 16), (3, 128)):
        got = SandwichBias(heads, dim)(q, k)
        torch.testing.assert_close(got.double(), sandwich_reference(heads, dim, q, k), rtol=1e-5, atol=1e-5)
    assert not list(SandwichBias(4).parameters())


def test_fire_matches_the_paper_and_sees_the_query_position():
    torch.manual_seed(0)
    provider = FireBias(4, hidden=8, init_threshold=16)
    q, k = torch.arange(0, 40), torch.arange(40)
    torch.testing.assert_close(provider(q, k).double(), fire_reference(provider, q, k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        provider(q, k, causal=False).double(), fire_reference(provider, q, k, causal=False), rtol=1e-5, atol=1e-6
    )
    # below the threshold the bias is one of the distance; past it the query's position normalises it
    near, far = provider(torch.tensor([10]), torch.tensor([5])), provider(torch.tensor([30]), torch.tensor([25]))
    assert provider(torch.tensor([12]), torch.tensor([7])).equal(near) and not far.equal(near)
    # the paper's initialisation: c = 0.1, threshold multiplier 1, torch's Linear ranges
    fresh = FireBias(8)
    assert fresh.c.item() == pytest.approx(0.1) and fresh.threshold_multiplier.item() == 1.0
    assert fresh.w1.abs().max() <= 1 and fresh.w2.abs().max() <= 32**-0.5


# --------------------------------------------------------------------------------------------------------------------
# Every attention path against float64 attention, forward and backward
# --------------------------------------------------------------------------------------------------------------------


class Attention(torch.nn.Module):
    def __init__(self, provider):
        super().__init__()
        self.training = False
        object.__setattr__(self, "posenc_bias", provider)


def reference_attention(query, key, value, bias, allowed, scaling):
    groups = query.shape[1] // key.shape[1]
    q, k, v = (t.double() for t in (query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)))
    scores = q @ k.transpose(-1, -2) * scaling + bias.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def providers():
    torch.manual_seed(0)
    fire = FireBias(4, hidden=8, init_threshold=24)  # a threshold inside the test lengths
    with torch.no_grad():
        fire.c.fill_(0.5)
    return {
        "kerple-log": KerpleBias(4, "log"),
        "kerple-power": KerpleBias(4, "power"),
        "sandwich": SandwichBias(4, 16),
        "fire": fire,
    }


def masks_case(name, length=48):
    positions = torch.arange(length)
    if name == "causal":
        return ScoreBiasMask(None, True, positions, positions)
    if name == "cached":  # 8 new queries after 40 cached keys
        return ScoreBiasMask(None, True, positions[40:], positions)
    if name == "bidirectional":
        return ScoreBiasMask(None, False, positions, positions)
    if name == "padded":
        mask = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
        mask[0, :, :, 40:] = False  # right padding: every row keeps keys
        return ScoreBiasMask(mask, True, positions, positions)
    if name == "position-ids":  # packed rows: positions restart at 20 in row 1, a gap of 5 in row 0
        ids = torch.stack(
            (torch.cat((positions[:30], positions[30:] + 5)), torch.cat((positions[:20], positions[:28])))
        )
        return ScoreBiasMask(None, True, positions, positions).with_position_ids(ids)
    raise KeyError(name)


MASKS = ["causal", "cached", "bidirectional", "padded", "position-ids"]
PATHS = {"sdpa": posenc_sdpa_attention, "eager": posenc_eager_attention, "flex": posenc_flex_attention}


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["kerple-log", "kerple-power", "sandwich", "fire"])
def test_paths_match_fp64(monkeypatch, name, path, mask_name):
    """Output (and, except flex, which has no CPU backward, the gradients of q, k, v and of the provider's
    parameters) against float64 attention over the provider's bias; small blocks force several chunks."""
    monkeypatch.setattr(posenc_attention, "FLEX_COMPILE", False)
    monkeypatch.setattr(posenc_attention, "BIAS_BLOCK_BYTES", 4 * 2 * 4 * 48 * 7)  # about 7 rows per block
    provider, masks = providers()[name], masks_case(mask_name)
    generator = torch.Generator().manual_seed(1)
    q_len, k_len = len(masks.q_positions), len(masks.kv_positions)
    train = path != "flex"
    make = lambda *shape: torch.randn(*shape, generator=generator).requires_grad_(train)  # noqa: E731
    query, key, value = make(2, 4, q_len, 16), make(2, 2, k_len, 16), make(2, 2, k_len, 16)
    with torch.set_grad_enabled(train):
        out, _ = PATHS[path](Attention(provider), query, key, value, masks, scaling=0.25)
    causal = masks.causal
    bias = masks.bias(provider, slice(None), 4, causal)
    expected = reference_attention(query, key, value, bias, masks.block(slice(None)), 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if not train:
        return
    parameters = list(provider.parameters())
    inputs = (query, key, value, *parameters)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    # q, k, v one by one; the provider's parameters together (a bias constant per head, as FIRE's output bias, has
    # no gradient at all in exact arithmetic: only rounding, which counts against the largest parameter gradient)
    pairs = list(zip(grads[:3], expected_grads[:3]))
    if parameters:
        pairs.append(
            (torch.cat([g.flatten() for g in grads[3:]]), torch.cat([g.flatten() for g in expected_grads[3:]]))
        )
    for grad, expected_grad in pairs:
        error = (grad.double() - expected_grad.double()).abs().max() / expected_grad.double().abs().max()
        assert error < 1e-4, f"relative error {error:.2e}"


def test_fire_chunks_count_its_scratch(spy):
    """FIRE's hidden layer is (rows, K, hidden): the chunk shrinks so that it stays within the block budget."""
    provider = FireBias(4, hidden=32)
    masks = masks_case("causal", 256)
    query, key, value = (torch.randn(1, 4, 256, 16) for _ in range(3))
    with torch.no_grad():
        posenc_sdpa_attention(Attention(provider), query, key, value, masks, scaling=0.25)
    rows = max(r for r, _ in spy)
    assert rows * 256 * (4 + 32) * 4 <= posenc_attention.BIAS_BLOCK_BYTES


# --------------------------------------------------------------------------------------------------------------------
# Models: sharing across layers, conversion, saving
# --------------------------------------------------------------------------------------------------------------------


def test_sharing_across_layers():
    """KERPLE (as its paper's code), Sandwich and FIRE-S share one provider; FIRE learns one per layer."""
    for spec, shared in (
        ("kerple", True),
        ("sandwich", True),
        ({"type": "fire", "shared": True}, True),
        ("fire", False),
    ):
        providers_ = score_bias_modules(normalize_posenc(spec, None), 4, 3)
        assert (len({id(p) for p in providers_}) == 1) == shared, spec
    model = build("llama", "fire")
    names = [n for n, _ in model.named_parameters() if "position_bias" in n]
    assert {n.split(".")[2] for n in names} == {"0", "1"} and len(names) == 12  # 2 layers x 6 tensors
    layers = model.model.layers
    assert layers[0].self_attn.posenc_bias is not layers[1].self_attn.posenc_bias


@pytest.mark.parametrize("spec", ["kerple", {"type": "kerple", "variant": "power"}, "sandwich", "fire"])
def test_convert_save_and_reload(tmp_path, spec):
    """A stock checkpoint converts (the new parameters start as the paper's) and the result reloads bit-exact, with
    the plugin and through trust_remote_code."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "stock")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", posenc=spec).eval()
    for name, param in model.named_parameters():
        if name.endswith(".c"):
            assert param.item() == pytest.approx(0.1)
        if name.endswith(("r1", "r2")):
            assert 0 <= param.min() and param.max() <= 2
    model.save_pretrained(tmp_path / "converted")
    x = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        expected = model(x).logits
        for kwargs in ({}, {"trust_remote_code": True}):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", **kwargs).eval()
            assert torch.equal(loaded(x).logits, expected)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"type": "kerple", "variant": "exp"}, "variant must be one of"),
        ({"type": "sandwich", "dim": 7}, "dim must be an even int"),
        ({"type": "fire", "hidden": 0}, "hidden must be an int >= 1"),
        ({"type": "fire", "shared": "yes"}, "shared must be a bool"),
        ({"type": "fire", "threshold": 4}, "unknown parameter"),
    ],
)
def test_bad_parameters(spec, error):
    with pytest.raises(ValueError, match=error):
        normalize_posenc(spec, None)
