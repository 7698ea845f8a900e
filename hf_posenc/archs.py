"""Which transformers architectures hf_posenc supports: the support matrix `hf-posenc archs` prints and the README
shows, generated from this module.

Every model type transformers registers gets one status:
- `verified`: the contract suite runs on it in CI (tests/test_archs.py) with the small config below;
- `untried`: built by the generic adapter (it has a rotary module and runs attention through AttentionInterface),
  but not in CI; it works with a warning;
- `refused`: hf_posenc will not build it, with the reason;
- `not a text model`: a vision, audio or multimodal model type (its text model type may be supported).

Some verified architectures refuse one site only (e.g. score-bias schemes where attention does not go through
AttentionInterface): `REFUSED_SITES`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping

VERIFIED_STATUS, UNTRIED_STATUS, REFUSED_STATUS, NOT_TEXT_STATUS = "verified", "untried", "refused", "not a text model"

#: model_type -> config overrides a small model of it needs beyond `small_config`'s shape (MoE sizes, latent widths,
#: per-layer lists...). Every key is verified: tests/test_archs.py runs the contract on it.
VERIFIED: dict[str, dict] = {
    "gpt2": {},
    "bert": {},
    "roberta": {},
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "gpt_neox": {},
}

#: model_type -> why hf_posenc refuses it
REFUSED: dict[str, str] = {}

#: model_type -> {site: why that site's schemes are refused} for architectures verified for the other sites
REFUSED_SITES: dict[str, dict[str, str]] = {}

#: the architectures with a hand-written adapter (no rotary module): see `modeling/posenc_factory.ADAPTERS`
HAND_WRITTEN = ("gpt2", "bert", "roberta")


def verified() -> list[str]:
    return sorted(VERIFIED)


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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model_type in VERIFIED:
        return VERIFIED_STATUS, "contract tested in CI"
    if model_type in REFUSED:
        return REFUSED_STATUS, REFUSED[model_type]
    if model_type not in CONFIG_MAPPING_NAMES:
        return REFUSED_STATUS, "transformers has no such model type"
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if getattr(CONFIG_MAPPING[model_type], "sub_configs", None):
        return NOT_TEXT_STATUS, "a composite (multimodal or encoder-decoder) config"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return NOT_TEXT_STATUS, "no causal or masked language-model head"
    source = _modeling_source(model_type)
    if source is None:
        return REFUSED_STATUS, "its modeling file does not import here"
    if "RotaryEmbedding" not in source:
        return REFUSED_STATUS, "no rotary module: it needs a hand-written adapter"
    if "ALL_ATTENTION_FUNCTIONS" not in source:
        return REFUSED_STATUS, "attention is not dispatched through AttentionInterface"
    return UNTRIED_STATUS, "generic adapter, not in CI"


def check_scheme(model_type: str, posenc) -> None:
    """Refuse a scheme whose site this architecture cannot take (`REFUSED_SITES`), naming the reason."""
    from .modeling.posenc_schemes import get_scheme

    name = posenc if isinstance(posenc, str) else posenc.get("type") if isinstance(posenc, Mapping) else None
    if not isinstance(name, str):
        return  # normalize_posenc names what is wrong with the spec
    site = get_scheme(name).site
    reason = REFUSED_SITES.get(model_type, {}).get(site)
    if reason:
        raise ValueError(f"posenc {name!r} acts at the {site} site, which {model_type!r} cannot take: {reason}")


def takes(model_type: str, scheme: str) -> bool:
    """Whether the architecture takes the scheme (it is supported and does not refuse the scheme's site)."""
    from .modeling.posenc_schemes import get_scheme

    return status(model_type)[0] in (VERIFIED_STATUS, UNTRIED_STATUS) and get_scheme(scheme).site not in (
        REFUSED_SITES.get(model_type, {})
    )


#: the shape of the contract suite's models (tests/test_archs.py): sharp attention (std 0.2), so that the effect of a
#: scheme is far above rounding
TEST_SIZE = dict(layers=2, hidden=32, heads=4, kv_heads=2, positions=64, initializer_range=0.2)


def small_config(model_type: str, layers=2, hidden=32, heads=4, kv_heads=None, intermediate=None, positions=64, **kw):
    """A small stock config of `model_type` (the shape plus `VERIFIED[model_type]` overrides, then `kw`)."""
    from transformers import AutoConfig

    shape = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=intermediate or 2 * hidden,
        max_position_embeddings=positions,
    )
    if kv_heads is not None:
        shape["num_key_value_heads"] = kv_heads
    return AutoConfig.for_model(model_type, **{**shape, **VERIFIED.get(model_type, {}), **kw})


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
    """The README's support matrix: the counts, every verified architecture with the sites it refuses, and every
    refused one with its reason (untried and non-text model types are counted, and listed by `hf-posenc archs`)."""
    import transformers

    total = counts(rows)
    lines = [
        f"transformers {transformers.__version__}: {len(rows)} model types, "
        + ", ".join(f"{number} {state}" for state, number in total.items())
        + ".",
        "",
        "| verified architecture | site refused |",
        "|---|---|",
    ]
    for model_type, state, _ in rows:
        if state == VERIFIED_STATUS:
            refused = "; ".join(f"{site}: {why}" for site, why in REFUSED_SITES.get(model_type, {}).items())
            lines.append(f"| {model_type} | {refused or '-'} |")
    lines += ["", "| refused architecture | reason |", "|---|---|"]
    lines += [f"| {model_type} | {why} |" for model_type, state, why in rows if state == REFUSED_STATUS]
    return "\n".join(lines)
