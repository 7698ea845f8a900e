"""The modules every architecture adapter places at its sites, and the attention functions of the bias schemes.

Part of the `trust_remote_code` closure: imports only torch, transformers and sibling files.

- input embedding: `LearnedPositionEmbedding`, `SinusoidalPositionEmbedding`, `ZeroPositionEmbedding`
- q/k rotation: `PosencRotaryEmbedding` (transformers' `rope_parameters` and init functions), `PositionFreeRotary`
- score bias: `AlibiBias`, `T5RelativeBias`, computed inside the attention functions registered here as
  `posenc_eager` and `posenc_sdpa`, from the cache coordinates that the mask function of the same name passes on.

Shape legend: B batch, H heads, Q query length, K key/value length, D head dim, T sequence length.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import EncoderDecoderCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    create_masks_for_generate,
    sdpa_mask,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from .posenc_schemes import (
    alibi_bias,
    alibi_slopes,
    get_scheme,
    head_dim_of,
    rotary_dim_of,
    sinusoidal_position_embedding,
    t5_relative_position_bucket,
)

# --------------------------------------------------------------------------------------------------------------------
# Input-embedding site
# --------------------------------------------------------------------------------------------------------------------


class LearnedPositionEmbedding(nn.Embedding):
    """A trained absolute position table that names the position it cannot embed instead of an index error."""

    def check_positions(self, last: int) -> None:
        if last >= self.num_embeddings:
            raise ValueError(
                f"position {last} is past the learned position table ({self.num_embeddings} positions); "
                "use a shorter input, grow the table (posenc={'type': 'learned', 'num_positions': N, 'grow': ...}) "
                "or a relative scheme (rope, alibi, t5_bias)"
            )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and position_ids.numel():
            self.check_positions(int(position_ids.max()))
        return super().forward(position_ids)


class SinusoidalPositionEmbedding(nn.Module):
    """The fixed sinusoidal table (see `sinusoidal_position_embedding`), computed on the fly: no parameters, no buffer.

    Its output takes the dtype of the token embedding it is added to, so a bf16 model stays bf16.
    """

    def __init__(self, dim: int, base: float, token_embedding: nn.Embedding):
        super().__init__()
        self.dim, self.base = dim, base
        # a reference, not a submodule: the token table is owned (and saved) by the model
        object.__setattr__(self, "_token_embedding", token_embedding)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, dim)
        table = sinusoidal_position_embedding(position_ids, self.dim, self.base)
        return table.to(self._token_embedding.weight.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


class ZeroPositionEmbedding(nn.Module):
    """Fills an architecture's absolute-table slot with nothing: a 0-d zero keeps the sum and its dtype exact."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


def input_position_module(
    posenc: dict, dim: int, token_embedding: nn.Embedding, padding_idx: int | None = None
) -> nn.Module | None:
    """The module that embeds positions for an `embedding`-site scheme, or None for every other scheme.

    `padding_idx` keeps an architecture's reserved padding row (RoBERTa) in a learned table built anew."""
    if posenc["type"] == "learned":
        return LearnedPositionEmbedding(posenc["num_positions"], dim, padding_idx=padding_idx)
    if posenc["type"] == "sinusoidal":
        return SinusoidalPositionEmbedding(dim, posenc["base"], token_embedding)
    if get_scheme(posenc["type"]).site == "embedding":
        raise NotImplementedError(f"no input-embedding module for posenc {posenc['type']!r}")
    return None


# --------------------------------------------------------------------------------------------------------------------
# Rotation site
# --------------------------------------------------------------------------------------------------------------------


class PosencRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE from `config.rope_parameters`, for every rope_type in transformers' ROPE_INIT_FUNCTIONS.

    Follows transformers' rotary-module conventions (`inv_freq`, `original_inv_freq`, `rope_type`, `config`, the
    `dynamic_rope_update` decorator and the "RotaryEmbedding" class name), so `PreTrainedModel._init_weights` refills
    its buffers when a model is built on the meta device. With `partial_rotary_factor < 1` the frequencies are padded
    with zeros to the full head: those dimension pairs get cos=1, sin=0 and pass through unrotated (the layout of
    transformers' `proportional` rope), which works with every architecture's `apply_rotary_pos_emb`. Architectures
    whose `apply_rotary_pos_emb` rotates only the first `cos.shape[-1]` dimensions (GPT-NeoX) get the unpadded
    tables, their native partial-rotary layout.

    Reference: Su et al., RoFormer (https://arxiv.org/abs/2104.09864).
    """

    def __init__(self, config, pad_to_head_dim: bool = True):
        super().__init__()
        self.config = config
        self.pad_to_head_dim = pad_to_head_dim  # False where the architecture rotates only cos.shape[-1] dims
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.head_dim = head_dim_of(config)
        init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE frequencies `theta^(-2i/d)` over the rotary width d (honouring `partial_rotary_factor`)."""
        params = config.rope_parameters
        dim = rotary_dim_of(config, params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos, sin of shape (B, T, D) in x's dtype."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        missing = self.head_dim // 2 - inv_freq.shape[0] if self.pad_to_head_dim else 0
        if missing:  # partial rotary: zero frequency for the pass-through pairs
            inv_freq = torch.cat((inv_freq, inv_freq.new_zeros(missing)))
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_then_cache(module: nn.Module, query, key, value, position_embeddings, past_key_values):
    """RoPE on q and k (B, H, T, D), then the self-attention cache update: the order every rotary model keeps, so the
    cache holds rotated keys. For attention modules of architectures without a rotary step of their own."""
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    if past_key_values is not None:
        cache = past_key_values
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        key, value = cache.update(key, value, module.layer_idx)
    return query, key, value


def attend(module: nn.Module, query, key, value, attention_mask, dropout: float, eager_function, **kwargs):
    """Run the model's configured attention implementation (falling back to the architecture's `eager_function`) on
    (B, H, T, D) q/k/v: the call every attention module makes once its q, k and v are ready."""
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_function)
    return attention_interface(
        module, query, key, value, attention_mask, dropout=dropout, scaling=module.scaling, **kwargs
    )


class PositionFreeRotary(nn.Module):
    """Stands in for an architecture's rotary module when the scheme is not RoPE: cos=1, sin=0 rotates nothing.

    `q * 1 + rotate_half(q) * 0` is exactly q, so attention sees no position through this site.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.head_dim)
        one = torch.ones((), dtype=x.dtype, device=x.device).expand(shape)
        return one, torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)


# --------------------------------------------------------------------------------------------------------------------
# Score-bias site
# --------------------------------------------------------------------------------------------------------------------


class AlibiBias(nn.Module):
    """ALiBi: `-slope_h * |i - j|` (Press et al., https://arxiv.org/abs/2108.12409). No parameters.

    `slope_multiplier` scales every slope (for evaluating at lengths other than the training length).
    """

    def __init__(self, num_heads: int, max_bias: float = 8.0, slope_multiplier: float = 1.0):
        super().__init__()
        self.num_heads, self.max_bias, self.slope_multiplier = num_heads, max_bias, slope_multiplier
        self._slopes = {}  # device -> (H,) float32; plain attribute, rebuilt on demand (never a meta buffer)

    def slopes(self, device: torch.device) -> torch.Tensor:
        if device not in self._slopes:
            self._slopes[device] = (alibi_slopes(self.num_heads, self.max_bias) * self.slope_multiplier).to(device)
        return self._slopes[device]

    def forward(self, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
        """(Q,), (K,) positions -> (H, Q, K) float32 bias."""
        return alibi_bias(self.slopes(q_positions.device), q_positions, kv_positions)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_bias={self.max_bias}, slope_multiplier={self.slope_multiplier}"


class T5RelativeBias(nn.Module):
    """T5's learned bias per (bucket of key - query, head), one table shared by all layers (Raffel et al., 2020)."""

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = False):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def forward(self, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
        """(Q,), (K,) positions -> (H, Q, K) float32 bias."""
        relative = kv_positions[None, :] - q_positions[:, None]  # (Q, K), memory minus query as in T5
        buckets = t5_relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).float()

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"


def score_bias_module(posenc: dict, num_heads: int, bidirectional: bool) -> nn.Module | None:
    """The bias provider for a `bias`-site scheme, or None for every other scheme."""
    if posenc["type"] == "alibi":
        return AlibiBias(num_heads, posenc["max_bias"], posenc["slope_multiplier"])
    if posenc["type"] == "t5_bias":
        return T5RelativeBias(num_heads, posenc["num_buckets"], posenc["max_distance"], bidirectional)
    if get_scheme(posenc["type"]).site == "bias":
        raise NotImplementedError(f"no score-bias module for posenc {posenc['type']!r}")
    return None


def refuse_bias_with_cross_attention(config) -> None:
    """Cross-attention layers take the same attention implementation but carry no position bias: refuse the pair."""
    if getattr(config, "add_cross_attention", False) and get_scheme(config.posenc["type"]).site == "bias":
        raise ValueError(
            f"posenc {config.posenc['type']!r} is a self-attention bias and cross-attention cannot take it; with "
            "add_cross_attention=True use learned, sinusoidal, rope or nope"
        )


def attach_score_bias(owner: nn.Module, attention_modules, provider: nn.Module | None) -> None:
    """Register `provider` once on `owner` (its weights are saved there) and point every attention module at it."""
    owner.position_bias = provider
    for attention in attention_modules:
        # a reference, not a submodule: one table shared by all layers, saved once
        object.__setattr__(attention, "posenc_bias", provider)


@dataclass
class ScoreBiasMask:
    """What the `posenc_*` mask function hands to the `posenc_*` attention function of the same name.

    Attributes:
        mask: (B, 1, Q, K) bool, True where a query may attend a key (padding, sliding window, packing); None when
            nothing but causality restricts attention (then no (Q, K) tensor exists at all).
        causal: whether queries see only earlier keys (decoders) or every key (encoders).
        q_positions: (Q,) cache coordinates of the queries.
        kv_positions: (K,) cache coordinates of the keys.
    """

    mask: torch.Tensor | None
    causal: bool
    q_positions: torch.Tensor
    kv_positions: torch.Tensor

    def block(self, rows: slice) -> torch.Tensor | None:
        """The boolean mask of query rows `rows` (B or 1, 1, rows, K), built from positions when `mask` is None."""
        if self.mask is not None:
            return self.mask[:, :, rows]
        if not self.causal:
            return None
        return (self.q_positions[rows, None] >= self.kv_positions[None, :])[None, None]


def posenc_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    allow_is_causal_skip: bool = False,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> ScoreBiasMask:
    """Mask function for `posenc_*`: transformers' boolean mask (or None where it may be skipped) plus the cache
    coordinates of queries and keys.

    Only the mask function sees `q_offset`/`kv_offset` for every cache type, so the distances of a relative bias are
    taken here, which keeps them right with a KV cache, left padding and sliding windows. transformers skips the mask
    (None) only when causality alone restricts attention: no padding, no window in reach.
    """
    for key in ("dtype", "config"):
        kwargs.pop(key, None)
    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=allow_is_causal_skip,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip,
        device=device,
        **kwargs,
    )
    # create_causal_mask passes allow_is_causal_skip, create_bidirectional_mask allow_is_bidirectional_skip
    causal = not allow_is_bidirectional_skip and mask_function is not bidirectional_mask_function
    q_positions = torch.arange(q_length, device=device) + q_offset
    kv_positions = torch.arange(kv_length, device=device) + kv_offset
    return ScoreBiasMask(mask, causal, q_positions, kv_positions)


def _provider(module: nn.Module, attention_mask) -> nn.Module:
    provider = getattr(module, "posenc_bias", None)
    if provider is None:
        raise ValueError(
            f"attn_implementation {module.config._attn_implementation!r} is for score-bias schemes (alibi, t5_bias); "
            f"this model's posenc is {module.config.posenc['type']!r}"
        )
    if not isinstance(attention_mask, ScoreBiasMask):
        raise ValueError(
            f"posenc {module.config.posenc['type']!r} computes its bias from the positions of the cache, but the "
            f"attention got a prepared {type(attention_mask).__name__} mask that bypasses them; pass a 2-D padding "
            "mask of shape (batch, length) instead of a 4-D one"
        )
    return provider


#: bytes one query chunk's fp32 bias-and-mask block (B x H x chunk x K) may take in posenc_sdpa
BIAS_BLOCK_BYTES = 64 * 2**20


def _alibi_column_attention(module, query, key, value, provider, masks: ScoreBiasMask, scaling, dropout):
    """Causal ALiBi on plain causal SDPA, no mask and no (Q, K) tensor: -m(i-j) equals m*j up to a per-row constant,
    which softmax ignores, so one extra head-dim column (1 in q, m*j/scale in k, 0 in v) adds it exactly.

    Exact in fp32 only (the column grows to m*K), so posenc_sdpa uses it for fp32 inputs without padding.
    """
    batch, heads, q_length, head_dim = query.shape
    key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    kv_positions = masks.kv_positions
    if q_length > 1 and key.shape[2] > q_length:  # StaticCache prefill: the keys past the queries are not filled yet
        key, value, kv_positions = key[:, :, :q_length], value[:, :, :q_length], kv_positions[:q_length]
    # positions counted from the first key keep the column small; a per-row shift changes nothing after softmax
    column = provider.slopes(query.device)[:, None] * (kv_positions - kv_positions[0]).to(torch.float32) / scaling
    pad = -(head_dim + 1) % 8  # keep the head dim a multiple of 8 for the fused kernels
    query = nn.functional.pad(torch.cat([query, query.new_ones(batch, heads, q_length, 1)], -1), (0, pad))
    key = nn.functional.pad(
        torch.cat([key, column[None, :, :, None].expand(batch, -1, -1, 1).to(key.dtype)], -1), (0, pad)
    )
    value = nn.functional.pad(value, (0, pad + 1))
    output = nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=q_length > 1
    )
    return output[..., :head_dim].transpose(1, 2).contiguous(), None


def _chunked_bias_attention(module, query, key, value, provider, masks: ScoreBiasMask, scaling, dropout):
    """SDPA with the bias, one block of query rows at a time: only a (B, H, chunk, K) bias exists, never (Q, K).

    The bias is fp32 and so is each block's attention (inputs upcast), so a bf16 model keeps an exact bias.
    """
    batch, heads, q_length, _ = query.shape
    key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    compute = torch.float32
    key32, value32 = key.to(compute), value.to(compute)
    chunk = max(1, BIAS_BLOCK_BYTES // (4 * batch * heads * key.shape[2]))
    outputs = []
    for start in range(0, q_length, chunk):
        rows = slice(start, start + chunk)
        bias = provider(masks.q_positions[rows], masks.kv_positions)[None]  # (1, H, c, K) fp32
        allowed = masks.block(rows)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, torch.finfo(compute).min)
        block = nn.functional.scaled_dot_product_attention(
            query[:, :, rows].to(compute), key32, value32, attn_mask=bias, dropout_p=dropout, scale=scaling
        )
        outputs.append(block.to(query.dtype))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def posenc_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Score-bias attention on SDPA without a (Q, K) bias: the ALiBi column trick where it is exact (causal, fp32, no
    padding), query-chunked blocks everywhere else."""
    provider = _provider(module, attention_mask)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    masks = attention_mask
    if isinstance(provider, AlibiBias) and masks.mask is None and masks.causal and query.dtype == torch.float32:
        return _alibi_column_attention(module, query, key, value, provider, masks, scaling, dropout)
    return _chunked_bias_attention(module, query, key, value, provider, masks, scaling, dropout)


def posenc_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Textbook attention with the bias: the reference. Scores and softmax in float32; returns the weights."""
    provider = _provider(module, attention_mask)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    bias = provider(attention_mask.q_positions, attention_mask.kv_positions)[None]  # (1, H, Q, K) fp32
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling + bias  # (B, H, Q, K) fp32
    allowed = attention_mask.block(slice(None))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    weights = nn.functional.softmax(scores, dim=-1).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Q, H, D)
    return output, weights


# One name per kernel, registered for both the attention and the mask interface: a name known only to the attention
# interface would make mask preparation exit early and drop the padding mask.
BIAS_KERNELS = {"eager": posenc_eager_attention, "sdpa": posenc_sdpa_attention}
for _kernel, _function in BIAS_KERNELS.items():
    AttentionInterface.register(f"posenc_{_kernel}", _function)
    AttentionMaskInterface.register(f"posenc_{_kernel}", posenc_mask)

# --------------------------------------------------------------------------------------------------------------------
# The model side shared by every architecture
# --------------------------------------------------------------------------------------------------------------------


class RotarySlotAdapter:
    """The adapter of base models with a model-level `rotary_emb` whose cos/sin every layer applies before its cache
    update (Llama, Mistral, Qwen2, GPT-NeoX). Place it after `PosencPreTrainedMixin`, before the stock base model.

    - input embedding: no absolute table natively; `embed_positions` (learned or sinusoidal) is added to the token
      embeddings in `forward`, and is None for every other scheme;
    - q/k rotation: the `rotary_emb` slot holds `PosencRotaryEmbedding` for RoPE and `PositionFreeRotary` (cos=1,
      sin=0) for every other scheme;
    - score bias: one provider on the base model (`position_bias`), shared by every layer's attention.
    """

    #: attribute of the token embedding on the base model
    token_embedding_name = "embed_tokens"
    #: attribute of the attention module on each element of `self.layers`
    attention_name = "self_attn"
    #: False where the architecture's apply_rotary_pos_emb rotates only cos.shape[-1] dims (native partial rotary)
    pad_partial_rotary = True

    def install_posenc(self) -> None:
        config, posenc = self.config, self.config.posenc
        token_embedding = getattr(self, self.token_embedding_name)
        self.embed_positions = input_position_module(posenc, config.hidden_size, token_embedding)
        if get_scheme(posenc["type"]).site == "rotation":
            self.rotary_emb = PosencRotaryEmbedding(config, pad_to_head_dim=self.pad_partial_rotary)
        else:
            self.rotary_emb = PositionFreeRotary(head_dim_of(config))
        provider = score_bias_module(posenc, config.num_attention_heads, bidirectional=False)
        attach_score_bias(self, [getattr(layer, self.attention_name) for layer in self.layers], provider)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if self.embed_positions is not None:
            inputs_embeds = kwargs.pop("inputs_embeds", None)
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            if inputs_embeds is None:
                inputs_embeds, input_ids = getattr(self, self.token_embedding_name)(input_ids), None
            if position_ids is None:
                past = kwargs.get("past_key_values")
                position_ids = default_position_ids(inputs_embeds.shape[1], past, inputs_embeds.device)
            kwargs["inputs_embeds"] = inputs_embeds + self.embed_positions(position_ids).to(inputs_embeds.dtype)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def default_position_ids(length: int, past_key_values, device: torch.device) -> torch.Tensor:
    """(1, length) positions following whatever the cache already holds, as transformers' models compute them."""
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    return (torch.arange(length, device=device) + past).unsqueeze(0)


def upgrade(module: nn.Module, cls: type) -> nn.Module:
    """Turn a stock module into its posenc subclass in place: same weights, the subclass's forward."""
    if not isinstance(module, cls.__bases__):
        raise TypeError(f"cannot upgrade {type(module).__name__} to {cls.__name__}")
    module.__class__ = cls
    if isinstance(module, PreTrainedModel):
        # output capture (output_attentions / output_hidden_states) looks models up by class, registered in __init__
        _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
    return module


class PosencPreTrainedMixin:
    """Behaviour shared by every posenc model class (base models and heads), placed before the stock class in the MRO.

    - score-bias schemes run on the `posenc_eager`/`posenc_sdpa` attention functions; a request for `eager` or
      `sdpa` maps onto them and anything else is refused, so the bias can never be silently dropped;
    - `save_pretrained` writes the code closure beside config.json for every class, heads without an Auto class too.
    """

    #: the posenc base-model class of the architecture; heads turn their stock base model into it
    posenc_base_class: type

    def __init__(self, config, *args, **kwargs):
        # Generic heads (e.g. LlamaForSequenceClassification) build their base with AutoModel.from_config(config).
        # A trust_remote_code load imports the shipped config and modeling files into two different packages, so the
        # config's class is not the one the modeling file registered: map the class actually in use.
        transformers.AutoModel.register(type(config), self.posenc_base_class, exist_ok=True)
        super().__init__(config, *args, **kwargs)
        base = getattr(self, self.base_model_prefix, self)  # a base model is its own base
        if not isinstance(base, self.posenc_base_class):
            upgrade(base, self.posenc_base_class)
        if not getattr(base, "_posenc_installed", False):  # heads may build their base through AutoModel
            config.check_rope_parameters()
            base.install_posenc()
            base._posenc_installed = True
            base.init_weights()  # initialises only the modules the install added; a no-op on the meta device

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False):
        scheme = self.config.posenc["type"]
        if isinstance(attn_implementation, str) and attn_implementation.startswith("posenc_"):
            if get_scheme(scheme).site != "bias":
                raise ValueError(
                    f"attn_implementation {attn_implementation!r} is for score-bias schemes (alibi, t5_bias); this "
                    f"model's posenc is {scheme!r}: use 'eager', 'sdpa', 'flex_attention' or a flash kernel"
                )
            attn_implementation = attn_implementation.removeprefix("posenc_")
        if get_scheme(scheme).site != "bias":
            return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        if attn_implementation not in (None, *BIAS_KERNELS):
            raise ValueError(
                f"posenc {scheme!r} adds its bias inside attention, which attn_implementation="
                f"{attn_implementation!r} cannot do; allowed: {', '.join(repr(k) for k in BIAS_KERNELS)} (or unset)"
            )
        kernel = super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        return f"posenc_{kernel}"

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values, **kwargs):
        """`generate` prepares masks in advance for compileable caches (StaticCache); a bias scheme keeps the 2-D mask
        instead, so that each forward's mask function still sees the cache coordinates its bias needs."""
        if get_scheme(config.posenc["type"]).site == "bias":
            return attention_mask
        return create_masks_for_generate(config, inputs_embeds, attention_mask, past_key_values, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.check_rope_parameters()
        # the closure goes in first, so that save_pretrained(push_to_hub=True) uploads it too
        if not os.path.isfile(save_directory):  # a file path: let transformers raise its own error
            os.makedirs(save_directory, exist_ok=True)
            write_code_closure(type(self), save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)


def write_code_closure(cls: type, folder: str | os.PathLike) -> list[Path]:
    """Copy the file defining `cls` and every sibling it imports relatively into `folder` (what `auto_map` loads)."""
    source = sys.modules[cls.__module__].__file__
    written = []
    for path in [source, *get_relative_import_files(source)]:
        target = Path(folder) / Path(path).name
        if not target.exists() or target.read_bytes() != Path(path).read_bytes():
            shutil.copyfile(path, target)
        written.append(target)
    return written


def _inherit_conversion_mapping(posenc_key: str, stock_key: str) -> None:
    """Give a posenc class or model type the checkpoint key renamings of its stock twin (e.g. GPT-NeoX's
    `embed_out.` -> `lm_head.`), so stock checkpoints load and posenc ones save under the stock names."""
    mapping = get_checkpoint_conversion_mapping(stock_key)
    if mapping is not None:
        register_checkpoint_conversion_mapping(posenc_key, mapping, overwrite=True)


def register_model_classes(config_class: type, base_class: type, namespace: dict) -> None:
    """Finish an architecture's modeling file: point every posenc class in it at the base class, and register the
    classes named in `config_class.auto_map_entries` with transformers' Auto classes.

    Run when a modeling file is imported, by the plugin and by a `trust_remote_code` load alike: heads such as
    `LlamaForSequenceClassification` build their base model through `AutoModel`, which must know the config class.
    The model *type* is registered with AutoConfig by the plugin only: registering it here would let a later load
    of another folder in the same process run without `trust_remote_code`.
    """
    for value in namespace.values():
        if isinstance(value, type) and issubclass(value, PosencPreTrainedMixin) and issubclass(value, PreTrainedModel):
            value.posenc_base_class = base_class
            stock = next(c for c in value.__mro__ if c.__module__.startswith("transformers.models."))
            _inherit_conversion_mapping(value.__name__, stock.__name__)
    _inherit_conversion_mapping(config_class.model_type, config_class.base_model_type)
    for auto_name, reference in config_class.auto_map_entries.items():
        if auto_name != "AutoConfig":
            model_class = namespace[reference.rsplit(".", 1)[1]]
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
