"""Which transformers architectures hf_posenc supports: the support matrix `hf-posenc archs` prints and the README
shows, generated from this module.

Every model type transformers registers gets one status:
- `verified`: the contract suite runs on it in CI (tests/test_archs.py) with the small config below;
- `untried`: built by the generic adapter (it has a rotary module and runs attention through AttentionInterface),
  but not in CI; it works with a warning;
- `refused`: hf_posenc will not build it, with the reason;
- `not a text model`: a vision, audio or multimodal model type (its text model type may be supported).

Some architectures refuse one site only (e.g. score-bias schemes where attention does not go through
AttentionInterface): `refused_sites`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from collections.abc import Mapping

VERIFIED_STATUS, UNTRIED_STATUS, REFUSED_STATUS, NOT_TEXT_STATUS = "verified", "untried", "refused", "not a text model"

#: model_type -> config overrides a small model of it needs beyond `small_config`'s shape (MoE sizes, latent widths,
#: per-layer lists...). Every key is verified: tests/test_archs.py runs the contract on it.
# the small shapes that several architectures share: multi-head latent attention, DeepSeek-style experts, Qwen's
# linear attention (one linear and one full-attention layer) and experts
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
_MLA |= dict(num_key_value_heads=4, head_dim=8)
_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
_LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8, linear_value_head_dim=8)
_LINEAR |= dict(linear_num_key_heads=2, linear_num_value_heads=4)
_QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)

VERIFIED: dict[str, dict] = {
    "afmoe": {},
    "apertus": {},
    "apertus1p5_text": {},
    "arcee": {},
    "aria_text": {},
    "axk1": {**_MLA, **_MOE, "n_group": 1, "topk_group": 1},
    "bailing_hybrid": {
        "layer_types": ["linear_attention", "full_attention"],
        "first_k_dense_replace": 1,
        "num_local_experts": 4,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_mtp_layers": 0,
        "num_key_value_heads": 4,
        "head_dim": 8,
    },
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 8},
    "beam": {
        "num_key_value_heads": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "moe_intermediate_size": 16,
        "sliding_window": 4,
    },
    "bert": {},
    "bitnet": {},
    "cohere": {},
    "cohere2": {},
    "cohere2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "cohere_compass_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 4,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        },
    },
    "cwm": {},
    "deepseek_v2": {**_MLA, **_MOE, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "deepseek_v3": {**_MLA, **_MOE, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "num_mtp_layers": 0},
    "diffllama": {},
    "doge": {},
    "dots1": {
        **_MOE,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "sliding_window": 4,
        "layer_types": ["full_attention", "sliding_attention"],
    },
    "ergo": {},
    "ernie4_5": {},
    "ernie4_5_moe": {},
    "esmc": {"num_key_value_heads": 4},
    "eurobert": {},
    "exaone4": {},
    "exaone_moe": {},
    "falcon_h1": {},
    "flex_olmo": {},
    "flint": {
        **_QWEN_MOE,
        "layer_types": ["full_attention", "sliding_attention"],
        "sliding_window": 4,
        "mlp_only_layers": [0],
    },
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "gemma3n_text": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "num_kv_shared_layers": 2,
        "sliding_window": 4,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 96,
        "altup_num_inputs": 2,
        "laurel_rank": 4,
    },
    "gemma4_text": {},
    "gemma4_unified_text": {},
    "glm": {},
    "glm4": {},
    "glm4_moe": {},
    "glm4_moe_lite": {**_MLA, **_MOE},
    "gpt2": {"attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0},
    "gpt_neox": {},
    "gpt_oss": {},
    "granite": {},
    "granite_swa": {},
    "granitemoe": {},
    "granitemoe_swa": {},
    "granitemoehybrid": {
        "layer_types": ["linear_attention", "full_attention"],
        "position_embedding_type": "rope",
        "mamba_n_heads": 4,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 32,
    },
    "granitemoeshared": {},
    "gte": {},
    "helium": {},
    "hrm_text": {},
    "hunyuan_v1_dense": {},
    "hunyuan_v1_moe": {},
    "hy_v3": {},
    "hy_v4": {},
    "hyperclovax": {},
    "jais2": {},
    "jetmoe": {},
    "jina_embeddings_v3": {},
    "kolibri1": {},
    "laguna": {},
    "lara_mini": {},
    "lfm2": {},
    "lfm3": {
        "num_hidden_layers": 3,
        "layer_types": ["conv", "sliding_attention", "full_attention"],
        "sliding_window": 4,
    },
    "llama": {},
    "llama4_text": {},
    "longcat_flash": {
        **_MLA,
        "n_routed_experts": 4,
        "moe_topk": 2,
        "zero_expert_num": 2,
        "ffn_hidden_size": 64,
        "expert_ffn_hidden_size": 16,
    },
    "mellum": {},
    "mimo_v2_flash": {**_MOE, "num_key_value_heads": 2, "v_head_dim": 8},
    "minicpm3": {**_MLA, "dim_model_base": 16},
    "minicpm5_moe": {},
    "minimax": {},
    "minimax_m2": {},
    "minimax_m3_vl_text": {},
    "ministral": {},
    "ministral3": {},
    "mistral": {},
    "mixtral": {},
    "modernbert": {},
    "modernbert-decoder": {},
    "nanochat": {},
    "nemotron": {},
    "nomic_bert": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {},
    "olmo_hybrid": {},
    "olmoe": {},
    "persimmon": {},
    "phi": {},
    "phi3": {},
    "phimoe": {},
    "qwen2": {},
    "qwen2_moe": {},
    "qwen3": {},
    "qwen3_5_moe_text": {**_LINEAR, **_QWEN_MOE},
    "qwen3_5_text": {**_LINEAR},
    "qwen3_moe": {},
    "qwen3_next": {**_LINEAR, **_QWEN_MOE},
    "roberta": {},
    "seed_oss": {},
    "smollm3": {},
    "solar_open": {},
    "stablelm": {},
    "starcoder2": {},
    "ultrabert": {},
    "vaultgemma": {},
    "youtu": {**_MLA},
    "zaya": {
        "num_experts": 4,
        "moe_intermediate_size": 16,
        "router_hidden_size": 8,
        "layer_types": ["hybrid", "hybrid_sliding"],
        "sliding_window": 4,
    },
}

#: model_type -> why hf_posenc refuses it (beyond what `status` finds itself: no rotary module, attention outside
#: AttentionInterface, no text head)
REFUSED: dict[str, str] = {
    "inkling2_text": "its base model computes positions without a rotary module: it needs an adapter of its own",
    "recurrent_gemma": "a recurrent model whose local attention rotates inside the layer: it needs its own adapter",
}

_READS_MASK = "its attention reads the mask tensor itself, which a score bias computed per call cannot give"
#: model_type -> {site: why that site's schemes are refused} for architectures verified for the other sites
REFUSED_SITES: dict[str, dict[str, str]] = {
    "doge": {"bias": _READS_MASK + " (dynamic mask)"},
    "hy_v4": {"bias": _READS_MASK},
    "minimax_m3_vl_text": {"bias": "block-sparse attention (block_indices), which the posenc kernels do not compute"},
    **{
        model_type: {"bias": _READS_MASK + " (a sparse-attention indexer selects the keys)"}
        for model_type in ("axk2", "deepseek_v32", "glm_moe_dsa", "dots3_note_text", "qwen4_exp_text")
    },
    "deepseek_v4": {
        "bias": "compressed keys are appended after the mask is made, so a bias per call cannot cover them",
        "embedding": "its hash-routed experts read input_ids, and its compressors use absolute positions",
    },
    # per-layer patterns: a layer must be handed its rotary tables by keyword to take its own, and be one layer
    **{
        model_type: {"layers": "its layers are not handed their rotary tables by keyword, so one cannot take its own"}
        for model_type in ("gemma3n_text", "beam")
    },
    "longcat_flash": {"layers": "each of its layers holds two attentions, so a pattern has no layer to give an entry"},
}

#: model_type -> a position signal of the architecture's own that no posenc scheme removes (stated in the matrix;
#: the contract's shift test does not apply)
NATIVE_POSITION_SIGNALS: dict[str, str] = {
    "beam": "its NoPE layers scale attention by the absolute position",
    "llama4_text": "its NoPE layers (every 4th) scale queries by the absolute position (attn_temperature_tuning)",
}

#: the architectures with a hand-written adapter (no rotary module): see `modeling/posenc_factory.ADAPTERS`
HAND_WRITTEN = ("gpt2", "bert", "roberta")


def verified() -> list[str]:
    """The verified model types the installed transformers has (older releases lack some: flint is new in 5.21)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(model_type for model_type in VERIFIED if model_type in CONFIG_MAPPING_NAMES)


def decoders() -> list[str]:
    """The verified architectures that are causal language models (not encoders with a causal head, like BERT)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return [
        t for t in verified() if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and t not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ]


def _modeling_source(model_type: str) -> str | None:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    try:
        return inspect.getsource(importlib.import_module(f"transformers.models.{module}.modeling_{module}"))
    except (ImportError, OSError, TypeError):
        return None


@functools.cache
def status(model_type: str) -> tuple[str, str]:
    """(status, reason) of one model type; see the module docstring."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model_type not in CONFIG_MAPPING_NAMES:
        return REFUSED_STATUS, f"transformers {transformers.__version__} has no such model type"
    if model_type in VERIFIED:
        return VERIFIED_STATUS, "contract tested in CI"
    if model_type in REFUSED:
        return REFUSED_STATUS, REFUSED[model_type]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if getattr(CONFIG_MAPPING[model_type], "sub_configs", None):
        return NOT_TEXT_STATUS, "a composite (multimodal or encoder-decoder) config"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return NOT_TEXT_STATUS, "no causal or masked language-model head"
    source = _modeling_source(model_type)
    if source is None:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        base = MODEL_MAPPING_NAMES.get(model_type)
        return REFUSED_STATUS, f"no modeling file of its own (its classes are {base}'s): convert it to that model type"
    if "RotaryEmbedding" not in source:
        return REFUSED_STATUS, "no rotary module: it needs a hand-written adapter"
    if "ALL_ATTENTION_FUNCTIONS" not in source:
        return UNTRIED_STATUS, f"generic adapter, not in CI; bias schemes refused: {_OWN_ATTENTION}"
    return UNTRIED_STATUS, "generic adapter, not in CI"


_OWN_ATTENTION = "its attention does not go through AttentionInterface, where the bias is added"


def refused_sites(model_type: str) -> dict[str, str]:
    """site -> why the architecture refuses that site's schemes: `REFUSED_SITES`, and the score-bias site wherever the
    modeling file does not dispatch attention through AttentionInterface."""
    refused = dict(REFUSED_SITES.get(model_type, {}))
    if model_type not in VERIFIED and "bias" not in refused and status(model_type)[0] == UNTRIED_STATUS:
        source = _modeling_source(model_type)
        if source is not None and "ALL_ATTENTION_FUNCTIONS" not in source:
            refused["bias"] = _OWN_ATTENTION
    return refused


def check_site(model_type: str, scheme: str) -> None:
    """Refuse a scheme whose site this architecture cannot take (`refused_sites`), naming the reason. Run by every
    posenc config the plugin builds (`posenc_factory.SCHEME_CHECKS`), hand-edited config.json files included."""
    from .modeling.posenc_schemes import get_scheme

    site = get_scheme(scheme).site
    reason = refused_sites(model_type).get(site)
    if reason:
        raise ValueError(f"posenc {scheme!r} acts at the {site} site, which {model_type!r} cannot take: {reason}")


def check_scheme(model_type: str, posenc) -> None:
    """Refuse a posenc spec the architecture cannot take, naming the reason: a refused site (`check_site`), or RoPE
    settings where the rotary tables do not come from rope_parameters."""
    name = posenc if isinstance(posenc, str) else posenc.get("type") if isinstance(posenc, Mapping) else None
    if not isinstance(name, str):
        return  # normalize_posenc names what is wrong with the spec
    has_settings = isinstance(posenc, Mapping) and bool(set(posenc) - {"type"})
    if name == "rope" and has_settings and not reads_rope_parameters(model_type):
        raise ValueError(
            f"posenc {dict(posenc)} asks for RoPE settings, but {model_type!r} computes its rotary tables from fields "
            "of its own (GPT-J's rotary_dim), not from rope_parameters, so they would not take effect: only its "
            "native RoPE (posenc='rope')"
        )
    from .modeling.posenc_schemes import SCHEMES

    if name == "layers":
        check_site(model_type, "layers")
    if name == "layers" and isinstance(posenc, Mapping) and isinstance(posenc.get("pattern"), (list, tuple)):
        for entry in posenc["pattern"]:  # each entry as a scheme of its own (its layer options aside)
            if isinstance(entry, Mapping):
                entry = {k: v for k, v in entry.items() if k not in ("sliding_window", "attn_temperature_tuning")}
            check_scheme(model_type, entry)
    elif name in SCHEMES:
        check_site(model_type, name)


@functools.cache
def reads_rope_parameters(model_type: str) -> bool:
    """Whether the architecture's rotary step is computed from `rope_parameters` (what posenc derives): the plugin's
    own on the hand-written adapters; the modeling file's otherwise (GPT-J and CodeGen read `rotary_dim`)."""
    if model_type in HAND_WRITTEN:
        return True
    source = _modeling_source(model_type)
    return source is None or "rope_parameters" in source


def takes(model_type: str, scheme) -> bool:
    """Whether the architecture takes the scheme, a name or a spec (it is supported and refuses none of the spec's
    sites, a pattern's entries included: `check_scheme`)."""
    from .modeling.posenc_schemes import get_scheme

    if status(model_type)[0] not in (VERIFIED_STATUS, UNTRIED_STATUS):
        return False
    if isinstance(scheme, str):
        return get_scheme(scheme).site not in refused_sites(model_type)
    try:
        check_scheme(model_type, scheme)
    except ValueError:
        return False
    return True


#: the shape of the contract suite's models (tests/test_archs.py): sharp attention (std 0.2), so that the effect of a
#: scheme is far above rounding
TEST_SIZE = dict(layers=2, hidden=32, heads=4, kv_heads=2, positions=64, initializer_range=0.2)


def small_config(model_type: str, layers=2, hidden=32, heads=4, kv_heads=None, intermediate=None, positions=64, **kw):
    """A small stock config of `model_type`: the shape given (head width hidden / heads), then the architecture's
    own overrides (`VERIFIED[model_type]`), then `kw`. A default padding id past a small vocabulary becomes its
    last id."""
    from transformers import AutoConfig

    shape = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate or 2 * hidden,
        max_position_embeddings=positions,
    )
    if kv_heads is not None:
        shape["num_key_value_heads"] = kv_heads
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(getattr(CONFIG_MAPPING[model_type], "head_dim", None), property):  # derived, not set (Falcon)
        del shape["head_dim"]
    overrides = copy.deepcopy(VERIFIED.get(model_type, {}))  # configs edit lists and dicts they are given in place
    depth = overrides.get("num_hidden_layers", layers)
    for key, value in overrides.items():  # per-layer lists (layer_types, ...) repeated over the depth asked for
        if key.endswith("layer_types") and isinstance(value, list) and value and len(value) != depth:
            overrides[key] = [value[i % len(value)] for i in range(depth)]
    config = AutoConfig.for_model(model_type, **{**shape, **overrides, **kw})
    pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and pad >= vocab:  # a full-size default, past a small vocab
        config.pad_token_id = vocab - 1  # the last id: in byte-level data, 0xFF, which UTF-8 never holds
    return config


def matrix() -> list[tuple[str, str, str]]:
    """(model_type, status, reason) of every model type transformers registers, sorted by model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return [(model_type, *status(model_type)) for model_type in sorted(CONFIG_MAPPING_NAMES)]


def counts(rows) -> dict[str, int]:
    found = {name: 0 for name in (VERIFIED_STATUS, UNTRIED_STATUS, REFUSED_STATUS, NOT_TEXT_STATUS)}
    for _, state, _ in rows:
        found[state] += 1
    return found


def markdown(rows) -> str:
    """The README's support matrix: the counts, every verified architecture with what it refuses or keeps, and every
    refused one with its reason (untried and non-text model types are counted, and listed by `hf-posenc archs`)."""
    import transformers

    total = counts(rows)
    lines = [
        f"transformers {transformers.__version__}: {len(rows)} model types, "
        + ", ".join(f"{number} {state}" for state, number in total.items())
        + ".",
        "",
        "| verified architecture | notes |",
        "|---|---|",
    ]
    for model_type, state, _ in rows:
        if state == VERIFIED_STATUS:
            notes = [f"{site} schemes refused: {why}" for site, why in refused_sites(model_type).items()]
            if model_type in NATIVE_POSITION_SIGNALS:
                notes.append(f"keeps a position signal of its own: {NATIVE_POSITION_SIGNALS[model_type]}")
            lines.append(f"| {model_type} | {'; '.join(notes) or '-'} |")
    refused = [f"| {model_type} | {why} |" for model_type, state, why in rows if state == REFUSED_STATUS]
    lines += ["", f"<details><summary>the {len(refused)} refused model types, with the reason</summary>", ""]
    lines += ["| refused architecture | reason |", "|---|---|", *refused, "", "</details>"]
    return "\n".join(lines)
