"""The score-bias site: the bias providers (ALiBi, T5) and the attention functions that add their bias inside attention.

Part of the `trust_remote_code` closure: imports only torch, transformers and sibling files.

One mask function, `posenc_mask`, hands every attention function the cache coordinates of queries and keys, so a
relative bias stays right with a KV cache, padding and sliding windows. The attention functions, each registered
under its own name with both AttentionInterface and AttentionMaskInterface:

- `posenc_auto` (the default): picks one of the paths below for each call, by device, dtype and what is installed;
- `posenc_sdpa`: plain SDPA. Causal ALiBi in fp32 without padding runs as plain `is_causal` SDPA with one extra
  head-dim column (no mask at all); everything else runs query-chunked, with an fp32 bias block per chunk;
- `posenc_flex`: `flex_attention` with the bias as a score_mod: a formula of the positions (ALiBi, FIRE) or a table
  of relative distances (compiled);
- `posenc_flash`: flash-attn's `alibi_slopes` (ALiBi, CUDA, fp16/bf16, no padding);
- `posenc_eager`: the textbook reference, which returns the attention weights.

None of them ever allocates a (B, H, Q, K) bias. Shape legend: B batch, H heads, Q queries, K keys, D head dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from .posenc_flush import blockwise, denormal_flush
from .posenc_schemes import alibi_slopes, get_scheme, t5_relative_position_bucket

# --------------------------------------------------------------------------------------------------------------------
# Bias providers
# --------------------------------------------------------------------------------------------------------------------


class RelativeBias(nn.Module):
    """A bias on the attention scores computed from the positions of queries and keys. Subclasses whose bias depends
    on the distance `key - query` only give `by_distance`; the (Q, K) block of any query and key positions, and the
    flex path's table of distances, both come from it. A bias that also depends on the query's own position (FIRE)
    sets `distance_only = False` and gives `forward` and `flex_bias` instead.

    `heads` is the number of query heads of the call (architectures may change it per layer); `causal` says whether
    the call attends one way (decoders) or both (encoders), as the mask function found.

    On flex_attention the bias is gathered from the table of distances inside the score_mod, except for providers
    that set `flex_analytic` and give `flex_bias`: a formula of the positions flex evaluates in its kernel.
    """

    #: calls of the posenc attention functions that used this provider (the adapters check that a forward made some)
    calls = 0
    #: the position ids of the forward in progress, set by the model's position-free rotary modules
    position_ids: torch.Tensor | None = None
    #: whether the bias is a function of `key - query` alone (a table by distance serves every query)
    distance_only = True
    #: whether the chunked path gathers each block's bias from a table by distance (cheaper than computing it per
    #: (query, key) pair for anything costlier than one multiply: a learned table, a log, a power, a cosine sum)
    tabulate = True
    #: floats of scratch memory the bias takes per (query, key) pair beyond its H outputs (FIRE's hidden layer)
    scratch_per_pair = 0
    #: one provider for every layer (True), or one per layer (its paper learns the parameters per layer)
    shared_across_layers = True
    #: whether flex computes the bias from the positions inside its kernel (`flex_bias`) rather than gathering it from
    #: a table of distances: for a formula as cheap as a load (ALiBi), and for a bias that is not a function of the
    #: distance alone (FIRE)
    flex_analytic = False

    def flex_bias(self, heads: int, device: torch.device, causal: bool):
        """A function `(head, query position, key position) -> bias` of scalar tensors for flex's score_mod, bound to
        a call of `heads` heads on `device` (providers that set `flex_analytic`)."""
        raise NotImplementedError(f"{type(self).__name__} gives no analytic flex bias")

    @classmethod
    def shares(cls, posenc: dict) -> bool:
        """Whether a normalised `posenc` of this scheme has one provider for every layer."""
        return cls.shared_across_layers

    @classmethod
    def from_posenc(cls, posenc: dict, num_heads: int) -> RelativeBias:
        """The provider of a normalised `posenc` of this scheme, for layers of `num_heads` query heads."""
        return cls(num_heads, **{key: value for key, value in posenc.items() if key != "type"})

    def forward(
        self, q_positions: torch.Tensor, kv_positions: torch.Tensor, heads: int | None = None, causal: bool = True
    ) -> torch.Tensor:
        """(Q,), (K,) positions -> (H, Q, K) float32 bias; (B, Q), (B, K) positions (each row's own) -> (B, H, Q, K)."""
        relative = kv_positions[..., None, :] - q_positions[..., :, None]  # key minus query (T5)
        bias = self.by_distance(relative, heads, causal)
        return bias if relative.dim() == 2 else bias.movedim(0, 1)

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        """Relative positions `key - query` of any shape S -> (H, *S) float32 bias."""
        raise NotImplementedError

    def before_call(self) -> None:
        """Called by every posenc kernel before it uses the provider (KERPLE projects its parameters here)."""

    def check_heads(self, heads: int | None) -> None:
        """A provider with parameters per head serves calls of that many heads only."""
        if heads is not None and heads != self.num_heads:
            scheme = type(self).scheme
            raise ValueError(
                f"posenc {scheme!r} has parameters for {self.num_heads} heads, but an attention layer has {heads}: "
                f"architectures whose layers differ in head count cannot share {scheme}'s parameters; use alibi"
            )


#: the bias provider of each score-bias scheme
BIAS_PROVIDERS: dict[str, type[RelativeBias]] = {}


def register_bias_provider(cls: type[RelativeBias]) -> type[RelativeBias]:
    """Make `cls` the provider of the score-bias scheme `cls.scheme` (built by `cls.from_posenc`)."""
    BIAS_PROVIDERS[cls.scheme] = cls
    return cls


@register_bias_provider
class AlibiBias(RelativeBias):
    """ALiBi: `-slope_h * |i - j|` (Press et al., https://arxiv.org/abs/2108.12409). No parameters.

    `slope_multiplier` scales every slope (for evaluating at lengths other than the training length). The slopes are
    those of the call's head count (`num_heads` when the call does not say), so layers with other head counts get
    the paper's slopes for theirs.
    """

    scheme = "alibi"
    tabulate = False  # one multiply per pair: no cheaper from a table
    flex_analytic = True  # nor on flex: the slope times the distance, with no table to load

    def __init__(self, num_heads: int, max_bias: float = 8.0, slope_multiplier: float = 1.0):
        super().__init__()
        self.num_heads, self.max_bias, self.slope_multiplier = num_heads, max_bias, slope_multiplier
        self._slopes = {}  # (device, heads) -> (H,) float32; plain attribute, rebuilt on demand (never a meta buffer)

    def slopes(self, device: torch.device, heads: int | None = None) -> torch.Tensor:
        key = (device, heads or self.num_heads)
        if key not in self._slopes:
            # a normal tensor even when first asked for under inference_mode (a pipeline call): a later training step
            # may save it for its backward (flex saves the tensors its score_mod captures)
            with torch.inference_mode(False):
                self._slopes[key] = (alibi_slopes(key[1], self.max_bias) * self.slope_multiplier).to(device)
        return self._slopes[key]

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        slopes = self.slopes(relative.device, heads).view(-1, *(1,) * relative.dim())
        return -slopes * relative.abs().to(torch.float32)

    def flex_bias(self, heads: int, device: torch.device, causal: bool):
        slopes = self.slopes(device, heads)

        def bias(head, q_position, kv_position):
            return -slopes[head] * (kv_position - q_position).abs().to(torch.float32)

        return bias

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_bias={self.max_bias}, slope_multiplier={self.slope_multiplier}"


class NoBias(RelativeBias):
    """The layers of a per-layer pattern that add no bias (RoPE, NoPE) but still run on the posenc kernels, which
    their windows and temperature need (or a neighbour's bias): a zero bias, which posenc_sdpa skips altogether."""

    scheme = "none"
    tabulate = False

    def __init__(self, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        return relative.new_zeros((heads or self.num_heads, *relative.shape), dtype=torch.float32)


@register_bias_provider
class T5RelativeBias(RelativeBias):
    """T5's learned bias per (bucket of key - query, head), one table shared by all layers (Raffel et al., 2020).

    Buckets are bidirectional where the call attends both ways (encoders) and one-way for causal calls, unless
    `bidirectional` fixes it."""

    scheme = "t5_bias"

    def __init__(
        self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool | None = None
    ):
        super().__init__()
        self.num_heads, self.num_buckets, self.max_distance = num_heads, num_buckets, max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        self.check_heads(heads)
        bidirectional = (not causal) if self.bidirectional is None else self.bidirectional
        buckets = t5_relative_position_bucket(relative, bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).movedim(-1, 0).float()

    def extra_repr(self) -> str:
        return f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"


def _by_table(relative: torch.Tensor, function) -> torch.Tensor:
    """`function(distances)` (H, N) evaluated once per distinct distance of `relative` and gathered to (H, *S): the
    bias of a (Q, K) block costs Q + K - 1 evaluations instead of Q * K. Traced code evaluates every element (no
    host-side lengths)."""
    if torch.compiler.is_compiling() or relative.numel() < 2 or relative.shape[:-1].numel() == 1:
        # traced, or a single row of distances (the chunked path's and flex's tables): already one per distance
        return function(relative.reshape(-1)).reshape(-1, *relative.shape)
    low, high = int(relative.min()), int(relative.max())
    table = function(torch.arange(low, high + 1, device=relative.device))  # (H, high - low + 1)
    return table[:, relative - low]


@register_bias_provider
class KerpleBias(RelativeBias):
    """KERPLE (Chi et al., 2022, https://arxiv.org/abs/2205.09921): a conditionally positive definite kernel of the
    distance, `-r1 * log(1 + r2 * |i - j|)` (log variant) or `-r1 * |i - j| ** r2` (power variant), with learned
    r1, r2 per head, one set for the whole model (the paper's code builds one module and hands it to every layer).

    As in the paper's code (chijames/KERPLE): both are kept at least 0.01, the power variant's exponent r2 at most 2
    (past it the kernel is no longer conditionally positive definite), by projecting them into that range in place
    before each attention call (`before_call`; an optimizer needs no hook); log starts with r1 uniform in (0, 2) and r2
    in (0, 1), power with r1 in (0, 1) and the exponent r2 in (0, 2)."""

    scheme = "kerple"
    EPS = 1e-2

    def __init__(self, num_heads: int, variant: str = "log"):
        super().__init__()
        self.num_heads, self.variant = num_heads, variant
        self.r1 = nn.Parameter(torch.empty(num_heads))
        self.r2 = nn.Parameter(torch.empty(num_heads))
        self.posenc_init()

    def posenc_init(self) -> None:
        """The paper's initialisation (transformers' `init` functions: tensors a checkpoint loaded are kept)."""
        from transformers import initialization as init

        log = self.variant == "log"
        init.uniform_(self.r1, 0.0, 2.0 if log else 1.0)
        init.uniform_(self.r2, 0.0, 1.0 if log else 2.0)

    def constrained(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r1, r2) as the bias uses them: clamped into the paper's range (where `before_call` has projected them
        already; traced code, which does not project in place, uses the clamped values)."""
        return self.r1.clamp(min=self.EPS).float(), self.r2.clamp(min=self.EPS, max=self.r2_max).float()

    @property
    def r2_max(self) -> float | None:
        """The power variant's exponent stays at most 2; the log variant's r2 has no upper bound."""
        return 2.0 if self.variant == "power" else None

    def before_call(self) -> None:
        """The paper's projection: parameters outside the range are set to its bound, in place, before an attention
        call uses them (the paper's code does it at the start of each forward), so that after an optimizer step
        pushed one past a bound, the next gradient in the other direction moves it back at once. Only where a value
        is out of range: the first call of a forward projects, before any graph holds the parameters."""
        if torch.compiler.is_compiling():
            return
        with torch.no_grad():
            for param, upper in ((self.r1, None), (self.r2, self.r2_max)):
                if bool((param < self.EPS).any()) or (upper is not None and bool((param > upper).any())):
                    param.clamp_(min=self.EPS, max=upper)

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        self.check_heads(heads)
        r1, r2 = (r.view(-1, *(1,) * relative.dim()) for r in self.constrained())
        distance = relative.abs().to(torch.float32)
        if self.variant == "log":
            return -r1 * torch.log1p(r2 * distance)
        # distances are integers: 0 ** r2 is 0, and its gradient in r2 (0 * log 0) is taken as 0, not NaN
        positive = distance > 0
        return -r1 * torch.where(positive, distance.clamp(min=1) ** r2, torch.zeros_like(distance))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, variant={self.variant!r}"


@register_bias_provider
class SandwichBias(RelativeBias):
    """Sandwich (Chi et al., 2023, https://arxiv.org/abs/2212.10356): the inner product of two sinusoidal position
    embeddings of width `dim` (the paper's d-bar, 128), `sum_k cos(|i - j| * 10000**(-2k/dim))` for k < dim/2, minus
    its value at distance 0 (dim/2: 0 at distance 0, negative beyond, a per-head constant softmax ignores), divided
    by the head's ratio `8h/H` (h = 1..H) as ALiBi's slopes spread the heads. No parameters. The table of distances
    is computed in float64 and rounded once."""

    scheme = "sandwich"

    def __init__(self, num_heads: int, dim: int = 128):
        super().__init__()
        self.num_heads, self.dim = num_heads, dim

    def ratios(self, heads: int, device) -> torch.Tensor:
        return torch.arange(1, heads + 1, device=device, dtype=torch.float64) * 8.0 / heads

    def by_distance(self, relative: torch.Tensor, heads: int | None = None, causal: bool = True) -> torch.Tensor:
        heads = heads or self.num_heads
        dtype = torch.float32 if relative.device.type == "mps" else torch.float64

        def table(distances: torch.Tensor) -> torch.Tensor:  # (N,) -> (H, N)
            frequencies = 10000.0 ** (-torch.arange(0, self.dim, 2, device=distances.device, dtype=dtype) / self.dim)
            products = torch.cos(distances.abs().to(dtype)[:, None] * frequencies).sum(-1) - self.dim / 2
            return (products[None] / self.ratios(heads, distances.device).to(dtype)[:, None]).to(torch.float32)

        return _by_table(relative, table)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dim={self.dim}"


@register_bias_provider
class FireBias(RelativeBias):
    """FIRE (Li et al., 2024, https://arxiv.org/abs/2310.04418): a small MLP of the progressively normalised
    log distance, `b(i, j) = f(psi(i - j) / psi(max(L, i)))` with `psi(x) = log(c x + 1)`, one output per head.

    As the paper's reference code: f is Linear(1, hidden) -> ReLU -> Linear(hidden, H) with torch's default
    initialisation, hidden 32; c is learned (starting at 0.1); the threshold L is `|multiplier| * init_threshold`
    with a learned multiplier starting at 1 (init_threshold 512); psi takes |c x| and the denominator gets 1e-6.
    The bias depends on the query's own position wherever it passes L, so it is not a table of distances: the
    chunked path computes each block's bias pair by pair (no (Q, K) tensor), flex computes it inside the score_mod.
    Encoders (both directions) use |i - j|."""

    scheme = "fire"
    distance_only = False
    tabulate = False
    flex_analytic = True
    EPS = 1e-6

    def __init__(self, num_heads: int, hidden: int = 32, init_threshold: int = 512, shared: bool = False):
        super().__init__()
        self.num_heads, self.hidden, self.init_threshold = num_heads, hidden, init_threshold
        self.shared_across_layers = shared
        self.scratch_per_pair = hidden
        self.w1 = nn.Parameter(torch.empty(hidden))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden))
        self.b2 = nn.Parameter(torch.empty(num_heads))
        # one-element vectors, not 0-dim: FSDP shards every parameter along a dimension and refuses scalars
        self.c = nn.Parameter(torch.empty(1))
        self.threshold_multiplier = nn.Parameter(torch.empty(1))
        self.posenc_init()

    @classmethod
    def shares(cls, posenc: dict) -> bool:
        return posenc["shared"]

    @classmethod
    def from_posenc(cls, posenc: dict, num_heads: int) -> RelativeBias:
        return cls(num_heads, posenc["hidden"], posenc["init_threshold"], posenc["shared"])

    def posenc_init(self) -> None:
        """torch's default Linear initialisation (uniform in +-1/sqrt(fan_in)), c = 0.1, multiplier 1, through
        transformers' `init` functions (tensors a checkpoint loaded are kept)."""
        from transformers import initialization as init

        for weight, fan_in in ((self.w1, 1), (self.b1, 1), (self.w2, self.hidden), (self.b2, self.hidden)):
            init.uniform_(weight, -(fan_in**-0.5), fan_in**-0.5)
        init.constant_(self.c, 0.1)
        init.constant_(self.threshold_multiplier, 1.0)

    def normalised(self, q_positions: torch.Tensor, kv_positions: torch.Tensor, causal: bool) -> torch.Tensor:
        """psi(i - j) / psi(max(L, i)) for broadcastable query and key positions, float32."""
        q, k = q_positions.to(torch.float32), kv_positions.to(torch.float32)
        distance = q - k if causal else (q - k).abs()
        c = self.c.float().reshape(())
        threshold = (self.threshold_multiplier.float().reshape(()) * self.init_threshold).abs()
        numerator = torch.log((c * distance).abs() + 1)
        return numerator / (torch.log((c * torch.maximum(q, threshold)).abs() + 1) + self.EPS)

    def forward(
        self, q_positions: torch.Tensor, kv_positions: torch.Tensor, heads: int | None = None, causal: bool = True
    ) -> torch.Tensor:
        """(Q,), (K,) positions -> (H, Q, K) float32 bias; (B, Q), (B, K) -> (B, H, Q, K)."""
        self.check_heads(heads)
        x = self.normalised(q_positions[..., :, None], kv_positions[..., None, :], causal)  # (..., Q, K)
        hidden = torch.relu(x[..., None] * self.w1.float() + self.b1.float())  # (..., Q, K, hidden)
        bias = hidden @ self.w2.float().T + self.b2.float()  # (..., Q, K, H)
        return bias.movedim(-1, -3)

    def flex_bias(self, heads: int, device: torch.device, causal: bool):
        """The bias of one (head, query position, key position) inside a flex score_mod: the MLP written out over its
        hidden units (scalar code flex fuses into its kernel; no (Q, K) tensor)."""
        self.check_heads(heads)

        def bias(head, q_position, kv_position):
            x = self.normalised(q_position, kv_position, causal)
            w1, b1, w2, b2 = self.w1.float(), self.b1.float(), self.w2.float(), self.b2.float()
            out = b2[head]
            for unit in range(self.hidden):
                out = out + w2[head, unit] * torch.relu(x * w1[unit] + b1[unit])
            return out

        return bias

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, hidden={self.hidden}, init_threshold={self.init_threshold}, "
            f"shared={self.shared_across_layers}"
        )


def score_bias_module(posenc: dict, num_heads: int) -> nn.Module | None:
    """A bias provider for a `bias`-site scheme, or None for every other scheme."""
    if get_scheme(posenc["type"]).site != "bias":
        return None
    if posenc["type"] not in BIAS_PROVIDERS:
        raise NotImplementedError(f"no score-bias module for posenc {posenc['type']!r}")
    return BIAS_PROVIDERS[posenc["type"]].from_posenc(posenc, num_heads)


def bias_per_layer(posenc: dict) -> bool:
    """Whether a scheme learns its bias per layer (FIRE; not T5, KERPLE or FIRE-S, which share one set)."""
    provider = BIAS_PROVIDERS.get(posenc["type"])
    return provider is not None and not provider.shares(posenc)


def score_bias_modules(posenc: dict, num_heads: int, num_layers: int) -> list[nn.Module | None]:
    """The provider of each of `num_layers` layers: one object for all of them where the scheme shares its
    parameters across layers (T5, KERPLE, FIRE-S, and every parameter-free bias), one per layer where its paper learns
    them per layer (FIRE); None for every layer of a scheme without a bias."""
    if bias_per_layer(posenc):
        return [score_bias_module(posenc, num_heads) for _ in range(num_layers)]
    return [score_bias_module(posenc, num_heads)] * num_layers


def refuse_bias_with_cross_attention(config) -> None:
    """Cross-attention layers take the same attention implementation but carry no position bias: refuse the pair."""
    if getattr(config, "add_cross_attention", False) and get_scheme(config.posenc["type"]).site == "bias":
        raise ValueError(
            f"posenc {config.posenc['type']!r} is a self-attention bias and cross-attention cannot take it; with "
            "add_cross_attention=True use learned, sinusoidal, rope or nope"
        )


def attach_score_bias(owner: nn.Module, layers: list[list[nn.Module]], providers: list[nn.Module | None]) -> None:
    """Register the providers on `owner` (their weights are saved there) and point the modules of each layer at
    theirs: `layers[i]` are the modules of layer i (its attention module among them), `providers[i]` its provider.

    One provider for every layer is `owner.position_bias` (T5's table: `position_bias.relative_attention_bias`) and
    reaches every module of `owner`; otherwise each distinct provider is `owner.position_bias[str(i)]` for the first
    layer i that uses it (once: the layers after it that share it hold a reference). Every module of `owner` also gets
    `posenc_biases`, the distinct providers, whose position ids the rotary modules set for each forward."""
    distinct = list({id(p): p for p in providers if p is not None}.values())
    if not distinct or (len(distinct) == 1 and all(p is not None for p in providers)):  # none, or one for all
        owner.position_bias = distinct[0] if distinct else None
        layers = [list(owner.modules())]
        providers = providers[:1]
    else:
        first = {}
        for index, provider in enumerate(providers):
            if provider is not None:
                first.setdefault(id(provider), (index, provider))
        owner.position_bias = nn.ModuleDict({str(index): provider for index, provider in first.values()})
    for module in owner.modules():
        object.__setattr__(module, "posenc_biases", tuple(distinct))
    for modules, provider in zip(layers, providers):
        for module in modules:
            # a reference, not a submodule: a provider is saved once, where it is registered
            object.__setattr__(module, "posenc_bias", provider)


def bias_providers(owner: nn.Module) -> tuple[nn.Module, ...]:
    """The distinct bias providers `attach_score_bias` put on `owner` (none for schemes without a bias)."""
    return getattr(owner, "posenc_biases", ())


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
        q_ids, kv_ids: (B, Q) and (B, K) positions of queries and keys, where the call's `position_ids` are not the
            cache coordinates (a gap, packed documents restarting at 0, left padding): the bias measures distances
            with these, the mask and causality go by the coordinates. None: the coordinates are the positions.
    """

    mask: torch.Tensor | None
    causal: bool
    q_positions: torch.Tensor
    kv_positions: torch.Tensor
    q_ids: torch.Tensor | None = None
    kv_ids: torch.Tensor | None = None
    #: a sliding window of a per-layer pattern's entry: each query sees the keys less than `window` cache positions
    #: before it (as transformers' sliding windows), on top of `mask`
    window: int | None = None

    def with_window(self, window: int | None) -> ScoreBiasMask:
        """These masks with a layer's own sliding window (None: as they are)."""
        if window is None:
            return self
        return dataclasses.replace(self, window=window)

    def key_padding(self) -> torch.Tensor | None:
        """(B, K) True at the keys every query may see, where the mask is exactly causal attention over those keys
        (padding, nothing else: no window, no packing); None otherwise. Computed once per mask (shared by layers)."""
        if "_keep" not in self.__dict__:
            keep = None
            mask = self.mask
            square = mask is not None and mask.shape[-1] == mask.shape[-2] == len(self.q_positions)
            if square and self.window is None and self.causal:
                keep = mask[:, 0, -1, :]  # the last query reaches every earlier key that is not padding
                causal = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
                if not torch.equal(mask[:, 0], causal[None] & keep[:, None, :]):
                    keep = None
            self.__dict__["_keep"] = keep
        return self.__dict__["_keep"]

    def positions_rise(self) -> bool:
        """Whether each row's key positions never decrease (so `|q - k|` is `q - k` wherever causal attention
        reaches): true of the cache coordinates; what the ALiBi column trick needs."""
        return self.kv_ids is None or bool((self.kv_ids.diff(dim=-1) >= 0).all())

    def bias_positions(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions the bias of query rows `rows` measures distances with: (rows,) and (K,), or (B, rows) and
        (B, K) where the rows have positions of their own."""
        if self.q_ids is None:
            return self.q_positions[rows], self.kv_positions
        return self.q_ids[:, rows], self.kv_ids

    def bias(self, provider: RelativeBias, rows: slice, heads: int, causal: bool) -> torch.Tensor:
        """The fp32 bias of query rows `rows`: (1, H, rows, K), or (B, H, rows, K) with positions of each row's own."""
        bias = provider(*self.bias_positions(rows), heads, causal)
        return bias if bias.dim() == 4 else bias[None]

    def with_position_ids(self, position_ids: torch.Tensor | None) -> ScoreBiasMask:
        """These masks, measuring distances with the call's `position_ids` (B or 1, Q) where they are not the cache
        coordinates. The keys of the call are its queries' positions; keys already cached before them sit at their
        cache slot shifted as the row's first query is (what `generate`'s pad-aware position ids give)."""
        if position_ids is None:
            return self
        cached = self.__dict__.get("_with_ids")
        if cached is not None and cached[0] is position_ids:  # the forward's other layers, posenc_auto's kernel
            return cached[1]
        applied = self._apply_position_ids(position_ids)
        if not torch.compiler.is_compiling():
            self.__dict__["_with_ids"] = (position_ids, applied)
        return applied

    def _apply_position_ids(self, position_ids: torch.Tensor) -> ScoreBiasMask:
        if position_ids.dim() == 3:  # multimodal RoPE (temporal, height, width): text tokens carry equal components
            position_ids = position_ids[0]
        q_length = len(self.q_positions)
        if position_ids.dim() != 2 or position_ids.shape[-1] != q_length:
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)} do not match the {q_length} queries of the "
                "attention call; pass (batch, length) position ids"
            )
        position_ids = position_ids.to(self.q_positions.device)
        if not torch.compiler.is_compiling() and torch.equal(position_ids, self.q_positions.expand_as(position_ids)):
            return self  # the coordinates themselves: the batch-free paths apply
        shift = position_ids[:, :1] - self.q_positions[:1]
        kv_ids = self.kv_positions[None, :] + shift  # (B, K)
        # where the queries sit among the keys (a prefill; a StaticCache has unfilled slots after them)
        start = self.q_positions[0] - self.kv_positions[0]
        index = (torch.arange(q_length, device=position_ids.device) + start).expand_as(position_ids)
        kv_ids = kv_ids.scatter(1, index.clamp(0, kv_ids.shape[1] - 1), position_ids)
        return dataclasses.replace(self, q_ids=position_ids, kv_ids=kv_ids)

    def block(self, rows: slice) -> torch.Tensor | None:
        """The boolean mask of query rows `rows` (B or 1, 1, rows, K), built from positions when `mask` is None."""
        if self.mask is not None:
            allowed = self.mask[:, :, rows]
        elif self.causal:
            allowed = (self.q_positions[rows, None] >= self.kv_positions[None, :])[None, None]
        else:
            allowed = None
        if self.window is not None:
            distance = (self.q_positions[rows, None] - self.kv_positions[None, :]).abs()[None, None]
            allowed = distance < self.window if allowed is None else allowed & (distance < self.window)
        return allowed


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
    **kwargs,
) -> ScoreBiasMask:
    """Mask function for `posenc_*`: transformers' boolean mask (or None where it may be skipped) plus the cache
    coordinates of queries and keys.

    Only the mask function sees `q_offset`/`kv_offset` for every cache type, so the distances of a relative bias are
    taken here, which keeps them right with a KV cache, left padding and sliding windows. transformers skips the mask
    (None) only when causality alone restricts attention: no padding, no window in reach.

    The direction: transformers' bidirectional mask builders (create_bidirectional_mask and its sliding-window form)
    pass `allow_is_bidirectional_skip`, its causal ones never do (5.20 through 5.25). Neither the skip's value nor the
    mask function tells: from 5.25 a bidirectional mask over packed documents passes False and wraps the mask function.
    """
    for key in ("dtype", "config"):
        kwargs.pop(key, None)
    bidirectional = "allow_is_bidirectional_skip" in kwargs or mask_function is bidirectional_mask_function
    allow_is_bidirectional_skip = kwargs.pop("allow_is_bidirectional_skip", False)
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
    q_positions = torch.arange(q_length, device=device) + q_offset
    kv_positions = torch.arange(kv_length, device=device) + kv_offset
    return ScoreBiasMask(mask, not bidirectional, q_positions, kv_positions)


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


def _call(
    module: nn.Module, attention_mask, kwargs: dict, count: bool = True
) -> tuple[nn.Module, ScoreExtras, ScoreBiasMask]:
    """The bias provider, score extras and masks (with the call's position ids) of one attention call, refusing what
    no posenc kernel can apply: a prepared mask that bypasses the cache coordinates, or a keyword the kernels do not
    know (it would be dropped silently). `count`: record the call on the provider (the kernel that computes does;
    `posenc_auto`, which picks it, not)."""
    provider = getattr(module, "posenc_bias", None)
    scheme = getattr(getattr(module, "config", None), "posenc", {}).get("type")
    entry = getattr(module, "posenc_entry", None)  # the layer's entry of a per-layer pattern
    if provider is None and entry is not None:
        provider = _NO_BIAS
    if provider is None:
        raise ValueError(
            f"attn_implementation {module.config._attn_implementation!r} is for score-bias schemes "
            f"({', '.join(BIAS_PROVIDERS)}); "
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
    provider.before_call()
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    own = getattr(module, "is_causal", None)
    causal = own if isinstance(own, bool) else attention_mask.causal
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # a model that does not hand them on: those its rotary module was called with
        position_ids = getattr(provider, "position_ids", None)
    masks = attention_mask.with_position_ids(position_ids)
    if entry is not None:
        masks = masks.with_window(entry["sliding_window"])
    return provider, ScoreExtras(kwargs.get("softcap"), sinks, causal), masks


_NO_BIAS = NoBias()


def tempered(module: nn.Module, query: torch.Tensor, masks: ScoreBiasMask) -> torch.Tensor:
    """The queries of a NoPE layer with Llama 4's attention temperature (a pattern entry's
    `attn_temperature_tuning`): scaled by `log1p(floor((p + 1) / floor_scale)) * attn_scale + 1` at cache position p,
    as transformers' Llama 4 scales them; unchanged elsewhere, and where the architecture applies it itself."""
    entry = getattr(module, "posenc_entry", None)
    temperature = None if entry is None else entry.get("attn_temperature_tuning")
    if temperature is None or getattr(module, "posenc_native_temperature", False):
        return query
    positions = masks.q_positions.to(torch.float32)
    scales = torch.log1p(torch.floor((positions + 1) / temperature["floor_scale"])) * temperature["attn_scale"] + 1
    return query * scales.to(query.dtype)[:, None]  # (Q, 1) against (B, H, Q, D)


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


def _alibi_column_attention(query, key, value, provider, masks: ScoreBiasMask, scaling, dropout, keep=None):
    """Causal ALiBi on plain causal SDPA, no mask and no (Q, K) tensor: -m(i-j) equals m*j up to a per-row constant,
    which softmax ignores, so one extra head-dim column (m_h in q, j/scale in k, 0 in v) adds it exactly. The key
    column does not depend on the head, so grouped keys stay grouped. `keep` (B, K), for padding: a second column
    (1 in q, -1e9/scale in k at padding keys, 0 elsewhere) masks the padding keys exactly (their weight underflows to
    0), still without a mask tensor.

    In inference the extended copies exist for one group of heads at a time (at most `COLUMN_BLOCK_BYTES`, at least
    one key head), and each group's output goes straight into the (B, Q, H, D) result. Exact up to the fp32 rounding
    of the column (which reaches m*K/2: relative error ~1e-4 at 8k tokens for slope 1/2), so posenc_sdpa uses it for
    fp32 inputs only.
    """
    batch, heads, q_length, head_dim = query.shape
    kv_heads = key.shape[1]
    kv_positions = masks.kv_positions if masks.kv_ids is None else masks.kv_ids  # (K,) or each row's own (B, K)
    if key.shape[2] > q_length:  # StaticCache prefill: the keys past the queries are not filled yet
        key, value, kv_positions = key[:, :, :q_length], value[:, :, :q_length], kv_positions[..., :q_length]
    value_dim = value.shape[-1]  # multi-head latent attention has values narrower than queries and keys
    # one width for q, k and v (the fused kernels need it), a multiple of 8 (they need that too)
    columns = 1 if keep is None else 2
    width = max(head_dim + columns, value_dim) + (-max(head_dim + columns, value_dim) % 8)
    # positions counted from the middle key halve the column's magnitude (its fp32 rounding is the trick's only
    # error); a per-row shift changes nothing after softmax
    middle = kv_positions[..., kv_positions.shape[-1] // 2, None]
    column = ((kv_positions - middle).to(torch.float32) / scaling).to(key.dtype)
    column = column if column.dim() == 1 else column[:, None, :]  # (B, 1, K): one column per row
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
        if keep is not None:
            if keep.shape[-1] > q_length:  # StaticCache prefill: as the keys above
                keep = keep[:, :q_length]
            extended_q[..., head_dim + 1] = 1.0
            extended_k[..., head_dim + 1] = ((~keep).to(torch.float32) * (-1e9 / scaling)).to(key.dtype)[:, None]
        extended_v[..., :value_dim] = v
        result = blockwise(attention, extended_q, extended_k, extended_v)
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
    extras (soft-capping, sinks), which SDPA cannot take, go through `_scores_attention` block by block. In training
    each block keeps only its inputs and recomputes its bias and scores in the backward (`blockwise`), so memory
    stays O(L) with a padding mask too.
    """
    batch, heads, q_length, _ = query.shape
    key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    compute = torch.float32
    # the bias block, and the scratch a bias may need per (query, key) pair (FIRE's hidden layer), within the budget
    width = batch * heads + (batch if masks.q_ids is not None else 1) * provider.scratch_per_pair
    chunk = max(1, BIAS_BLOCK_BYTES // (4 * width * key.shape[2]))
    # the provider's parameters (T5's table) and the sinks are inputs of each block, so that a recomputed block
    # differentiates them too
    names, weights = zip(*provider.named_parameters()) if any(True for _ in provider.parameters()) else ((), ())
    sinks = () if extras.sinks is None else (extras.sinks,)

    def bias_of(rows, *tensors):
        """(1 or B, H, rows, K) fp32 bias of query rows `rows`, from the provider's parameters `tensors`."""
        q_positions, kv_positions = masks.bias_positions(rows)
        # a bias of the distance that costs more than the gather (T5's buckets, KERPLE's log, Sandwich's cosines):
        # the block's bias by distance (rows + K - 1 of them), then gathered; traced code takes the direct way (no
        # host-side lengths)
        if (
            q_positions.dim() == 1
            and provider.distance_only
            and provider.tabulate
            and not torch.compiler.is_compiling()
        ):
            first = int(kv_positions[0] - q_positions[-1])
            distances = torch.arange(first, int(kv_positions[-1] - q_positions[0]) + 1, device=q_positions.device)
            origin = distances.new_zeros(1)
            table = torch.func.functional_call(
                provider, dict(zip(names, tensors)), (origin, distances, heads, extras.causal)
            )[:, 0]  # (H, distances)
            return table[:, kv_positions[None, :] - q_positions[:, None] - first][None]
        arguments = (q_positions, kv_positions, heads, extras.causal)
        bias = torch.func.functional_call(provider, dict(zip(names, tensors)), arguments)
        return bias if bias.dim() == 4 else bias[None]

    def block(rows, rows_query, key, value, *tensors):
        bias = bias_of(rows, *tensors[: len(names)])  # (1 or B, H, c, K) fp32
        allowed = masks.block(rows)
        rows_query, key, value = rows_query.to(compute), key.to(compute), value.to(compute)
        if extras:
            block_extras = dataclasses.replace(extras, sinks=tensors[len(names)] if sinks else None)
            output, _ = _scores_attention(
                rows_query, key, value, bias, allowed, scaling, dropout, dropout > 0, block_extras
            )
            return output.to(query.dtype)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, torch.finfo(compute).min)
        output = nn.functional.scaled_dot_product_attention(
            rows_query, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling
        )
        return output.to(query.dtype)

    # plain scores (no soft-capping, sinks, dropout or autocast) take the hand-written backward of `_BiasBlock`
    plain = not extras and not dropout and not torch.is_autocast_enabled(query.device.type)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *weights))
    outputs = []
    for start in range(0, q_length, chunk):
        rows = slice(start, start + chunk)
        if plain and training and not torch.compiler.is_compiling():
            bias = functools.partial(bias_of, rows)
            allowed = functools.partial(masks.block, rows)  # made again in the backward: no (rows, K) tensor is kept
            outputs.append(_BiasBlock.apply(bias, allowed, scaling, query[:, :, rows], key, value, *weights))
            continue
        function = functools.partial(block, rows)
        tensors = (query[:, :, rows], key, value, *weights, *sinks)
        outputs.append(blockwise(function, *tensors, recompute=True, random=dropout > 0))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


class _BiasBlock(torch.autograd.Function):
    """One block of query rows of SDPA with a bias, in training: SDPA's fused forward (denormals flushed), and a
    backward written out that recomputes only the scores, from the inputs and the output kept (O(rows + K) memory):
    P = softmax(q k^T s + bias), dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)), dQ = dS K s, dK = dS^T Q s, and the
    bias's parameters (T5's table) get dS through the bias function. One matrix product more than autograd's math
    kernel, which keeps the (rows, K) weights of every block instead."""

    @staticmethod
    def forward(ctx, bias_of, allowed_of, scaling, query, key, value, *weights):
        compute = torch.float32
        with denormal_flush.on(query.device):
            bias = bias_of(*weights)
            allowed = allowed_of()
            if allowed is not None:
                bias = bias.masked_fill(~allowed, torch.finfo(compute).min)
            q, k, v = query.to(compute), key.to(compute), value.to(compute)
            output = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
        ctx.bias_of, ctx.allowed_of, ctx.scaling = bias_of, allowed_of, scaling
        ctx.save_for_backward(query, key, value, output, *weights)
        return output.to(query.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        query, key, value, output, *weights = ctx.saved_tensors
        compute, scaling = torch.float32, ctx.scaling
        needs = ctx.needs_input_grad[6:]
        with denormal_flush.on(query.device):
            leaves = [w.detach().requires_grad_(need) for w, need in zip(weights, needs)]
            with torch.enable_grad():
                bias = ctx.bias_of(*leaves)
            q, k, v = query.to(compute), key.to(compute), value.to(compute)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scaling + bias.detach()
            allowed = ctx.allowed_of()
            if allowed is not None:
                scores = scores.masked_fill(~allowed, torch.finfo(compute).min)
            weights_p = torch.softmax(scores, dim=-1)
            del scores
            grad = grad_output.to(compute)
            grad_value = torch.matmul(weights_p.transpose(-1, -2), grad)
            grad_scores = torch.matmul(grad, v.transpose(-1, -2))
            grad_scores -= (grad * output).sum(-1, keepdim=True)
            grad_scores *= weights_p
            del weights_p
            grad_query = torch.matmul(grad_scores, k) * scaling
            grad_key = torch.matmul(grad_scores.transpose(-1, -2), q) * scaling
            grad_weights = [None] * len(leaves)
            wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            if wanted:
                grad_bias = grad_scores.sum(0, keepdim=True) if bias.shape[0] == 1 else grad_scores
                found = torch.autograd.grad(bias, [leaves[i] for i in wanted], grad_bias, allow_unused=True)
                for i, g in zip(wanted, found):
                    grad_weights[i] = g
        return (
            None,
            None,
            None,
            grad_query.to(query.dtype),
            grad_key.to(key.dtype),
            grad_value.to(value.dtype),
            *grad_weights,
        )


def posenc_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Score-bias attention on SDPA without a (Q, K) bias: the ALiBi column trick where it is exact and fastest
    (causal, fp32, a prefill of more than one query, positions that never fall, no score extras, a mask of padding
    only or none), query-chunked blocks everywhere else (see `hf-posenc bench`)."""
    provider, extras, masks = _call(module, attention_mask, kwargs)
    query = tempered(module, query, masks)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if provider is _NO_BIAS and masks.window is None and not extras:  # a pattern's layer without a bias: plain SDPA
        output, _ = sdpa_attention_forward(module, query, key, value, masks.mask, dropout=dropout, scaling=scaling)
        return output, None
    # the column trick needs SDPA's is_causal alignment: queries and keys both start at the first position (a
    # prefill; keys past the queries are unfilled StaticCache slots). A decode step (one query) is faster chunked
    # anyway: one (H, K) bias row instead of extended copies of the whole cache.
    column_trick_exact = isinstance(provider, AlibiBias) and masks.causal and not extras and masks.window is None
    column_trick_exact = column_trick_exact and query.dtype == torch.float32 and query.shape[2] > 1
    if column_trick_exact and _query_meets_key(masks, 0) and masks.positions_rise():  # False while compiling
        keep = None if masks.mask is None else masks.key_padding()  # padding only: a second column masks it
        if masks.mask is None or keep is not None:
            return _alibi_column_attention(query, key, value, provider, masks, scaling, dropout, keep)
    return _chunked_bias_attention(query, key, value, provider, masks, scaling, dropout, extras)


#: compile flex_attention (its fused kernel); uncompiled, flex materialises the scores (tests use it on small inputs)
FLEX_COMPILE = True

#: the compiled entries flex_attention and create_block_mask may each keep while posenc_flex calls them: one per
#: variant (score_mod and mask_mod kind, dtype, grad mode, batch size on the CPU, each static at first, then with
#: dynamic lengths), against torch's default of 8 per compiled function, which a few schemes and dtypes in one
#: process reach (the GPU tests, about 60); past it torch falls back to uncompiled flex, which materialises the scores
FLEX_RECOMPILE_LIMIT = 128

#: torch.compile takes a recompile limit of each compiled function's own (torch 2.13 does; releases without it have
#: the global limit only, raised around each call by `_flex_compiling`)
_OWN_RECOMPILE_LIMIT = {"recompile_limit", "isolate_recompiles"} <= set(inspect.signature(torch.compile).parameters)


def _compile(function):
    """`function` compiled for posenc_flex: lengths dynamic from the first length that differs (torch.compile's
    automatic dynamic shapes, as transformers compiles flex), so that batches of varying lengths compile a few times
    per variant, not once per length; with FLEX_RECOMPILE_LIMIT entries of its own where torch.compile takes a limit
    (other compiles of flex, transformers' own, then do not count against it)."""
    if _OWN_RECOMPILE_LIMIT:
        return torch.compile(function, recompile_limit=FLEX_RECOMPILE_LIMIT, isolate_recompiles=True)
    return torch.compile(function)


def _flex_compiling():
    """The context a compiled posenc_flex call runs in: nothing where its compiled functions have a limit of their
    own, else torch's global recompile limit raised to FLEX_RECOMPILE_LIMIT (never lowered; `cache_size_limit` before
    torch renamed it)."""
    if _OWN_RECOMPILE_LIMIT:
        return contextlib.nullcontext()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(FLEX_RECOMPILE_LIMIT, getattr(config, name))})


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return _compile(flex_attention)


@functools.cache
def _compiled_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return _compile(create_block_mask)


def _block_mask(mask_mod, batch: int | None, q_length: int, k_length: int, device):
    """flex's block mask of `mask_mod`, compiled (as transformers builds it): uncompiled, `create_block_mask` writes
    out (L, L) index tensors (160 MiB at 4096 tokens, 8 GiB at 32k); compiled, none."""
    from torch.nn.attention.flex_attention import create_block_mask

    if torch.compiler.is_compiling() or not FLEX_COMPILE:
        return create_block_mask(mask_mod, batch, None, q_length, k_length, device=device)
    with _flex_compiling():
        return _compiled_block_mask()(mask_mod, batch, None, q_length, k_length, device=device)


#: block masks without a mask tensor by (query length, key length, offset, window, direction, device): the same at
#: every layer of a forward and at every step of the same length, so built once, not once per layer and step; the
#: most recently used few are kept
_CAUSAL_BLOCK_MASKS: dict = {}
CAUSAL_BLOCK_MASKS_KEPT = 8


def _flex_mask_mod(shift: torch.Tensor, window: int | None, causal: bool, allowed: torch.Tensor | None):
    """flex's mask_mod: transformers' boolean mask `allowed` (padding, packing) where there is one, else causal
    attention of queries `shift` cache positions after the keys' start (none for an encoder), and a per-layer
    pattern's sliding window on top (as ScoreBiasMask.block). None where nothing is masked."""
    if allowed is not None:

        def mask_mod(b, h, q_index, kv_index):
            return allowed[b if allowed.shape[0] > 1 else 0, 0, q_index, kv_index]

    elif causal:

        def mask_mod(b, h, q_index, kv_index):
            return q_index + shift >= kv_index

    else:
        mask_mod = None
    if window is None:
        return mask_mod
    inner = mask_mod

    def windowed(b, h, q_index, kv_index):
        near = (q_index + shift - kv_index).abs() < window
        return near if inner is None else near & inner(b, h, q_index, kv_index)

    return windowed


def _causal_block_mask(q_length: int, k_length: int, shift: int, window: int | None, causal: bool, device):
    """The block mask of a call without a mask tensor (causal and/or windowed: a function of these scalars alone),
    built once per (lengths, offset, window, direction, device) and reused (a mask tensor's block mask is not: it
    would keep the tensor alive); None where nothing is masked."""
    if not causal and window is None:
        return None

    def build():
        mask_mod = _flex_mask_mod(torch.tensor(shift, device=device), window, causal, None)
        return _block_mask(mask_mod, None, q_length, k_length, device)

    if torch.compiler.is_compiling():  # no state across calls inside a traced graph
        return build()
    key = (q_length, k_length, shift, window, causal, str(device))
    block_mask = _CAUSAL_BLOCK_MASKS.pop(key, None)
    if block_mask is None:
        # outside inference mode: a mask built for a pipeline call must serve a later training step, whose backward
        # saves the block mask's tensors (inference tensors cannot be saved)
        with torch.inference_mode(False):
            block_mask = build()
        while len(_CAUSAL_BLOCK_MASKS) >= CAUSAL_BLOCK_MASKS_KEPT:
            _CAUSAL_BLOCK_MASKS.pop(next(iter(_CAUSAL_BLOCK_MASKS), None), None)  # the least recently used
    _CAUSAL_BLOCK_MASKS[key] = block_mask  # the most recent last
    return block_mask


def _static_batch(tensor):
    """`tensor` (or a block mask's tensors) with its batch dimension kept static by the compiler: torch 2.13's CPU flex
    kernel fails to build when a batch becomes dynamic (a padded call after an unpadded one, batches of 2 then 3 with
    position ids); the lengths still become dynamic. A tensor is marked through an alias of its own (a mark on the
    caller's tensor, position ids or a KV cache, would change the guards of the caller's own compiled code)."""
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(tensor, BlockMask):  # the plugin's own (built and cached here): marked in place
        for part in tensor.as_tuple():
            if isinstance(part, torch.Tensor) and part.dim():
                torch._dynamo.mark_static(part, 0)
        return tensor
    if tensor is None or not tensor.dim():
        return tensor
    alias = tensor.view(tensor.shape)
    torch._dynamo.mark_static(alias, 0)
    return alias


#: the narrowest head torch 2.13's compiled CPU flex kernel computes right. With AVX2 code (not AVX-512) it returns
#: wrong scores, O(1) off or NaN, for heads 8 and 16 wide at lengths of 8 mod 16 below 128 (measured: 4-128 wide,
#: 8-520 long, GQA and a score_mod or not); narrower heads go through it zero-padded to this width, which adds only
#: zeros to every dot product and leaves the output's own columns as they are
CPU_FLEX_MIN_HEAD_DIM = 32


def cpu_flex_supported() -> bool:
    """Whether torch's compiled flex kernel builds on this CPU: torch's own test where it has one (2.13: x86 with AVX2
    and ATEN_CPU_CAPABILITY not 'default', not macOS, no XPU), else that test written out."""
    try:
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
    except ImportError:
        import os
        import sys

        avx2 = getattr(torch.cpu, "_is_avx2_supported", lambda: False)()
        xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        return avx2 and os.getenv("ATEN_CPU_CAPABILITY") != "default" and sys.platform != "darwin" and not xpu
    return check_cpu_supported()


def _cpu_flex_heads(query, key, value):
    """q, k and v for torch's compiled CPU flex kernel: heads narrower than CPU_FLEX_MIN_HEAD_DIM zero-padded to it
    (q and k to one width, v to its own); refused where torch's kernel does not build on this CPU."""
    if not cpu_flex_supported():
        raise ValueError(
            "attn_implementation 'posenc_flex' on the CPU runs torch's compiled flex kernel, which builds only on x86 "
            "CPUs with AVX2 (not on macOS, not with ATEN_CPU_CAPABILITY=default), which this is not; use "
            "'posenc_sdpa'"
        )

    def widened(tensor):
        missing = CPU_FLEX_MIN_HEAD_DIM - tensor.shape[-1]
        return torch.nn.functional.pad(tensor, (0, missing)) if missing > 0 else tensor

    return widened(query), widened(key), widened(value)


def posenc_flex_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flex_attention with the bias as a score_mod: `score + table[h, j - i + Q - 1]`, the provider's fp32 bias of
    every relative distance the call can see ((H, Q + K - 1), not (Q, K)), or the provider's formula of the
    positions (`flex_bias`: ALiBi, FIRE). Masks are block masks: causal from the positions (built once per lengths
    and offset), or transformers' boolean mask (padding, windows) when there is one.

    Soft-capping goes into the score_mod; attention sinks do not (use posenc_sdpa, which `posenc_auto` picks for them).
    torch 2.13's flex_attention has no backward on the CPU: training on the CPU runs posenc_sdpa.
    """
    from torch.nn.attention.flex_attention import flex_attention

    provider, extras, masks = _call(module, attention_mask, kwargs)
    query = tempered(module, query, masks)
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
    device, causal, softcap = query.device, extras.causal, extras.softcap
    compiled = FLEX_COMPILE and not torch.compiler.is_compiling()  # (inside a compiled model: flex as it is)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling  # of the head as it is (before any padding)
    value_width = value.shape[-1]
    if compiled and device.type == "cpu":
        query, key, value = _cpu_flex_heads(query, key, value)
    static = _static_batch if compiled and device.type == "cpu" else (lambda tensor: tensor)
    query, key, value = static(query), static(key), static(value)
    q_ids, kv_ids = static(masks.q_ids), static(masks.kv_ids)
    # Offsets reach the score_mod and mask_mod as 0-dim tensors, never Python ints: compiled code guards on every int
    # a closure holds and would compile again for each new value (each length, each cache offset). Their difference,
    # read once (one host sync), sizes the table and keys the cached block masks.
    q_first, kv_first = masks.q_positions[0].to(device), masks.kv_positions[0].to(device)
    shift = int(q_first - kv_first)
    if provider.flex_analytic:  # a formula of the positions, in the kernel (ALiBi, FIRE)
        bias = provider.flex_bias(heads, device, causal)

        def bias_at(b, h, q_index, kv_index):
            if q_ids is None:
                return bias(h, q_index + q_first, kv_index + kv_first)
            row = b if q_ids.shape[0] > 1 else 0  # position ids of shape (1, Q) serve every row
            return bias(h, q_ids[row, q_index], kv_ids[row, kv_index])

    else:  # the provider's fp32 bias of every distance the call can see, gathered
        if q_ids is None:  # positions are the coordinates: distances are kv_index - q_index + (kv_first - q_first)
            first = -shift - (q_length - 1)  # the smallest key - query distance
            last = first + q_length + k_length - 2
        else:  # each row's own positions
            first, last = int(kv_ids.min() - q_ids.max()), int(kv_ids.max() - q_ids.min())
        table = provider.by_distance(torch.arange(first, last + 1, device=device), heads, causal)
        start = kv_first - q_first - first if q_ids is None else torch.tensor(-first, device=device)

        def bias_at(b, h, q_index, kv_index):
            if q_ids is None:
                return table[h, kv_index - q_index + start]
            row = b if q_ids.shape[0] > 1 else 0
            return table[h, kv_ids[row, kv_index] - q_ids[row, q_index] + start]

    def score_mod(score, b, h, q_index, kv_index):
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        return score + bias_at(b, h, q_index, kv_index)

    if masks.mask is None:  # causal (and windowed): the same few scalars at every layer, and every step
        block_mask = _causal_block_mask(q_length, k_length, shift, masks.window, masks.causal, device)
    else:  # transformers' mask (padding, packing): built once per forward, kept with the masks its layers share
        block_mask = masks.__dict__.get("_flex_block_mask")
        if block_mask is None:
            mask_mod = _flex_mask_mod(q_first - kv_first, masks.window, masks.causal, static(masks.mask))
            block_mask = _block_mask(mask_mod, masks.mask.shape[0], q_length, k_length, device)
            if not torch.compiler.is_compiling():
                masks.__dict__["_flex_block_mask"] = block_mask
    function, context = flex_attention, contextlib.nullcontext()
    if compiled:
        function, context, block_mask = _compiled_flex(), _flex_compiling(), static(block_mask)
    with context:
        output = function(
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=key.shape[1] != heads,
        )
    return output[..., :value_width].transpose(1, 2).contiguous(), None


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
        and masks.window is None
        and masks.q_ids is None  # the kernel measures distances by index
        and query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and _query_meets_key(masks, -1)
        and (masks.causal or len(masks.q_positions) == len(masks.kv_positions))
        and extras.sinks is None
        and (extras.softcap is None or _flash_takes_softcap())
    )


def posenc_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """flash-attn with `alibi_slopes`: the bias is computed inside the kernel (ALiBi only)."""
    provider, extras, masks = _call(module, attention_mask, kwargs)
    if provider is _NO_BIAS:  # a pattern's layer without a bias (flash-attn has no window of ours): SDPA's kernels
        return posenc_sdpa_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    query = tempered(module, query, masks)
    if not flash_applies(query, provider, masks, extras):
        raise ValueError(
            "attn_implementation 'posenc_flash' runs ALiBi on CUDA in fp16/bf16 without a padding mask, window, "
            "attention sinks or position ids other than the cache positions, with the queries ending at the last key; "
            "got posenc "
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
    - CPU: SDPA (the ALiBi column trick or chunked blocks): flex has no CPU backward, and for inference it needs a
      C++ compiler and seconds of compiling (it is faster there for long T5, KERPLE and Sandwich inference: README).
    """
    value_dim = query.shape[-1] if value_dim is None else value_dim
    if provider is _NO_BIAS and masks.window is None and not extras:
        return "sdpa"  # a pattern's layer without a bias or window: plain SDPA (its flash/cuDNN kernels on CUDA)
    if query.device.type == "cuda":
        if flash_available and flash_applies(query, provider, masks, extras):
            return "flash"
        if query.shape[2] > 1 and not dropout and extras.sinks is None and min(query.shape[-1], value_dim) >= 16:
            return "flex"  # compiled flex needs head widths of at least 16 (measured on an H200, torch 2.11)
    return "sdpa"


def posenc_auto_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The default for score-bias schemes: the fastest exact path for this call's device, dtype and mask."""
    provider, extras, masks = _call(module, attention_mask, kwargs, count=False)
    training_dropout = dropout if module.training else 0.0
    path = choose_path(query, provider, masks, training_dropout, flash_attn_available(), extras, value.shape[-1])
    return BIAS_KERNELS[path](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def posenc_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Textbook attention with the bias: the reference. Scores and softmax in float32; returns the weights."""
    provider, extras, masks = _call(module, attention_mask, kwargs)
    query = tempered(module, query, masks)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    bias = masks.bias(provider, slice(None), query.shape[1], extras.causal)  # (1 or B, H, Q, K) fp32
    output, weights = _scores_attention(
        query, key, value, bias, masks.block(slice(None)), scaling, dropout, module.training, extras
    )
    return output.transpose(1, 2).contiguous(), weights  # (B, Q, H, D)


# One name per kernel, registered for both the attention and the mask interface: a name known only to the attention
# interface would make mask preparation exit early and drop the padding mask.
#
# The registries are process-wide, and a process may hold several copies of this file: the installed hf_posenc, and
# one per folder a `trust_remote_code` load imported (each its own module, maybe of another release). Each copy
# registers its kernels under names of its own (the installed plugin the plain `posenc_sdpa`, a folder's copy
# `posenc_sdpa.<tag of its module>`), and its models run those names, so a model keeps running its own code's kernels
# whatever else is loaded or imported later.
KERNEL_SUFFIX = "" if __name__.startswith("hf_posenc.") else "." + hashlib.sha1(__name__.encode()).hexdigest()[:10]


def kernel_name(kernel: str) -> str:
    """The attn_implementation name of this copy's `kernel` ('sdpa' -> 'posenc_sdpa' or 'posenc_sdpa.<tag>')."""
    return f"posenc_{kernel}{KERNEL_SUFFIX}"


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
    AttentionInterface.register(kernel_name(_kernel), _function)
    AttentionMaskInterface.register(kernel_name(_kernel), posenc_mask)
