"""BERT with a choice of positional scheme: one class per transformers head, on the shared `BertLikeAdapter`."""

from transformers.models.bert.modeling_bert import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    BertSelfAttention,
)

from .configuration_posenc_bert import PosencBertConfig
from .posenc_bert_like import BertLikeAdapter, RotatingSelfAttentionMixin
from .posenc_layers import PosencPreTrainedMixin, register_model_classes


class PosencBertSelfAttention(RotatingSelfAttentionMixin, BertSelfAttention):
    pass


class PosencBertModel(PosencPreTrainedMixin, BertLikeAdapter, BertModel):
    config_class = PosencBertConfig
    _auto_class = "AutoModel"
    posenc_attention_class = PosencBertSelfAttention


class PosencBertForPreTraining(PosencPreTrainedMixin, BertForPreTraining):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForPreTraining"


class PosencBertLMHeadModel(PosencPreTrainedMixin, BertLMHeadModel):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForCausalLM"


class PosencBertForMaskedLM(PosencPreTrainedMixin, BertForMaskedLM):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForMaskedLM"


class PosencBertForNextSentencePrediction(PosencPreTrainedMixin, BertForNextSentencePrediction):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForNextSentencePrediction"


class PosencBertForSequenceClassification(PosencPreTrainedMixin, BertForSequenceClassification):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForSequenceClassification"


class PosencBertForMultipleChoice(PosencPreTrainedMixin, BertForMultipleChoice):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForMultipleChoice"


class PosencBertForTokenClassification(PosencPreTrainedMixin, BertForTokenClassification):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForTokenClassification"


class PosencBertForQuestionAnswering(PosencPreTrainedMixin, BertForQuestionAnswering):
    config_class = PosencBertConfig
    _auto_class = "AutoModelForQuestionAnswering"


register_model_classes(PosencBertConfig, PosencBertModel, globals())
