"""BERT with a choice of positional scheme: the config (`model_type="posenc_bert"`)."""

from typing import ClassVar

from transformers import BertConfig

from .posenc_schemes import PosencConfigMixin


class PosencBertConfig(PosencConfigMixin, BertConfig):
    """A `BertConfig` plus `posenc`: a scheme name or `{"type": name, **params}` (see `hf_posenc.SCHEMES`).

    The stock BERT uses `learned` (`embeddings.position_embeddings`); weight names stay BERT's.
    """

    model_type = "posenc_bert"
    base_model_type: ClassVar[str] = "bert"
    native_posenc: ClassVar[str] = "learned"
    auto_map_entries: ClassVar[dict] = {
        "AutoConfig": "configuration_posenc_bert.PosencBertConfig",
        "AutoModel": "modeling_posenc_bert.PosencBertModel",
        "AutoModelForPreTraining": "modeling_posenc_bert.PosencBertForPreTraining",
        "AutoModelForCausalLM": "modeling_posenc_bert.PosencBertLMHeadModel",
        "AutoModelForMaskedLM": "modeling_posenc_bert.PosencBertForMaskedLM",
        "AutoModelForNextSentencePrediction": "modeling_posenc_bert.PosencBertForNextSentencePrediction",
        "AutoModelForSequenceClassification": "modeling_posenc_bert.PosencBertForSequenceClassification",
        "AutoModelForMultipleChoice": "modeling_posenc_bert.PosencBertForMultipleChoice",
        "AutoModelForTokenClassification": "modeling_posenc_bert.PosencBertForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_posenc_bert.PosencBertForQuestionAnswering",
    }

    posenc: dict | str | None = None


PosencBertConfig.register_for_auto_class("AutoConfig")
