"""Llama with a choice of positional scheme: the config (`model_type="posenc_llama"`)."""

from typing import ClassVar

from transformers import LlamaConfig

from .posenc_schemes import PosencConfigMixin


class PosencLlamaConfig(PosencConfigMixin, LlamaConfig):
    """A `LlamaConfig` plus `posenc`: a scheme name or `{"type": name, **params}` (see `hf_posenc.SCHEMES`).

    The stock Llama uses `rope` with the config's own `rope_parameters`, which `posenc="rope"` keeps; every RoPE
    field given in `posenc` overrides them, and `rope_parameters` is then derived from `posenc`.
    """

    model_type = "posenc_llama"
    base_model_type: ClassVar[str] = "llama"
    native_posenc: ClassVar[str] = "rope"
    auto_map_entries: ClassVar[dict] = {
        "AutoConfig": "configuration_posenc_llama.PosencLlamaConfig",
        "AutoModel": "modeling_posenc_llama.PosencLlamaModel",
        "AutoModelForCausalLM": "modeling_posenc_llama.PosencLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_posenc_llama.PosencLlamaForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_posenc_llama.PosencLlamaForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_posenc_llama.PosencLlamaForQuestionAnswering",
    }

    posenc: dict | str | None = None


PosencLlamaConfig.register_for_auto_class("AutoConfig")
