"""Mistral with a choice of positional scheme: the config (`model_type="posenc_mistral"`)."""

from typing import ClassVar

from transformers import MistralConfig

from .posenc_schemes import PosencConfigMixin


class PosencMistralConfig(PosencConfigMixin, MistralConfig):
    """A `MistralConfig` plus `posenc`: a scheme name or `{"type": name, **params}` (see `hf_posenc.SCHEMES`).

    The stock Mistral uses `rope` with the config's own `rope_parameters` and its sliding window;
    `posenc="rope"` keeps it.
    """

    model_type = "posenc_mistral"
    base_model_type: ClassVar[str] = "mistral"
    native_posenc: ClassVar[str] = "rope"
    auto_map_entries: ClassVar[dict] = {
        "AutoConfig": "configuration_posenc_mistral.PosencMistralConfig",
        "AutoModel": "modeling_posenc_mistral.PosencMistralModel",
        "AutoModelForCausalLM": "modeling_posenc_mistral.PosencMistralForCausalLM",
        "AutoModelForSequenceClassification": "modeling_posenc_mistral.PosencMistralForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_posenc_mistral.PosencMistralForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_posenc_mistral.PosencMistralForQuestionAnswering",
    }

    posenc: dict | str | None = None


PosencMistralConfig.register_for_auto_class("AutoConfig")
