"""GPT-2 with a choice of positional scheme: the config (`model_type="posenc_gpt2"`)."""

from typing import ClassVar

from transformers import GPT2Config

from .posenc_schemes import PosencConfigMixin


class PosencGPT2Config(PosencConfigMixin, GPT2Config):
    """A `GPT2Config` plus `posenc`: a scheme name or `{"type": name, **params}` (see `hf_posenc.SCHEMES`).

    The stock GPT-2 uses `learned` (the `wpe` table); weight names stay GPT-2's, so stock checkpoints load directly.
    """

    model_type = "posenc_gpt2"
    base_model_type: ClassVar[str] = "gpt2"
    native_posenc: ClassVar[str] = "learned"
    auto_map_entries: ClassVar[dict] = {
        "AutoConfig": "configuration_posenc_gpt2.PosencGPT2Config",
        "AutoModel": "modeling_posenc_gpt2.PosencGPT2Model",
        "AutoModelForCausalLM": "modeling_posenc_gpt2.PosencGPT2LMHeadModel",
        "AutoModelForSequenceClassification": "modeling_posenc_gpt2.PosencGPT2ForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_posenc_gpt2.PosencGPT2ForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_posenc_gpt2.PosencGPT2ForQuestionAnswering",
    }

    posenc: dict | str | None = None


PosencGPT2Config.register_for_auto_class("AutoConfig")
