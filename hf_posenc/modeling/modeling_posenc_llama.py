"""Llama with a choice of positional scheme: the adapter and one class per transformers head.

Sites on Llama:
- input embedding: Llama has no absolute table; `embed_positions` (learned or sinusoidal) is added to the token
  embeddings in `PosencLlamaModel.forward`, and is None for every other scheme;
- q/k rotation: the native `rotary_emb` slot holds `PosencRotaryEmbedding` for RoPE (every rope_type and partial
  rotary) and `PositionFreeRotary` (cos=1, sin=0) for every other scheme;
- score bias: one provider on the base model (`position_bias`), shared by every layer's attention.
"""

from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)

from .configuration_posenc_llama import PosencLlamaConfig
from .posenc_layers import (
    PosencPreTrainedMixin,
    PosencRotaryEmbedding,
    PositionFreeRotary,
    attach_score_bias,
    default_position_ids,
    input_position_module,
    register_auto_classes,
    score_bias_module,
)
from .posenc_schemes import get_scheme, head_dim_of


class PosencLlamaModel(PosencPreTrainedMixin, LlamaModel):
    config_class = PosencLlamaConfig
    _auto_class = "AutoModel"

    def install_posenc(self) -> None:
        """Place the scheme at its site (see the module docstring). Called once, after the stock `__init__`."""
        config, posenc = self.config, self.config.posenc
        self.embed_positions = input_position_module(
            posenc, config.max_position_embeddings, config.hidden_size, self.embed_tokens
        )
        if get_scheme(posenc["type"]).site == "rotation":
            self.rotary_emb = PosencRotaryEmbedding(config)
        else:
            self.rotary_emb = PositionFreeRotary(head_dim_of(config))
        provider = score_bias_module(posenc, config.num_attention_heads, bidirectional=False)
        attach_score_bias(self, [layer.self_attn for layer in self.layers], provider)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if self.embed_positions is not None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            if inputs_embeds is None:
                inputs_embeds, input_ids = self.embed_tokens(input_ids), None
            if position_ids is None:
                position_ids = default_position_ids(inputs_embeds.shape[1], past_key_values, inputs_embeds.device)
            inputs_embeds = inputs_embeds + self.embed_positions(position_ids).to(inputs_embeds.dtype)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


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


for _cls in (
    PosencLlamaModel,
    PosencLlamaForCausalLM,
    PosencLlamaForSequenceClassification,
    PosencLlamaForTokenClassification,
    PosencLlamaForQuestionAnswering,
):
    _cls.posenc_base_class = PosencLlamaModel

register_auto_classes(PosencLlamaConfig, globals())
