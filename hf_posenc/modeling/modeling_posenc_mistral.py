"""Mistral with a choice of positional scheme: one class per transformers head, on the shared `RotarySlotAdapter`."""

from transformers.models.mistral.modeling_mistral import (
    MistralForCausalLM,
    MistralForQuestionAnswering,
    MistralForSequenceClassification,
    MistralForTokenClassification,
    MistralModel,
)

from .configuration_posenc_mistral import PosencMistralConfig
from .posenc_layers import PosencPreTrainedMixin, RotarySlotAdapter, register_model_classes


class PosencMistralModel(PosencPreTrainedMixin, RotarySlotAdapter, MistralModel):
    config_class = PosencMistralConfig
    _auto_class = "AutoModel"


class PosencMistralForCausalLM(PosencPreTrainedMixin, MistralForCausalLM):
    config_class = PosencMistralConfig
    _auto_class = "AutoModelForCausalLM"


class PosencMistralForSequenceClassification(PosencPreTrainedMixin, MistralForSequenceClassification):
    config_class = PosencMistralConfig
    _auto_class = "AutoModelForSequenceClassification"


class PosencMistralForTokenClassification(PosencPreTrainedMixin, MistralForTokenClassification):
    config_class = PosencMistralConfig
    _auto_class = "AutoModelForTokenClassification"


class PosencMistralForQuestionAnswering(PosencPreTrainedMixin, MistralForQuestionAnswering):
    config_class = PosencMistralConfig
    _auto_class = "AutoModelForQuestionAnswering"


register_model_classes(PosencMistralConfig, PosencMistralModel, globals())
