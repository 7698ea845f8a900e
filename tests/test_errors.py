"""Every bad input is refused with an error that names the bad value and what is allowed."""

import importlib.util
import re

import pytest
import torch
from conftest import wide_config
from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc

ARCHS = ["gpt2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_scheme(arch):
    """An unknown scheme name is refused, naming it and listing every registered scheme."""
    with pytest.raises(ValueError, match="'foo'.*allowed: " + ", ".join(sorted(hf_posenc.SCHEMES))) as info:
        AutoModelForCausalLM.from_config(wide_config(arch), posenc="foo")
    assert all(name in str(info.value) for name in hf_posenc.SCHEMES)


def test_unknown_architecture():
    """A config of an unsupported architecture is refused, naming it, the reason and where the matrix is."""
    opt = AutoConfig.for_model("opt", num_hidden_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match=r"architecture 'opt': no rotary module: .*\(see `hf-posenc archs`\)$"):
        hf_posenc.with_posenc(opt, "alibi")
    vit = AutoConfig.for_model("vit", num_hidden_layers=1, hidden_size=32, num_attention_heads=2)
    with pytest.raises(ValueError, match="architecture 'vit': no causal or masked language-model head"):
        hf_posenc.with_posenc(vit, "alibi")


def test_with_posenc_needs_a_config():
    """with_posenc refuses something that is not a transformers config, naming its type."""
    with pytest.raises(TypeError, match="got dict"):
        hf_posenc.with_posenc({"model_type": "gpt2"}, "alibi")


# (posenc spec, pattern the message must match): each names the bad value or key and what is allowed
BAD_SPECS = {
    "unknown rope_type": ({"type": "rope", "rope_type": "bogus"}, r"'bogus'.*allowed: .*yarn"),
    "rope factor < 1": ({"type": "rope", "rope_type": "linear", "factor": 0.5}, r"factor must be a number >= 1.*0\.5"),
    "negative max_bias": ({"type": "alibi", "max_bias": -1}, r"max_bias must be a number > 0, got -1"),
    "zero max_bias": ({"type": "alibi", "max_bias": 0}, r"max_bias must be a number > 0, got 0"),
    "yarn without factor": ({"type": "rope", "rope_type": "yarn"}, r"needs parameter 'factor'"),
    "llama3 without low_freq_factor": (
        {"type": "rope", "rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0},
        r"needs parameter 'low_freq_factor'",
    ),
    "unknown parameter": (
        {"type": "alibi", "maxbias": 2},
        r"unknown parameter\(s\) \['maxbias'\]; allowed: max_bias, slope_multiplier",
    ),
    "dict without type": ({"max_bias": 2}, r"needs a 'type' key, one of: alibi, .*t5_bias"),
    "t5 max_distance too small": (
        {"type": "t5_bias", "num_buckets": 32, "max_distance": 16},
        r"max_distance must exceed num_buckets // 2.*max_distance=16, num_buckets=32",
    ),
    "t5 max_distance equal to exact buckets": (
        {"type": "t5_bias", "num_buckets": 8, "max_distance": 4},
        r"max_distance=4, num_buckets=8",
    ),
    "odd rotary width": (
        {"type": "rope", "partial_rotary_factor": 0.3125},
        r"16 \* 0\.3125 -> 5 must be an even number >= 2",
    ),
    "rotary width 1": ({"type": "rope", "partial_rotary_factor": 0.0625}, r"-> 1 must be an even number"),
    "partial_rotary_factor > 1": ({"type": "rope", "partial_rotary_factor": 1.5}, r"a number in \(0, 1\], got 1\.5"),
    "longrope factors of the wrong length": (
        {"type": "rope", "rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8},
        r"short_factor needs rotary_dim / 2 = 8 entries, got 3",
    ),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_is_refused(case, arch):
    """A bad posenc spec raises a ValueError naming the bad value and the rule, through with_posenc and from_config."""
    spec, pattern = BAD_SPECS[case]
    with pytest.raises(ValueError, match=pattern):
        hf_posenc.with_posenc(wide_config(arch), spec)
    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_config(wide_config(arch), posenc=spec)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [3, 2.5, ["alibi"]])
def test_posenc_of_wrong_type(arch, spec):
    """A posenc that is neither a name nor a dict raises a TypeError naming its type."""
    with pytest.raises(TypeError, match=f"scheme name or a dict.*got {type(spec).__name__}"):
        AutoModelForCausalLM.from_config(wide_config(arch), posenc=spec)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
@pytest.mark.parametrize("impl", ["flash_attention_3", "paged|sdpa", "kernels-community/flash-attn2"])
def test_bias_scheme_refuses_other_kernels(arch, scheme, impl):
    """A score-bias scheme refuses a kernel that cannot add its bias, naming it and the kernels allowed."""
    allowed = r".*allowed: 'sdpa', 'flex_attention', 'flash_attention_2', 'eager'"
    with pytest.raises(ValueError, match=re.escape(f"attn_implementation={impl!r}") + allowed):
        AutoModelForCausalLM.from_config(wide_config(arch), posenc=scheme, attn_implementation=impl)


@pytest.mark.parametrize("impl", ["posenc_fast", "posenc_flash_attention_2"])
def test_unknown_posenc_kernel(impl):
    """A misspelt posenc_ kernel names every posenc_ kernel there is."""
    with pytest.raises(ValueError, match=f"unknown attn_implementation '{impl}'.*'posenc_auto', 'posenc_sdpa'"):
        AutoModelForCausalLM.from_config(wide_config("llama"), posenc="alibi", attn_implementation=impl)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
@pytest.mark.parametrize("impl", ["flash_attention_2", "posenc_flash"])
def test_flash_needs_flash_attn(impl):
    """Asking for the flash path without flash-attn fails at build time with transformers' own message."""
    with pytest.raises(ImportError, match="FlashAttention2.*doesn't seem to be installed"):
        AutoModelForCausalLM.from_config(wide_config("gpt2"), posenc="alibi", attn_implementation=impl)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["rope", "learned", "sinusoidal", "nope"])
@pytest.mark.parametrize("impl", ["posenc_sdpa", "posenc_eager"])
def test_bias_kernel_refused_without_bias(arch, scheme, impl):
    """The posenc_* kernels are refused for a scheme without a score bias, naming the kernel and the scheme."""
    with pytest.raises(ValueError, match=f"'{impl}' is for score-bias schemes.*posenc is '{scheme}'"):
        AutoModelForCausalLM.from_config(wide_config(arch), posenc=scheme, attn_implementation=impl)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
@pytest.mark.parametrize(("impl", "kernel"), [("eager", "eager"), ("sdpa", "sdpa"), ("flex_attention", "flex")])
def test_bias_never_dropped(arch, scheme, impl, kernel):
    """Asking a bias model for a stock kernel, at build time or later, maps it to its posenc_ kernel; unset is auto."""
    assert AutoModelForCausalLM.from_config(wide_config(arch), posenc=scheme).config._attn_implementation == (
        "posenc_auto"
    )
    model = AutoModelForCausalLM.from_config(wide_config(arch), posenc=scheme, attn_implementation=impl)
    assert model.config._attn_implementation == f"posenc_{kernel}"
    other = "sdpa" if impl == "eager" else "eager"
    model.set_attn_implementation(other)
    assert model.config._attn_implementation == f"posenc_{other}"
    with pytest.raises(ValueError, match="allowed: 'sdpa', 'flex_attention'"):
        model.set_attn_implementation("paged|sdpa")
    assert model.config._attn_implementation == f"posenc_{other}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
def test_bias_model_refuses_4d_mask(arch, scheme):
    """A bias model given a prepared 4-D mask asks for the 2-D padding mask instead of silently misplacing the bias."""
    model = AutoModelForCausalLM.from_config(wide_config(arch), posenc=scheme)
    input_ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"2-D padding mask of shape \(batch, length\)"):
        model(input_ids, attention_mask=torch.zeros(2, 1, 5, 5))
    assert model(input_ids, attention_mask=torch.ones(2, 5, dtype=torch.long)).logits.shape == (2, 5, 128)


@pytest.mark.parametrize("via", ["keyword", "config"])
def test_learned_positions_past_table(via):
    """Learned positions past the table raise a ValueError naming the position and the table size."""
    stock = wide_config("gpt2", n_positions=16)
    if via == "keyword":
        model = AutoModelForCausalLM.from_config(stock, posenc="learned")
    else:
        model = AutoModelForCausalLM.from_config(hf_posenc.with_posenc(stock, "learned"))
    assert model(torch.zeros(1, 16, dtype=torch.long)).logits.shape == (1, 16, 128)
    with pytest.raises(ValueError, match=r"position 19 is past the learned position table \(16 positions\)"):
        model(torch.zeros(1, 20, dtype=torch.long))


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((0,), "num_heads must be an int >= 1, got 0"),
        ((-3,), "num_heads must be an int >= 1, got -3"),
        ((2.0,), r"num_heads must be an int >= 1, got 2\.0"),
        ((True,), "num_heads must be an int >= 1, got True"),
        ((4, -1), "max_bias must be a number > 0, got -1"),
        ((4, 0), "max_bias must be a number > 0, got 0"),
        ((4, float("nan")), "max_bias must be a number > 0, got nan"),
    ],
)
def test_alibi_slopes_bad_arguments(args, pattern):
    """alibi_slopes refuses a head count below 1 (or not an int) and a max_bias that is not > 0."""
    with pytest.raises(ValueError, match=pattern):
        hf_posenc.alibi_slopes(*args)


def test_sinusoidal_odd_width():
    """The sinusoidal table refuses an odd width, naming it."""
    with pytest.raises(ValueError, match="even embedding width, got 7"):
        hf_posenc.sinusoidal_position_embedding(torch.arange(4), 7)


def test_rope_parameters_edited_by_hand(tmp_path):
    """Editing config.rope_parameters instead of posenc is refused at build and save: it would not survive a reload."""
    model = AutoModelForCausalLM.from_config(wide_config("llama"), posenc="rope")
    model.config.rope_parameters["rope_theta"] = 123.0
    with pytest.raises(ValueError, match="no longer match config.posenc.*with_posenc"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no longer match config.posenc"):
        AutoModelForCausalLM.from_config(model.config)


def test_bias_scheme_with_cross_attention():
    """GPT-2 with cross-attention cannot take a self-attention bias: refused at build time, naming what works."""
    with pytest.raises(ValueError, match="add_cross_attention=True use learned, sinusoidal, rope or nope"):
        AutoModelForCausalLM.from_config(wide_config("gpt2", add_cross_attention=True), posenc="alibi")
