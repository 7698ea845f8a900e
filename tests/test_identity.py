"""A posenc model configured with its architecture's native scheme is the stock model: same weights, same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

NATIVE = {"gpt2": "learned", "llama": "rope", "mistral": "rope", "qwen2": "rope", "gpt_neox": "rope"}
STOCK_ROPE = {
    "default": None,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
        "rope_theta": 500000.0,
    },
}


def stock_model(arch, auto_class=AutoModelForCausalLM, **overrides):
    torch.manual_seed(0)
    return auto_class.from_config(tiny_config(arch, **overrides)).eval()


def x():
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_native_scheme_gives_stock_logits(arch, implementation):
    """from_config(stock config, posenc=native) + the stock weights reproduces the stock logits bit for bit."""
    stock = stock_model(arch, attn_implementation=implementation)
    assert type(stock).__module__.startswith("transformers.models.")
    posenc = AutoModelForCausalLM.from_config(
        tiny_config(arch), posenc=NATIVE[arch], attn_implementation=implementation
    ).eval()
    result = posenc.load_state_dict(stock.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(posenc(x()).logits, stock(x()).logits)


@pytest.mark.parametrize("rope", sorted(STOCK_ROPE))
def test_llama_rope_parameters_are_kept(rope, tmp_path):
    """Converting a stock Llama checkpoint with posenc="rope" keeps its own RoPE scaling and its logits."""
    stock = stock_model("llama", rope_parameters=STOCK_ROPE[rope])
    stock.save_pretrained(tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, posenc="rope").eval()
    assert type(converted).__name__ == "PosencLlamaForCausalLM"
    assert converted.config.posenc["rope_type"] == (STOCK_ROPE[rope] or {"rope_type": "default"})["rope_type"]
    with torch.no_grad():
        assert torch.equal(converted(x()).logits, stock(x()).logits)


def test_gpt2_checkpoint_converts_with_learned_table(tmp_path):
    """A stock GPT-2 checkpoint loaded with posenc="learned" keeps wpe and gives the stock logits."""
    stock = stock_model("gpt2")
    stock.save_pretrained(tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, posenc="learned").eval()
    with torch.no_grad():
        assert torch.equal(converted(x()).logits, stock(x()).logits)


@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_classification_head_is_stock(arch):
    """The sequence-classification head too: native scheme + stock weights = stock logits."""
    stock = stock_model(arch, AutoModelForSequenceClassification, pad_token_id=0, num_labels=3)
    posenc = AutoModelForSequenceClassification.from_config(
        tiny_config(arch, pad_token_id=0, num_labels=3), posenc=NATIVE[arch]
    ).eval()
    posenc.load_state_dict(stock.state_dict())
    with torch.no_grad():
        assert torch.equal(posenc(x()).logits, stock(x()).logits)


@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_conversion_to_another_scheme_keeps_other_weights(arch, tmp_path):
    """from_pretrained(stock, posenc="alibi") keeps every non-positional weight exactly."""
    stock = stock_model(arch)
    stock.save_pretrained(tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, posenc="alibi")
    stock_weights = stock.state_dict()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, stock_weights[name]), name
    assert "transformer.wpe.weight" not in converted.state_dict()


@pytest.mark.parametrize(
    ("arch", "posenc", "new_weight"),
    [
        ("gpt2", "t5_bias", "transformer.position_bias.relative_attention_bias.weight"),
        ("llama", "t5_bias", "model.position_bias.relative_attention_bias.weight"),
        ("llama", "learned", "model.embed_positions.weight"),
    ],
)
def test_new_parameters_are_initialised(arch, posenc, new_weight, tmp_path):
    """Parameters a conversion adds are initialised like transformers' embeddings, not left as meta/empty memory."""
    stock_model(arch).save_pretrained(tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, posenc=posenc)
    weight = dict(converted.named_parameters())[new_weight]
    assert torch.isfinite(weight).all()
    assert abs(weight.std().item() - converted.config.initializer_range) < 0.01


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_gpt_neox_native_partial_rotary(rotary_pct, tmp_path):
    """A stock GPT-NeoX checkpoint (partial rotary, 0.25 by default) converted with posenc="rope" is bit-identical."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt_neox", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB
    )
    config.rope_parameters["partial_rotary_factor"] = rotary_pct
    stock = AutoModelForCausalLM.from_config(config).eval()
    stock.save_pretrained(tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, posenc="rope").eval()
    assert converted.config.posenc["partial_rotary_factor"] == rotary_pct
    with torch.no_grad():
        assert torch.equal(converted(x()).logits, stock(x()).logits)


@pytest.mark.parametrize("encoder", ["bert", "roberta"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_encoder_native_scheme_gives_stock_logits(encoder, implementation, tmp_path):
    """A stock BERT/RoBERTa masked-LM checkpoint converted with posenc="learned" is bit-identical, padding included."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(0)
    stock = AutoModelForMaskedLM.from_config(tiny_config(encoder), attn_implementation=implementation).eval()
    stock.save_pretrained(tmp_path)
    converted = AutoModelForMaskedLM.from_pretrained(
        tmp_path, posenc="learned", attn_implementation=implementation
    ).eval()
    assert converted.posenc_conversion.added == converted.posenc_conversion.dropped == []
    inputs = x()
    inputs[0, -4:] = 1  # pad_token_id of the tiny encoder configs
    mask = (inputs != 1).long()
    with torch.no_grad():
        assert torch.equal(converted(inputs, attention_mask=mask).logits, stock(inputs, attention_mask=mask).logits)
