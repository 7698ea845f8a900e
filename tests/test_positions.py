"""Explicit `position_ids`: every scheme measures positions with them (a gap is seen, a shift is not), and packed
(padding-free) batches from transformers' DataCollatorWithFlattening give each document what it gives alone."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, SCHEME_CASES, build
from test_contract import tokens
from transformers import DataCollatorWithFlattening

from hf_posenc.modeling import posenc_attention

BIAS_PATHS = ["posenc_sdpa", "posenc_eager", "posenc_flex"]
SCHEMES = ["learned", "sinusoidal", "rope", "nope", "alibi", "t5_bias"]


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """Uncompiled flex on the CPU (inference): the same score_mod and block mask."""
    monkeypatch.setattr(posenc_attention, "FLEX_COMPILE", False)


pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def gapped(length: int, at: int, gap: int = 96) -> torch.Tensor:
    positions = torch.arange(length)
    return (positions + gap * (positions >= at))[None]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
def test_a_gap_in_position_ids_changes_a_bias(arch, scheme):
    """A gap of 96 between two halves changes ALiBi's and T5's outputs (it changed nothing before), a constant shift
    does not (relative schemes), and every CPU path agrees with the eager reference."""
    x = tokens(2, 24)
    ids = gapped(24, 12).expand(2, -1)
    results = {}
    for path in BIAS_PATHS if arch != "bert" else ["posenc_sdpa", "posenc_eager"]:
        model = build(arch, scheme, attn_implementation=path)
        results[path] = logits(model, x, position_ids=ids)
        plain = logits(model, x)
        assert not torch.allclose(results[path], plain, atol=1e-4), f"{path} ignored the gap"
        shifted = logits(model, x, position_ids=torch.arange(24)[None] + 7)
        torch.testing.assert_close(shifted, plain, atol=2e-5, rtol=1e-5)
    for path, result in results.items():
        torch.testing.assert_close(result, results["posenc_eager"], atol=2e-5, rtol=1e-5, msg=path)


def test_position_ids_of_each_row_of_a_batch():
    """Rows with different position ids get different biases (the batch's own, not its first row's)."""
    x = tokens(1, 20).expand(2, -1)
    ids = torch.cat([torch.arange(20)[None], gapped(20, 10)])
    for path in BIAS_PATHS:
        model = build("llama", "alibi", attn_implementation=path)
        out = logits(model, x, position_ids=ids)
        torch.testing.assert_close(out[0], logits(model, x[:1])[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], logits(model, x[:1], position_ids=ids[1:])[0], atol=2e-5, rtol=1e-5)


def test_position_ids_continue_after_a_cache():
    """With a KV cache, the new tokens' own position ids count and the cached tokens sit at their slots shifted as
    the row's newest tokens are: a left-padded batch with generate's pad-aware ids, prefilled with a gap inside the
    new tokens, then continued, equals the full forward."""
    from conftest import pad_aware_positions

    x = tokens(2, 16)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    ids = pad_aware_positions(mask)
    ids[:, 13:] += 40  # a gap among the tokens of the second call
    model = build("llama", "alibi")
    full = logits(model, x, attention_mask=mask, position_ids=ids)
    with torch.no_grad():
        first = model(x[:, :12], attention_mask=mask[:, :12], position_ids=ids[:, :12], use_cache=True)
        rest = model(
            x[:, 12:], attention_mask=mask, position_ids=ids[:, 12:], past_key_values=first.past_key_values
        ).logits
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first.logits, rest], 1)[real], full[real], atol=2e-5, rtol=1e-5)


def test_position_ids_of_the_wrong_length_are_refused():
    masks = posenc_attention.ScoreBiasMask(None, True, torch.arange(8), torch.arange(8))
    with pytest.raises(ValueError, match=r"position_ids of shape \(1, 9\) do not match the 8 queries"):
        masks.with_position_ids(torch.arange(9)[None])
    assert masks.with_position_ids(torch.arange(8)[None]) is masks  # the coordinates: nothing per row


def documents():
    lengths = (5, 11, 8)
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 90, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_documents_equal_each_alone(arch, scheme):
    """DataCollatorWithFlattening's packed row (position ids restarting per document, no padding) gives every token
    the logits of its document run alone, and the same loss, on every CPU path of the scheme."""
    docs = documents()
    batch = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": d.tolist()} for d in docs])
    paths = BIAS_PATHS if scheme in ("alibi", "t5_bias") else ["sdpa", "eager"]
    for path in paths:
        model = build(arch, scheme, attn_implementation=path)
        # transformers reads packing from the position ids where no cache is made (training, use_cache=False)
        packed = logits(model, batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)[0]
        alone = torch.cat([logits(model, d[None])[0] for d in docs])
        torch.testing.assert_close(packed, alone, atol=3e-5, rtol=1e-5, msg=path)


@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
def test_packed_training_equals_each_alone(scheme):
    """Training on a packed row: the gradients of the summed per-document losses equal those of the documents run
    one by one (the recomputed chunked blocks, with each row's own positions)."""
    docs = documents()
    batch = DataCollatorWithFlattening(return_position_ids=True)([{"input_ids": d.tolist()} for d in docs])
    grads = []
    for packed in (True, False):
        model = build("llama", scheme, attn_implementation="posenc_sdpa").train()
        if packed:
            out = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        else:
            out = torch.cat([model(d[None]).logits[0] for d in docs])
        out.square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kwargs", [{"attention_mask": True}, {"use_cache": True}], ids=["mask", "cache"])
def test_position_ids_that_fall_leave_the_column_trick(kwargs):
    """Restarting or reversed position ids without transformers' packed mask (an attention mask given, or a cache
    made): the ALiBi column trick, exact only for rising positions, is not taken; posenc_sdpa equals the reference."""
    x = tokens(1, 12)
    extra = {"attention_mask": torch.ones_like(x)} if "attention_mask" in kwargs else kwargs
    for ids in (torch.cat([torch.arange(6), torch.arange(6)])[None], torch.arange(12).flip(0)[None]):
        results = [
            logits(build("llama", "alibi", attn_implementation=path), x, position_ids=ids, **extra)
            for path in ("posenc_sdpa", "posenc_eager")
        ]
        torch.testing.assert_close(results[0], results[1], atol=2e-5, rtol=1e-5)


def test_compiled_forwards_read_their_own_position_ids():
    """On an architecture that does not hand its attention the position ids (ModernBERT), a compiled forward reads
    those of its own call, not the last eager call's."""
    import test_archs

    torch._dynamo.reset()
    model = test_archs.build("modernbert", "alibi")
    x = tokens(1, 16)
    gap = gapped(16, 8, 50)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        expected = [model(x, position_ids=gap).logits, model(x).logits]
        got = [compiled(x, position_ids=gap).logits, compiled(x).logits]
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("case", sorted(SCHEME_CASES))
def test_packed_loss_equals_each_alone_for_every_scheme(arch, case):
    """A packed batch (DataCollatorWithFlattening: one row, position_ids restarting per document, no cache) gives
    the loss of the documents run one by one, for every scheme: each document attends only to itself and every
    scheme reads the restarted positions."""
    model = build(arch, SCHEME_CASES[case]).train()
    model.config.use_cache = False  # what `train --packing` sets: transformers reads packed positions without a cache
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 96, (n,), generator=generator) for n in (7, 13, 5, 11)]
    batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    packed = model(**batch).loss
    losses = [model(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    unpacked = sum(losses) / sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)


def test_flex_builds_a_causal_block_mask_once(monkeypatch):
    """posenc_flex builds the block mask of a causal call once per (lengths, offset, window, direction, device): not
    once per layer, not again at the next forward of the same length; a padding mask's once per forward (kept with
    that forward's masks: a block mask kept longer would keep the mask tensor alive); outputs are those of a fresh
    build."""
    built = []
    create = posenc_attention._block_mask

    def counting(*args, **kwargs):
        built.append(args[2:4])
        return create(*args, **kwargs)

    monkeypatch.setattr(posenc_attention, "_block_mask", counting)
    monkeypatch.setattr(posenc_attention, "_CAUSAL_BLOCK_MASKS", {})
    model = build("llama", "alibi", attn_implementation="posenc_flex")  # 2 layers
    x = tokens()
    first = logits(model, x)
    assert built == [(x.shape[1], x.shape[1])]
    torch.testing.assert_close(logits(model, x), first, rtol=0, atol=0)
    assert len(built) == 1  # the next forward of the same length builds nothing
    logits(model, x[:, :-3])
    assert len(built) == 2  # another length: one more
    monkeypatch.setattr(posenc_attention, "_CAUSAL_BLOCK_MASKS", {})
    torch.testing.assert_close(logits(model, x), first, rtol=0, atol=0)  # the same as a fresh build
    built.clear()
    padding = torch.ones_like(x)
    padding[0, :3] = 0
    padded = logits(model, x, attention_mask=padding)
    assert len(built) == 1  # once for both layers
    logits(model, x, attention_mask=padding)
    assert len(built) == 2  # and again at the next forward: nothing kept alive with the mask
    monkeypatch.setattr(posenc_attention, "FLEX_COMPILE", False)
    eager = build("llama", "alibi", attn_implementation="posenc_eager")
    torch.testing.assert_close(padded[padding.bool()], logits(eager, x, attention_mask=padding)[padding.bool()])


def test_a_cached_block_mask_built_in_inference_mode_is_a_normal_tensor(monkeypatch):
    """A block mask first built under inference_mode (a pipeline call) is reused by a later training step, whose
    backward saves it: it is built outside inference mode, and so are ALiBi's cached slopes."""
    monkeypatch.setattr(posenc_attention, "_CAUSAL_BLOCK_MASKS", {})
    model = build("llama", "alibi", attn_implementation="posenc_flex")
    with torch.inference_mode():
        model(tokens())
    (cached,) = posenc_attention._CAUSAL_BLOCK_MASKS.values()
    assert not any(t.is_inference() for t in cached.as_tuple() if isinstance(t, torch.Tensor))
    slopes = model.model.layers[0].self_attn.posenc_bias._slopes  # cached by ALiBi, captured by flex's score_mod
    assert slopes and not any(t.is_inference() for t in slopes.values())
