"""RoBERTa with a choice of positional scheme: the config (`model_type="posenc_roberta"`)."""

from typing import ClassVar

from transformers import RobertaConfig

from .posenc_schemes import PosencConfigMixin


class PosencRobertaConfig(PosencConfigMixin, RobertaConfig):
    """A `RobertaConfig` plus `posenc`: a scheme name or `{"type": name, **params}` (see `hf_posenc.SCHEMES`).

    The stock RoBERTa uses `learned` (`embeddings.position_embeddings`); weight names stay RoBERTa's.
    """

    model_type = "posenc_roberta"
    base_model_type: ClassVar[str] = "roberta"
    native_posenc: ClassVar[str] = "learned"
    auto_map_entries: ClassVar[dict] = {
        "AutoConfig": "configuration_posenc_roberta.PosencRobertaConfig",
        "AutoModel": "modeling_posenc_roberta.PosencRobertaModel",
        "AutoModelForCausalLM": "modeling_posenc_roberta.PosencRobertaForCausalLM",
        "AutoModelForMaskedLM": "modeling_posenc_roberta.PosencRobertaForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_posenc_roberta.PosencRobertaForSequenceClassification",
        "AutoModelForMultipleChoice": "modeling_posenc_roberta.PosencRobertaForMultipleChoice",
        "AutoModelForTokenClassification": "modeling_posenc_roberta.PosencRobertaForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_posenc_roberta.PosencRobertaForQuestionAnswering",
    }

    posenc: dict | str | None = None


PosencRobertaConfig.register_for_auto_class("AutoConfig")
