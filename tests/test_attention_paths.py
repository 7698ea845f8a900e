"""The other score-bias paths (flex_attention, flash-attn, the per-call choice of posenc_auto), each against the float64
textbook formula of test_bias_paths, and training through them (retained graphs, checkpointing, compile)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import build, pad_aware_positions
from test_bias_paths import Attention, assert_close, causal, reference
from test_contract import tokens

from hf_posenc.modeling import posenc_attention
from hf_posenc.modeling.posenc_attention import (
    AlibiBias,
    ScoreBiasMask,
    T5RelativeBias,
    choose_path,
    posenc_flash_attention,
    posenc_flex_attention,
)
from hf_posenc.modeling.posenc_flush import DenormalFlush

# ------------------------------------------------------------------------------------------------------------------
# flex_attention (CPU: inference only; uncompiled here except in one test, where the compile takes seconds)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def eager_flex(monkeypatch):
    """Uncompiled flex: the same score_mod and block mask, materialised scores (fine at these sizes)."""
    monkeypatch.setattr(posenc_attention, "FLEX_COMPILE", False)


pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def inputs(batch, heads, kv_heads, q_len, k_len, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, q_len, 16, generator=generator),
        torch.randn(batch, kv_heads, k_len, 16, generator=generator),
        torch.randn(batch, kv_heads, k_len, 16, generator=generator),
    )


def padded_causal(length, pad):
    mask = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
    mask[1, :, :, :pad] = False  # left padding of the second row
    mask[1, :, :pad, :pad] |= torch.eye(pad, dtype=torch.bool)  # padded rows keep one key (the textbook has no NaN)
    return ScoreBiasMask(mask, True, torch.arange(length), torch.arange(length))


FLEX_CASES = {
    "alibi-causal": (AlibiBias(4), causal(130, 130)),
    "alibi-decode-offsets": (AlibiBias(4), causal(3, 150)),
    "alibi-bidirectional": (AlibiBias(4), causal(140, 140, causal=False)),
    "alibi-padded": (AlibiBias(4), padded_causal(130, 7)),
    "t5-causal-offsets": (T5RelativeBias(4, 16, 64), causal(20, 150)),
    "t5-bidirectional-padded": (T5RelativeBias(4, 16, 64, bidirectional=True), padded_causal(130, 9)),
}


@pytest.mark.parametrize("case", FLEX_CASES)
def test_flex_matches_fp64(eager_flex, case):
    """flex_attention with the relative-distance table as score_mod equals the fp64 formula, GQA and offsets too."""
    provider, masks = FLEX_CASES[case]
    if not masks.causal and masks.mask is not None:  # a bidirectional padded mask: padding only, both directions
        masks = ScoreBiasMask(masks.mask | masks.mask.transpose(-1, -2), False, masks.q_positions, masks.kv_positions)
    batch = 2 if masks.mask is not None else 1
    query, key, value = inputs(batch, 4, 2, len(masks.q_positions), len(masks.kv_positions))
    with torch.no_grad():
        out, weights = posenc_flex_attention(Attention(provider), query, key, value, masks, scaling=0.25)
    assert weights is None and out.shape == (batch, len(masks.q_positions), 4, 16)
    assert_close(out, reference(query, key, value, provider, masks, 0.25), 1e-5)


def test_flex_compiled_matches_fp64():
    """The compiled flex kernel (what posenc_flex runs) on the CPU, inference."""
    provider, masks = AlibiBias(4), causal(256, 256)
    query, key, value = inputs(1, 4, 4, 256, 256)
    with torch.no_grad():
        out, _ = posenc_flex_attention(Attention(provider), query, key, value, masks, scaling=0.25)
    assert_close(out, reference(query, key, value, provider, masks, 0.25), 1e-5)


@pytest.mark.parametrize("provider", [AlibiBias(4), T5RelativeBias(4, 16, 64)], ids=["alibi", "t5_bias"])
def test_flex_compiles_a_few_times_across_lengths(provider, monkeypatch):
    """Compiled flex over calls of many lengths and cache offsets (as batches of varying length and a KV cache give
    it): a few compiles of flex and of its block mask while torch finds which sizes vary (the first length; a second
    one, now dynamic; past one 128-block; queries fewer than keys), then none for any new length, not one per length.
    Each call stays right. torch's global recompile limit is 1 here, and reaching it raises: posenc_flex's compiled
    functions keep a limit of their own. Guards torch's internal compile counter: if it moves, this test fails."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(posenc_attention, "_CAUSAL_BLOCK_MASKS", {})  # every block mask built here

    def run(shapes) -> int:
        before = counters["stats"]["unique_graphs"]
        for q_length, k_length in shapes:
            masks = causal(q_length, k_length)
            query, key, value = inputs(1, 4, 4, q_length, k_length)
            with torch.no_grad():
                out, _ = posenc_flex_attention(Attention(provider), query, key, value, masks, scaling=0.25)
            assert_close(out, reference(query, key, value, provider, masks, 0.25), 1e-5)
        return counters["stats"]["unique_graphs"] - before

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        assert 1 <= run([(64, 64), (80, 80), (150, 150), (20, 150)]) <= 8  # flex's and the block mask's, 4 each
        assert run([(300, 300), (7, 300), (129, 129), (200, 260), (33, 33)]) == 0


@pytest.mark.parametrize("own_limit", [True, False], ids=["torch.compile's own limit", "global limit patched"])
def test_flex_keeps_its_recompile_limit(own_limit, monkeypatch):
    """posenc_flex's compiled functions may keep FLEX_RECOMPILE_LIMIT entries whatever torch's global limit (here 1):
    through torch.compile's own limit where it takes one, else by raising the global limit around each call (torch
    releases without it). At a limit of 1 the second variant raises (the check is live). Guards torch's config: if
    it moves, this test fails."""
    if own_limit and not posenc_attention._OWN_RECOMPILE_LIMIT:
        pytest.skip("this torch.compile takes no recompile limit of its own")
    monkeypatch.setattr(posenc_attention, "_OWN_RECOMPILE_LIMIT", own_limit)
    monkeypatch.setattr(posenc_attention, "_CAUSAL_BLOCK_MASKS", {})
    provider = AlibiBias(4)

    def call(length, bidirectional=False):
        masks = causal(length, length, causal=not bidirectional)
        with torch.no_grad():
            posenc_flex_attention(Attention(provider), *inputs(1, 4, 4, length, length), masks, scaling=0.25)

    try:
        for limit, raises in ((posenc_attention.FLEX_RECOMPILE_LIMIT, False), (1, True)):
            monkeypatch.setattr(posenc_attention, "FLEX_RECOMPILE_LIMIT", limit)
            posenc_attention._compiled_flex.cache_clear()
            posenc_attention._compiled_block_mask.cache_clear()
            torch._dynamo.reset()
            with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
                call(40, bidirectional=True)  # a first variant (no block mask)
                if raises:
                    with pytest.raises(Exception, match="recompile_limit"):
                        call(56, bidirectional=True)  # a second: the limit of 1 is reached
                else:
                    call(56, bidirectional=True)
                    call(40)  # a causal one, with its block mask
    finally:
        posenc_attention._compiled_flex.cache_clear()
        posenc_attention._compiled_block_mask.cache_clear()
        torch._dynamo.reset()


def test_flex_compiles_a_padded_call_after_an_unpadded_one():
    """Batches that change size on compiled flex: a padded batch after an unpadded one (the block mask's batch goes
    from 1 to 2), then left-padded batches of 3 and 4 with generate's position ids (captured by ALiBi's score_mod).
    torch 2.13's CPU kernel fails to build if a batch becomes dynamic, so posenc_flex keeps it static there, through
    aliases: the caller's tensors are left unmarked. Every call gives the eager model's logits."""
    model = build("llama", "alibi", attn_implementation="posenc_flex")
    eager = build("llama", "alibi", attn_implementation="posenc_eager")
    x = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, eager(x, use_cache=False).logits)
    for rows, pads in ((2, [0, 5]), (3, [0, 3, 7]), (4, [2, 0, 1, 9])):
        x = torch.randint(3, 90, (rows, 40), generator=torch.Generator().manual_seed(rows))
        padding = torch.ones_like(x)
        for row, pad in enumerate(pads):
            padding[row, :pad] = 0
        kwargs = dict(attention_mask=padding, use_cache=False)
        if rows > 2:
            kwargs["position_ids"] = pad_aware_positions(padding)
        with torch.no_grad():
            got = model(x, **kwargs).logits
            expected = eager(x, **kwargs).logits
        torch.testing.assert_close(got[padding.bool()], expected[padding.bool()], rtol=1e-4, atol=1e-5)
        assert not any(hasattr(t, "_dynamo_static_indices") for t in kwargs.values() if isinstance(t, torch.Tensor))


AVX2_FLEX = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_bias_paths import Attention, causal, reference
from hf_posenc.modeling import posenc_attention
from hf_posenc.modeling.posenc_attention import AlibiBias, posenc_flex_attention
posenc_attention.CPU_FLEX_MIN_HEAD_DIM = int(sys.argv[2])
provider, masks, errors = AlibiBias(4), causal(40, 40), []
for seed in range(16):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(2, heads, 40, 8, generator=generator) for heads in (4, 2, 2))
    with torch.no_grad():
        out, _ = posenc_flex_attention(Attention(provider), query, key, value, masks, scaling=0.3)
    expected = reference(query, key, value, provider, masks, 0.3)
    errors.append(((out.double() - expected).abs().max() / expected.abs().max()).item())
print("ERRORS", " ".join(map(str, errors)))
"""


@pytest.mark.skipif(not posenc_attention.cpu_flex_supported(), reason="torch's compiled CPU flex needs x86 with AVX2")
@pytest.mark.parametrize("min_width", [posenc_attention.CPU_FLEX_MIN_HEAD_DIM, 0], ids=["padded", "as-is"])
def test_flex_on_avx2_code_pads_narrow_heads(min_width, tmp_path):
    """torch 2.13's compiled CPU flex kernel with AVX2 code is wrong for narrow heads; padded, it is exact.

    Made to emit AVX2 code (ATEN_CPU_CAPABILITY=avx2, as on a CPU without AVX-512), the kernel returns wrong values for
    heads 8 wide at 40 tokens (NaN or O(1) off) in most calls, not every one (the same compiled kernel, other inputs:
    it varies from call to call), so 16 calls are checked; posenc_flex pads narrow heads to CPU_FLEX_MIN_HEAD_DIM and
    is exact in every call there. Run in a process of its own with an empty compile cache: the vector code is chosen
    when a kernel compiles. As-is, the error shows on torch 2.13.0, the pinned release (the check is live there; on
    other releases, patches of 2.13 too, the as-is case is not asserted, since they may have fixed or moved the fault).
    """
    if not min_width and torch.__version__.split("+")[0] != "2.13.0":
        pytest.skip(f"the fault was measured on torch 2.13.0; torch {torch.__version__} may have fixed or moved it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", AVX2_FLEX, tests, str(min_width)], capture_output=True, text=True, env=env, timeout=600
    )
    assert "ERRORS" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    errors = [float(e) for e in done.stdout.split("ERRORS")[-1].split()]
    assert len(errors) == 16
    if min_width:
        assert max(errors) < 1e-5, errors
    else:  # wrong in most calls, not all: over 16 calls with other inputs one wrong one is all but certain
        assert not max(errors) < 1e-3, f"torch's AVX2 flex kernel computed heads 8 wide right 16 times: {errors}"


def test_flex_refuses_a_cpu_its_kernel_does_not_build_on(monkeypatch):
    """Where torch's compiled CPU flex kernel does not build (no AVX2, ATEN_CPU_CAPABILITY=default, macOS), posenc_flex
    says so and names posenc_sdpa, before compiling anything. It asks torch's own test, whose place is guarded here."""
    if torch.__version__.startswith("2.13."):  # the release pinned: its test must be where cpu_flex_supported looks
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported

        assert callable(check_cpu_supported)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert not posenc_attention.cpu_flex_supported()
    query, key, value = inputs(1, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="builds only on x86 CPUs with AVX2.*posenc_sdpa"), torch.no_grad():
        posenc_flex_attention(Attention(AlibiBias(4)), query, key, value, causal(8, 8))


def test_flex_refuses_cpu_training():
    """torch has no flex backward on the CPU: training there is refused with what to use instead."""
    query, key, value = (t.requires_grad_() for t in inputs(1, 4, 4, 8, 8))
    with pytest.raises(ValueError, match="cannot train on the CPU.*posenc_sdpa"):
        posenc_flex_attention(Attention(AlibiBias(4)), query, key, value, causal(8, 8))


@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
def test_flex_model_generate_matches_eager(eager_flex, scheme):
    """A whole model on posenc_flex: left-padded cached generation gives the eager model's tokens and logits."""
    results = []
    for implementation in ("eager", "flex_attention"):
        model = build("llama", scheme, attn_implementation=implementation)
        assert model.config._attn_implementation == f"posenc_{implementation.removesuffix('_attention')}"
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
        x, mask = tokens(), torch.ones(2, tokens().shape[1], dtype=torch.long)
        x[1, :4], mask[1, :4] = 0, 0
        with torch.no_grad():
            out = model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=5,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            full = model(x, attention_mask=mask, position_ids=pad_aware_positions(mask)).logits
        results.append((out.sequences, torch.stack(out.logits), full[mask.bool()]))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][2], results[1][2], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# flash-attn: no GPU in CI, so the call is checked against a stand-in with flash_attn_func's documented contract
# ------------------------------------------------------------------------------------------------------------------


def documented_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None):
    """flash_attn_func as documented: (B, S, H, D) inputs, bias -slope * |i + K - Q - j|, causal aligned to the
    bottom-right, fewer key heads than query heads allowed."""
    batch, q_len, heads, _ = q.shape
    k_len, groups = k.shape[1], heads // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)))
    i = torch.arange(q_len)[:, None] + k_len - q_len
    j = torch.arange(k_len)[None, :]
    scores = q @ k.transpose(-1, -2) * softmax_scale - alibi_slopes.double()[:, None, None] * (i - j).abs()
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).float()


@pytest.mark.parametrize(("q_len", "k_len", "is_causal"), [(50, 50, True), (1, 50, True), (40, 40, False)])
def test_flash_call_follows_flash_attn_contract(monkeypatch, q_len, k_len, is_causal):
    """posenc_flash hands flash_attn_func the layout, scale, causality and slopes that reproduce the fp64 formula."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=documented_flash_attn_func))
    monkeypatch.setattr(posenc_attention, "flash_applies", lambda query, provider, masks, extras=None: True)
    provider, masks = AlibiBias(4), causal(q_len, k_len, causal=is_causal)
    query, key, value = inputs(1, 4, 2, q_len, k_len)
    out, _ = posenc_flash_attention(Attention(provider), query, key, value, masks, scaling=0.25)
    assert_close(out, reference(query, key, value, provider, masks, 0.25), 1e-6)


def test_flash_refuses_what_it_cannot_compute():
    """On the CPU, or with padding, or for T5, posenc_flash says what it needs and what to use instead."""
    module = Attention(AlibiBias(4))
    module.config = types.SimpleNamespace(posenc={"type": "alibi"})
    query, key, value = inputs(1, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="ALiBi on CUDA in fp16/bf16.*got posenc 'alibi', cpu torch.float32"):
        posenc_flash_attention(module, query, key, value, causal(8, 8))


# ------------------------------------------------------------------------------------------------------------------
# posenc_auto
# ------------------------------------------------------------------------------------------------------------------


def fake_query(device, dtype=torch.bfloat16, q_len=64):
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 4, q_len, 16))


@pytest.mark.parametrize(
    ("device", "provider", "masks", "dropout", "flash", "q_len", "path"),
    [
        ("cpu", AlibiBias(4), causal(64, 64), 0.0, True, 64, "sdpa"),
        ("cuda", AlibiBias(4), causal(64, 64), 0.0, True, 64, "flash"),
        ("cuda", AlibiBias(4), causal(64, 64), 0.1, True, 64, "flash"),
        ("cuda", AlibiBias(4), causal(64, 64), 0.0, False, 64, "flex"),
        ("cuda", T5RelativeBias(4), causal(64, 64), 0.0, True, 64, "flex"),
        ("cuda", AlibiBias(4), padded_causal(64, 3), 0.0, True, 64, "flex"),
        ("cuda", AlibiBias(4), causal(64, 64), 0.1, False, 64, "sdpa"),
        ("cuda", T5RelativeBias(4), causal(1, 64), 0.0, True, 1, "sdpa"),
        ("cuda", AlibiBias(4), ScoreBiasMask(None, True, torch.arange(64), torch.arange(80)), 0.0, True, 64, "flex"),
    ],
    ids=[
        "cpu",
        "cuda-flash",
        "cuda-flash-dropout",
        "cuda-no-flash-attn",
        "cuda-t5",
        "cuda-padding",
        "cuda-dropout-no-flash",
        "cuda-decode-t5",
        "cuda-static-cache-prefill",
    ],
)
def test_auto_choice(device, provider, masks, dropout, flash, q_len, path):
    """The per-call choice: flash where it computes ALiBi, flex for the rest of CUDA prefill, SDPA otherwise."""
    assert choose_path(fake_query(device, q_len=q_len), provider, masks, dropout, flash) == path


def test_auto_choice_fp32_cuda_skips_flash():
    """flash-attn takes fp16/bf16 only: an fp32 CUDA model runs flex."""
    assert choose_path(fake_query("cuda", torch.float32), AlibiBias(4), causal(64, 64), 0.0, True) == "flex"


# ------------------------------------------------------------------------------------------------------------------
# Training (the flush of denormals and the recomputed blocks: tests/test_flush.py)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
def test_backward_twice_with_retained_graph(scheme):
    """backward(retain_graph=True) then backward again: the same gradients twice (the flush keeps no graph of its own),
    and the flush is off after each."""
    model = build("llama", scheme).train()
    loss = model(tokens(), labels=tokens()).loss
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert not DenormalFlush.flushing()
    model.zero_grad()
    loss.backward()
    second = [p.grad for p in model.parameters() if p.grad is not None]
    assert not DenormalFlush.flushing()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("scheme", ["alibi", "t5_bias"])
def test_gradient_checkpointing_matches(scheme):
    """With gradient checkpointing (transformers' non-reentrant default) a bias model gives the same gradients."""
    results = []
    for checkpointing in (False, True):
        model = build("llama", scheme).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(tokens(), labels=tokens()).loss.backward()
        results.append([p.grad for p in model.parameters() if p.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("arch", "scheme"),
    [("llama", "alibi"), ("llama", "t5_bias"), ("llama", "sinusoidal"), ("gpt2", "rope"), ("bert", "rope")],
)
def test_compiles_in_one_graph(arch, scheme):
    """torch.compile(fullgraph=True) traces a bias model (no data-dependent branches or host syncs on the positions)
    and a model whose rotary step the plugin owns, and gives the eager logits."""
    torch._dynamo.reset()
    model = build(arch, scheme)
    x = tokens()
    with torch.no_grad():
        expected = model(x).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x).logits
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("head_dim", "value_dim", "path"), [(16, 16, "flex"), (8, 8, "sdpa"), (16, 8, "sdpa")])
def test_auto_choice_needs_flex_head_widths(head_dim, value_dim, path):
    """Compiled flex lowers only head widths of 16 or more (found on an H200: 'NYI: embedding dimension ... must be at
    least 16'); narrower heads, or multi-head latent attention's narrower values, go to SDPA."""
    query = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 4, 64, head_dim))
    assert choose_path(query, AlibiBias(4), causal(64, 64), 0.0, False, value_dim=value_dim) == path


def test_auto_choice_sends_sinks_off_flex():
    """flex has no attention sinks: posenc_auto runs them on SDPA (the scores written out) on CUDA too."""
    from hf_posenc.modeling.posenc_attention import ScoreExtras

    extras = ScoreExtras(sinks=torch.zeros(4))
    assert choose_path(fake_query("cuda"), AlibiBias(4), causal(64, 64), 0.0, False, extras) == "sdpa"
