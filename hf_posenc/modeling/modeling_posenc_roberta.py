"""RoBERTa with a choice of positional scheme: one class per transformers head, on the shared `BertLikeAdapter`."""

from transformers.models.roberta.modeling_roberta import (
    RobertaForCausalLM,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    RobertaSelfAttention,
)

from .configuration_posenc_roberta import PosencRobertaConfig
from .posenc_bert_like import BertLikeAdapter, RotatingSelfAttentionMixin
from .posenc_layers import PosencPreTrainedMixin, register_model_classes


class PosencRobertaSelfAttention(RotatingSelfAttentionMixin, RobertaSelfAttention):
    pass


class PosencRobertaModel(PosencPreTrainedMixin, BertLikeAdapter, RobertaModel):
    config_class = PosencRobertaConfig
    _auto_class = "AutoModel"
    posenc_attention_class = PosencRobertaSelfAttention

    def default_position_ids(self, input_ids, inputs_embeds, past_key_values):
        """RoBERTa's own rule: count real tokens from padding_idx + 1, padding keeps padding_idx."""
        padding_idx = self.embeddings.padding_idx
        if input_ids is None:
            return self.embeddings.create_position_ids_from_inputs_embeds(inputs_embeds, padding_idx)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        return self.embeddings.create_position_ids_from_input_ids(input_ids, padding_idx, past)


class PosencRobertaForCausalLM(PosencPreTrainedMixin, RobertaForCausalLM):
    config_class = PosencRobertaConfig
    _auto_class = "AutoModelForCausalLM"


class PosencRobertaForMaskedLM(PosencPreTrainedMixin, RobertaForMaskedLM):
    config_class = PosencRobertaConfig
    _auto_class = "AutoModelForMaskedLM"


class PosencRobertaForSequenceClassification(PosencPreTrainedMixin, RobertaForSequenceClassification):
    config_class = PosencRobertaConfig
    _auto_class = "AutoModelForSequenceClassification"


class PosencRobertaForMultipleChoice(PosencPreTrainedMixin, RobertaForMultipleChoice):
    config_class = PosencRobertaConfig
    _auto_class = "AutoModelForMultipleChoice"


class PosencRobertaForTokenClassification(PosencPreTrainedMixin, RobertaForTokenClassification):
    config_class = PosencRobertaConfig
    _auto_class = "AutoModelForTokenClassification"


class PosencRobertaForQuestionAnswering(PosencPreTrainedMixin, RobertaForQuestionAnswering):
    config_class = PosencRobertaConfig
    _auto_class = "AutoModelForQuestionAnswering"


register_model_classes(PosencRobertaConfig, PosencRobertaModel, globals())
