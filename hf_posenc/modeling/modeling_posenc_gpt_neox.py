"""GPT-NeoX with a choice of positional scheme: one class per transformers head, on the shared `RotarySlotAdapter`."""

from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXForCausalLM,
    GPTNeoXForQuestionAnswering,
    GPTNeoXForSequenceClassification,
    GPTNeoXForTokenClassification,
    GPTNeoXModel,
)

from .configuration_posenc_gpt_neox import PosencGPTNeoXConfig
from .posenc_layers import PosencPreTrainedMixin, RotarySlotAdapter, register_model_classes


class PosencGPTNeoXModel(PosencPreTrainedMixin, RotarySlotAdapter, GPTNeoXModel):
    config_class = PosencGPTNeoXConfig
    _auto_class = "AutoModel"
    token_embedding_name = "embed_in"
    attention_name = "attention"
    pad_partial_rotary = False  # GPT-NeoX rotates the first cos.shape[-1] dims natively


class PosencGPTNeoXForCausalLM(PosencPreTrainedMixin, GPTNeoXForCausalLM):
    config_class = PosencGPTNeoXConfig
    _auto_class = "AutoModelForCausalLM"


class PosencGPTNeoXForSequenceClassification(PosencPreTrainedMixin, GPTNeoXForSequenceClassification):
    config_class = PosencGPTNeoXConfig
    _auto_class = "AutoModelForSequenceClassification"


class PosencGPTNeoXForTokenClassification(PosencPreTrainedMixin, GPTNeoXForTokenClassification):
    config_class = PosencGPTNeoXConfig
    _auto_class = "AutoModelForTokenClassification"


class PosencGPTNeoXForQuestionAnswering(PosencPreTrainedMixin, GPTNeoXForQuestionAnswering):
    config_class = PosencGPTNeoXConfig
    _auto_class = "AutoModelForQuestionAnswering"


register_model_classes(PosencGPTNeoXConfig, PosencGPTNeoXModel, globals())
