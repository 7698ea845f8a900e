"""The adapter of BERT-like encoders (BERT, RoBERTa): an absolute table in the embeddings, `layer[i].attention.self`.

Part of the `trust_remote_code` closure: imports only torch, transformers and sibling files.

Sites:
- input embedding: the native `embeddings.position_embeddings` slot keeps the learned table for `learned`, holds the
  fixed table for `sinusoidal` and an exact zero for every other scheme;
- q/k rotation: BERT has none, so the self-attention rotates q and k (`apply_rope`, adjacent pairs) before its
  (decoder-mode) cache update, with the turns computed once per forward by the base model's `rotary_emb`
  (`PairRotaryEmbedding`);
- score bias: one provider on the base model (`position_bias`). Encoders attend both ways, so ALiBi's `-m|i-j|` is
  the symmetric form and T5's buckets are bidirectional; in decoder mode (`is_decoder=True`) they are causal.
"""

import functools

import torch
from transformers.models.bert.modeling_bert import eager_attention_forward

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
    publish,
    rotate_then_cache,
    upgrade,
)
from .posenc_schemes import stock_class_of


class RotatingSelfAttentionMixin:
    """BERT-like self-attention that can rotate q and k (RoPE) before the cache update; without
    `position_embeddings` (every scheme but RoPE) it is the stock forward."""

    def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
        if position_embeddings is None:
            return super().forward(hidden_states, *args, **kwargs)
        named = bind_arguments(stock_class_of(type(self)).forward, self, hidden_states, *args, **kwargs)
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, D)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        query, key, value = rotate_then_cache(self, query, key, value, position_embeddings, cache_of(named))
        dropout = self.dropout.p if self.training else 0.0
        passed = {k: v for k, v in named.items() if k not in ("hidden_states", "attention_mask", *CACHE_KWARGS)}
        attn_output, attn_weights = attend(
            self, query, key, value, named.get("attention_mask"), dropout, eager_attention_forward, **passed
        )
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights


@functools.cache
def rotating_class(attention_class: type) -> type:
    """`attention_class` (BertSelfAttention, RobertaSelfAttention) with `RotatingSelfAttentionMixin` in front."""
    name = f"Posenc{attention_class.__name__}"
    return publish(type(name, (RotatingSelfAttentionMixin, attention_class), {}), __name__)


class BertLikeAdapter:
    """Place after `PosencPreTrainedMixin` and before the stock base model (BertModel, RobertaModel)."""

    native_posenc = "learned"
    #: whether the default position ids rise by one (BERT's count from the cache; RoBERTa's keep padding_idx at pad
    #: tokens, which transformers 5.25's mask builder would read as packed documents)
    default_positions_rise = True
    #: the rotary step is the plugin's own (`apply_rope`), which rotates part of the head natively
    rotates_part = True
    extra_heads = ()

    def _self_attentions(self):
        return [layer.attention.self for layer in self.encoder.layer]

    def install_posenc(self) -> None:
        config, posenc = self.config, self.config.posenc
        refuse_bias_with_cross_attention(config)
        embeddings = self.embeddings
        stock_table = embeddings.position_embeddings
        if posenc["type"] == "learned" and posenc["num_positions"] == stock_table.num_embeddings:
            upgrade(stock_table, LearnedPositionEmbedding)  # the stock table: stock weights load
        else:
            table = input_position_module(
                posenc, config.hidden_size, embeddings.word_embeddings, padding_idx=stock_table.padding_idx
            )
            embeddings.position_embeddings = table if table is not None else ZeroPositionEmbedding()
        self.rotary_emb, self.posenc_extra_rotaries = plugin_rotaries(config)
        for attention in self._self_attentions():
            upgrade(attention, rotating_class(type(attention)))
        if posenc["type"] == "layers":
            install_layer_entries(self, list(self.encoder.layer), [], config.num_attention_heads)
            return
        attentions = self._self_attentions()
        providers = score_bias_modules(posenc, config.num_attention_heads, len(attentions))
        attach_score_bias(self, [[attention] for attention in attentions], providers)

    def default_position_ids(self, input_ids, inputs_embeds, cache) -> torch.Tensor:
        """The architecture's own default positions (BERT: counting from the cache; RoBERTa overrides this)."""
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        return default_position_ids(reference.shape[-1], cache, reference.device)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs):
        """Every argument by name: the factory gives the class the stock signature (`keep_stock_signature`)."""
        inputs_embeds, cache = kwargs.get("inputs_embeds"), cache_of(kwargs)
        # The stock defaults slice buffers max_position_embeddings long; the same values computed here are not bound
        # by it (relative schemes, grown tables).
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, inputs_embeds, cache)
            if attention_mask is None and cache is None and not self.default_positions_rise:
                # From transformers 5.25 the mask builder reads position ids that do not rise by one as packed
                # documents (without a padding mask or a cache). The stock model hands it the caller's ids (none
                # here), this one its defaults, where RoBERTa's padding keeps padding_idx: an all-ones padding mask,
                # which is what no mask means, keeps the builder from reading them so (at the cost of a (T, T) mask
                # where the stock model traced under torch.compile has none).
                shape = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
                attention_mask = torch.ones(shape, dtype=torch.long, device=position_ids.device)
        if token_type_ids is None:
            shape = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
            token_type_ids = torch.zeros(shape, dtype=torch.long, device=position_ids.device)
        self.posenc_tables = [] if self.config.posenc["type"] == "layers" else None
        if self.rotary_emb is not None:
            kwargs["position_embeddings"] = plugin_tables(self, self.embeddings.word_embeddings.weight, position_ids)
        try:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                **kwargs,
            )
        finally:
            self.posenc_tables = None


class BertAdapter(BertLikeAdapter):
    """BERT: positions count from the cache."""


class RobertaAdapter(BertLikeAdapter):
    """RoBERTa: its own padding-aware positions."""

    default_positions_rise = False

    def default_position_ids(self, input_ids, inputs_embeds, cache):
        """RoBERTa's own rule: count real tokens from padding_idx + 1, padding keeps padding_idx."""
        padding_idx = self.embeddings.padding_idx
        if input_ids is None:
            return self.embeddings.create_position_ids_from_inputs_embeds(inputs_embeds, padding_idx)
        past = cache.get_seq_length() if cache is not None else 0
        return self.embeddings.create_position_ids_from_input_ids(input_ids, padding_idx, past)
