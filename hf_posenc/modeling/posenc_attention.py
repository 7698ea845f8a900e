"""The score-bias site: the bias providers (ALiBi, T5) and the attention functions that add their bias inside attention.

Part of the `trust_remote_code` closure: imports only torch, transformers and sibling files.

One mask function, `posenc_mask`, hands every attention function the cache coordinates of queries and keys, so a
relative bias stays right with a KV cache, padding and sliding windows. The attention functions, each registered
under its own name with both AttentionInterface and AttentionMaskInterface:

- `posenc_auto` (the default): picks one of the paths below for each call, by device, dtype and what is installed;
- `posenc_sdpa`: plain SDPA. Causal ALiBi in fp32 without padding runs as plain `is_causal` SDPA with one extra
  head-dim column (no mask at all); everything else runs query-chunked, with an fp32 bias block per chunk;
- `posenc_flex`: `flex_attention` with the bias as a score_mod over a table of relative distances (compiled);
- `posenc_flash`: flash-attn's `alibi_slopes` (ALiBi, CUDA, fp16/bf16, no padding);
- `posenc_eager`: the textbook reference, which returns the attention weights.

None of them ever allocates a (B, H, Q, K) bias. Shape legend: B batch, H heads, Q queries, K keys, D head dim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from .posenc_schemes import alibi_slopes, get_scheme, t5_relative_position_bucket

# --------------------------------------------------------------------------------------------------------------------
# Bias providers
# --------------------------------------------------------------------------------------------------------------------


class RelativeBias(nn.Module):
    """A bias that depends on the distance `key - query` only. Subclasses give `by_distance`; the (Q, K) block of any
    query and key positions, and the flex path's table of distances, both come from it.

    `heads` is the number of query heads of the call (architectures may change it per layer); `causal` says whether
    the call attends one way (decoders) or both (encoders), as the mask function found.
    """

    #: calls of the posenc attention functions that used this provider (the adapters check that a forward made some)
    calls = 0

    def forward(
        self, q_positions: torch.Tensor, kv_positions: torch.Tensor, heads: int | None = None, causal: bool = True
    ) -> torch.Tensor:
        """(Q,), (K,) positions -> (H, Q, K) float32 bias."""
        return self.by_distance(kv_positions[None, :] - q_positions[:, None], heads, causal)  # key minus query (T5)

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        """Relative positions `key - query` of any shape S -> (H, *S) float32 bias."""
        raise NotImplementedError


class AlibiBias(RelativeBias):
    """ALiBi: `-slope_h * |i - j|` (Press et al., https://arxiv.org/abs/2108.12409). No parameters.

    `slope_multiplier` scales every slope (for evaluating at lengths other than the training length). The slopes are
    those of the call's head count (`num_heads` when the call does not say), so layers with other head counts get
    the paper's slopes for theirs.
    """

    def __init__(self, num_heads: int, max_bias: float = 8.0, slope_multiplier: float = 1.0):
        super().__init__()
        self.num_heads, self.max_bias, self.slope_multiplier = num_heads, max_bias, slope_multiplier
        self._slopes = {}  # (device, heads) -> (H,) float32; plain attribute, rebuilt on demand (never a meta buffer)

    def slopes(self, device: torch.device, heads: int | None = None) -> torch.Tensor:
        key = (device, heads or self.num_heads)
        if key not in self._slopes:
            self._slopes[key] = (alibi_slopes(key[1], self.max_bias) * self.slope_multiplier).to(device)
        return self._slopes[key]

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        slopes = self.slopes(relative.device, heads).view(-1, *(1,) * relative.dim())
        return -slopes * relative.abs().to(torch.float32)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_bias={self.max_bias}, slope_multiplier={self.slope_multiplier}"


class T5RelativeBias(RelativeBias):
    """T5's learned bias per (bucket of key - query, head), one table shared by all layers (Raffel et al., 2020).

    Buckets are bidirectional where the call attends both ways (encoders) and one-way for causal calls, unless
    `bidirectional` fixes it."""

    def __init__(
        self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool | None = None
    ):
        super().__init__()
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        if heads is not None and heads != self.num_heads:
            raise ValueError(
                f"posenc 't5_bias' has a table for {self.num_heads} heads, but an attention layer has {heads}: "
                "architectures whose layers differ in head count cannot share T5's table; use alibi"
            )
        bidirectional = (not causal) if self.bidirectional is None else self.bidirectional
        buckets = t5_relative_position_bucket(relative, bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).movedim(-1, 0).float()

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"


def score_bias_module(posenc: dict, num_heads: int) -> nn.Module | None:
    """The bias provider for a `bias`-site scheme, or None for every other scheme."""
    if posenc["type"] == "alibi":
        return AlibiBias(num_heads, posenc["max_bias"], posenc["slope_multiplier"])
    if posenc["type"] == "t5_bias":
        return T5RelativeBias(num_heads, posenc["num_buckets"], posenc["max_distance"])
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


# --------------------------------------------------------------------------------------------------------------------
# Cache coordinates: the mask function
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Denormals
# --------------------------------------------------------------------------------------------------------------------


class DenormalFlush:
    """Flush denormal floats to zero on every CPU thread for the span of one attention call, then restore.

    A bias that falls with distance drives many softmax weights `exp(score - max)` into the fp32 denormal range
    (below 1.2e-38), where x86 arithmetic slows down by orders of magnitude: causal ALiBi on SDPA ran 2.6x slower for
    that alone. Flushing those weights to zero changes the output by less than 1e-38 relative to a row's sum, i.e. not
    at all in fp32. `torch.set_flush_denormal` sets the calling thread only, and the OpenMP workers that run the
    kernel keep their own state; with libgomp (PyTorch's Linux builds) every thread of the team gets the flushing
    floating-point environment through one `GOMP_parallel` call of `fesetenv`. Elsewhere only the calling thread is
    set. A no-op for tensors that are not on the CPU. Set `DenormalFlush.enabled = False` to keep IEEE denormals.
    """

    enabled = True

    def __init__(self):
        self._team = None  # (GOMP_parallel, fesetenv, fegetenv) or () when unavailable; resolved on first use

    def _resolve(self):
        if self._team is None:
            self._team = ()
            try:
                if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
                    with open("/proc/self/maps") as maps:
                        paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
                    # torch's own runtime first: torch.compile'd kernels may load the system's libgomp beside it
                    torch_lib = str(Path(torch.__file__).parent)
                    path = min(paths, key=lambda candidate: not candidate.startswith(torch_lib))
                    gomp, libm = ctypes.CDLL(path), ctypes.CDLL(ctypes.util.find_library("m"))
                    gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    gomp.GOMP_parallel.restype = None
                    libm.fegetenv.argtypes = [ctypes.c_void_p]
                    self._team = (gomp.GOMP_parallel, ctypes.cast(libm.fesetenv, ctypes.c_void_p), libm.fegetenv)
            except (OSError, ValueError, AttributeError, TypeError):  # no libgomp or libm: the calling thread only
                self._team = ()
        return self._team

    @staticmethod
    def flushing() -> bool:
        """Whether the calling thread flushes denormals (a denormal operand reads as zero)."""
        return (torch.full((), 1e-39) * 1.0).item() == 0.0

    def _set_team(self, environment) -> None:
        parallel, fesetenv, _ = self._team
        parallel(fesetenv, environment, torch.get_num_threads(), 0)

    def enter(self, where: torch.Tensor | torch.device):
        """Start flushing on every thread (for a tensor or device on the CPU); returns the token `exit` needs (None
        when nothing was changed)."""
        device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
        if not self.enabled or device.type != "cpu" or self.flushing():
            return None
        team = self._resolve()
        if not team:
            torch.set_flush_denormal(True)
            return "thread"
        before, after = ctypes.create_string_buffer(256), ctypes.create_string_buffer(256)  # >= sizeof(fenv_t)
        team[2](before)
        torch.set_flush_denormal(True)
        team[2](after)
        self._set_team(after)
        return before

    def exit(self, token) -> None:
        if token is None:
            return
        if isinstance(token, str):
            torch.set_flush_denormal(False)
        else:
            self._set_team(token)

    def around(self, function, *tensors):
        """`function(*tensors)` with denormals flushed, in its forward and in its backward. `function` must reach every
        tensor that needs a gradient through its arguments. Under torch.compile it runs as it is (no flush)."""
        if not self.enabled or tensors[0].device.type != "cpu" or torch.compiler.is_compiling():
            return function(*tensors)
        token = self.enter(tensors[0])
        try:
            output = function(*tensors)
        finally:
            self.exit(token)
        inputs = [t for t in tensors if t.requires_grad]
        if output.grad_fn is not None and inputs:
            self._flush_backward(output.grad_fn, inputs)
        return output

    def _flush_backward(self, node, inputs: list) -> None:
        """Flush from the moment the output's gradient arrives until every input's gradient is computed (SDPA's math
        fallback, used with dropout, is several autograd nodes), and at the latest until the backward pass ends."""
        state, count = {}, len(inputs)  # the closures keep the count, not the tensors

        def finish(*_):
            if "token" in state:
                self.exit(state.pop("token"))

        def start(grad_outputs):
            if "token" not in state:
                state["token"], state["left"] = self.enter(torch.device("cpu")), count
                torch.autograd.Variable._execution_engine.queue_callback(finish)  # the safety net

        def arrived(grad):
            state["left"] = state.get("left", 1) - 1
            if state["left"] == 0:
                finish()

        node.register_prehook(start)  # the hooks hold no tensor: nothing outlives what autograd itself keeps
        for tensor in inputs:
            tensor.register_hook(arrived)


denormal_flush = DenormalFlush()


# --------------------------------------------------------------------------------------------------------------------
# Attention paths
# --------------------------------------------------------------------------------------------------------------------


#: keywords an attention function is called with that the posenc kernels may take as they are: what they carry is
#: in the ScoreBiasMask (causality, sliding windows, cache positions) or does not concern the scores
PASSIVE_KWARGS = frozenset(
    {
        "position_ids",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "past_key_values",
        "cache",  # the KV cache's name from transformers 5.24 (already applied to the keys and values)
        "cache_position",
        "sliding_window",
        "is_causal",
        "encoder_hidden_states",
        "layer_idx",
        "return_dict",
        "output_router_logits",
        "num_items_in_batch",
        "deterministic",  # flash-attn's deterministic backward; the other kernels are deterministic already
        "inputs_embeds",  # a head's forward arguments, handed down to every layer by some models (ESM C)
    }
)
#: keywords that change the scores, which every posenc kernel applies or refuses: see `ScoreExtras`
SCORE_KWARGS = ("softcap", "s_aux", "sinks")


@dataclass(frozen=True)
class ScoreExtras:
    """What an architecture adds to the scores besides the mask and the position bias.

    Attributes:
        softcap: logit soft-capping `softcap * tanh(scores / softcap)` of the scaled q.k scores (Gemma 2), before
            the bias and the mask are added, as the stock eager kernels add the mask.
        sinks: (H,) attention sinks (GPT-OSS, MiMo `s_aux`): one more logit per head in the softmax's denominator,
            whose weight is dropped.
    """

    softcap: float | None = None
    sinks: torch.Tensor | None = None
    #: the direction of the bias (T5's buckets): the attention module's own `is_causal`, which stock SDPA reads too,
    #: where it has one, else the mask function's. Masks made with an extra mask function (ESM C's sequence ids,
    #: EmbeddingGemma's bidirectional Gemma 3) do not say it.
    causal: bool = True

    def __bool__(self) -> bool:
        """Whether the scores need writing out (SDPA cannot take soft-capping or sinks)."""
        return self.softcap is not None or self.sinks is not None


def _call(module: nn.Module, attention_mask, kwargs: dict, count: bool = True) -> tuple[nn.Module, ScoreExtras]:
    """The bias provider and score extras of one attention call, refusing what no posenc kernel can apply: a prepared
    mask that bypasses the cache coordinates, or a keyword the kernels do not know (it would be dropped silently).
    `count`: record the call on the provider (the kernel that computes does; `posenc_auto`, which picks it, not)."""
    provider = getattr(module, "posenc_bias", None)
    scheme = getattr(getattr(module, "config", None), "posenc", {}).get("type")
    if provider is None:
        raise ValueError(
            f"attn_implementation {module.config._attn_implementation!r} is for score-bias schemes (alibi, t5_bias); "
            f"this model's posenc is {scheme!r}"
        )
    if not isinstance(attention_mask, ScoreBiasMask):
        raise ValueError(
            f"posenc {scheme!r} computes its bias from the positions of the cache, but the attention got a prepared "
            f"{type(attention_mask).__name__} mask that bypasses them; pass a 2-D padding mask of shape "
            "(batch, length) instead of a 4-D one"
        )
    unknown = sorted(set(kwargs) - PASSIVE_KWARGS - set(SCORE_KWARGS))
    if unknown:
        raise ValueError(
            f"posenc {scheme!r}: {type(module).__name__} passes {unknown} to its attention function, which the posenc "
            f"kernels do not apply; rather than drop them silently, hf_posenc refuses this architecture with a score "
            f"bias (they apply {', '.join(SCORE_KWARGS)} and take {', '.join(sorted(PASSIVE_KWARGS))} as they are)"
        )
    if count and not torch.compiler.is_compiling():
        provider.calls += 1
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    own = getattr(module, "is_causal", None)
    causal = own if isinstance(own, bool) else attention_mask.causal
    return provider, ScoreExtras(kwargs.get("softcap"), sinks, causal)


def _query_meets_key(masks: ScoreBiasMask, index: int) -> bool:
    """Whether query `index` sits at key `index`: 0 for a prefill (nothing cached before it), -1 for queries ending
    at the last key (no unfilled StaticCache slots after them). Under torch.compile the positions are not known while
    tracing, so this answers False, which sends the call to a path that is right for any positions."""
    if torch.compiler.is_compiling():
        return False
    return int(masks.q_positions[index]) == int(masks.kv_positions[index])


#: bytes one query chunk's fp32 bias-and-mask block (B x H x chunk x K) may take in posenc_sdpa
BIAS_BLOCK_BYTES = 64 * 2**20


#: bytes the column trick's extended q, k, v and output may take at once (as many heads per call as fit): at 16k
#: tokens and 12 heads, 2 heads per call keep its extra memory near causal SDPA's output; see the README
COLUMN_BLOCK_BYTES = 40 * 2**20


def _alibi_column_attention(query, key, value, provider, masks: ScoreBiasMask, scaling, dropout):
    """Causal ALiBi on plain causal SDPA, no mask and no (Q, K) tensor: -m(i-j) equals m*j up to a per-row constant,
    which softmax ignores, so one extra head-dim column (m_h in q, j/scale in k, 0 in v) adds it exactly. The key
    column does not depend on the head, so grouped keys stay grouped.

    In inference the extended copies exist for one group of heads at a time (at most `COLUMN_BLOCK_BYTES`, at least
    one key head), and each group's output goes straight into the (B, Q, H, D) result. Exact up to the fp32 rounding
    of the column (which reaches m*K/2: relative error ~1e-4 at 8k tokens for slope 1/2), so posenc_sdpa uses it for
    fp32 inputs without padding only.
    """
    batch, heads, q_length, head_dim = query.shape
    kv_heads = key.shape[1]
    kv_positions = masks.kv_positions
    if key.shape[2] > q_length:  # StaticCache prefill: the keys past the queries are not filled yet
        key, value, kv_positions = key[:, :, :q_length], value[:, :, :q_length], kv_positions[:q_length]
    value_dim = value.shape[-1]  # multi-head latent attention has values narrower than queries and keys
    # one width for q, k and v (the fused kernels need it), a multiple of 8 (they need that too)
    width = max(head_dim + 1, value_dim) + (-max(head_dim + 1, value_dim) % 8)
    # positions counted from the middle key halve the column's magnitude (its fp32 rounding is the trick's only
    # error); a per-row shift changes nothing after softmax
    column = ((kv_positions - kv_positions[len(kv_positions) // 2]).to(torch.float32) / scaling).to(key.dtype)
    slopes = provider.slopes(query.device, heads).to(query.dtype)
    group = heads // kv_heads  # query heads per key head

    def attention(q, k, v):
        return nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
        )

    output = query.new_empty(batch, q_length, heads, value_dim)
    # Without autograd, one set of extended buffers serves every group of heads, so groups bound the extra memory.
    # With it, SDPA keeps every group's extended inputs for the backward anyway: one call, which is faster.
    reuse = not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
    per_kv_head = batch * width * query.element_size() * (2 * group * q_length + 2 * key.shape[2])  # q, out, k, v
    calls = -(-kv_heads // max(1, COLUMN_BLOCK_BYTES // per_kv_head)) if reuse else 1
    step = -(-kv_heads // calls)  # key heads per call, balanced
    buffers = None
    for first in range(0, kv_heads, step):
        kv_rows, q_rows = slice(first, first + step), slice(first * group, (first + step) * group)
        q, k, v = query[:, q_rows], key[:, kv_rows], value[:, kv_rows]
        if buffers is None or not reuse:
            buffers = [t.new_zeros(*t.shape[:3], width) for t in (q, k, v)]  # the padding columns stay zero
        extended_q, extended_k, extended_v = (b[:, : t.shape[1]] for b, t in zip(buffers, (q, k, v)))
        extended_q[..., :head_dim] = q
        extended_q[..., head_dim] = slopes[q_rows, None]
        extended_k[..., :head_dim] = k
        extended_k[..., head_dim] = column
        extended_v[..., :value_dim] = v
        result = denormal_flush.around(attention, extended_q, extended_k, extended_v)
        output[:, :, q_rows] = result[..., :value_dim].transpose(1, 2)
        del q, k, v, extended_q, extended_k, extended_v, result  # before the next group allocates its own
    return output, None


def _scores_attention(query, key, value, bias, allowed, scaling, dropout, training, extras: ScoreExtras):
    """Attention with the scores written out, in float32: `q.k * scaling`, soft-capped, plus the (H, Q, K) bias,
    masked where `allowed` is False, softmax (with the sinks in its denominator), dropout. (B, H, Q, D) q and
    (B, H, K, D) k, v with as many heads -> (B, H, Q, D) output in value's dtype and the (B, H, Q, K) weights."""
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling  # (B, H, Q, K) fp32
    if extras.softcap is not None:
        scores = torch.tanh(scores / extras.softcap) * extras.softcap
    scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    if extras.sinks is not None:
        sinks = extras.sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        combined = torch.cat([scores, sinks], dim=-1)
        weights = nn.functional.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    else:
        weights = nn.functional.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights.to(value.dtype), p=dropout, training=training)
    return torch.matmul(weights, value), weights


def _chunked_bias_attention(query, key, value, provider, masks: ScoreBiasMask, scaling, dropout, extras=ScoreExtras()):
    """SDPA with the bias, one block of query rows at a time: only a (B, H, chunk, K) bias exists, never (Q, K).

    The bias is fp32 and so is each block's attention (inputs upcast), so a bf16 model keeps an exact bias. Score
    extras (soft-capping, sinks), which SDPA cannot take, go through `_scores_attention` block by block.
    """
    batch, heads, q_length, _ = query.shape
    key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    compute = torch.float32
    key32, value32 = key.to(compute), value.to(compute)
    chunk = max(1, BIAS_BLOCK_BYTES // (4 * batch * heads * key.shape[2]))

    def attention(rows_query, key32, value32, bias):
        return nn.functional.scaled_dot_product_attention(
            rows_query, key32, value32, attn_mask=bias, dropout_p=dropout, scale=scaling
        )

    outputs = []
    for start in range(0, q_length, chunk):
        rows = slice(start, start + chunk)
        bias = provider(masks.q_positions[rows], masks.kv_positions, heads, extras.causal)[None]  # (1, H, c, K) fp32
        allowed = masks.block(rows)
        rows_query = query[:, :, rows].to(compute)
        if extras:
            output, _ = _scores_attention(
                rows_query, key32, value32, bias, allowed, scaling, dropout, dropout > 0, extras
            )
            outputs.append(output.to(query.dtype))
            continue
        if allowed is not None:
            bias = bias.masked_fill(~allowed, torch.finfo(compute).min)
        outputs.append(denormal_flush.around(attention, rows_query, key32, value32, bias).to(query.dtype))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def posenc_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Score-bias attention on SDPA without a (Q, K) bias: the ALiBi column trick where it is exact and fastest
    (causal, fp32, no padding, more than one query, no score extras), query-chunked blocks everywhere else (see
    `hf-posenc bench`)."""
    provider, extras = _call(module, attention_mask, kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    masks = attention_mask
    # the column trick needs SDPA's is_causal alignment: queries and keys both start at the first position (a
    # prefill; keys past the queries are unfilled StaticCache slots). A decode step (one query) is faster chunked
    # anyway: one (H, K) bias row instead of extended copies of the whole cache.
    column_trick_exact = isinstance(provider, AlibiBias) and masks.mask is None and masks.causal and not extras
    if column_trick_exact and query.dtype == torch.float32 and query.shape[2] > 1 and _query_meets_key(masks, 0):
        return _alibi_column_attention(query, key, value, provider, masks, scaling, dropout)
    return _chunked_bias_attention(query, key, value, provider, masks, scaling, dropout, extras)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


#: compile flex_attention (its fused kernel); uncompiled, flex materialises the scores (tests use it on small inputs)
FLEX_COMPILE = True


def posenc_flex_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flex_attention with the bias as a score_mod: `score + table[h, j - i + Q - 1]`, the provider's fp32 bias of
    every relative distance the call can see ((H, Q + K - 1), not (Q, K)). Masks are block masks: causal from the
    positions, or transformers' boolean mask (padding, windows) when there is one.

    Soft-capping goes into the score_mod; attention sinks do not (use posenc_sdpa, which `posenc_auto` picks for them).
    torch 2.13's flex_attention has no backward on the CPU: training on the CPU runs posenc_sdpa.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    provider, extras = _call(module, attention_mask, kwargs)
    masks = attention_mask
    if extras.sinks is not None:
        raise ValueError("attn_implementation 'posenc_flex' cannot take attention sinks (s_aux); use 'posenc_sdpa'")
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise ValueError(
            "attn_implementation 'posenc_flex' cannot train on the CPU: torch's flex_attention has no CPU backward; "
            "use 'posenc_sdpa' (the default 'posenc_auto' picks it)"
        )
    if dropout and module.training:
        raise ValueError("attn_implementation 'posenc_flex' has no attention dropout; use 'posenc_sdpa'")
    batch, heads, q_length, _ = query.shape
    k_length = key.shape[2]
    q_offset, kv_offset = int(masks.q_positions[0]), int(masks.kv_positions[0])
    first = kv_offset - (q_offset + q_length - 1)  # the smallest key - query distance
    distances = torch.arange(first, first + q_length + k_length - 1, device=query.device)
    table = provider.by_distance(distances, heads, extras.causal)
    offset, softcap = q_length - 1, extras.softcap

    def score_mod(score, b, h, q_index, kv_index):
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        return score + table[h, kv_index - q_index + offset]

    if masks.mask is not None:
        allowed = masks.mask

        def mask_mod(b, h, q_index, kv_index):
            return allowed[b if allowed.shape[0] > 1 else 0, 0, q_index, kv_index]

        block_mask = create_block_mask(mask_mod, allowed.shape[0], None, q_length, k_length, device=query.device)
    elif masks.causal:
        shift = q_offset - kv_offset

        def mask_mod(b, h, q_index, kv_index):
            return q_index + shift >= kv_index

        block_mask = create_block_mask(mask_mod, None, None, q_length, k_length, device=query.device)
    else:
        block_mask = None
    function = _compiled_flex() if FLEX_COMPILE else flex_attention
    output = function(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=query.shape[-1] ** -0.5 if scaling is None else scaling,
        enable_gqa=key.shape[1] != heads,
    )
    return output.transpose(1, 2).contiguous(), None


def flash_attn_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


def _flash_takes_softcap() -> bool:
    import inspect

    from flash_attn import flash_attn_func

    return "softcap" in inspect.signature(flash_attn_func).parameters


def flash_applies(query, provider, masks: ScoreBiasMask, extras: ScoreExtras = ScoreExtras()) -> bool:
    """flash-attn's `alibi_slopes` computes `-m|i + K - Q - j|`: ALiBi without a mask, queries ending at the last key,
    on CUDA in fp16/bf16, without sinks (soft-capping where the installed flash-attn takes it)."""
    return (
        isinstance(provider, AlibiBias)
        and masks.mask is None
        and query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and _query_meets_key(masks, -1)
        and (masks.causal or len(masks.q_positions) == len(masks.kv_positions))
        and extras.sinks is None
        and (extras.softcap is None or _flash_takes_softcap())
    )


def posenc_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash-attn with `alibi_slopes`: the bias is computed inside the kernel (ALiBi only)."""
    provider, extras = _call(module, attention_mask, kwargs)
    masks = attention_mask
    if not flash_applies(query, provider, masks, extras):
        raise ValueError(
            "attn_implementation 'posenc_flash' runs ALiBi on CUDA in fp16/bf16 without a padding mask, window or "
            "attention sinks, with the queries ending at the last key; got posenc "
            f"{module.config.posenc['type']!r}, {query.device.type} {query.dtype}, mask "
            f"{'present' if masks.mask is not None else 'none'}, "
            f"sinks {'present' if extras.sinks is not None else 'none'}; "
            "use 'posenc_auto' or 'posenc_sdpa'"
        )
    from flash_attn import flash_attn_func

    options = {} if extras.softcap is None else {"softcap": extras.softcap}
    output = flash_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=dropout if module.training else 0.0,
        softmax_scale=scaling,
        causal=masks.causal,
        alibi_slopes=provider.slopes(query.device, query.shape[1]).float(),
        **options,
    )
    return output, None  # (B, Q, H, D) already


def choose_path(
    query,
    provider,
    masks: ScoreBiasMask,
    dropout: float,
    flash_available: bool,
    extras: ScoreExtras = ScoreExtras(),
    value_dim: int | None = None,
) -> str:
    """The path `posenc_auto` takes for one call (measured in `hf-posenc bench`, see the README):

    - CUDA: flash-attn where it applies and is installed, else compiled flex_attention for prefill and training
      (no dropout, no sinks, head widths of 16 or more), else SDPA (decode steps: one query row needs no fused
      kernel);
    - CPU: SDPA (the ALiBi column trick or chunked blocks): flex has no CPU backward, and for inference it measured
      slower than the column trick and needs a compiler.
    """
    value_dim = query.shape[-1] if value_dim is None else value_dim
    if query.device.type == "cuda":
        if flash_available and flash_applies(query, provider, masks, extras):
            return "flash"
        if query.shape[2] > 1 and not dropout and extras.sinks is None and min(query.shape[-1], value_dim) >= 16:
            return "flex"  # compiled flex needs head widths of at least 16 (measured on an H200, torch 2.11)
    return "sdpa"


def posenc_auto_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The default for score-bias schemes: the fastest exact path for this call's device, dtype and mask."""
    provider, extras = _call(module, attention_mask, kwargs, count=False)
    training_dropout = dropout if module.training else 0.0
    path = choose_path(
        query, provider, attention_mask, training_dropout, flash_attn_available(), extras, value.shape[-1]
    )
    return BIAS_KERNELS[path](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def posenc_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Textbook attention with the bias: the reference. Scores and softmax in float32; returns the weights."""
    provider, extras = _call(module, attention_mask, kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    masks = attention_mask
    bias = provider(masks.q_positions, masks.kv_positions, query.shape[1], extras.causal)[None]  # (1, H, Q, K) fp32
    output, weights = _scores_attention(
        query, key, value, bias, masks.block(slice(None)), scaling, dropout, module.training, extras
    )
    return output.transpose(1, 2).contiguous(), weights  # (B, Q, H, D)


# One name per kernel, registered for both the attention and the mask interface: a name known only to the attention
# interface would make mask preparation exit early and drop the padding mask.
BIAS_KERNELS = {
    "auto": posenc_auto_attention,
    "sdpa": posenc_sdpa_attention,
    "flex": posenc_flex_attention,
    "flash": posenc_flash_attention,
    "eager": posenc_eager_attention,
}
#: posenc kernel -> the stock attn_implementation a user may name instead (None: the default when none is named)
STOCK_NAMES = {"auto": None, "sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2", "eager": "eager"}
for _kernel, _function in BIAS_KERNELS.items():
    AttentionInterface.register(f"posenc_{_kernel}", _function)
    AttentionMaskInterface.register(f"posenc_{_kernel}", posenc_mask)
