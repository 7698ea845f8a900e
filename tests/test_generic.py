"""The generic adapter's promises beyond the per-architecture contract (tests/test_archs.py): what the bias kernels
apply or refuse, the per-layer RoPE policy, NoPE layers, refusals with reasons, the check that a forward reached the
scheme's site, the support matrix and README, the workflow on every verified decoder."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import test_archs
import torch
from test_bias_paths import Attention, causal
from transformers import AutoModelForCausalLM

import hf_posenc
from hf_posenc import archs
from hf_posenc.modeling.posenc_attention import (
    BIAS_KERNELS,
    AlibiBias,
    ScoreBiasMask,
    posenc_eager_attention,
    posenc_sdpa_attention,
)

# ----------------------------------------------------------------------------------------------------- bias kernels


def extras_reference(query, key, value, provider, masks: ScoreBiasMask, scaling, softcap=None, sinks=None):
    """Float64 textbook attention with the score extras: soft-capped scaled scores, plus the bias, masked, softmax with
    one sink logit per head in the denominator (GPT-OSS's eager kernel, Gemma 2's soft-capping)."""
    q, k, v = (t.double() for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + provider(masks.q_positions, masks.kv_positions, q.shape[1], masks.causal).double()[None]
    allowed = masks.block(slice(None))
    if allowed is not None:  # the kernels' fill value: a fully masked row (left padding) attends uniformly
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        weights = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        weights = scores.softmax(-1)
    return (weights @ v).transpose(1, 2)


@pytest.mark.parametrize("kernel", [posenc_sdpa_attention, posenc_eager_attention], ids=["sdpa", "eager"])
@pytest.mark.parametrize(
    "extras",
    [{"softcap": 5.0}, {"s_aux": "sinks"}, {"softcap": 5.0, "s_aux": "sinks"}],
    ids=["softcap", "sinks", "both"],
)
@pytest.mark.parametrize("padded", [False, True])
def test_score_extras_are_applied_exactly(kernel, extras, padded):
    """Soft-capping (Gemma 2) and attention sinks (GPT-OSS `s_aux`) are applied as the stock eager kernels apply them,
    with the bias added after the cap, against float64, forward and backward."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 12, 8, generator=generator, requires_grad=True) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
        mask[1, :, :, :3] = False
    masks = causal(12, 12, mask=mask)
    sinks = torch.randn(4, generator=generator)
    options = {name: sinks if value == "sinks" else value for name, value in extras.items()}
    provider = AlibiBias(4)
    out, _ = kernel(Attention(provider), query, key, value, masks, scaling=0.5, **options)
    expected = extras_reference(query, key, value, provider, masks, 0.5, extras.get("softcap"), options.get("s_aux"))
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["auto", "sdpa", "flex", "flash", "eager"])
def test_bias_kernels_refuse_keywords_they_do_not_apply(name):
    """A keyword a posenc kernel does not know raises, naming it, instead of being dropped (transformers passes
    model-specific ones: block indices, indexers...)."""
    query = key = value = torch.zeros(1, 4, 6, 8)
    module = Attention(AlibiBias(4))
    module.config = type("Config", (), {"posenc": {"type": "alibi"}})()
    with pytest.raises(ValueError, match=r"passes \['block_indices'\] to its attention function.*refuses"):
        BIAS_KERNELS[name](module, query, key, value, causal(6, 6), block_indices=torch.zeros(1))


def test_alibi_slopes_follow_the_heads_of_each_call():
    """Layers with different head counts (Laguna) get the paper's slopes for their own count."""
    provider = AlibiBias(8)
    relative = torch.arange(-3, 1)
    assert provider.by_distance(relative).shape == (8, 4)
    torch.testing.assert_close(provider.by_distance(relative, heads=4), AlibiBias(4).by_distance(relative))


# ------------------------------------------------------------------------------------------------ the rotation site


def test_per_layer_rope_types_policy():
    """Per-layer-type rope_parameters (Gemma 3) are kept as they are when posenc is the native scheme (so the model is
    the stock one), and every rotating layer type gets the requested RoPE otherwise."""
    config = archs.small_config("gemma3_text", vocab_size=96)
    native = copy.deepcopy(config.rope_parameters)
    assert (
        set(native) == {"full_attention", "sliding_attention"}
        and native["full_attention"] != native["sliding_attention"]
    )
    kept = hf_posenc.with_posenc(config, "rope")
    assert kept.rope_parameters == native
    assert kept.posenc["rope_theta"] == native["full_attention"]["rope_theta"]  # read against full attention
    yarn = hf_posenc.with_posenc(config, {"type": "rope", "rope_type": "yarn", "factor": 4.0})
    assert {entry["rope_type"] for entry in yarn.rope_parameters.values()} == {"yarn"}
    back = hf_posenc.with_posenc(hf_posenc.with_posenc(yarn, "alibi"), "rope")
    assert back.posenc == yarn.posenc


def test_nope_layer_types_stay_nope():
    """A layer type without RoPE of its own (BEAM's full-attention layers: an empty entry) stays without it under
    any RoPE posenc."""
    config = archs.small_config("beam", vocab_size=96, num_key_value_heads=2)
    assert config.rope_parameters["full_attention"] is None
    yarn = hf_posenc.with_posenc(config, {"type": "rope", "rope_type": "yarn", "factor": 2.0})
    assert yarn.rope_parameters["full_attention"] is None and yarn.rope_parameters["sliding_attention"]["factor"] == 2


def test_models_with_nope_layers_keep_them():
    """SmolLM3 rotates only some layers (`no_rope_layers`): posenc="rope" keeps that; every other scheme makes all
    layers position-free and puts its own signal on every layer."""
    config = archs.small_config("smollm3", vocab_size=96, num_hidden_layers=4)
    model = AutoModelForCausalLM.from_config(config, posenc="rope")
    assert model.config.no_rope_layers == config.no_rope_layers and 0 in config.no_rope_layers


def test_partial_rotation_on_whole_head_architectures():
    """Partial RoPE on an architecture that rotates the whole head (Llama) zero-pads the frequencies of any inner
    rope_type (dynamic updates too), and refuses longrope, whose frequency switch transformers keys by name."""
    config = archs.small_config("llama", vocab_size=96)
    model = AutoModelForCausalLM.from_config(
        config, posenc={"type": "rope", "rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5}
    )
    rotary = model.model.rotary_emb
    assert model.config.rope_parameters["rope_type"] == "posenc_partial_dynamic"
    model(torch.randint(0, 96, (1, 100)))  # past max_position_embeddings: the dynamic update runs
    assert (rotary.inv_freq[2:] == 0).all() and (rotary.inv_freq[:2] > 0).all()
    with pytest.raises(ValueError, match="rotates the whole head.*not 'longrope'"):
        hf_posenc.with_posenc(
            config,
            {
                "type": "rope",
                "rope_type": "longrope",
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.0],
                "long_factor": [2.0, 2.0],
            },
        )


# --------------------------------------------------------------------------------------------- refusals and checks


@pytest.mark.parametrize(
    ("arch", "scheme", "reason"),
    [
        ("doge", "alibi", "reads the mask tensor itself"),
        ("minimax_m3_vl_text", "t5_bias", "block-sparse attention"),
        ("gpt_neox_japanese", "alibi", "does not go through AttentionInterface"),
    ],
)
def test_refused_sites_name_the_reason(arch, scheme, reason):
    config = archs.small_config(arch, vocab_size=96)
    with pytest.raises(
        ValueError, match=f"posenc '{scheme}' acts at the bias site, which '{arch}' cannot take: .*{reason}"
    ):
        hf_posenc.with_posenc(config, scheme)


def test_a_forward_that_misses_the_bias_raises():
    """Were a model's attention to skip the posenc kernels (here: the implementation swapped behind the plugin's back),
    the forward raises instead of running without the bias."""
    model = test_archs.build("llama", "alibi")
    model.config._attn_implementation_internal = "sdpa"
    with pytest.raises(ValueError, match="no attention of PosencLlamaModel called them"):
        model(test_archs.tokens())


def test_a_forward_that_misses_the_rotary_module_raises():
    """Were a model to rotate without its rotary module, removing RoPE would not take effect: the forward raises."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = test_archs.build("llama", "nope")
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)  # a stock module the plugin did not make position-free
    with pytest.raises(ValueError, match="did not call them in this forward"):
        model(test_archs.tokens())


def test_untried_architecture_warns(caplog, monkeypatch):
    """A supported architecture that CI does not verify is registered with a warning saying so."""
    config = archs.small_config("falcon", vocab_size=96)
    monkeypatch.delitem(hf_posenc.ARCHITECTURES, "falcon", raising=False)  # as in a new process
    with caplog.at_level("WARNING", logger="hf_posenc.auto"):
        hf_posenc.with_posenc(config, "nope")
    assert "has not verified architecture 'falcon'" in caplog.text


# ------------------------------------------------------------------------------------------ matrix, README, workflow


def test_matrix_covers_every_model_type_and_the_readme_shows_it():
    """`hf-posenc archs --markdown` classifies every model type transformers registers, and the README's support
    matrix is exactly that output (regenerate it with scripts/support_matrix.py)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    rows = archs.matrix()
    assert [row[0] for row in rows] == sorted(CONFIG_MAPPING_NAMES)
    total = archs.counts(rows)
    assert total["verified"] == len(archs.verified()) >= 60
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"<!-- support matrix: begin -->\n(.*?)\n<!-- support matrix: end -->", readme, re.S)
    assert block is not None and block.group(1) == archs.markdown(rows)


def test_every_verified_decoder_trains_in_the_workflow():
    """`compare` and `train` accept every verified decoder: each one's small config builds and takes a step."""
    from hf_posenc.workflow.compare import CompareConfig, tiny_config

    for arch in archs.decoders():
        schemes = [scheme for scheme in CompareConfig().schemes if archs.takes(arch, scheme)]
        CompareConfig(arch=arch, schemes=schemes).validate()
        model = AutoModelForCausalLM.from_config(
            tiny_config(arch, 2, 32, 4, 64, vocab=64), posenc="alibi" if archs.takes(arch, "alibi") else "nope"
        )
        x = torch.randint(0, 64, (1, 16))
        model(x, labels=x).loss.backward()


@pytest.mark.parametrize("layout", ["cos_sin", "sin_cos", "complex", "per_layer_type"])
def test_identity_rotation_in_any_layout(layout):
    """A non-RoPE scheme turns a rotary module's output into the identity rotation whatever its order or form:
    (cos, sin) as Llama, (sin, cos) as GPT-J, complex freqs_cis, a dict per layer type; with any attention scaling."""
    from torch import nn

    from hf_posenc.modeling.posenc_layers import position_free_class, upgrade

    class Rotary(nn.Module):
        def forward(self, x, position_ids):
            angles = position_ids[..., None].float() * torch.tensor([1.0, 0.1])  # (B, T, 2)
            cos, sin = 1.5 * angles.cos(), 1.5 * angles.sin()  # attention scaling 1.5, as yarn has
            if layout == "sin_cos":
                return sin, cos
            if layout == "complex":
                return torch.polar(torch.full_like(angles, 1.5), angles)
            if layout == "per_layer_type":
                return {"full_attention": (cos, sin), "sliding_attention": (cos, sin)}
            return cos, sin

    rotary = upgrade(Rotary(), position_free_class(Rotary))
    out = rotary(torch.zeros(1), torch.arange(5)[None] + 3)
    pairs = out.values() if isinstance(out, dict) else [out]
    for pair in pairs:
        if layout == "complex":
            assert torch.equal(pair, torch.ones(1, 5, 2, dtype=torch.complex64))
        else:
            first, second = pair
            cos, sin = (second, first) if layout == "sin_cos" else (first, second)
            assert torch.equal(cos, torch.ones(1, 5, 2)) and torch.equal(sin, torch.zeros(1, 5, 2))


def test_rope_settings_need_an_architecture_that_reads_them():
    """Where the rotary tables come from the architecture's own fields (GPT-J's rotary_dim, from transformers 5.24
    where GPT-J has a rotary module), a RoPE spec with settings would not take effect: refused, naming why; the
    native RoPE and every other scheme still apply."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "gptj" not in CONFIG_MAPPING_NAMES or archs.status("gptj")[0] != "untried":
        pytest.skip("GPT-J has no rotary module in this transformers release")
    config = archs.small_config("gptj", vocab_size=96, rotary_dim=4)
    with pytest.raises(ValueError, match="computes its rotary tables from fields of its own.*only its native RoPE"):
        hf_posenc.with_posenc(config, {"type": "rope", "rope_type": "linear", "factor": 2.0})
    assert hf_posenc.with_posenc(config, "nope").posenc == {"type": "nope"}


def test_bias_direction_follows_the_attention_module():
    """T5's buckets take their direction from the attention module (what stock SDPA reads), also where the mask is
    made with an extra mask function: ESM C with sequence ids, Gemma 3 with bidirectional attention (EmbeddingGemma)."""
    from hf_posenc.modeling import posenc_attention

    x = test_archs.tokens()
    model = test_archs.build("esmc", "t5_bias")
    with_ids = test_archs.logits(model, x, sequence_id=torch.zeros_like(x))  # one sequence: the same attention
    torch.testing.assert_close(with_ids, test_archs.logits(model, x), atol=2e-5, rtol=1e-4)

    seen = []
    original = posenc_attention.t5_relative_position_bucket

    def recording(relative, bidirectional, *args):
        seen.append(bidirectional)
        return original(relative, bidirectional, *args)

    posenc_attention.t5_relative_position_bucket = recording
    try:
        config = archs.small_config("gemma3_text", vocab_size=96, use_bidirectional_attention=True)
        bidirectional = AutoModelForCausalLM.from_config(config, posenc="t5_bias").eval()
        with torch.no_grad():
            bidirectional(x)
    finally:
        posenc_attention.t5_relative_position_bucket = original
    assert seen and all(seen)


def test_compare_refuses_a_scheme_the_architecture_refuses_before_training():
    """`compare` on Doge with the default schemes stops before any training, naming the refused site's reason."""
    from hf_posenc.workflow.compare import CompareConfig

    with pytest.raises(ValueError, match="posenc 'alibi' acts at the bias site, which 'doge' cannot take"):
        CompareConfig(arch="doge").validate()


def test_refused_site_fails_however_the_config_is_made(tmp_path):
    """The refusal runs whenever a posenc config is built: directly from its class, or from a config.json edited to
    a scheme the architecture refuses."""
    import json

    config_class = hf_posenc.register_architecture("doge")
    values = archs.small_config("doge", vocab_size=96).to_dict()
    values.pop("model_type")
    with pytest.raises(ValueError, match="'doge' cannot take: its attention reads the mask tensor itself"):
        config_class(**values, posenc="alibi")
    AutoModelForCausalLM.from_config(archs.small_config("doge", vocab_size=96), posenc="nope").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "posenc": {"type": "alibi"}}))
    with pytest.raises(ValueError, match="'doge' cannot take"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
