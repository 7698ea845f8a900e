"""What a posenc model looks like from outside: the stock forward signature on every class, `inputs_embeds` taken as
the stock model takes it, and a RoPE model cast to bf16 that computes what it computes once saved and reloaded.

- signatures: `inspect.signature(cls.forward)` of every posenc class of every verified architecture (base models,
  every head, the hand-written GPT-2/BERT/RoBERTa adapters) is its stock class's, so what picks inputs by signature
  (the Trainer's column filter, `generate`, transformers' common tests) sees `inputs_embeds`, the cache and the
  encoder arguments; positional calls bind in the stock order;
- `inputs_embeds` instead of `input_ids` gives the stock output with the native scheme and, for the schemes whose
  positions the plugin adds at the input (learned, sinusoidal), still gets them added;
- casts: the frequencies of the plugin's own rotary module (`PairRotaryEmbedding`, GPT-2 and BERT-like models) stay
  fp32 through `.to(bf16)` / `.half()`, as `from_pretrained(dtype=...)` builds them, so a cast model saved and
  reloaded in that dtype gives the same logits bit for bit.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import ENCODERS, SCHEME_CASES, build, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, LlamaForCausalLM

from hf_posenc import archs
from hf_posenc.modeling.posenc_factory import posenc_config_class, posenc_model_classes
from hf_posenc.modeling.posenc_layers import PosencRotaryEmbedding
from hf_posenc.modeling.posenc_schemes import stock_class_of

VOCAB, T = 96, 12


def tokens(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", archs.verified())
def test_forward_signature_is_stock(model_type):
    """Every posenc class has its stock class's forward signature: parameters, kinds, defaults, annotations, order."""
    classes = posenc_model_classes(posenc_config_class(model_type))
    for name, cls in classes.items():
        stock = stock_class_of(cls)
        ours, theirs = inspect.signature(cls.forward), inspect.signature(stock.forward)
        assert ours == theirs, f"{name}.forward{ours} is not {stock.__name__}.forward{theirs}"
        assert list(ours.parameters) == list(theirs.parameters)


def test_signature_wrapper_keeps_no_unwrap_chain():
    """The base model's forward carries the stock signature without a `__wrapped__` link to the stock forward: what
    unwraps along that chain (accelerate's `unwrap_model`) would otherwise land on the stock forward and skip the
    adapter (with `__wrapped__`, a sinusoidal Llama unwrapped by accelerate lost its positions: max diff 3.8)."""
    base = posenc_model_classes(posenc_config_class("llama"))["PosencLlamaModel"]
    assert not hasattr(base.forward, "__wrapped__")
    assert inspect.unwrap(base.forward) is base.forward


def _native_pair(arch: str):
    """A posenc base model with the architecture's own scheme and the stock base model with the same weights."""
    torch.manual_seed(0)
    ours = AutoModel.from_config(tiny_config(arch), posenc=posenc_config_class(arch).native_posenc).eval()
    stock = stock_class_of(type(ours))(tiny_config(arch)).eval()
    assert type(ours) is not type(stock)
    stock.load_state_dict(ours.state_dict())
    return ours, stock


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "roberta"])
def test_positional_call_binds_in_stock_order(arch):
    """Arguments passed positionally reach the parameters the stock signature names, up to `inputs_embeds`."""
    ours, stock = _native_pair(arch)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    given = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(T).expand(2, T) + 1}
    names = list(inspect.signature(type(stock).forward).parameters)[1:]
    last = max(names.index(name) for name in given)
    args = [given.get(name) for name in names[: last + 1]]
    with torch.no_grad():
        expected = stock(*args).last_hidden_state
        assert torch.equal(ours(*args).last_hidden_state, expected)
        assert torch.equal(ours(**given).last_hidden_state, expected)


def test_positional_call_errors_are_the_stock_ones():
    ours, _ = _native_pair("llama")
    ids = tokens()
    with pytest.raises(TypeError, match="multiple values"):
        ours(ids, input_ids=ids)
    with pytest.raises(TypeError, match="too many positional"):
        ours(*[None] * 10)


# --------------------------------------------------------------------------------------------------------------------
# inputs_embeds
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "roberta"])
def test_inputs_embeds_gives_the_stock_output(arch):
    """The native scheme on stock weights: `inputs_embeds` alone (no input_ids) gives the stock model's output."""
    ours, stock = _native_pair(arch)
    embeds = stock.get_input_embeddings()(tokens())
    with torch.no_grad():
        expected = stock(inputs_embeds=embeds).last_hidden_state
        assert torch.equal(ours(inputs_embeds=embeds).last_hidden_state, expected)


@pytest.mark.parametrize("scheme", ["learned", "sinusoidal", "alibi", "rope", "t5_bias", "nope"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_inputs_embeds_gets_the_positions(arch, scheme):
    """`inputs_embeds=embed(ids)` gives what `input_ids=ids` gives, so the positions the plugin adds at the input
    (learned, sinusoidal: on Llama the token embedding adds them for input_ids, the adapter for inputs_embeds) are
    added either way; offset positions change the output for every positional scheme."""
    model = build(arch, scheme, auto_class=AutoModel)
    ids = tokens()
    embeds = torch.nn.functional.embedding(ids, model.get_input_embeddings().weight)  # the token table only
    shifted = torch.arange(T).expand(2, T) + 5
    with torch.no_grad():
        from_ids = model(input_ids=ids).last_hidden_state
        assert torch.equal(model(inputs_embeds=embeds).last_hidden_state, from_ids)
        assert torch.equal(
            model(inputs_embeds=embeds, position_ids=shifted).last_hidden_state,
            model(input_ids=ids, position_ids=shifted).last_hidden_state,
        )
        if scheme in ("learned", "sinusoidal"):  # absolute: the positions are in the output
            assert not torch.equal(model(inputs_embeds=embeds, position_ids=shifted).last_hidden_state, from_ids)


# --------------------------------------------------------------------------------------------------------------------
# bf16 casts of the plugin's rotary module
# --------------------------------------------------------------------------------------------------------------------

CAST_CASES = ["rope", "rope_linear", "rope_yarn"]


def _rotaries(model):
    return [module for module in model.modules() if isinstance(module, PosencRotaryEmbedding)]


@pytest.mark.parametrize("case", CAST_CASES)
@pytest.mark.parametrize("arch", ["gpt2", "bert", "roberta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_rope_model_reloads_bit_exact(arch, case, dtype, tmp_path):
    """`.to(bf16)` / `.half()` keep the frequencies fp32 (a cast rounded them, while a reload in that dtype rebuilds
    them in fp32: GPT-2 rope moved by 2.0e-3, linear by 3.9e-3, BERT by 9.8e-4), so save_pretrained +
    from_pretrained(dtype=...) gives the cast model's logits bit for bit."""
    model = build(arch, SCHEME_CASES[case])
    fp32 = [rotary.inv_freq.clone() for rotary in _rotaries(model)]
    model = model.to(dtype) if dtype == torch.bfloat16 else model.half()
    assert fp32
    for rotary, before in zip(_rotaries(model), fp32):
        assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
        assert torch.equal(rotary.inv_freq, before)
    assert next(model.parameters()).dtype == dtype  # the rest of the model did cast
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    auto_class = AutoModelForMaskedLM if arch in ENCODERS else AutoModelForCausalLM
    reloaded = auto_class.from_pretrained(tmp_path, dtype=dtype).eval()
    assert all(rotary.inv_freq.dtype == torch.float32 for rotary in _rotaries(reloaded))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_rotary_frequencies_follow_device_moves():
    """Only the dtype of a cast is refused: the frequencies still move with the model (here to the meta device, with
    a cast in the same call), and an fp32 cast back is a no-op on them."""
    model = build("gpt2", "rope")
    rotary = _rotaries(model)[0]
    model.to("meta", torch.bfloat16)
    assert (rotary.inv_freq.device.type, rotary.inv_freq.dtype) == ("meta", torch.float32)
    assert rotary.original_inv_freq.device.type == "meta"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_generic_rope_cast_reload_is_the_stock_models(tmp_path):
    """Architectures with a rotary module of their own keep transformers' behaviour, which the plugin does not change:
    the stock rotary module rounds its frequencies in a bf16 cast and a reload rebuilds them in fp32 (measured on
    transformers 5.24: a tiny stock LlamaForCausalLM moves by 2.0e-3 across the round trip, the posenc one alike).
    The posenc model (rope on the stock weights) gives the stock logits bit for bit before and after the reload."""
    logits = {}
    for make, cls in (("stock", LlamaForCausalLM), ("posenc", AutoModelForCausalLM)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config("llama")) if make == "stock" else None
        if model is None:
            model = cls.from_config(tiny_config("llama"), posenc="rope")
        model = model.eval().to(torch.bfloat16)
        model.save_pretrained(tmp_path / make)
        reloaded = cls.from_pretrained(tmp_path / make, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits[make] = model(tokens()).logits, reloaded(tokens()).logits
    assert torch.equal(logits["stock"][0], logits["posenc"][0])
    assert torch.equal(logits["stock"][1], logits["posenc"][1])
