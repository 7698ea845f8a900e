"""The adapter of GPT-2, which has no rotary module: its absolute table `wpe` and an attention that can rotate.

Part of the `trust_remote_code` closure: imports only torch, transformers and sibling files. The factory makes the
posenc classes (every head) from GPT-2's own with this adapter on the base model.

Sites on GPT-2:
- input embedding: the native `wpe` slot keeps the learned table for `learned`, holds the fixed table for
  `sinusoidal`, and holds nothing (an exact zero) for every other scheme;
- q/k rotation: GPT-2 has none, so `PosencGPT2Attention` rotates q and k (`apply_rope`, adjacent pairs) before the
  KV-cache update, with the turns computed once per forward by the base model's `rotary_emb` (`PairRotaryEmbedding`);
- score bias: one provider on the base model (`position_bias`), shared by every layer's attention.
"""

from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, eager_attention_forward

from .posenc_attention import attach_score_bias, refuse_bias_with_cross_attention, score_bias_modules
from .posenc_layers import (
    CACHE_KWARGS,
    LearnedPositionEmbedding,
    ZeroPositionEmbedding,
    attend,
    bind_arguments,
    cache_of,
    default_position_ids,
    input_position_module,
    install_layer_entries,
    plugin_rotaries,
    plugin_tables,
    rotate_then_cache,
    upgrade,
)


class PosencGPT2Attention(GPT2Attention):
    """GPT-2 self-attention that can rotate q and k (RoPE) before they enter the KV cache.

    Without `position_embeddings` (every scheme but RoPE) and for cross-attention it is the stock forward.
    """

    def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
        named = bind_arguments(GPT2Attention.forward, self, hidden_states, *args, **kwargs)
        if position_embeddings is None or named.get("encoder_hidden_states") is not None:
            return super().forward(hidden_states, *args, **kwargs)
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))  # (B, H, T, D)
        query, key, value = rotate_then_cache(self, query, key, value, position_embeddings, cache_of(named))
        attention_mask = named.get("attention_mask")

        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            attn_output, attn_weights = self._upcast_and_reordered_attn(query, key, value, attention_mask)
        else:
            dropout = self.attn_dropout.p if self.training else 0.0
            passed = {k: v for k, v in named.items() if k not in STOCK_ATTENTION_ARGUMENTS}
            attn_output, attn_weights = attend(
                self, query, key, value, attention_mask, dropout, eager_attention_forward, **passed
            )
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


#: GPT2Attention.forward's own arguments, which it does not hand to the attention function (the rest it does)
STOCK_ATTENTION_ARGUMENTS = (
    "self",
    "hidden_states",
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "output_attentions",
    *CACHE_KWARGS,
)


class GPT2Adapter:
    """Place after `PosencPreTrainedMixin`, before `GPT2Model` (see the module docstring for the sites)."""

    native_posenc = "learned"
    #: the rotary step is the plugin's own (`apply_rope`), which rotates part of the head natively
    rotates_part = True
    #: heads transformers has no Auto class for
    extra_heads = ("GPT2DoubleHeadsModel",)

    def install_posenc(self) -> None:
        """Place the scheme at its site (see the module docstring). Called once, after the stock `__init__`."""
        posenc = self.config.posenc
        refuse_bias_with_cross_attention(self.config)
        if posenc["type"] == "learned" and posenc["num_positions"] == self.wpe.num_embeddings:
            upgrade(self.wpe, LearnedPositionEmbedding)  # the stock table, so stock weights load
        else:
            table = input_position_module(posenc, self.embed_dim, self.wte)
            self.wpe = table if table is not None else ZeroPositionEmbedding()
        self.rotary_emb, self.posenc_extra_rotaries = plugin_rotaries(self.config)
        for block in self.h:
            upgrade(block.attn, PosencGPT2Attention)
        if posenc["type"] == "layers":
            install_layer_entries(self, list(self.h), [], self.config.n_head)
            return
        providers = score_bias_modules(posenc, self.config.n_head, len(self.h))
        attach_score_bias(self, [[block.attn] for block in self.h], providers)

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        """Every argument by name: the factory gives the class GPT2Model's signature (`keep_stock_signature`)."""
        self.posenc_tables = [] if self.config.posenc["type"] == "layers" else None
        if self.rotary_emb is not None:
            length = input_ids.shape[-1] if input_ids is not None else inputs_embeds.shape[-2]
            if position_ids is None:
                position_ids = default_position_ids(length, cache_of(kwargs), self.wte.weight.device)
            kwargs["position_embeddings"] = plugin_tables(self, self.wte.weight, position_ids)
        try:
            return super().forward(
                input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs
            )
        finally:
            self.posenc_tables = None
