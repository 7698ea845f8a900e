"""The smoke contract on every architecture the support matrix calls verified (hf_posenc.archs.VERIFIED), with tiny
configs and random weights: what `hf-posenc archs` says "verified" means.

- identity: the native scheme with the stock weights gives the stock logits bit for bit, with sdpa and eager (where
  the stock model has them);
- alibi, t5_bias, nope and sinusoidal change the function, relative schemes ignore a shift of every position and
  sinusoidal does not;
- generation with the KV cache equals one full forward (alibi and rope), left padding included;
- save/load through the Auto classes is bit-exact, and a stock checkpoint converts with `from_pretrained(posenc=)`;
- every head transformers registers is built with the scheme in place.
The no-plugin `trust_remote_code` load runs on a rotating subset (tests/test_remote.py).
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

import hf_posenc
from hf_posenc import archs
from hf_posenc.modeling.posenc_schemes import softmax_attention_kind

VOCAB, T = 96, 10
#: the architectures of the smoke subset (`pytest -m smoke`, run on every supported transformers release): the
#: hand-written adapters (GPT-2, BERT), the generic one on a plain decoder and encoder (Llama, ModernBERT), and the
#: cases that need care (soft-capping, sinks, latent attention, per-layer rope types, NoPE layers, linear attention)
SMOKE = (
    "gpt2",
    "bert",
    "llama",
    "modernbert",
    "gemma2",
    "gpt_oss",
    "deepseek_v3",
    "gemma3_text",
    "smollm3",
    "qwen3_next",
)
ARCHS = [pytest.param(arch, marks=pytest.mark.smoke) if arch in SMOKE else arch for arch in archs.verified()]
ENCODERS = [arch for arch in archs.verified() if arch in MODEL_FOR_MASKED_LM_MAPPING_NAMES]  # BERT has a causal head
DECODERS = [arch for arch in ARCHS if (arch.values[0] if hasattr(arch, "values") else arch) not in ENCODERS]


@functools.cache
def tiny(arch: str):
    """The arch's small config: 2 layers, sharp attention (std 0.2) so position effects are far above rounding."""
    return archs.small_config(arch, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **archs.TEST_SIZE)


def auto_class(arch: str):
    return AutoModelForMaskedLM if arch in ENCODERS else AutoModelForCausalLM


#: parameters whose stock initialisation makes every position scheme moot in a tiny random model (Zaya's key
#: temperature starts at zero: every key is zero, attention uniform), set so that the contract means something
TEST_FILL = {"zaya": {"qk_norm.temp": 1.0}}


@functools.cache
def stock_state(arch: str) -> dict:
    torch.manual_seed(0)
    state = auto_class(arch).from_config(copy.deepcopy(tiny(arch))).state_dict()
    for suffix, value in TEST_FILL.get(arch, {}).items():
        for name in [name for name in state if name.endswith(suffix)]:
            state[name] = torch.full_like(state[name], value)
    return state


def build(arch: str, posenc=None, **kwargs):
    """A model of `arch` (stock when posenc is None) carrying the stock weights; positional tensors the stock model
    lacks (a T5 table, a learned table) are drawn at std 1 so that they matter."""
    model = auto_class(arch).from_config(copy.deepcopy(tiny(arch)), posenc=posenc, **kwargs)
    missing = model.load_state_dict(stock_state(arch), strict=False).missing_keys
    generator = torch.Generator().manual_seed(0)  # the same draws whatever ran before
    with torch.no_grad():
        for name in missing:
            param = model.get_parameter(name)
            if param.dim() == 0:  # FIRE's scalars (c, its threshold) keep the paper's start
                continue
            if "position_bias" in name and "relative_attention_bias" not in name:  # KERPLE's, FIRE's: positive
                param.copy_(torch.rand(param.shape, generator=generator) * 1.5 + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def tokens(batch=2, length=T, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def stock_supports(arch: str, implementation: str) -> bool:
    try:
        auto_class(arch).from_config(copy.deepcopy(tiny(arch)), attn_implementation=implementation)
    except ValueError:  # e.g. gemma2 and gpt_oss have no stock SDPA path
        return False
    return True


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_native_scheme_is_the_stock_model(arch, implementation):
    if not stock_supports(arch, implementation):
        pytest.skip(f"stock {arch} has no {implementation} attention")
    stock = build(arch, attn_implementation=implementation)
    native = build(arch, hf_posenc.ARCHITECTURES[arch].native_posenc, attn_implementation=implementation)
    x = tokens()
    assert torch.equal(logits(native, x), logits(stock, x))
    # transformers picks kernels per class (MoE experts); the posenc class picks what the stock class picks
    assert getattr(native.config, "_experts_implementation", None) == getattr(
        stock.config, "_experts_implementation", None
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_scheme_changes_the_function(arch):
    """Each scheme computes another function than NoPE; relative ones (the biases, nope, rope; FIRE below its
    threshold of 512 positions) ignore a shift of every position (unless the architecture has a position signal of
    its own, NATIVE_POSITION_SIGNALS), sinusoidal does not; NoPE ignores the position ids altogether (no RoPE left in
    place), and the biases measure distances with them (shuffled ids change the output: the ids reach every
    attention call)."""
    x = tokens()
    positions = torch.arange(T)[None].expand(2, T)
    results = {}
    for scheme in ("nope", "alibi", "t5_bias", "kerple", "sandwich", "fire", "sinusoidal", "rope"):
        if not archs.takes(arch, scheme):
            continue
        model = build(arch, scheme)
        results[scheme] = base = logits(model, x, position_ids=positions)
        shifted = logits(model, x, position_ids=positions + 5)
        if scheme == "sinusoidal":
            assert (base - shifted).abs().max() > 1e-2, "sinusoidal must see absolute positions"
        elif arch not in archs.NATIVE_POSITION_SIGNALS:
            torch.testing.assert_close(shifted, base, atol=2e-5, rtol=1e-4)
            shuffled = positions[:, torch.randperm(T, generator=torch.Generator().manual_seed(2))]
            # a padding mask: without one, position ids that do not rise by one read as packed documents (decoders
            # without a cache; encoders from transformers 5.25), see test_packed_documents_attend_as_the_stock_model
            unpacked = dict(position_ids=shuffled, attention_mask=torch.ones_like(x))
            if scheme == "nope":  # no rotation left in place: the position ids do not matter at all
                torch.testing.assert_close(logits(model, x, **unpacked), base, atol=2e-5, rtol=1e-4)
            elif hf_posenc.SCHEMES[scheme].site == "bias":
                moved = (logits(model, x, **unpacked) - base).abs().max()
                assert moved > 1e-3, f"{scheme} on {arch} ignores position_ids"
    for scheme, out in results.items():
        if scheme != "nope":
            assert (out - results["nope"]).abs().max() > 1e-3, f"{scheme} acts like nope on {arch}"
    # a RoPE setting reaches the stock rotary module through rope_parameters (or the config refuses it, naming why)
    try:
        scaled = build(arch, {"type": "rope", "rope_type": "linear", "factor": 4.0})
    except ValueError as error:
        assert "refuses" in str(error), error  # Phi-3's config takes longrope only
    else:
        assert (logits(scaled, x, position_ids=positions) - results["rope"]).abs().max() > 1e-3, (
            f"linear RoPE on {arch}"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_documents_attend_as_the_stock_model(arch):
    """Two documents packed in one row, their position ids restarting at 0, no padding mask (and no cache): where the
    stock model reads that as packing (decoders; encoders that hand the mask builder their position ids, from
    transformers 5.25) it keeps the documents apart, and posenc models attend exactly as it does: the native scheme
    gives the stock logits, and NoPE and ALiBi (the posenc kernels) keep the documents apart where the stock model
    does, and only there."""
    first, second = 4, T - 4
    x = tokens(batch=1)
    positions = torch.cat([torch.arange(first), torch.arange(second)])[None]
    kwargs = {} if arch in ENCODERS else {"use_cache": False}

    def packed_and_apart(model) -> tuple[torch.Tensor, float]:
        packed = logits(model, x, position_ids=positions, **kwargs)
        apart = torch.cat(
            [
                logits(model, x[:, part], position_ids=positions[:, part], **kwargs)
                for part in (slice(0, first), slice(first, T))
            ],
            dim=1,
        )
        return packed, (packed - apart).abs().max().item()

    stock = auto_class(arch).from_config(copy.deepcopy(tiny(arch))).eval()
    stock.load_state_dict(stock_state(arch))
    stock_packed, stock_gap = packed_and_apart(stock)
    assert stock_gap < 1e-4 or stock_gap > 1e-3, f"stock {arch}: documents neither apart nor mixed ({stock_gap})"
    torch.testing.assert_close(packed_and_apart(build(arch))[0], stock_packed, atol=2e-5, rtol=1e-4)
    for scheme in ("nope", "alibi"):
        if archs.takes(arch, scheme):
            gap = packed_and_apart(build(arch, scheme))[1]
            assert (gap < 1e-4) == (stock_gap < 1e-4), (
                f"{scheme} on {arch}: packed documents differ from apart by {gap:.2e}, the stock model's by "
                f"{stock_gap:.2e}"
            )


FIRE = {"type": "fire", "hidden": 8, "init_threshold": 6}


def fire_kerple(arch: str) -> dict:
    """FIRE (per layer, a bias of the query's own position) then KERPLE (shared) as a pattern over the attention
    layers; uniform FIRE where the architecture refuses patterns or has one attention layer (a hybrid)."""
    layer_types = getattr(tiny(arch), "layer_types", None) or ()
    single = sum(map(softmax_attention_kind, layer_types)) == 1
    if not archs.takes(arch, "layers") or single:
        return FIRE
    return {"type": "layers", "pattern": [FIRE, {"type": "kerple", "variant": "power"}]}


def arch_pattern(arch: str, bias: str = "kerple") -> dict | None:
    """A per-layer pattern of RoPE and a windowed `bias` (NoPE where the architecture refuses biases), over its
    attention layers (a hybrid's tiny config has one: then RoPE with the window)."""
    if not archs.takes(arch, "rope") or not archs.takes(arch, "layers"):
        return None
    other = {"type": bias, "sliding_window": 4} if archs.takes(arch, bias) else "nope"
    layer_types = getattr(tiny(arch), "layer_types", None) or ()
    if sum(map(softmax_attention_kind, layer_types)) == 1:
        return {"type": "layers", "pattern": [{"type": "rope", "sliding_window": 4}]}
    return {"type": "layers", "pattern": ["rope", other]}


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_pattern(arch):
    """A per-layer pattern computes another function than each of its schemes alone, ignores a shift of every
    position (both are relative), and trains."""
    spec = arch_pattern(arch)
    if spec is None:
        pytest.skip(f"{arch} refuses rope or per-layer patterns")
    model = build(arch, spec)
    x = tokens()
    positions = torch.arange(T)[None].expand(2, T)
    base = logits(model, x, position_ids=positions)
    if arch not in archs.NATIVE_POSITION_SIGNALS:
        torch.testing.assert_close(logits(model, x, position_ids=positions + 5), base, atol=2e-5, rtol=1e-4)
    for entry in spec["pattern"]:  # each entry alone, without its window: the pattern is neither
        alone = build(arch, entry if isinstance(entry, str) else {"type": entry["type"]})
        assert (logits(alone, x, position_ids=positions) - base).abs().max() > 1e-3, f"{entry} alone on {arch}"
    model.train()
    model(x, labels=x).loss.backward()
    # the pattern reaches every attention call: shuffled position ids move a bias entry's layers
    if "kerple" in str(spec) and arch not in archs.NATIVE_POSITION_SIGNALS:
        shuffled = positions[:, torch.randperm(T, generator=torch.Generator().manual_seed(2))]
        assert (logits(model.eval(), x, position_ids=shuffled) - base).abs().max() > 1e-3


#: (scheme, left-padded) pairs. FIRE with a threshold inside the test lengths (a bias of the query's own position,
#: which a decode step must get) then KERPLE, as a pattern (uniform FIRE where patterns are refused), and a pattern of
#: RoPE then windowed Sandwich run left-padded only, the harder case (unpadded in tests/test_contract.py)
GENERATE_CASES = {
    "alibi-unpadded": ("alibi", False),
    "alibi-left_padded": ("alibi", True),
    "rope-unpadded": ("rope", False),
    "rope-left_padded": ("rope", True),
    "fire-kerple-left_padded": ("fire-kerple", True),
    "layers-left_padded": ("layers", True),
}


@pytest.mark.parametrize(("scheme", "padded"), list(GENERATE_CASES.values()), ids=list(GENERATE_CASES))
@pytest.mark.parametrize("arch", DECODERS)
def test_generate_matches_full_forward(arch, scheme, padded):
    name = scheme if isinstance(scheme, str) else scheme["type"]
    if name == "fire-kerple":
        name, scheme = "fire", fire_kerple(arch)
    if name == "layers":
        scheme = arch_pattern(arch, "sandwich")
        if scheme is None:
            pytest.skip(f"{arch} refuses rope")
    elif not archs.takes(arch, name):
        pytest.skip(f"{arch} refuses {name}")
    model = build(arch, scheme)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    x, mask = tokens(), torch.ones(2, T, dtype=torch.long)
    if padded:
        x[1, :3], mask[1, :3] = 0, 0
    out = model.generate(
        x, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    full = logits(model, out.sequences, attention_mask=full_mask, position_ids=positions)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, T - 1 : -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_convert(arch, tmp_path):
    """A posenc model reloads bit-exact through the Auto class; a stock checkpoint converts with posenc=...,
    keeping every stock tensor, into the model built from the same weights."""
    scheme = "alibi" if archs.takes(arch, "alibi") else "nope"
    model = build(arch, scheme)
    model.save_pretrained(tmp_path / "posenc")
    loaded = auto_class(arch).from_pretrained(tmp_path / "posenc").eval()
    x = tokens()
    assert loaded.config.posenc == model.config.posenc
    assert torch.equal(logits(loaded, x), logits(model, x))

    # RoPE settings other than the checkpoint's own survive the reload too (the architecture's own rope settings
    # stay in rope_parameters, not in posenc)
    if archs.takes(arch, "rope") and archs.reads_rope_parameters(arch):
        try:
            scaled = build(arch, {"type": "rope", "rope_type": "linear", "factor": 2.0})
        except ValueError as error:
            assert "refuses" in str(error), error  # Phi-3's config takes longrope only
        else:
            scaled.save_pretrained(tmp_path / "scaled")
            again = auto_class(arch).from_pretrained(tmp_path / "scaled").eval()
            assert again.config.posenc == scaled.config.posenc
            assert torch.equal(logits(again, x), logits(scaled, x))
    # a bias learned per layer (FIRE) and one shared by layers (KERPLE), in a pattern: each saved once and reloaded
    if archs.takes(arch, "fire"):
        fire = build(arch, fire_kerple(arch))
        fire.save_pretrained(tmp_path / "fire")
        assert torch.equal(logits(auto_class(arch).from_pretrained(tmp_path / "fire").eval(), x), logits(fire, x))
    # the model pickles whole (torch.save), its classes made at run time included
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(logits(torch.load(buffer, weights_only=False), x), logits(model, x))

    build(arch).save_pretrained(tmp_path / "stock")
    converted = auto_class(arch).from_pretrained(tmp_path / "stock", posenc=scheme).eval()
    report = converted.posenc_conversion
    assert not report.added and not report.grown
    assert set(report.kept) == set(converted.state_dict())
    assert torch.equal(logits(converted, x), logits(model, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_head(arch):
    """Every head transformers registers for the architecture is a posenc class with the scheme in place."""
    import transformers

    scheme = "alibi" if archs.takes(arch, "alibi") else "nope"
    config = hf_posenc.with_posenc(copy.deepcopy(tiny(arch)), scheme)
    for auto_name in config.auto_map_entries:
        if auto_name == "AutoConfig":
            continue
        model = getattr(transformers, auto_name).from_config(copy.deepcopy(config)).eval()
        assert type(model).__name__.startswith("Posenc"), auto_name
        assert type(model.base_model).__name__.startswith("Posenc"), auto_name
        assert model.config.posenc == config.posenc
        x = tokens()[:, None] if auto_name == "AutoModelForMultipleChoice" else tokens()
        with torch.no_grad():
            model(x, attention_mask=torch.ones_like(x))
