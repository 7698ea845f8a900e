"""Qwen2 with a choice of positional scheme: one class per transformers head, on the shared `RotarySlotAdapter`."""

from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2ForCausalLM,
    Qwen2ForQuestionAnswering,
    Qwen2ForSequenceClassification,
    Qwen2ForTokenClassification,
    Qwen2Model,
)

from .configuration_posenc_qwen2 import PosencQwen2Config
from .posenc_layers import PosencPreTrainedMixin, RotarySlotAdapter, register_model_classes


class PosencQwen2Model(PosencPreTrainedMixin, RotarySlotAdapter, Qwen2Model):
    config_class = PosencQwen2Config
    _auto_class = "AutoModel"


class PosencQwen2ForCausalLM(PosencPreTrainedMixin, Qwen2ForCausalLM):
    config_class = PosencQwen2Config
    _auto_class = "AutoModelForCausalLM"


class PosencQwen2ForSequenceClassification(PosencPreTrainedMixin, Qwen2ForSequenceClassification):
    config_class = PosencQwen2Config
    _auto_class = "AutoModelForSequenceClassification"


class PosencQwen2ForTokenClassification(PosencPreTrainedMixin, Qwen2ForTokenClassification):
    config_class = PosencQwen2Config
    _auto_class = "AutoModelForTokenClassification"


class PosencQwen2ForQuestionAnswering(PosencPreTrainedMixin, Qwen2ForQuestionAnswering):
    config_class = PosencQwen2Config
    _auto_class = "AutoModelForQuestionAnswering"


register_model_classes(PosencQwen2Config, PosencQwen2Model, globals())
