"""Llama with a choice of positional scheme: one class per transformers head, on the shared `RotarySlotAdapter`."""

from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)

from .configuration_posenc_llama import PosencLlamaConfig
from .posenc_layers import PosencPreTrainedMixin, RotarySlotAdapter, register_model_classes


class PosencLlamaModel(PosencPreTrainedMixin, RotarySlotAdapter, LlamaModel):
    config_class = PosencLlamaConfig
    _auto_class = "AutoModel"


class PosencLlamaForCausalLM(PosencPreTrainedMixin, LlamaForCausalLM):
    config_class = PosencLlamaConfig
    _auto_class = "AutoModelForCausalLM"


class PosencLlamaForSequenceClassification(PosencPreTrainedMixin, LlamaForSequenceClassification):
    config_class = PosencLlamaConfig
    _auto_class = "AutoModelForSequenceClassification"


class PosencLlamaForTokenClassification(PosencPreTrainedMixin, LlamaForTokenClassification):
    config_class = PosencLlamaConfig
    _auto_class = "AutoModelForTokenClassification"


class PosencLlamaForQuestionAnswering(PosencPreTrainedMixin, LlamaForQuestionAnswering):
    config_class = PosencLlamaConfig
    _auto_class = "AutoModelForQuestionAnswering"


register_model_classes(PosencLlamaConfig, PosencLlamaModel, globals())
