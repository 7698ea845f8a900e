"""The contract every (encoder, scheme) pair keeps, run on the whole registry without per-pair code.

Encoders attend both ways: padding invariance replaces the KV-cache checks, and the symmetric schemes (NoPE, ALiBi's
-m|i-j|) make the model equivariant to permutations and reversals respectively.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import ABSOLUTE, SCHEME_CASES, VOCAB, build, tiny_config

import hf_posenc

T = 12
PAD = 1  # pad_token_id of the tiny encoder configs


def tokens(batch=2, length=T, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def test_forward_backward(encoder, case):
    """A masked-LM training step runs, the loss is finite and the scheme's own parameters receive gradient."""
    model = build(encoder, SCHEME_CASES[case]).train()
    x = tokens()
    labels = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3, x, -100)
    loss = model(x, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    positional = [p for n, p in model.named_parameters() if "relative_attention_bias" in n or "position" in n]
    for param in positional:
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("case", [c for c in SCHEME_CASES if c != "nope"])
def test_scheme_takes_effect(encoder, case):
    """With the same weights, every scheme computes a different function from NoPE: none is a silent no-op."""
    sharp = {"initializer_range": 0.2}  # BERT's std 0.02 keeps attention near uniform and position effects near 1e-5
    model = build(encoder, SCHEME_CASES[case], config_overrides=sharp)
    nope = build(encoder, "nope", config_overrides=sharp)
    nope.load_state_dict(model.state_dict(), strict=False)
    assert (logits(model, tokens()) - logits(nope, tokens())).abs().max() > 0.1


def test_position_shift(encoder, case):
    """Absolute schemes react when every position moves by k; relative ones do not."""
    model = build(encoder, SCHEME_CASES[case])
    positions = torch.arange(2, T + 2)[None].expand(2, T)  # RoBERTa's positions start after its padding index
    base, shifted = logits(model, tokens(), position_ids=positions), logits(model, tokens(), position_ids=positions + 7)
    if case in ABSOLUTE:
        assert (base - shifted).abs().max() > 1e-3
    else:
        torch.testing.assert_close(base, shifted, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance(encoder, case, side):
    """Pad tokens masked out by a 2-D attention mask leave the real tokens' outputs unchanged, on either side."""
    model = build(encoder, SCHEME_CASES[case])
    x = tokens(batch=1)
    pads = torch.full((1, 5), PAD)
    padded = torch.cat([x, pads] if side == "right" else [pads, x], dim=1)
    mask = (padded != PAD).long()
    positions = torch.arange(2, T + 2)[None]
    real = slice(0, T) if side == "right" else slice(5, None)
    full_positions = torch.full_like(padded, PAD)
    full_positions[:, real] = positions
    expected = logits(model, x, position_ids=positions)
    got = logits(model, padded, attention_mask=mask, position_ids=full_positions)[:, real]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_nope_is_permutation_equivariant(encoder):
    """Bidirectional attention without positions sees a set: permuting the tokens permutes the outputs."""
    model = build(encoder, "nope")
    x = tokens(batch=1)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(model, x[:, perm]), logits(model, x)[:, perm], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["alibi", "alibi_scaled"])
def test_encoder_alibi_is_symmetric(encoder, case):
    """On an encoder ALiBi is -m|i-j| (not the causal shortcut): reversing the tokens reverses the outputs exactly."""
    model = build(encoder, SCHEME_CASES[case])
    x = tokens(batch=1)
    torch.testing.assert_close(logits(model, x.flip(1)), logits(model, x).flip(1), atol=2e-5, rtol=1e-4)
    assert (
        model.base_model.position_bias(torch.arange(4), torch.arange(4))
        .flip(1, 2)
        .equal(model.base_model.position_bias(torch.arange(4), torch.arange(4)))
    )


def test_encoder_t5_buckets_are_bidirectional(encoder, monkeypatch):
    """On an encoder T5's keys before and after a query fall in different buckets; in decoder mode one way only (the
    provider takes the direction from the mask of each call)."""
    from hf_posenc.modeling import posenc_attention

    seen = []

    def recording(relative, bidirectional, *args):
        seen.append(bidirectional)
        return original(relative, bidirectional, *args)

    original = posenc_attention.t5_relative_position_bucket
    monkeypatch.setattr(posenc_attention, "t5_relative_position_bucket", recording)
    logits(build(encoder, "t5_bias"), tokens(batch=1))
    assert seen and all(seen)
    seen.clear()
    logits(build(encoder, "t5_bias", config_overrides={"is_decoder": True}), tokens(batch=1))
    assert seen and not any(seen)


def test_eager_matches_sdpa(encoder, case):
    """The eager and SDPA attention paths agree, with padding, forward and backward."""
    x = tokens()
    x[0, -3:] = PAD
    mask = (x != PAD).long()
    results = []
    for implementation in ("eager", "sdpa"):
        model = build(encoder, SCHEME_CASES[case], attn_implementation=implementation)
        out = model(x, attention_mask=mask).logits
        out[mask.bool()].square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.detach()[mask.bool()], grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-3)


def test_output_attentions(encoder, case):
    """With eager attention, output_attentions returns one row-stochastic (B, H, T, T) map per layer."""
    model = build(encoder, SCHEME_CASES[case], attn_implementation="eager")
    model.config.output_attentions = True
    with torch.no_grad():
        attentions = model(tokens()).attentions
    assert len(attentions) == model.config.num_hidden_layers
    for weights in attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, model.config.num_attention_heads, T))


def test_save_load_roundtrip(encoder, case, tmp_path):
    """save_pretrained then the stock AutoModelForMaskedLM.from_pretrained gives the same class, scheme and logits."""
    from transformers import AutoModelForMaskedLM

    model = build(encoder, SCHEME_CASES[case])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.posenc == model.config.posenc
    assert torch.equal(logits(loaded, tokens()), logits(model, tokens()))


def test_longer_than_the_stock_table(encoder, case):
    """Every scheme but learned runs past max_position_embeddings (64 here); learned names the limit instead."""
    model = build(encoder, SCHEME_CASES[case])
    x = tokens(batch=1, length=100)
    if case == "learned":
        with pytest.raises(ValueError, match="past the learned position table"):
            logits(model, x)
    else:
        assert logits(model, x).shape == (1, 100, VOCAB)


def test_every_head(encoder):
    """Every Auto head transformers has for the architecture is built as a posenc model with the scheme in place."""
    import transformers

    for auto_name in hf_posenc.ARCHITECTURES[encoder].auto_map_entries:
        if auto_name == "AutoConfig":
            continue
        config = tiny_config(encoder, num_labels=2, is_decoder=auto_name == "AutoModelForCausalLM")
        model = getattr(transformers, auto_name).from_config(config, posenc="alibi").eval()
        assert type(model).__name__.startswith("Posenc") and model.base_model.position_bias is not None
        x = tokens()[:, None].repeat(1, 3, 1) if "MultipleChoice" in auto_name else tokens()
        with torch.no_grad():
            model(x, attention_mask=torch.ones_like(x))


def test_roberta_default_positions_ignore_left_padding(case):
    """RoBERTa counts positions from the first real token: with default position ids, left padding changes nothing
    for any scheme, absolute ones included (as for the stock RoBERTa)."""
    model = build("roberta", SCHEME_CASES[case])
    x = tokens(batch=1)
    padded = torch.cat([torch.full((1, 5), PAD), x], dim=1)
    got = logits(model, padded, attention_mask=(padded != PAD).long())[:, 5:]
    torch.testing.assert_close(got, logits(model, x), atol=2e-5, rtol=1e-4)


def test_no_mask_attends_every_token_as_the_stock_model(encoder, case):
    """Without a padding mask every token attends every token, pad tokens in the input included, as in the stock
    model: the default positions the adapter computes (RoBERTa's keep padding_idx at pad tokens) are not read as
    packed documents, which transformers 5.25's mask builder does with position ids that do not rise by one."""
    model = build(encoder, SCHEME_CASES[case])
    x = tokens()
    x[0, -4:] = PAD
    torch.testing.assert_close(logits(model, x), logits(model, x, attention_mask=torch.ones_like(x)), atol=0, rtol=0)


def test_no_mask_with_pad_tokens_gives_the_stock_logits(encoder):
    """The stock model itself, pad tokens in the input and no padding mask: the posenc model of the native scheme with
    its weights gives its logits (the stock model does attend every token there, on every release)."""
    native = build(encoder, "learned")  # the native scheme of BERT and RoBERTa
    stock = transformers.AutoModelForMaskedLM.from_config(tiny_config(encoder)).eval()
    stock.load_state_dict(native.state_dict())
    x = tokens()
    x[0, -4:] = PAD
    expected = logits(stock, x)
    torch.testing.assert_close(logits(native, x), expected, atol=0, rtol=0)
    torch.testing.assert_close(logits(stock, x, attention_mask=torch.ones_like(x)), expected, atol=0, rtol=0)


@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder-mode"])
def test_packed_mask_keeps_the_direction(encoder, monkeypatch, is_decoder):
    """Packed documents (position ids restarting, no padding mask): the posenc kernels get transformers' mask with the
    model's direction, both ways for an encoder and causal in decoder mode. From transformers 5.25 an encoder's mask
    over packed documents wraps the mask function and allows no skip, which must not read as causal."""
    from hf_posenc.modeling import posenc_attention

    seen = []
    original = posenc_attention._call

    def recording(module, attention_mask, kwargs, count=True):
        seen.append(attention_mask.causal)
        return original(module, attention_mask, kwargs, count)

    monkeypatch.setattr(posenc_attention, "_call", recording)
    model = build(encoder, "alibi", config_overrides={"is_decoder": is_decoder})
    positions = torch.cat([torch.arange(2, 8), torch.arange(2, 8)])[None]
    logits(model, tokens(batch=1), position_ids=positions, use_cache=False)
    assert seen and all(causal == is_decoder for causal in seen), seen
