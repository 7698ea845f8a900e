"""Nothing silently wrong (issue 11): hand edits that would not survive a reload, parameters that disable a scheme or
give NaN, config files that do not say their scheme, obscure errors, and two spellings of one request."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import ARCH_KWARGS, VOCAB, build, tiny_config, wide_config
from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc

ARCHS = ["gpt2", "llama"]


def x(length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------------------------------
# 4. config.posenc or rope_parameters edited after the build
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_posenc_edited_after_build_refused_at_save(arch, tmp_path):
    """Editing model.config.posenc changes nothing in memory, so saving it would reload another model: refused,
    naming the old and the new posenc and the way to get a model of the new scheme; nothing is written."""
    model = build(arch, "alibi")
    model.config.posenc = {"type": "nope"}
    message = r"config.posenc was changed from \{'type': 'alibi', .*\} to \{'type': 'nope'\} after the model was built"
    with pytest.raises(ValueError, match=message + r".*with_posenc\(config, new_posenc\).*posenc=new_posenc"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"config.posenc was changed .* after the config was built"):
        model.config.save_pretrained(tmp_path / "config")  # the config alone is refused too
    with pytest.raises(ValueError, match=r"config.posenc was changed from \{'type': 'alibi'"):
        AutoModelForCausalLM.from_config(model.config)  # and a model built from the edited config


def test_posenc_edited_normalised_spec_still_refused(tmp_path):
    """An edit to another complete (normalised) spec is refused just the same: the model was built with the old one."""
    model = build("llama", "alibi")
    model.config.posenc = hf_posenc.with_posenc(tiny_config("llama"), "nope").posenc
    with pytest.raises(ValueError, match="after the model was built"):
        model.save_pretrained(tmp_path)


def test_posenc_edit_through_new_config_refused(tmp_path):
    """Replacing the whole config of a built model by one of another scheme is refused at save as well."""
    model = build("llama", "alibi")
    model.config = hf_posenc.with_posenc(model.config, "nope")
    with pytest.raises(ValueError, match=r"from \{'type': 'alibi'.*to \{'type': 'nope'\} after the model was built"):
        model.save_pretrained(tmp_path)


@pytest.mark.parametrize("scheme", ["alibi", "nope", "learned", "sinusoidal", "t5_bias"])
def test_rope_parameters_edited_without_rope_refused(scheme, tmp_path):
    """Under a scheme other than RoPE the architecture's rope_parameters only set the identity rotation: a hand edit
    would change nothing, so it is refused at save and at build, naming both values and the way to get RoPE."""
    model = build("llama", scheme)
    model.config.rope_parameters["rope_theta"] = 5.0
    message = r"config.rope_parameters were changed from \{.*10000.0.*\} to \{.*5.0.*\}.*with_posenc"
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_config(model.config)


def test_legitimate_flows_still_work(tmp_path):
    """with_posenc, from_config, save, reload, save again, and a new scheme from a built model's config: no refusal."""
    model = build("llama", {"type": "rope", "rope_type": "yarn", "factor": 4.0})
    model.save_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert again.config.posenc == model.config.posenc
    again.save_pretrained(tmp_path / "b")
    alibi = AutoModelForCausalLM.from_config(hf_posenc.with_posenc(again.config, "alibi"))
    alibi.save_pretrained(tmp_path / "c")
    back = AutoModelForCausalLM.from_config(hf_posenc.with_posenc(alibi.config, "rope"))
    assert back.config.posenc == model.config.posenc  # the yarn settings travel through the alibi config
    back.save_pretrained(tmp_path / "d")
    assert "_posenc_as_built" not in json.loads((tmp_path / "d" / "config.json").read_text())


# --------------------------------------------------------------------------------------------------------------------
# 5. Parameters that disable a scheme or give NaN
# --------------------------------------------------------------------------------------------------------------------

OUT_OF_RANGE = {
    "alibi max_bias 600 (NoPE)": ({"type": "alibi", "max_bias": 600}, r"smallest slope .* must be at least 2\*\*-24"),
    "alibi max_bias 25": (
        {"type": "alibi", "max_bias": 25},
        r"allowed: max_bias <= 24 \+ log2\(slope_multiplier\) = 24",
    ),
    "alibi slope_multiplier 1e-46 (NoPE)": (
        {"type": "alibi", "slope_multiplier": 1e-46},
        r"smallest slope slope_multiplier \* 2\*\*-max_bias = 1e-46 \* 2\*\*-8\.0",
    ),
    "alibi slope_multiplier 1e39 (NaN)": (
        {"type": "alibi", "slope_multiplier": 1e39},
        r"slope_multiplier must be a number > 0 and at most 1e30 / 2\*\*24 = 5\.96e\+22.*got 1e\+39",
    ),
    "linear factor 1e308 (NoPE)": (
        {"type": "rope", "rope_type": "linear", "factor": 1e308},
        r"factor must be a number >= 1 and at most 2\*\*24 = 16777216.*got 1e\+308",
    ),
    "proportional factor 1e30": (
        {"type": "rope", "rope_type": "proportional", "factor": 1e30},
        r"factor must be a number >= 1 and at most 2\*\*24",
    ),
    "longrope zero factors (NaN)": (
        {"type": "rope", "rope_type": "longrope", "short_factor": [0.0] * 8, "long_factor": [1.0] * 8},
        r"short_factor must be a list of numbers in \[2\*\*-24, 2\*\*24\].*got \[0\.0",
    ),
    "longrope negative factor": (
        {"type": "rope", "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [-1.0] + [1.0] * 7},
        r"long_factor must be a list of numbers in \[2\*\*-24, 2\*\*24\].*got \[-1\.0",
    ),
    "longrope nan factor": (
        {"type": "rope", "rope_type": "longrope", "short_factor": [math.nan] * 8, "long_factor": [1.0] * 8},
        r"short_factor must be a list of numbers in \[2\*\*-24, 2\*\*24\].*got \[nan",
    ),
    "rope_theta 1e-40 (NaN)": ({"type": "rope", "rope_theta": 1e-40}, r"rope_theta must be a number >= 1.*got 1e-40"),
    "yarn mscale_all_dim zero attention term": (
        {"type": "rope", "rope_type": "yarn", "factor": math.e, "mscale": 1.0, "mscale_all_dim": -10.0},
        r"attention factor .* needs both terms > 0, got mscale=1\.0, mscale_all_dim=-10\.0",
    ),
    "llama3 high_freq_factor <= low_freq_factor": (
        {"type": "rope", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
        r"high_freq_factor must be greater than low_freq_factor.*high_freq_factor=4\.0, low_freq_factor=4\.0",
    ),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_out_of_range_parameters_refused(case):
    """A value that would make a scheme NoPE or give NaN is refused, naming the value and the bound."""
    spec, pattern = OUT_OF_RANGE[case]
    with pytest.raises(ValueError, match=pattern):
        hf_posenc.with_posenc(wide_config("llama"), spec)


AT_THE_BOUNDS = {
    "alibi max_bias 24": {"type": "alibi", "max_bias": 24.0},
    "alibi max_bias 30 with slope_multiplier 64": {"type": "alibi", "max_bias": 30.0, "slope_multiplier": 64.0},
    "alibi slope_multiplier 2**-16 at max_bias 8": {"type": "alibi", "slope_multiplier": 2.0**-16},
    "alibi largest slope_multiplier": {"type": "alibi", "slope_multiplier": 1e30 / 2**24},
    "linear factor 2**24": {"type": "rope", "rope_type": "linear", "factor": 2**24},
    "ntk factor 2**24": {"type": "rope", "rope_type": "ntk", "factor": 2**24},
    "longrope factors at both bounds": {
        "type": "rope",
        "rope_type": "longrope",
        "short_factor": [2.0**-24] + [1.0] * 7,
        "long_factor": [2.0**24] * 8,
    },
}


@pytest.mark.parametrize("case", list(AT_THE_BOUNDS))
def test_values_at_the_bounds_act_and_stay_finite(case):
    """Values at the bounds are accepted, and the model's logits are finite and differ from NoPE's."""
    spec = AT_THE_BOUNDS[case]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(wide_config("llama"), posenc=spec).eval()
    nope = AutoModelForCausalLM.from_config(wide_config("llama"), posenc="nope").eval()
    nope.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        logits = model(x()).logits
        assert torch.isfinite(logits).all()
        assert not torch.equal(logits, nope(x()).logits)


def test_weakest_alibi_head_acts():
    """At the bound, the weakest slope (2**-24) still changes a unit score at distance 1 in float32."""
    model = build("llama", {"type": "alibi", "max_bias": 24.0}, config_overrides={"hidden_size": 32})
    slopes = model.model.position_bias.slopes(torch.device("cpu"))
    assert slopes.min().item() == 2.0**-24
    assert (torch.ones(4) - slopes != 1).all()


# --------------------------------------------------------------------------------------------------------------------
# 8. A config.json without posenc
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("edit", ["deleted", "null"])
def test_config_json_without_posenc_refused(arch, edit, tmp_path):
    """Deleting posenc from a saved ALiBi folder no longer loads it as the native scheme: refused, naming what is
    missing and what is allowed, by the model and config classes, with and without trust_remote_code."""
    build(arch, "alibi").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    if edit == "deleted":
        del saved["posenc"]
    else:
        saved["posenc"] = None
    (tmp_path / "config.json").write_text(json.dumps(saved))
    schemes = ", ".join(sorted(hf_posenc.SCHEMES))
    message = rf"config.json of model_type 'posenc_{arch}' has no 'posenc' entry.*one of {schemes}"
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


@pytest.mark.parametrize(("arch", "native"), [("gpt2", "learned"), ("llama", "rope")])
def test_config_built_in_code_takes_native_scheme(arch, native):
    """A posenc config built in code without posenc still takes the architecture's native scheme."""
    assert AutoConfig.for_model(f"posenc_{arch}").posenc["type"] == native
    assert hf_posenc.ARCHITECTURES[arch]().posenc["type"] == native
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(f"posenc_{arch}", **ARCH_KWARGS[arch]))
    assert model.config.posenc["type"] == native


# --------------------------------------------------------------------------------------------------------------------
# 10. Obscure errors
# --------------------------------------------------------------------------------------------------------------------

OBSCURE = {
    "type given as a list": (
        {"type": ["alibi"]},
        r"unknown posenc scheme \['alibi'\]; allowed: " + ", ".join(sorted(hf_posenc.SCHEMES)),
    ),
    "ntk factor 1e308": (
        {"type": "rope", "rope_type": "ntk", "factor": 1e308},
        r"factor must be a number >= 1 and at most 2\*\*24 = 16777216.*got 1e\+308",
    ),
    "yarn negative beta_fast": (
        {"type": "rope", "rope_type": "yarn", "factor": 4.0, "beta_fast": -5, "beta_slow": 100},
        r"beta_fast must be a number > 0 \(a number of rotations\), got -5",
    ),
    "yarn beta_fast below beta_slow": (
        {"type": "rope", "rope_type": "yarn", "factor": 4.0, "beta_fast": 5, "beta_slow": 100},
        r"beta_fast must be greater than beta_slow .*got beta_fast=5, beta_slow=100",
    ),
    "yarn beta_slow above the default beta_fast": (
        {"type": "rope", "rope_type": "yarn", "factor": 4.0, "beta_slow": 40},
        r"beta_fast must be greater than beta_slow .*got beta_fast=32, beta_slow=40",
    ),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(OBSCURE))
def test_obscure_errors_are_clear(case, arch):
    """Each raised a TypeError, OverflowError or math domain error; now a ValueError naming the value and the rule."""
    spec, pattern = OBSCURE[case]
    with pytest.raises(ValueError, match=pattern):
        hf_posenc.with_posenc(wide_config(arch), spec)


def test_ntk_helper_overflow():
    """The public NTK helper names an overflowing scaled base instead of raising OverflowError."""
    with pytest.raises(ValueError, match=r"scaled base .* overflows"):
        hf_posenc.ntk_scaled_rope_theta(10000.0, 1e308, 16)


def test_unnormalised_posenc_edit_named(tmp_path):
    """config.posenc = {"type": "rope"} on a built ALiBi model gave KeyError 'rope_type' at save: now named."""
    model = build("llama", "alibi")
    model.config.posenc = {"type": "rope"}
    with pytest.raises(ValueError, match=re.escape("to {'type': 'rope'} after the model was built")):
        model.save_pretrained(tmp_path)


def test_with_posenc_after_posenc_edit():
    """with_posenc on a config whose posenc was edited by hand raised KeyError 'rope_type': it reads the settings the
    config was built with, and the new config takes the scheme asked for."""
    config = hf_posenc.with_posenc(wide_config("llama"), {"type": "rope", "rope_type": "yarn", "factor": 4.0})
    config.posenc = {"type": "rope"}
    new = hf_posenc.with_posenc(config, "nope")
    assert new.posenc == {"type": "nope"} and new.rope_parameters["rope_type"] == "yarn"


@pytest.mark.parametrize("head_dim", [9, 3])
def test_odd_head_without_rope_named(head_dim):
    """ALiBi on a Llama with an odd head width spoke of RoPE (9) or failed at the first forward (3): now one message
    names the scheme, the width and what is allowed."""
    shape = dict(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)
    message = rf"posenc 'alibi' on 'llama': the head width {head_dim} is odd.*Allowed: an even head_dim"
    with pytest.raises(ValueError, match=message):
        AutoConfig.for_model("posenc_llama", hidden_size=32, intermediate_size=64, posenc="alibi", **shape)
    if head_dim <= 4:  # transformers' own LlamaConfig takes these
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", hidden_size=32, **shape), posenc="alibi")


# --------------------------------------------------------------------------------------------------------------------
# 11. One request, one model
# --------------------------------------------------------------------------------------------------------------------

YARN_CHECKPOINTS = {
    "max_position_embeddings 2048": dict(
        max_position_embeddings=2048, rope_parameters={"rope_type": "yarn", "factor": 4.0}
    ),
    "own original length 2048, extended to 8192": dict(
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 16},
    ),
}


@pytest.mark.parametrize("checkpoint", list(YARN_CHECKPOINTS))
def test_two_spellings_of_one_yarn_request(checkpoint):
    """On a yarn checkpoint, {"type": "rope", "factor": 8} and the same with rope_type "yarn" named are one request:
    one posenc, one rope_parameters, the checkpoint's pretraining length and its own settings kept."""
    config = wide_config("llama", **YARN_CHECKPOINTS[checkpoint])
    implicit = hf_posenc.with_posenc(config, {"type": "rope", "factor": 8})
    named = hf_posenc.with_posenc(config, {"type": "rope", "rope_type": "yarn", "factor": 8})
    assert named.posenc == implicit.posenc
    assert named.rope_parameters == implicit.rope_parameters
    assert named.posenc["original_max_position_embeddings"] == 2048
    assert named.posenc.get("beta_fast") == config.rope_parameters.get("beta_fast")


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "rope", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        {"type": "rope", "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    ],
)
def test_other_type_keeps_pretraining_length(spec):
    """Switching a checkpoint with its own original_max_position_embeddings to another scaled type keeps that
    pretraining length (its max_position_embeddings is already the extended one)."""
    config = wide_config("llama", **YARN_CHECKPOINTS["own original length 2048, extended to 8192"])
    assert hf_posenc.with_posenc(config, spec).posenc["original_max_position_embeddings"] == 2048


# --------------------------------------------------------------------------------------------------------------------
# 3. a stock class refuses a posenc checkpoint it would compute wrongly
# --------------------------------------------------------------------------------------------------------------------

STOCK_LOADS = [
    ("llama", "alibi", False),
    ("llama", "t5_bias", False),
    ("llama", "learned", False),
    ("llama", "nope", False),
    ("llama", "rope", True),
    ("llama", {"type": "rope", "rope_type": "yarn", "factor": 2.0}, True),
    ("gpt2", "learned", True),
    ("gpt2", "rope", False),
    ("gpt2", "sinusoidal", False),
    ("bert", "rope", False),
    ("bert", "learned", True),
]


@pytest.mark.parametrize(("arch", "scheme", "stock_computes_it"), STOCK_LOADS)
def test_stock_class_refuses_a_checkpoint_it_would_compute_wrongly(arch, scheme, stock_computes_it, tmp_path):
    """`LlamaForCausalLM.from_pretrained(alibi_folder)` fails, naming the scheme and how to load it (it ran with the
    wrong positions before, with only transformers' model-type warning); a folder the stock class computes alike
    (the native scheme, RoPE of transformers' own types) still loads as before, and the plugin reloads either."""
    model = build(arch, scheme)
    model.save_pretrained(tmp_path)
    stock_class = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
    inputs = x(12)
    with torch.no_grad():
        expected = model(inputs).logits
    if stock_computes_it:
        stock = stock_class.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(stock(inputs).logits, expected)
    else:
        name = scheme if isinstance(scheme, str) else scheme["type"]
        with pytest.raises(ValueError, match=rf"hf_posenc guard: .*posenc '{name}'.*trust_remote_code=True"):
            stock_class.from_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        assert "/" not in config["attn_implementation"]  # never read as a Hub kernel
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert not str(reloaded.config._attn_implementation).startswith("hf_posenc guard")
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, expected)
