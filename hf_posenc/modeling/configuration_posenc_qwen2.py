"""Qwen2 with a choice of positional scheme: the config (`model_type="posenc_qwen2"`)."""

from typing import ClassVar

from transformers import Qwen2Config

from .posenc_schemes import PosencConfigMixin


class PosencQwen2Config(PosencConfigMixin, Qwen2Config):
    """A `Qwen2Config` plus `posenc`: a scheme name or `{"type": name, **params}` (see `hf_posenc.SCHEMES`).

    The stock Qwen2 uses `rope` with the config's own `rope_parameters` (and sliding-window layers when enabled);
    `posenc="rope"` keeps it.
    """

    model_type = "posenc_qwen2"
    base_model_type: ClassVar[str] = "qwen2"
    native_posenc: ClassVar[str] = "rope"
    auto_map_entries: ClassVar[dict] = {
        "AutoConfig": "configuration_posenc_qwen2.PosencQwen2Config",
        "AutoModel": "modeling_posenc_qwen2.PosencQwen2Model",
        "AutoModelForCausalLM": "modeling_posenc_qwen2.PosencQwen2ForCausalLM",
        "AutoModelForSequenceClassification": "modeling_posenc_qwen2.PosencQwen2ForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_posenc_qwen2.PosencQwen2ForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_posenc_qwen2.PosencQwen2ForQuestionAnswering",
    }

    posenc: dict | str | None = None


PosencQwen2Config.register_for_auto_class("AutoConfig")
