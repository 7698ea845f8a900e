"""GPT-NeoX with a choice of positional scheme: the config (`model_type="posenc_gpt_neox"`)."""

from typing import ClassVar

from transformers import GPTNeoXConfig

from .posenc_schemes import PosencConfigMixin


class PosencGPTNeoXConfig(PosencConfigMixin, GPTNeoXConfig):
    """A `GPTNeoXConfig` plus `posenc`: a scheme name or `{"type": name, **params}` (see `hf_posenc.SCHEMES`).

    The stock GPT-NeoX uses `rope` with its native partial rotary (`partial_rotary_factor`, 0.25 by default);
    `posenc="rope"` keeps it.
    """

    model_type = "posenc_gpt_neox"
    base_model_type: ClassVar[str] = "gpt_neox"
    native_posenc: ClassVar[str] = "rope"
    auto_map_entries: ClassVar[dict] = {
        "AutoConfig": "configuration_posenc_gpt_neox.PosencGPTNeoXConfig",
        "AutoModel": "modeling_posenc_gpt_neox.PosencGPTNeoXModel",
        "AutoModelForCausalLM": "modeling_posenc_gpt_neox.PosencGPTNeoXForCausalLM",
        "AutoModelForSequenceClassification": "modeling_posenc_gpt_neox.PosencGPTNeoXForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_posenc_gpt_neox.PosencGPTNeoXForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_posenc_gpt_neox.PosencGPTNeoXForQuestionAnswering",
    }

    posenc: dict | str | None = None


PosencGPTNeoXConfig.register_for_auto_class("AutoConfig")
