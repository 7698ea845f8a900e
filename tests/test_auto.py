"""The posenc= keyword on the stock Auto classes behaves like the stock call it extends, and with_posenc composes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_posenc


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_pretrained_config_overrides(arch, tmp_path):
    """Config attributes given to from_pretrained(path, posenc=...) override the saved config, as without posenc."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(arch, pad_token_id=0)).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, posenc="alibi", num_labels=5, use_cache=False, dtype=torch.float64
    )
    assert model.config.num_labels == 5 and model.config.use_cache is False and model.dtype == torch.float64
    assert model.score.out_features == 5 and model.config.posenc["type"] == "alibi"


@pytest.mark.parametrize(("posenc", "expected"), [("alibi", "posenc_eager"), ("rope", "eager")])
def test_attn_implementation_on_the_config_is_kept(posenc, expected):
    """An attention implementation set on the config survives the conversion (mapped for bias schemes)."""
    config = tiny_config("llama")
    config._attn_implementation = "eager"
    assert AutoModelForCausalLM.from_config(config, posenc=posenc).config._attn_implementation == expected


def test_scheme_changes_compose_on_gpt2():
    """rope-yarn -> alibi -> rope on GPT-2 (no native RoPE) ends at plain RoPE; the alibi config carries no RoPE."""
    yarn = hf_posenc.with_posenc(tiny_config("gpt2"), {"type": "rope", "rope_type": "yarn", "factor": 4.0})
    alibi = hf_posenc.with_posenc(yarn, "alibi")
    assert "rope_parameters" not in alibi.to_dict()
    assert hf_posenc.with_posenc(alibi, "rope").posenc["rope_type"] == "default"


def test_scheme_changes_compose_on_llama():
    """On Llama, the config's own RoPE stays the baseline: ntk -> rope hands on the unscaled base, not the NTK one."""
    ntk = hf_posenc.with_posenc(
        tiny_config("llama", rope_parameters={"rope_theta": 500.0}), {"type": "rope", "rope_type": "ntk", "factor": 4.0}
    )
    assert ntk.rope_parameters["rope_theta"] > 500.0
    back = hf_posenc.with_posenc(hf_posenc.with_posenc(ntk, "alibi"), "rope")
    assert back.posenc["rope_type"] == "default" and back.posenc["rope_theta"] == 500.0
