"""The contract every (architecture, scheme) pair keeps, run on the whole registry without per-pair code."""

from __future__ import annotations

import pytest
import torch
from conftest import ABSOLUTE, ARCH_KWARGS, SCHEME_CASES, VOCAB, build, pad_aware_positions, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc

T = 12


def tokens(batch=2, length=T, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def test_forward_backward(arch, case):
    """A training step runs, the loss is finite and the scheme's own parameters receive gradient."""
    model = build(arch, SCHEME_CASES[case]).train()
    x = tokens()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    positional = [p for n, p in model.named_parameters() if "relative_attention_bias" in n or "position" in n]
    positional += [p for n, p in model.named_parameters() if n.endswith("wpe.weight")]
    for param in positional:
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", [c for c in SCHEME_CASES if c != "nope"])
def test_scheme_takes_effect(arch, case):
    """With the same weights, every scheme computes a different function from NoPE: none is a silent no-op."""
    sharp = {"initializer_range": 0.2}  # std 0.02 keeps attention near uniform and position effects near 1e-3
    model = build(arch, SCHEME_CASES[case], config_overrides=sharp)
    x = tokens()
    nope = build(arch, "nope", config_overrides=sharp)
    nope.load_state_dict(model.state_dict(), strict=False)
    assert (logits(model, x) - logits(nope, x)).abs().max() > 0.1


def test_position_shift(arch, case):
    """Absolute schemes react when every position moves by k; relative ones (rope, alibi, t5_bias, nope) do not."""
    model = build(arch, SCHEME_CASES[case])
    x = tokens()
    positions = torch.arange(T)[None].expand(2, T)
    base, shifted = logits(model, x, position_ids=positions), logits(model, x, position_ids=positions + 7)
    if case in ABSOLUTE:
        assert (base - shifted).abs().max() > 1e-3
    else:
        torch.testing.assert_close(base, shifted, atol=2e-5, rtol=1e-4)


def test_left_padding(arch, case):
    """Left padding (with a 2-D mask and pad-aware positions) leaves the logits of the real tokens unchanged.

    For alibi and t5_bias this is the relative test in cache coordinates: every real token moves by the pad width.
    """
    model = build(arch, SCHEME_CASES[case])
    x = tokens(batch=1)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(x)], dim=1)
    expected = logits(model, x)
    got = logits(model, padded, attention_mask=mask, position_ids=pad_aware_positions(mask))[:, pad:]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_nope_is_permutation_equivariant(arch):
    """Without a causal mask, NoPE attention sees a set: permuting the tokens permutes the outputs.

    Sliding windows are switched off: a window is itself a position signal (locality).
    """
    windows = {"sliding_window": None, "use_sliding_window": False} if "sliding_window" in ARCH_KWARGS[arch] else {}
    model = build(arch, "nope", config_overrides=windows)
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    x = tokens(batch=1)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(model, x[:, perm]), logits(model, x)[:, perm], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_generate_matches_full_forward(arch, case, padded):
    """Greedy generation with the KV cache produces the logits of one full forward over the final sequences."""
    model = build(arch, SCHEME_CASES[case])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    x = tokens()
    mask = torch.ones_like(x)
    if padded:
        x[1, :4], mask[1, :4] = 0, 0
    out = model.generate(
        x, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    step_logits = torch.stack(out.logits, dim=1)  # (B, new, V)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], dim=1)
    full = logits(model, out.sequences, attention_mask=full_mask, position_ids=pad_aware_positions(full_mask))
    torch.testing.assert_close(step_logits, full[:, T - 1 : -1], atol=1e-4, rtol=1e-4)


def test_prompt_in_chunks_matches_full_forward(arch, case):
    """A prompt fed in two chunks through the cache (several new queries after cached keys, as in chunked prefill or
    speculative decoding) gives the logits of one full forward."""
    from transformers import DynamicCache

    model = build(arch, SCHEME_CASES[case])
    x = tokens()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(x[:, :7], past_key_values=cache, use_cache=True).logits
        second = model(x[:, 7:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), logits(model, x), atol=1e-4, rtol=1e-4)


def test_eager_matches_sdpa(arch, case):
    """The eager and SDPA attention paths agree, with padding, forward and backward."""
    x = tokens()
    mask = torch.ones_like(x)
    x[0, :3], mask[0, :3] = 0, 0
    results = []
    for implementation in ("eager", "sdpa"):
        model = build(arch, SCHEME_CASES[case], attn_implementation=implementation)
        out = model(x, attention_mask=mask, position_ids=pad_aware_positions(mask)).logits
        out[mask.bool()].square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.detach()[mask.bool()], grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-3)


def test_output_attentions(arch, case):
    """With eager attention, output_attentions returns one row-stochastic (B, H, T, T) map per layer, causal."""
    model = build(arch, SCHEME_CASES[case], attn_implementation="eager")
    model.config.output_attentions = True
    with torch.no_grad():
        attentions = model(tokens()).attentions
    assert len(attentions) == model.config.num_hidden_layers
    for weights in attentions:
        assert weights.shape == (2, model.config.num_attention_heads, T, T)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, model.config.num_attention_heads, T))
        assert weights.triu(1).abs().max() == 0


def test_save_load_roundtrip(arch, case, tmp_path):
    """save_pretrained then the stock AutoModelForCausalLM.from_pretrained gives the same class, scheme and logits."""
    model = build(arch, SCHEME_CASES[case])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.posenc == model.config.posenc
    x = tokens()
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_config_roundtrip_is_idempotent(arch, case):
    """A saved posenc config rebuilds the same scheme and (for RoPE) the same transformers rope_parameters."""
    config = hf_posenc.with_posenc(tiny_config(arch), SCHEME_CASES[case])
    saved = config.to_dict()
    again = AutoConfig.for_model(saved.pop("model_type"), **saved)
    assert again.posenc == config.posenc
    assert getattr(again, "rope_parameters", None) == getattr(config, "rope_parameters", None)
    replaced = hf_posenc.with_posenc(config, config.posenc)
    assert replaced.posenc == config.posenc


def test_every_head(arch):
    """Every Auto head transformers has for the architecture is built as a posenc model with the scheme in place."""
    import transformers

    config_class = hf_posenc.ARCHITECTURES[arch]
    for auto_name in config_class.auto_map_entries:
        if auto_name == "AutoConfig":
            continue
        auto_class = getattr(transformers, auto_name)
        model = auto_class.from_config(tiny_config(arch, pad_token_id=0), posenc="alibi").eval()
        assert type(model).__name__.startswith("Posenc")
        base = model.base_model
        assert type(base).__name__.startswith("Posenc") and base.position_bias is not None
        with torch.no_grad():
            model(tokens(), attention_mask=torch.ones(2, T, dtype=torch.long))


@pytest.mark.parametrize("case", ["learned", "sinusoidal", "rope_yarn", "alibi", "t5_bias"])
def test_gpt2_double_heads(case, tmp_path):
    """GPT-2's multiple-choice head (no Auto class; (B, choices, T) inputs) works and round-trips through save."""
    PosencGPT2DoubleHeadsModel = hf_posenc.model_classes("gpt2")["PosencGPT2DoubleHeadsModel"]

    torch.manual_seed(0)
    model = PosencGPT2DoubleHeadsModel(hf_posenc.with_posenc(tiny_config("gpt2"), SCHEME_CASES[case])).eval()
    x = tokens(batch=6).view(2, 3, T)
    mc_token_ids = torch.full((2, 3), T - 1)
    with torch.no_grad():
        out = model(x, mc_token_ids=mc_token_ids)
    assert out.logits.shape == (2, 3, T, VOCAB) and out.mc_logits.shape == (2, 3)
    # each choice is computed as its own sequence
    with torch.no_grad():
        alone = model(x[:, :1], mc_token_ids=mc_token_ids[:, :1]).logits
    torch.testing.assert_close(out.logits[:, :1], alone, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_posenc_gpt2.py").exists()
    loaded = PosencGPT2DoubleHeadsModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, mc_token_ids=mc_token_ids).mc_logits, out.mc_logits)


@pytest.mark.parametrize("case", ["alibi", "t5_bias", "rope_yarn", "learned"])
def test_generate_with_static_cache(arch, case):
    """generate() with a compileable StaticCache (masks prepared in advance) matches the dynamic-cache generation."""
    model = build(arch, SCHEME_CASES[case])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    x, mask = tokens(), torch.ones(2, T, dtype=torch.long)
    x[1, :4], mask[1, :4] = 0, 0
    kwargs = dict(
        attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    dynamic = model.generate(x, **kwargs)
    static = model.generate(x, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=1e-4)


def test_loaded_weights_are_realigned(tmp_path):
    """safetensors places loaded tensors at arbitrary offsets and CPU kernels sum in an order that depends on the
    alignment; a loaded posenc model has every tensor where a freshly built one has it, and tied weights stay tied."""
    from hf_posenc.modeling.posenc_layers import CPU_ALIGNMENT

    model = build("gpt2", "alibi")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(t.data_ptr() % CPU_ALIGNMENT == 0 for t in [*loaded.parameters(), *loaded.buffers()] if t.numel())
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)  # the tuple form too
    assert all(t.data_ptr() % CPU_ALIGNMENT == 0 for t in loaded.parameters())
