"""The modules every architecture adapter places at its sites, and the attention functions of the bias schemes.

Part of the `trust_remote_code` closure: imports only torch, transformers and sibling files.

- input embedding: `LearnedPositionEmbedding`, `SinusoidalPositionEmbedding`, `ZeroPositionEmbedding`
- q/k rotation: `PosencRotaryEmbedding` (transformers' `rope_parameters` and init functions), `PositionFreeRotary`;
  where the plugin owns the rotary step (GPT-2, BERT-like), `PairRotaryEmbedding` and `apply_rope`
- score bias: the providers and attention functions of `posenc_attention.py`, wired in by the adapters here.

Shape legend: B batch, H heads, Q query length, K key/value length, D head dim, T sequence length.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import is_torch_flex_attn_available
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from .posenc_attention import (
    BIAS_KERNELS,
    BIAS_PROVIDERS,
    STOCK_NAMES,
    attach_score_bias,
    bias_per_layer,
    bias_providers,
    kernel_name,
    score_bias_module,
    score_bias_modules,
)
from .posenc_schemes import (
    STOCK_GUARD,
    entry_scheme,
    get_scheme,
    head_dim_of,
    kernel_of,
    layer_entries,
    other_rope_specs,
    posenc_schemes,
    rope_spec_of,
    rotary_dim_of,
    sinusoidal_position_embedding,
    softmax_attention_kind,
    stock_class_of,
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

    def __init__(self, dim: int, base: float, token_embedding: nn.Embedding, scale: float = 1.0):
        super().__init__()
        self.dim, self.base, self.scale = dim, base, scale
        # a reference, not a submodule: the token table is owned (and saved) by the model
        object.__setattr__(self, "_token_embedding", token_embedding)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, dim)
        table = sinusoidal_position_embedding(position_ids, self.dim, self.base)
        if self.scale != 1.0:
            table = table * self.scale
        return table.to(self._token_embedding.weight.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scale={self.scale}"


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
        return SinusoidalPositionEmbedding(dim, posenc["base"], token_embedding, posenc["scale"])
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

    #: the frequency buffers, which stay fp32 through a model's dtype casts (see `_apply`)
    fp32_buffers = ("inv_freq", "original_inv_freq")

    def _apply(self, fn, recurse=True):
        """Follow every device move, but keep the frequencies fp32 through dtype casts (`model.to(torch.bfloat16)`,
        `.half()`, `.double()`): a cast would round them where `from_pretrained(dtype=...)` recomputes them in fp32,
        so a cast model would not compute what it computes once saved and reloaded. (transformers' own rotary modules
        round them: a stock Llama cast to bf16 moves by about 2e-3 across a save and reload.)"""
        before = {name: self._buffers.get(name) for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, kept in before.items():
            now = self._buffers.get(name)
            if kept is not None and now is not None and now.dtype != kept.dtype:
                self._buffers[name] = kept.to(device=now.device)  # from the unrounded values
        return self

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE frequencies `theta^(-2i/d)` over the rotary width d (honouring `partial_rotary_factor`)."""
        params = config.rope_parameters
        dim = rotary_dim_of(config, params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0

    def angles(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) positions -> the (B, T, D/2) fp32 angles, one per rotated pair."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        missing = self.head_dim // 2 - inv_freq.shape[0] if self.pad_to_head_dim else 0
        if missing:  # partial rotary: zero frequency for the pass-through pairs
            inv_freq = torch.cat((inv_freq, inv_freq.new_zeros(missing)))
        return position_ids[..., None].float() * inv_freq

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos, sin of shape (B, T, D) in x's dtype."""
        freqs = self.angles(x, position_ids)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class PairRotaryEmbedding(PosencRotaryEmbedding):
    """The rotary table of `apply_rope`, for architectures whose rotary step the plugin owns (GPT-2, BERT-like):
    (B, T, D/2, 2) turns, `attention_scaling * (cos, sin)` of each pair's fp32 angle, computed once per forward like
    every rotary module's cos/sin. The turns are fp32 (fp64 for an fp64 model), so a bf16 model does not round them to
    bf16 as transformers' cos/sin tables are."""

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        angles = self.angles(x, position_ids).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return torch.stack((angles.cos(), angles.sin()), dim=-1) * self.attention_scaling


#: bf16/fp16 q and k go through fp32 (they have no complex type). Small ones, whose cost is the number of calls, go
#: as one stack of both up to TURN_STACK_BYTES of fp32; larger ones on the CPU in blocks of rows of TURN_BLOCK_BYTES,
#: which stay in cache between the conversion, the multiply and the rounding and keep the allocator from mapping
#: fresh pages on every call (chosen with `hf-posenc bench`'s rotary rows).
TURN_STACK_BYTES = 256 << 10
TURN_BLOCK_BYTES = 4 << 20


def _pair_viewable(x: torch.Tensor) -> bool:
    """Whether `view_as_complex` can view x's adjacent pairs: unit last stride, even offset and other strides."""
    return x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(stride % 2 == 0 for stride in x.stride()[:-1])


def _as_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., D) fp32/fp64 -> (..., D/2) complex view of the adjacent pairs (2i, 2i+1): a view where the layout allows
    (strided q/k from a fused projection do), a copy otherwise."""
    if not _pair_viewable(x):
        x = x.clone(memory_format=torch.contiguous_format)  # .contiguous() would keep an odd offset
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def _turned(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """x's adjacent pairs times the complex turns, in the turns' precision (fp32 for complex64, fp64 for complex128):
    the real (..., D) view of the product."""
    wide = torch.float64 if turns.dtype == torch.complex128 else torch.float32
    return torch.view_as_real(_as_pairs(x if x.dtype == wide else x.to(wide)) * turns).flatten(-2)


def _turn(x: torch.Tensor, turns: torch.Tensor, fresh: bool = False) -> torch.Tensor:
    """Turn the adjacent pairs of (B, H, T, D) x by (B, 1, T, D/2) complex turns, computed in the turns' precision and
    rounded once to x's dtype. `fresh`: a tensor of its own, never a view (autograd lets those change in place)."""
    wide = torch.float64 if turns.dtype == torch.complex128 else torch.float32
    if x.dtype == wide:
        if not fresh:
            return _turned(x, turns)
        out = torch.empty_like(x)  # x's stride order, so the multiply does not transpose
        if not _pair_viewable(out):
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.mul(_as_pairs(x), turns, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
        return out
    length = x.shape[-2]
    rows = length
    if x.device.type == "cpu":
        rows = max(1, TURN_BLOCK_BYTES * length // max(1, x.numel() * wide.itemsize))
    if rows >= length:
        return _turned(x, turns).to(x.dtype)
    out = torch.empty_like(x)  # in x's stride order, as the fp32 blocks are: the rounding copy does not transpose
    for start in range(0, length, rows):
        block = slice(start, start + rows)
        out[..., block, :].copy_(_turned(x[..., block, :], turns[..., block, :]))
    return out


def _turn_both(query: torch.Tensor, key: torch.Tensor, turns: torch.Tensor, fresh: bool = False):
    """`_turn` of q and of k (`fresh` as there). Small bf16/fp16 ones, which cost what their calls cost, go through as
    one stack."""
    if (
        query.dtype not in (torch.float32, torch.float64)
        and (query.dtype, query.shape) == (key.dtype, key.shape)
        and 8 * query.numel() <= TURN_STACK_BYTES
    ):
        both = _turned(torch.stack((query, key)), turns)
        if fresh:
            return both[0].to(query.dtype), both[1].to(query.dtype)  # rounded: tensors of their own
        return tuple(both.to(query.dtype).unbind())
    return _turn(query, turns, fresh), _turn(key, turns, fresh)


class _TurnPairs(torch.autograd.Function):
    """q and k turned by one complex multiply each; the turns have modulus `attention_scaling`, so the backward is
    the same multiply by their conjugate (a multiply's transpose, whatever the modulus). The turns get no gradient:
    `apply_rope` sends turns that need one through `_turn_traced` instead."""

    @staticmethod
    def forward(ctx, query, key, turns):
        ctx.save_for_backward(turns)
        return _turn_both(query, key, turns, fresh=True)

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        back = ctx.saved_tensors[0].conj()
        need_query, need_key, _ = ctx.needs_input_grad
        if need_query and need_key:
            return *_turn_both(grad_query, grad_key, back), None
        return _turn(grad_query, back) if need_query else None, _turn(grad_key, back) if need_key else None, None


def _turn_traced(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """`_turn` in real arithmetic on (B, 1, T, D/2, 2) turns: for torch.compile (inductor fuses it into one kernel,
    forward and backward, where it would leave complex operators to eager kernels), TorchScript tracing and ONNX
    export, devices other than the CPU and CUDA, and turns that need a gradient."""
    cos, sin = turns.unbind(-1)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2).to(x.dtype)


def apply_rope(query: torch.Tensor, key: torch.Tensor, turns: torch.Tensor):
    """RoPE on (B, H, T, D) q and k with the (B, T, D/2, 2) turns of `PairRotaryEmbedding`.

    Pairs are adjacent dimensions (2i, 2i+1) turned by frequency i: the layout of RoFormer and of transformers' GPT-J,
    where Llama's `apply_rotary_pos_emb` pairs dimension i with i + D/2 (a fixed permutation of the head dimensions,
    which q.k does not see). Adjacent pairs are complex numbers, so the rotation is one complex multiply per tensor,
    forward and backward: in fp32 about the cost of copying q and k, where the half-split form needs several passes
    (see `hf-posenc bench`). It computes in fp32 (fp64 when q, k or the turns are fp64) and rounds once to q's and k's
    dtype. Used where the plugin owns the rotary step (GPT-2, BERT-like models); architectures with a native rotary
    step keep their own.
    """
    wide = torch.float64 if torch.float64 in (query.dtype, key.dtype, turns.dtype) else torch.float32
    turns = (turns if turns.dtype == wide else turns.to(wide)).unsqueeze(1)  # (B, 1, T, D/2, 2): for every head
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or turns.requires_grad
        or query.device.type not in ("cpu", "cuda")
    ):
        return _turn_traced(query, turns), _turn_traced(key, turns)
    if not _pair_viewable(turns):
        turns = turns.clone(memory_format=torch.contiguous_format)
    turns = torch.view_as_complex(turns)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return _TurnPairs.apply(query, key, turns)
    return _turn_both(query, key, turns)


#: the keyword a forward's KV cache arrives under: `cache` from transformers 5.24, `past_key_values` before
CACHE_KWARGS = ("cache", "past_key_values")


def cache_of(arguments: dict):
    """The KV cache among a forward's keyword arguments, whichever name this transformers release gives it."""
    return next((arguments[name] for name in CACHE_KWARGS if arguments.get(name) is not None), None)


def bind_arguments(function, *args, **kwargs) -> dict:
    """The arguments of a call to `function` (the instance and the hidden states first), by name, with the keyword
    catch-all merged in: lets an override read what it needs (the cache, the mask) whatever the stock signature calls
    it or however the caller passed it. Keyword-only calls need no signature (so torch.compile traces them)."""
    if len(args) <= 2:  # self and the hidden states, everything else by keyword: how transformers calls them
        return dict(kwargs)
    bound = inspect.signature(function).bind(*args, **kwargs)
    named = dict(bound.arguments)
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


def keep_stock_signature(cls: type) -> type:
    """Give `cls.forward` (an adapter's, which takes its arguments by name) the signature of the stock class's forward:
    the parameters, defaults, order and annotations that `inspect.signature` reports, and the positional order a call
    is bound by. Tools that pick a model's inputs by its signature (the Trainer's column filter, `generate`,
    transformers' common tests) then see the stock model's: `inputs_embeds`, the cache, the encoder arguments.

    The adapter's forward gets every argument by keyword. A call with only `self` and keywords (how transformers calls
    a base model) is passed through untouched, and positional arguments are matched to the stock parameter names
    without `inspect` at call time (torch.compile traces both). A stock forward with positional-only or variadic
    positional parameters (none so far) gets its positional arguments passed on as they came."""
    stock_forward = stock_class_of(cls).forward
    own = cls.forward
    if own is stock_forward:
        return cls
    signature = inspect.signature(stock_forward)
    parameters = list(signature.parameters.values())
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]  # not self
    simple = all(p.kind is not p.POSITIONAL_ONLY and p.kind is not p.VAR_POSITIONAL for p in parameters)

    @functools.wraps(stock_forward)
    def forward(self, *args, **kwargs):
        if args and simple:
            if len(args) > len(positional):
                signature.bind(self, *args, **kwargs)  # raises the stock TypeError (too many positional arguments)
            for name in positional[: len(args)]:
                if name in kwargs:
                    raise TypeError(f"{cls.__name__}.forward() got multiple values for argument {name!r}")
            args, kwargs = (), {**dict(zip(positional, args)), **kwargs}
        return own(self, *args, **kwargs)

    # no `__wrapped__`: what unwraps a forward down its `__wrapped__` chain (accelerate's `unwrap_model` of a
    # mixed-precision model) would reach the stock forward and skip the adapter's; the signature is set instead
    del forward.__wrapped__
    forward.__signature__ = signature
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    forward.__module__ = cls.__module__
    cls.forward = forward
    return cls


def rotate_then_cache(module: nn.Module, query, key, value, position_embeddings, cache):
    """RoPE on q and k (B, H, T, D), then the self-attention cache update: the order every rotary model keeps, so the
    cache holds rotated keys. For attention modules of architectures without a rotary step of their own."""
    query, key = apply_rope(query, key, position_embeddings)
    if cache is not None:
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


def _unrotated(at_zero):
    """The identity rotation in the structure, shapes and dtypes of a rotary module's output, from its output at
    position 0 (`at_zero`), where every angle is 0: a cosine table holds its attention scaling there (> 0) and a sine
    table 0, so their signs are the identity rotation's cos = 1 and sin = 0, and a complex `freqs_cis` (the scaling
    times 1 + 0j) has sign 1 + 0j. `q * 1 + rotate(q) * 0` is exactly q in every layout (half-split, interleaved,
    natively partial, the rope part of latent attention), no order of the pair is assumed (Llama returns (cos, sin),
    GPT-J (sin, cos)), and nothing depends on the values at run time (torch.compile traces it)."""
    if isinstance(at_zero, torch.Tensor) and (at_zero.is_floating_point() or at_zero.is_complex()):
        return torch.sgn(at_zero)
    if isinstance(at_zero, dict):
        return {key: _unrotated(value) for key, value in at_zero.items()}
    if isinstance(at_zero, (tuple, list)) and at_zero:
        return type(at_zero)(_unrotated(item) for item in at_zero)
    raise TypeError(
        f"cannot make a rotary module's output position-free: {type(at_zero).__name__} is not a table of cosines, "
        "sines or complex turns"
    )


def _rotary_call_seen(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Count a call of a rotary module the plugin changed (the adapter checks that a forward made some) and hand its
    position ids to the score biases, which read them in every attention call of this forward, also where the model
    does not hand its attention the position ids (ModernBERT, Persimmon, ...); set in compiled forwards too, or they
    would go stale."""
    if not torch.compiler.is_compiling():
        module.posenc_calls += 1
    ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
    for provider in getattr(module, "posenc_biases", ()):
        provider.position_ids = ids


def _at_position_zero(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A rotary call's arguments with every position id 0 (`forward(x, position_ids, ...)`: the rotary call
    convention of every release)."""
    if "position_ids" in kwargs:
        return args, {**kwargs, "position_ids": torch.zeros_like(kwargs["position_ids"])}
    return (args[0], torch.zeros_like(args[1]), *args[2:]), kwargs


class PositionFreeRotaryMixin:
    """Put in front of a stock rotary module's class (in place, see `upgrade`) when the scheme is not RoPE: the stock
    module still computes, at position 0 for every token (so every attribute a model reads from it stays and the
    shapes are the call's), and its output becomes the identity rotation (`_unrotated`). Weight names and buffers are
    the stock ones."""

    #: forwards of this module (the adapter checks that a model forward made some)
    posenc_calls = 0

    def forward(self, *args, **kwargs):
        _rotary_call_seen(self, args, kwargs)
        args, kwargs = _at_position_zero(args, kwargs)
        return _unrotated(super().forward(*args, **kwargs))


def publish(cls: type, module_name: str) -> type:
    """Make a class made at run time an attribute of the module `module_name`, so that it pickles (`torch.save` of a
    whole model, multiprocessing) and reprs like a class written there."""
    cls.__module__ = module_name
    cls.__qualname__ = cls.__name__
    setattr(sys.modules[module_name], cls.__name__, cls)
    return cls


@functools.cache
def position_free_class(rotary_class: type) -> type:
    name = f"PositionFree{rotary_class.__name__}"
    return publish(type(name, (PositionFreeRotaryMixin, rotary_class), {}), __name__)


class PositionedInputMixin:
    """Put in front of a model's token-embedding class (in place, see `upgrade`) for `learned` and `sinusoidal`: the
    embedding adds the position table (`posenc_table`) at the positions its base model hands it for the forward in
    progress (`posenc_positions`). The model still receives `input_ids`, so what else it computes from them stays
    (Gemma 3n's per-layer embeddings, hash-routed experts)."""

    posenc_positions: torch.Tensor | None = None

    def forward(self, input_ids, *args, **kwargs):
        embedded = super().forward(input_ids, *args, **kwargs)
        if self.posenc_positions is None:
            return embedded
        return embedded + self.posenc_table(self.posenc_positions).to(embedded.dtype)


@functools.cache
def positioned_input_class(embedding_class: type) -> type:
    name = f"Positioned{embedding_class.__name__}"
    return publish(type(name, (PositionedInputMixin, embedding_class), {}), __name__)


class PatternRotaryMixin:
    """Put in front of a stock rotary module's class (in place, see `upgrade`) under a per-layer pattern that rotates
    some layers: the stock module computes the pattern's main RoPE (from `rope_parameters`) as ever, and beside it, for
    the same call, the tables of the layers that rotate otherwise: the identity rotation (`_unrotated`, as
    `PositionFreeRotaryMixin`) for layers without RoPE, and the output of a rotary module of its own for each other
    RoPE setting of the pattern (`posenc_extra_rotaries`). Each call's tables are kept for the forward in progress
    (`posenc_tables`), where the pattern's layers (`PatternLayerMixin`) take theirs."""

    posenc_calls = 0
    posenc_identity = False
    posenc_tables: list | None = None

    def forward(self, *args, **kwargs):
        _rotary_call_seen(self, args, kwargs)
        out = super().forward(*args, **kwargs)
        tables = {index: extra(*args, **kwargs) for index, extra in enumerate(self.posenc_extra_rotaries)}
        if self.posenc_identity:  # as PositionFreeRotaryMixin computes it
            zero_args, zero_kwargs = _at_position_zero(args, kwargs)
            tables["none"] = _unrotated(super().forward(*zero_args, **zero_kwargs))
        if self.posenc_tables is not None:
            self.posenc_tables.append((out, tables))
        return out


@functools.cache
def pattern_rotary_class(rotary_class: type) -> type:
    name = f"Pattern{rotary_class.__name__}"
    return publish(type(name, (PatternRotaryMixin, rotary_class), {}), __name__)


def _first_tensor(table) -> torch.Tensor | None:
    if isinstance(table, torch.Tensor):
        return table
    if isinstance(table, dict):
        table = list(table.values())
    if isinstance(table, (tuple, list)):
        return next((t for t in map(_first_tensor, table) if t is not None), None)
    return None


class PatternLayerMixin:
    """Put in front of a decoder layer's class (in place, see `upgrade`) whose pattern entry rotates otherwise than
    the main RoPE: its `position_embeddings` (the tables the stock model computed for the main RoPE) are swapped for
    its own, which the pattern's rotary modules computed in the same call (`posenc_rotation`: "none" for the identity
    rotation, or the index of the entry's RoPE setting), or for None where the adapter's own attention rotates (GPT-2,
    BERT: no tables, no rotation)."""

    #: swaps made (the adapter checks that a forward made some)
    posenc_swaps = 0

    def forward(self, *args, **kwargs):
        tables = kwargs.get("position_embeddings")
        if tables is None:
            raise ValueError(
                f"posenc 'layers': {type(self).__name__} was not handed position_embeddings by keyword, so hf_posenc "
                "cannot give this layer its own rotation; use one rotation for every layer on this architecture"
            )
        if not torch.compiler.is_compiling():
            self.posenc_swaps += 1
        kwargs["position_embeddings"] = self._posenc_own_tables(tables)
        return super().forward(*args, **kwargs)

    def _posenc_own_tables(self, tables):
        first = _first_tensor(tables)
        for source in self.posenc_table_sources:
            for out, own in source.posenc_tables or ():
                if _first_tensor(out) is first:
                    return own[self.posenc_rotation]
        raise ValueError(
            f"posenc 'layers': the position_embeddings {type(self).__name__} was handed are not the output of a "
            "rotary module of this forward, so hf_posenc cannot tell which rotation to swap them for"
        )


@functools.cache
def pattern_layer_class(layer_class: type) -> type:
    name = f"Pattern{layer_class.__name__}"
    return publish(type(name, (PatternLayerMixin, layer_class), {}), __name__)


def install_layer_entries(base: nn.Module, layers: list[nn.Module], rotaries: list[nn.Module], heads: int) -> None:
    """Place a per-layer pattern (`posenc={"type": "layers", ...}`) on `layers`, the base model's layers in order:

    - rotation: the stock rotary modules compute the pattern's main RoPE and, where some layer rotates otherwise,
      the other tables too (`PatternRotaryMixin`); those layers swap theirs in (`PatternLayerMixin`). Architectures
      whose config states which layers rotate (`no_rope_layers`) are told in the config and need no swap for them;
    - bias: each bias entry's provider on its layers (one per distinct entry for schemes that share, one per layer
      for FIRE), none on the others;
    - every module of layer i gets `posenc_entry` (its window and temperature, which the posenc kernels apply).

    `rotaries` are the stock rotary modules (empty for the hand-written adapters, whose attention rotates by the
    tables the base model computes: it is their `posenc_tables` source, and "none" means no tables)."""
    config = base.config
    layers = attention_layers(config, layers)
    entries = layer_entries(config.posenc, len(layers))
    main, extras = rope_spec_of(config.posenc), other_rope_specs(config.posenc)
    natively = config.layers_natively()
    kinds = []
    for entry in entries:
        scheme = entry_scheme(entry)
        if scheme["type"] == "rope":
            kinds.append("main" if scheme == main else extras.index(scheme))
        else:
            kinds.append("main" if natively or main is None else "none")  # main None: the rotaries rotate nothing
    sources = rotaries if rotaries else [base]
    if main is not None and rotaries:
        for rotary in rotaries:
            upgrade(rotary, pattern_rotary_class(type(rotary)))
            rotary.posenc_identity = "none" in kinds
            rotary.posenc_extra_rotaries = nn.ModuleList(extra_rotary(rotary, config, spec) for spec in extras)
    for layer, kind in zip(layers, kinds):
        if kind != "main":
            upgrade(layer, pattern_layer_class(type(layer)))
            layer.posenc_rotation = kind
            object.__setattr__(layer, "posenc_table_sources", sources)  # references, not submodules
    # the bias of each layer: one provider per distinct entry of a scheme that shares, one per layer otherwise
    shared, providers = {}, []
    for entry in entries:
        scheme = entry_scheme(entry)
        if not bias_per_layer(scheme) and repr(scheme) in shared:
            providers.append(shared[repr(scheme)])
            continue
        provider = score_bias_module(scheme, heads)
        shared[repr(scheme)] = provider
        providers.append(provider)
    attach_score_bias(base, [list(layer.modules()) for layer in layers], providers)
    native_temperature = config.temperature_natively()
    for layer, entry in zip(layers, entries):
        for module in layer.modules():
            object.__setattr__(module, "posenc_entry", entry)
            object.__setattr__(module, "posenc_native_temperature", native_temperature)
    base._posenc_pattern_layers = [layer for layer, kind in zip(layers, kinds) if kind != "main"]


def plugin_rotaries(config) -> tuple[nn.Module | None, nn.ModuleList]:
    """The rotary modules of an adapter whose attention the plugin rotates (GPT-2, BERT): the main RoPE's (None
    without RoPE) and one for each other RoPE setting of a per-layer pattern."""
    if rope_spec_of(config.posenc) is None:
        return None, nn.ModuleList()
    extras = [PairRotaryEmbedding(config.viewed_with_rope(spec)) for spec in other_rope_specs(config.posenc)]
    return PairRotaryEmbedding(config), nn.ModuleList(extras)


def plugin_tables(base: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The main RoPE's turns of this forward (`base.rotary_emb`), keeping a pattern's other tables for its layers
    (`PatternLayerMixin`): None (no rotation) for layers without RoPE, each other RoPE setting's turns."""
    out = base.rotary_emb(x, position_ids)
    if base.posenc_tables is not None:
        tables = {index: extra(x, position_ids) for index, extra in enumerate(base.posenc_extra_rotaries)}
        base.posenc_tables.append((out, {"none": None, **tables}))
    return out


def attention_layers(config, layers: list[nn.Module]) -> list[nn.Module]:
    """The layers a pattern (or a bias learned per layer) runs over: those with softmax attention, leaving out the
    linear-attention, convolution, state-space and MLP layers of hybrid models (`softmax_attention_kind`: Qwen3-Next's
    DeltaNet, Bamba's Mamba, MiniMax's lightning attention, LFM2's convolutions), where no position scheme acts."""
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != len(layers):
        return layers
    return [layer for layer, kind in zip(layers, layer_types) if softmax_attention_kind(kind)]


def extra_rotary(rotary: nn.Module, config, spec: dict) -> nn.Module:
    """A rotary module of the stock class of `rotary` for another RoPE setting `spec` of a pattern."""
    stock = next(c for c in type(rotary).__mro__ if c.__module__.startswith("transformers."))
    try:
        return stock(config=config.viewed_with_rope(spec))
    except TypeError as error:
        raise ValueError(
            f"posenc 'layers': {stock.__name__} cannot be built for a second RoPE setting ({error}); on this "
            "architecture a pattern takes one RoPE setting"
        ) from error


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of a base model, in order: its module list of attention-holding modules as long as
    `num_hidden_layers` (`layers` in the Llama pattern, `h` in GPT-2's, `layer` in BERT's; LongCat-Flash's two
    attentions of each layer); where there is none (HRM runs two stacks of layers in cycles), every outermost module
    list that holds attention modules, one after the other."""

    def attends(layer: nn.Module) -> bool:  # an attention module: named so, or numbered for the cache (MLA)
        return any("Attention" in type(m).__name__ or hasattr(m, "layer_idx") for m in layer.modules())

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and any(map(attends, m))]
    count = model.config.num_hidden_layers
    for _, layers in lists:
        if len(layers) == count:
            return list(layers)
    outermost = [(n, m) for n, m in lists if not any(n.startswith(other + ".") for other, _ in lists)]
    if not outermost:
        raise ValueError(
            f"{type(model).__name__} has no list of layers with attention: a scheme that differs per layer cannot "
            "find them"
        )
    return [layer for _, layers in outermost for layer in layers]


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Every rotary module in `model`: transformers names their classes `*RotaryEmbedding` (or `*RotaryEmbeddings`)."""
    return [module for module in model.modules() if "RotaryEmbedding" in type(module).__name__]


class RotarySlotAdapter:
    """The adapter of every base model that computes RoPE in rotary modules and runs attention through
    transformers' AttentionInterface (the Llama pattern). Place it after `PosencPreTrainedMixin`, before the stock
    base model; it needs no knowledge of the architecture:

    - input embedding: the model has no absolute table; `embed_positions` (learned or sinusoidal) is added to the
      token embeddings (`get_input_embeddings()`) in `forward`, and is None for every other scheme;
    - q/k rotation: RoPE is computed by the stock rotary modules from `rope_parameters`, which the config derives
      from `posenc`; for every other scheme each rotary module returns the identity rotation (`_unrotated`);
    - score bias: one provider on the base model (`position_bias`), reached by every module in it, so the `posenc_*`
      attention functions find it whichever module calls them.
    """

    native_posenc = "rope"
    extra_heads = ()
    #: whether RoPE rotates part of the head natively: read from the stock config (None)
    rotates_part = None

    def install_posenc(self) -> None:
        config, posenc = self.config, self.config.posenc
        rotaries = rotary_modules(self)
        if not rotaries:
            raise ValueError(
                f"{type(self).__name__} has no rotary module (a class named *RotaryEmbedding): hf_posenc cannot place "
                f"posenc on {config.base_model_type!r} without an adapter of its own"
            )
        embedding = self.get_input_embeddings()
        width = getattr(embedding, "embedding_dim", config.hidden_size)  # NeoMMe embeds in a narrower space first
        self.embed_positions = input_position_module(posenc, width, embedding)
        if self.embed_positions is not None:
            upgrade(embedding, positioned_input_class(type(embedding)))
            object.__setattr__(embedding, "posenc_table", self.embed_positions)  # a reference: saved once, here
        rotates = rope_spec_of(posenc) is not None
        if not rotates:
            for rotary in rotaries:
                upgrade(rotary, position_free_class(type(rotary)))
        # the rotary modules a forward must call (a plain list, not submodules: they are registered where they are):
        # the position-free ones, or those computing a pattern's tables
        self._posenc_rotaries = [] if rotates and posenc["type"] != "layers" else rotaries
        if posenc["type"] == "layers":
            install_layer_entries(self, decoder_layers(self), rotaries if rotates else [], config.num_attention_heads)
            return
        per_layer = bias_per_layer(posenc)
        layers = (
            [list(layer.modules()) for layer in attention_layers(config, decoder_layers(self))] if per_layer else [[]]
        )
        attach_score_bias(self, layers, score_bias_modules(posenc, config.num_attention_heads, len(layers)))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        """Every argument by name: the factory gives the class the stock forward's signature (`keep_stock_signature`),
        so `inputs_embeds`, the cache and the rest arrive in `kwargs`."""
        embedding = None
        if self.embed_positions is not None:
            inputs_embeds = kwargs.get("inputs_embeds")
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            if position_ids is None:
                reference = input_ids if input_ids is not None else inputs_embeds
                position_ids = default_position_ids(reference.shape[1], cache_of(kwargs), reference.device)
            if inputs_embeds is not None:  # the caller embedded the tokens: add the positions here
                kwargs["inputs_embeds"] = inputs_embeds + self.embed_positions(position_ids).to(inputs_embeds.dtype)
            else:  # the model embeds them: its embedding adds the positions (see PositionedInputMixin)
                embedding = self.get_input_embeddings()
                embedding.posenc_positions = position_ids
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        sources = self._posenc_table_sources()
        for source in sources:
            source.posenc_tables = []  # this forward's tables (PatternRotaryMixin)
        try:
            if torch.compiler.is_compiling():
                return super().forward(**kwargs)
            before = self._posenc_calls()
            output = super().forward(**kwargs)
            self._check_posenc_applied(before)
            return output
        finally:
            if embedding is not None:
                embedding.posenc_positions = None
            for source in sources:
                source.posenc_tables = None

    def _posenc_table_sources(self) -> list[nn.Module]:
        """The modules whose tables a pattern's layers swap in (PatternRotaryMixin)."""
        return [r for r in self._posenc_rotaries if isinstance(r, PatternRotaryMixin)]

    def _posenc_calls(self) -> tuple[int, int, int]:
        """(bias kernel calls, position-free or pattern rotary calls, pattern layer swaps) so far: a forward must add
        to the ones its scheme needs."""
        rotary = sum(module.posenc_calls for module in self._posenc_rotaries)
        swaps = sum(layer.posenc_swaps for layer in getattr(self, "_posenc_pattern_layers", ()))
        return sum(provider.calls for provider in bias_providers(self)), rotary, swaps

    def _check_posenc_applied(self, before: tuple[int, int, int]) -> None:
        """Raise where the forward never reached the site of the scheme: nothing may fail silently."""
        posenc = self.config.posenc
        sites = {get_scheme(spec["type"]).site for spec in posenc_schemes(posenc)}
        site = "bias" if "bias" in sites else get_scheme(posenc["type"]).site
        bias_calls, rotary_calls, swaps = (now - then for now, then in zip(self._posenc_calls(), before))
        if getattr(self, "_posenc_pattern_layers", None) and not swaps:
            raise ValueError(
                f"posenc 'layers' gives some layers of {type(self).__name__} a rotation of their own, but none of them "
                "ran in this forward, so they may have rotated as the others; hf_posenc cannot place this pattern on "
                "this architecture"
            )
        if site == "bias" and not bias_calls:
            raise ValueError(
                f"posenc {self.config.posenc['type']!r} adds its bias in the posenc attention functions, but no "
                f"attention of {type(self).__name__} called them (attn_implementation "
                f"{self.config._attn_implementation!r}): this architecture does not dispatch attention through "
                "transformers' AttentionInterface; use learned, sinusoidal, rope or nope"
            )
        if self._posenc_rotaries and not rotary_calls:
            raise ValueError(
                f"posenc {self.config.posenc['type']!r} removes RoPE by making the rotary modules rotate nothing, but "
                f"{type(self).__name__} did not call them in this forward, so its rotation may still apply; hf_posenc "
                "cannot place this scheme on this architecture"
            )


def initialize_added(base: PreTrainedModel, modules: list[nn.Module]) -> None:
    """Initialise the modules `install_posenc` added, as transformers initialises its own (the stock `__init__` ran
    `post_init` before they existed). Nothing on the meta device: there `from_pretrained` initialises whatever the
    checkpoint lacks, and marking modules initialised here would make it skip buffers it must fill (Falcon-H1's)."""
    parameters = [t for m in modules for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
    if any(t.device.type == "meta" for t in parameters):
        return
    with torch.no_grad():
        for module in modules:
            base._init_weights(module)


def default_position_ids(length: int, cache, device: torch.device) -> torch.Tensor:
    """(1, length) positions following whatever the cache already holds, as transformers' models compute them."""
    past = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(length, device=device) + past).unsqueeze(0)


def upgrade(module: nn.Module, cls: type) -> nn.Module:
    """Turn a stock module into its posenc subclass in place: same weights, the subclass's forward."""
    if not isinstance(module, cls.__bases__):
        raise TypeError(f"cannot upgrade {type(module).__name__} to {cls.__name__}")
    module.__class__ = cls
    if isinstance(module, PreTrainedModel):
        # output capture (output_attentions / output_hidden_states) looks models up by class, registered in __init__
        # the registry is keyed by the class name (5.23 made it a dict subclass that derives the key from a model it
        # is given; before, callers passed the name): set the name itself, which every release reads
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(type(module)), module._can_record_outputs)
    return module


class PosencPreTrainedMixin:
    """Behaviour shared by every posenc model class (base models and heads), placed before the stock class in the MRO.

    - score-bias schemes run on the `posenc_*` attention functions (`posenc_auto` unless one is asked for); a request
      for a stock kernel maps onto its posenc form (`STOCK_NAMES`) and anything else is refused, so the bias can never
      be silently dropped;
    - `save_pretrained` writes the code closure beside config.json for every class, heads without an Auto class too.
    """

    #: the posenc base-model class of the architecture; heads turn their stock base model into it
    posenc_base_class: type

    def __init__(self, config, *args, **kwargs):
        # Generic heads (e.g. LlamaForSequenceClassification) build their base with AutoModel.from_config(config).
        # A trust_remote_code load imports the shipped config and modeling files into two different packages, so the
        # config's class is not the one the modeling file registered: map the class actually in use.
        transformers.AutoModel.register(type(config), self.posenc_base_class, exist_ok=True)
        config.check_posenc()  # posenc edited after the config was built was never normalised: refused, named
        super().__init__(config, *args, **kwargs)
        #: the scheme this model computes, which `save_pretrained` checks config.posenc against
        self._posenc_built = copy.deepcopy(config.posenc)
        base = self._stock_base_model()
        if not isinstance(base, self.posenc_base_class):
            upgrade(base, self.posenc_base_class)
            base._posenc_built = self._posenc_built  # upgraded in place: its __init__ did not run
        if not getattr(base, "_posenc_installed", False):  # heads may build their base through AutoModel
            config.check_rope_parameters()
            before = set(base.modules())
            base.install_posenc()
            base._posenc_installed = True
            initialize_added(base, [module for module in base.modules() if module not in before])

    @classmethod
    def is_custom_code(cls) -> bool:
        """Not custom code to transformers' loader: the classes are the stock ones with the posenc mixins in front,
        initialised by the stock `_init_weights`. (As custom code, `from_pretrained` would take every module whose own
        tensors all loaded as initialised, and skip `_init_weights` of modules that fill their children's
        non-persistent buffers: Falcon-H1's `mup_vector` was left uninitialised.)"""
        return False

    @classmethod
    def _stock_class(cls) -> type:
        """The transformers class this posenc class is made from."""
        return stock_class_of(cls)

    # transformers decides what a class may run (the experts kernels of MoE layers, attention set after loading) by
    # reading the source of the module that defines it: the factory's module is not the architecture's, so these ask
    # the stock class (as factory-made classes, every MoE posenc model ran the slower eager experts, or not, by the
    # order in which classes were first asked)
    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return cls._stock_class()._can_set_experts_implementation()

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return cls._stock_class()._can_set_attn_implementation()

    def _stock_base_model(self) -> nn.Module:
        """The base model inside this model (itself for a base model): the outermost module of the stock base class.
        Found by class, not by `base_model_prefix`, which some heads name differently from their base (Llama 4)."""
        stock_base = self.posenc_base_class._stock_class()
        base = next((module for module in self.modules() if isinstance(module, stock_base)), None)
        if base is None:
            raise TypeError(
                f"{type(self).__name__} holds no {stock_base.__name__}: it is not a head of that base model"
            )
        return base

    def _init_weights(self, module):
        """The stock initialisation, and the paper's for the parameters of a bias provider (`posenc_init`: KERPLE,
        FIRE), which the stock `_init_weights` does not know (a converted checkpoint lacks them)."""
        if hasattr(module, "posenc_init"):
            module.posenc_init()
            return
        super()._init_weights(module)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False):
        scheme = self.config.posenc["type"]
        if isinstance(attn_implementation, str) and attn_implementation.startswith(STOCK_GUARD):
            attn_implementation = None  # config.json's words for stock classes (handed on by a copied config)
        kernel = kernel_of(attn_implementation)
        if kernel is not None:
            if not self.config.score_kernels():
                raise ValueError(
                    f"attn_implementation {attn_implementation!r} is for score-bias schemes "
                    f"({', '.join(BIAS_PROVIDERS)}); this "
                    f"model's posenc is {scheme!r}: use 'eager', 'sdpa', 'flex_attention' or a flash kernel"
                )
            if kernel not in BIAS_KERNELS:
                raise ValueError(
                    f"unknown attn_implementation {attn_implementation!r}; allowed: "
                    f"{', '.join(repr('posenc_' + k) for k in BIAS_KERNELS)}"
                )
            attn_implementation = STOCK_NAMES[kernel]
        if not self.config.score_kernels():
            return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        kernels = {stock: kernel for kernel, stock in STOCK_NAMES.items()}
        if attn_implementation not in kernels:
            raise ValueError(
                f"posenc {scheme!r} adds its bias inside attention, which attn_implementation="
                f"{attn_implementation!r} cannot do; allowed: {', '.join(repr(k) for k in kernels if k)}, their "
                f"'posenc_' forms, or unset (posenc_auto picks the path per call)"
            )
        # the posenc kernels are their own (they apply soft-capping and sinks where the stock SDPA path of an
        # architecture cannot): only flex must exist in torch, and flash-attn be installed and usable
        if attn_implementation == "flex_attention" and not is_torch_flex_attn_available():
            raise ImportError(
                f"attn_implementation 'posenc_flex' needs flex_attention, which torch {torch.__version__} lacks"
            )
        if attn_implementation == "flash_attention_2":
            super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)
        return kernel_name(kernels[attn_implementation])  # this copy's own kernels (see posenc_attention)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        """`generate` prepares masks in advance for compileable caches (StaticCache); a bias scheme keeps the 2-D mask
        instead, so that each forward's mask function still sees the cache coordinates its bias needs."""
        if config.score_kernels():
            return attention_mask
        return create_masks_for_generate(config, inputs_embeds, attention_mask, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        realign_loaded_tensors(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Refuse a config edited by hand since this model was built (`posenc`, `rope_parameters`): the folder would
        reload as another model."""
        self.config.check_posenc(getattr(self, "_posenc_built", None), what="model")
        self.config.check_rope_parameters()
        # the closure goes in first, so that save_pretrained(push_to_hub=True) uploads it too
        if not os.path.isfile(save_directory):  # a file path: let transformers raise its own error
            os.makedirs(save_directory, exist_ok=True)
            write_code_closure(_unwrapped_class(self), save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)


def _unwrapped_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 (`fully_shard`) swaps in a subclass made on the fly (`FSDP<Class>`), whose module
    is torch's, not the one whose code the folder must ship."""
    return next(cls for cls in type(model).__mro__ if not cls.__module__.startswith("torch."))


#: the alignment of torch's CPU allocator, which every tensor of a freshly built model has
CPU_ALIGNMENT = 64


def realign_loaded_tensors(model: nn.Module) -> int:
    """Move every CPU parameter and buffer that does not start on a `CPU_ALIGNMENT` boundary into freshly allocated
    memory; returns how many moved.

    safetensors hands out tensors that live inside Python byte strings, at whatever 4- or 16-byte offset the heap
    gives them, and the CPU matrix kernels sum in an order that depends on the operand's alignment (measured: stock
    GPT2DoubleHeadsModel's mc_logits move by 1.5e-8 when its summary weight sits 4 or 8 bytes off a 16-byte
    boundary). Realigned, a loaded model computes bit for bit what the saved one did. Shared parameters (tied
    embeddings) are one object and move once, so they stay shared.
    """
    moved = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % CPU_ALIGNMENT:
            tensor.data = tensor.data.clone()
            moved += 1
    return moved


def write_code_closure(model_class: type, folder: str | os.PathLike) -> list[Path]:
    """Write what `auto_map` loads into `folder`: the factory and every sibling it imports relatively, plus the two
    generated stubs of `model_class`'s architecture."""
    from .posenc_factory import stub_sources

    source = sys.modules[model_class.__module__].__file__
    written = []
    for path in [source, *get_relative_import_files(source)]:
        target = Path(folder) / Path(path).name
        if not target.exists() or target.read_bytes() != Path(path).read_bytes():
            shutil.copyfile(path, target)
        written.append(target)
    for name, text in stub_sources(model_class.config_class).items():
        target = Path(folder) / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
        written.append(target)
    return written


def inherit_conversion_mapping(posenc_key: str, stock_key: str) -> None:
    """Give a posenc class or model type the checkpoint key renamings of its stock twin (e.g. GPT-NeoX's
    `embed_out.` -> `lm_head.`), so stock checkpoints load and posenc ones save under the stock names."""
    mapping = get_checkpoint_conversion_mapping(stock_key)
    if mapping is not None:
        register_checkpoint_conversion_mapping(posenc_key, mapping, overwrite=True)
