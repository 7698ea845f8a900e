"""Per-layer mixing, `posenc={"type": "layers", "pattern": [...]}`: the pattern over the depth, each layer's rotation,
bias, window and temperature against live references (transformers' SmolLM3 and Mistral, which do per layer what
the plugin does generically, and a layer-by-layer forward), the native form where a config can state the pattern
(SmolLM3's and Llama 4's `no_rope_layers`), and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB
from transformers import AutoConfig, AutoModelForCausalLM

from hf_posenc import archs
from hf_posenc.modeling.posenc_attention import AlibiBias, ScoreBiasMask, tempered
from hf_posenc.modeling.posenc_schemes import layer_entries, normalize_posenc

T = 14
LLAMA = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)  # fmt: skip


def tokens(batch=2, length=T, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def llama(posenc, seed=0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **{**LLAMA, **overrides})
    return AutoModelForCausalLM.from_config(config, posenc=posenc).eval()


def pattern(*entries):
    return {"type": "layers", "pattern": list(entries)}


# --------------------------------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------------------------------


def test_pattern_repeats_over_the_depth():
    config = AutoConfig.for_model("llama", **LLAMA)
    spec = normalize_posenc(pattern("rope", "alibi", "nope"), config)
    assert [e["type"] for e in layer_entries(spec, 4)] == ["rope", "alibi", "nope", "rope"]
    assert [e["type"] for e in layer_entries(spec, 12)] == ["rope", "alibi", "nope"] * 4
    assert normalize_posenc(spec, config) == spec  # normalising again changes nothing
    model = llama(pattern("rope", "alibi"))
    assert [type(layer.self_attn.posenc_bias).__name__ for layer in model.model.layers] == [
        "NoneType", "AlibiBias", "NoneType", "AlibiBias",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (pattern(), "pattern must be a non-empty list"),
        (pattern("rope", "learned"), r"pattern\[1\] is 'learned', an input-embedding table.*allowed in a pattern"),
        (pattern("sinusoidal"), "acts once for the whole model"),
        (pattern(pattern("rope")), "patterns do not nest"),
        (pattern("rope") | {"layers": 2}, "unknown parameter"),
        (pattern({"type": "rope", "attn_temperature_tuning": True}), "goes on a 'nope' entry"),
        (pattern({"type": "nope", "sliding_window": 0}), "sliding_window must be an int >= 1"),
        (pattern({"type": "nope", "attn_temperature_tuning": {"scale": 1}}), "attn_temperature_tuning must be"),
        (pattern({"type": "alibi", "max_bias": -1}), r"pattern\[0\]: posenc 'alibi': max_bias must be"),
        (pattern("rope", "nope", "rope", "nope", "rope"), "the pattern has 5 entries but the model 4 attention layers"),
        (pattern("alibbi"), r"pattern\[0\]: unknown posenc scheme 'alibbi'"),
    ],
)
def test_bad_patterns(spec, error):
    with pytest.raises(ValueError, match=error):
        llama(spec)


def test_refused_entry_names_the_architecture():
    """An entry whose site the architecture refuses is refused as that scheme would be."""
    with pytest.raises(ValueError, match="posenc 'alibi' acts at the bias site, which 'doge' cannot take"):
        archs.check_scheme("doge", pattern("rope", "alibi"))


# --------------------------------------------------------------------------------------------------------------------
# Against live references
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["rope", "nope", "alibi", "t5_bias", "fire", {"type": "kerple", "variant": "power"}])
def test_one_entry_is_the_scheme(scheme):
    """A pattern of one entry is that scheme everywhere: the same parameters and logits."""
    uniform, layered = llama(scheme), llama(pattern(scheme))
    layered.load_state_dict(uniform.state_dict())
    assert set(layered.state_dict()) == set(uniform.state_dict())
    x = tokens()
    torch.testing.assert_close(logits(layered, x), logits(uniform, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "entries", [["rope", "nope"], ["nope", "rope", "rope", "rope"], ["rope", "rope", "rope", "nope"]]
)
def test_rope_and_nope_as_smollm3(entries):
    """A Llama with RoPE and NoPE layers (the plugin swaps each NoPE layer's tables for the identity rotation) is
    bit for bit transformers' SmolLM3 with the same no_rope_layers, from the same weights."""
    model = llama(pattern(*entries))
    rotates = [int(e == "rope") for e in layer_entries(model.config.posenc, 4) for e in [e["type"]]]
    smol_config = AutoConfig.for_model("smollm3", **LLAMA, no_rope_layers=rotates, use_sliding_window=False)
    smol = AutoModelForCausalLM.from_config(smol_config).eval()
    smol.load_state_dict(model.state_dict())
    x = tokens()
    assert torch.equal(logits(model, x), logits(smol, x))


def test_window_as_mistral():
    """A windowed RoPE entry on every layer is Mistral's sliding window (keys less than `window` positions back),
    from the same weights, on the posenc kernels and with a KV cache."""
    model = llama(pattern({"type": "rope", "sliding_window": 5}))
    mistral_config = AutoConfig.for_model("mistral", **LLAMA, sliding_window=5)
    mistral = AutoModelForCausalLM.from_config(mistral_config, attn_implementation="eager").eval()
    mistral.load_state_dict(model.state_dict())
    x = tokens(length=20)
    assert model.config._attn_implementation == "posenc_auto"
    torch.testing.assert_close(logits(model, x), logits(mistral, x), atol=2e-5, rtol=1e-5)
    windowed = logits(model, x)
    assert (windowed - logits(llama("rope"), x)).abs().max() > 1e-3  # the window matters at this length


def layer_by_layer(reference, x, tables):
    """The Llama forward written out: layer i gets `tables[i]` as its position_embeddings."""
    positions = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        hidden = reference.model.embed_tokens(x)
        for layer, table in zip(reference.model.layers, tables):
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=table)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return reference.lm_head(reference.model.norm(hidden))


def test_two_rope_settings_and_nope_layer_by_layer():
    """RoPE, YaRN (a rotary module of its own) and NoPE layers: each layer gets its own tables, as a forward that
    hands them to each layer by hand."""
    yarn = {"type": "rope", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    model = llama(pattern("rope", yarn, "nope", yarn))
    rope, yarn_model, nope = llama("rope"), llama(yarn), llama("nope")
    x = tokens()
    positions = torch.arange(T)[None]
    hidden = torch.zeros(1, T, 32)
    tables = [m.model.rotary_emb(hidden, positions) for m in (rope, yarn_model, nope)]
    reference = copy.deepcopy(rope)
    reference.load_state_dict(model.state_dict())
    expected = layer_by_layer(reference, x, [tables[0], tables[1], tables[2], tables[1]])
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=1e-5)
    assert (logits(model, x) - logits(rope, x)).abs().max() > 1e-3


def test_temperature_is_llama4s():
    """Llama 4's temperature of NoPE layers: queries times log1p(floor((p + 1) / floor_scale)) * attn_scale + 1 at
    cache position p (transformers' Llama4TextAttention), written out; and where a pattern's NoPE entry has it, the
    logits past floor_scale move and those before do not."""

    class Module(torch.nn.Module):
        posenc_entry = {"attn_temperature_tuning": {"floor_scale": 4, "attn_scale": 0.5}}

    query = torch.randn(2, 3, 10, 8)
    masks = ScoreBiasMask(None, True, torch.arange(5, 15), torch.arange(15))
    expected = torch.tensor([torch.log1p(torch.floor(torch.tensor((p + 1) / 4.0))) * 0.5 + 1 for p in range(5, 15)])
    torch.testing.assert_close(tempered(Module(), query, masks), query * expected[:, None])
    plain = llama(pattern("rope", "nope"))
    hot = llama(pattern("rope", {"type": "nope", "attn_temperature_tuning": {"floor_scale": 8, "attn_scale": 2.0}}))
    hot.load_state_dict(plain.state_dict())
    x = tokens()
    before, after = logits(plain, x), logits(hot, x)
    assert torch.equal(before[:, :7], after[:, :7])  # positions 0..6: scale 1
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------------
# The native form: architectures whose config states which layers rotate
# --------------------------------------------------------------------------------------------------------------------


def test_smollm3_states_the_pattern_natively(tmp_path):
    """On SmolLM3 the pattern's RoPE layers go into no_rope_layers: a stock checkpoint converts to the pattern it
    already computes with the same logits, the saved folder loads into stock SmolLM3 (no guard: the stock class
    computes it), and a pattern with a bias is guarded."""
    config = AutoConfig.for_model("smollm3", **LLAMA, no_rope_layers=[1, 1, 1, 0], use_sliding_window=False)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config).eval()
    stock.save_pretrained(tmp_path / "stock")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", posenc=pattern("rope", "rope", "rope", "nope"))
    assert converted.config.no_rope_layers == [1, 1, 1, 0]
    x = tokens()
    assert torch.equal(logits(converted.eval(), x), logits(stock, x))
    converted.save_pretrained(tmp_path / "layers")
    back = type(stock).from_pretrained(tmp_path / "layers").eval()  # the stock class, no plugin involved
    assert torch.equal(logits(back, x), logits(stock, x))
    # another pattern: the stock class computes it too (no_rope_layers), but not one with a bias
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", posenc=pattern("nope", "rope")).eval()
    assert other.config.no_rope_layers == [0, 1, 0, 1] and other.config.stock_guard() is None
    biased = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", posenc=pattern("rope", "alibi"))
    assert biased.config.stock_guard() is not None


def test_llama4_temperature_natively():
    """On Llama 4 (whose NoPE layers apply the temperature themselves) a pattern's NoPE entries set no_rope_layers and
    the temperature in the config: the stock model's own every-4th-layer NoPE with its temperature is that pattern."""
    overrides = dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0], floor_scale=4, attn_scale=0.5)
    config = archs.small_config("llama4_text", vocab_size=VOCAB, pad_token_id=0, **archs.TEST_SIZE | overrides)
    assert config.attn_temperature_tuning
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
    nope = {"type": "nope", "attn_temperature_tuning": {"floor_scale": 4, "attn_scale": 0.5}}
    layered = AutoModelForCausalLM.from_config(copy.deepcopy(config), posenc=pattern("rope", "rope", "rope", nope))
    layered.load_state_dict(stock.state_dict())
    assert layered.config.no_rope_layers == [1, 1, 1, 0] and layered.config.attn_temperature_tuning
    x = tokens()
    torch.testing.assert_close(logits(layered.eval(), x), logits(stock, x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one attention temperature"):
        AutoModelForCausalLM.from_config(copy.deepcopy(config), posenc=pattern("rope", nope, "rope", "nope"))


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def test_providers_per_entry():
    """Entries of one scheme that shares (T5, ALiBi) share its provider; FIRE gets one per layer; layers without a
    bias get none, and run plain SDPA (no bias block at all)."""
    model = llama(pattern("t5_bias", "fire", "nope", "t5_bias"))
    providers = [layer.self_attn.posenc_bias for layer in model.model.layers]
    assert providers[0] is providers[3] and providers[1] is not None and providers[2] is None
    assert sorted({name.split(".")[2] for name, _ in model.named_parameters() if "position_bias" in name}) == [
        "0", "1",
    ]  # fmt: skip
    alibi = llama(pattern("alibi", "rope", "alibi", "rope"))
    assert isinstance(alibi.model.layers[0].self_attn.posenc_bias, AlibiBias)
    assert alibi.model.layers[0].self_attn.posenc_bias is alibi.model.layers[2].self_attn.posenc_bias


def test_stock_attention_where_nothing_needs_the_kernels():
    """A pattern of rotations and NoPE without windows runs the architecture's own attention implementation."""
    assert llama(pattern("rope", "nope")).config._attn_implementation == "sdpa"
    assert llama(pattern("rope", "alibi")).config._attn_implementation == "posenc_auto"
    assert llama(pattern("rope", {"type": "nope", "sliding_window": 4})).config._attn_implementation == "posenc_auto"


def test_training_step_and_compile():
    """A mixed model trains (every parameter gets a gradient, the bias's too) and compiles in one graph."""
    model = llama(pattern("rope", "fire", {"type": "nope", "sliding_window": 6}, "alibi")).train()
    x = tokens()
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()
    model.eval()
    with torch.no_grad():
        expected = model(x).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x).logits
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "entries",
    [["kerple", "rope"], ["t5_bias", "nope", "t5_bias", "nope"], [{"type": "fire", "shared": True}, "alibi", "fire"]],
)
def test_shared_providers_save_once(tmp_path, entries):
    """A learned bias shared by several layers of a pattern is registered once (under its first layer), so the
    folder saves (no tensor under two names) and reloads bit for bit."""
    model = llama(pattern(*entries))
    names = [n for n in model.state_dict() if "position_bias" in n]
    assert len(names) == len({id(t) for n, t in model.state_dict().items() if "position_bias" in n})
    model.save_pretrained(tmp_path)
    x = tokens()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), x), logits(model, x))


def test_layer_types_follow_the_native_pattern():
    """Where the stock config derives `layer_types` from `no_rope_layers` (Llama 4's RoPE layers are chunked,
    SmolLM3's NoPE layers slide), a pattern written into no_rope_layers gets the layer types the stock config gives
    that no_rope_layers, and the stock model with it computes the same logits."""
    smol = dict(LLAMA, no_rope_layers=[1, 1, 1, 0], use_sliding_window=True, sliding_window=4)
    layered = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("smollm3", **smol), posenc=pattern("nope", "rope")
    ).eval()
    fresh = AutoConfig.for_model("smollm3", **smol | {"no_rope_layers": [0, 1, 0, 1]})
    assert layered.config.layer_types == fresh.layer_types == ["sliding_attention", "full_attention"] * 2
    stock = AutoModelForCausalLM.from_config(fresh).eval()
    stock.load_state_dict(layered.state_dict())
    x = tokens(length=20)
    assert torch.equal(logits(layered, x), logits(stock, x))
    overrides = dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])
    config = archs.small_config("llama4_text", vocab_size=VOCAB, pad_token_id=0, **archs.TEST_SIZE | overrides)
    llama4 = AutoModelForCausalLM.from_config(copy.deepcopy(config), posenc=pattern("nope", "rope"))
    assert llama4.config.layer_types == ["full_attention", "chunked_attention"] * 2


def test_hybrid_layers_without_attention_are_skipped():
    """On LFM2 (convolution layers between attention layers) a pattern's entries and FIRE's per-layer MLPs go to the
    attention layers only, so each entry acts."""
    config = AutoConfig.for_model(
        "lfm2", **{k: v for k, v in LLAMA.items() if k != "rope_parameters"} | dict(num_hidden_layers=6),
        full_attn_idxs=[1, 3, 5],
    )  # fmt: skip
    assert config.layer_types == ["conv", "full_attention"] * 3
    torch.manual_seed(0)
    rope = AutoModelForCausalLM.from_config(copy.deepcopy(config), posenc="rope").eval()
    x = tokens()
    for spec in (pattern("nope", "rope"), pattern({"type": "rope", "sliding_window": 2}, "rope")):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), posenc=spec).eval()
        model.load_state_dict(rope.state_dict())
        assert (logits(model, x) - logits(rope, x)).abs().max() > 1e-3, spec
    fire = AutoModelForCausalLM.from_config(copy.deepcopy(config), posenc="fire")
    assert sorted({n.split(".")[2] for n, _ in fire.named_parameters() if "position_bias" in n}) == ["0", "1", "2"]
    fire(x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in fire.named_parameters() if "position_bias" in n)
