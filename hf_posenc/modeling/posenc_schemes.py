"""Positional schemes: the registry, the validation of a `posenc` spec, and the math of each scheme.

This file ships next to every saved posenc model (it is part of the `trust_remote_code` closure), so it imports
only the standard library, torch and transformers.

A scheme acts at exactly one *site* of a transformer:

| site        | schemes                      | where it acts                                           |
|-------------|------------------------------|---------------------------------------------------------|
| `embedding` | learned, sinusoidal          | a position table added to the token embeddings           |
| `rotation`  | rope (every `rope_type`)     | queries and keys rotated by position before the cache    |
| `bias`      | alibi, t5_bias, kerple,      | a bias added to the attention scores, from the positions |
|             | sandwich, fire               | of queries and keys                                      |
| `none`      | nope                         | no position signal at all                                |
| `layers`    | layers                       | a pattern of rotation, bias and none schemes over depth  |

Shape legend used in docstrings: B batch, H heads, Q query length, K key/value length, D head dim.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SITES = ("embedding", "rotation", "bias", "none", "layers")


# --------------------------------------------------------------------------------------------------------------------
# Math helpers (public through `hf_posenc`)
# --------------------------------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """ALiBi head slopes (Press et al., 2022, https://arxiv.org/abs/2108.12409).

    For a power of two `n`, head `h` (1-based) gets `2 ** (-max_bias * h / n)`; `max_bias=8` is the paper's choice
    and `max_bias` is MPT's generalisation. For other head counts the paper takes the slopes of the closest smaller
    power of two `p` and adds every other slope of `2p` (the odd exponents), which keeps the geometric spread.

    Args:
        num_heads: number of attention heads, >= 1.
        max_bias: exponent range, > 0.

    Returns:
        float32 tensor of shape (num_heads,).
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be an int >= 1, got {num_heads!r}")
    if not _is_number(max_bias) or max_bias <= 0:
        raise ValueError(f"alibi_slopes: max_bias must be a number > 0, got {max_bias!r}")
    closest = 2 ** math.floor(math.log2(num_heads))
    # exponents computed in float64, so the only rounding is the final cast to float32
    exponents = [max_bias * k / closest for k in range(1, closest + 1)]
    exponents += [max_bias * k / (2 * closest) for k in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor([2.0 ** (-e) for e in exponents], dtype=torch.float64).to(torch.float32)


def alibi_bias(slopes: torch.Tensor, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
    """ALiBi bias `-m_h * |i - j|`, in float32 whatever the model dtype.

    The symmetric distance equals the paper's causal `i - j` wherever a causal mask lets a query see a key, and is the
    right form for bidirectional attention. The bias is added to the scaled scores: it is *not* divided by sqrt(D).

    Args:
        slopes: (H,) head slopes.
        q_positions: (Q,) integer positions of the queries.
        kv_positions: (K,) integer positions of the keys.

    Returns:
        float32 tensor of shape (H, Q, K).
    """
    distance = (q_positions[:, None] - kv_positions[None, :]).abs().to(torch.float32)  # (Q, K)
    return -slopes.to(device=distance.device, dtype=torch.float32)[:, None, None] * distance


def t5_relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """T5's bucket of each relative position `key - query` (Raffel et al., 2020, https://arxiv.org/abs/1910.10683).

    Half of the buckets (of each direction, when bidirectional) hold exact small distances; the rest cover distances up
    to `max_distance` on a log scale; everything farther shares the last bucket.

    Args:
        relative_position: integer tensor of any shape, `key_position - query_position`.
        bidirectional: whether keys after the query get their own buckets (encoders) or share bucket 0 (decoders).
        num_buckets: number of buckets.
        max_distance: distance at which the log-spaced buckets end.

    Returns:
        int64 tensor of the same shape, values in [0, num_buckets).
    """
    relative_position = relative_position.to(torch.int64)
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.int64) * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets for the far distances; clamp(min=1) only keeps log() finite where is_small picks the exact one
    scaled = torch.log(distance.clamp(min=1).to(torch.float32) / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (scaled * (num_buckets - max_exact)).to(torch.int64)
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, far)


def sinusoidal_position_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed sinusoidal table of Vaswani et al. (2017, https://arxiv.org/abs/1706.03762), interleaved form.

    `PE[p, 2i] = sin(p / base^(2i/dim))`, `PE[p, 2i+1] = cos(p / base^(2i/dim))`: the paper's own layout, not the
    fairseq/tensor2tensor layout that concatenates all sines before all cosines.

    Args:
        positions: integer tensor of any shape (...).
        dim: embedding width, even.
        base: wavelength base.

    Returns:
        float32 tensor of shape (..., dim).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even embedding width, got {dim}")
    # angles in float64: in float32 the rounding of p * inv_freq alone costs 2e-4 at position 4096 (MPS has no float64)
    dtype = torch.float32 if positions.device.type == "mps" else torch.float64
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim)  # (dim/2,)
    angles = positions.to(dtype)[..., None] * inv_freq  # (..., dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(torch.float32)  # interleave sin, cos


def ntk_scaled_rope_theta(rope_theta: float, factor: float, rotary_dim: int) -> float:
    """Static NTK-aware RoPE base: `theta * factor ** (d / (d - 2))` for rotary width d (bloc97, 2023).

    Stretches the lowest frequency by `factor` while leaving the highest one almost untouched; transformers ships only
    the dynamic variant, which recomputes this from the running length.
    """
    if rotary_dim < 4:
        raise ValueError(f"NTK scaling needs a rotary width of at least 4, got {rotary_dim}")
    try:
        theta = float(rope_theta) * float(factor) ** (rotary_dim / (rotary_dim - 2))
    except OverflowError:
        theta = math.inf
    if not math.isfinite(theta):
        raise ValueError(
            f"NTK scaling: the scaled base rope_theta * factor ** (d / (d - 2)) = {rope_theta} * {factor} ** "
            f"({rotary_dim} / {rotary_dim - 2}) overflows; allowed: a factor and rope_theta whose scaled base is a "
            "finite number"
        )
    return theta


# --------------------------------------------------------------------------------------------------------------------
# The scheme registry
# --------------------------------------------------------------------------------------------------------------------

_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One scheme parameter: its default (or required), a check and the rule shown when the check fails."""

    default: Any = _REQUIRED
    check: Callable[[Any], bool] | None = None
    rule: str = ""


@dataclass(frozen=True)
class Scheme:
    """A positional scheme: its name, the site it acts at, and how to normalise its parameters.

    `normalize(params, config)` receives the user's parameters without `type` and returns the complete, validated
    parameter dict (defaults filled in), raising `ValueError` naming the bad value and what is allowed.
    """

    name: str
    site: str
    relative: bool
    description: str
    normalize: Callable[[dict, Any], dict]


SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Add a scheme to the registry; names are identifiers and unique, sites are one of `SITES`."""
    if not scheme.name.isidentifier():
        raise ValueError(f"scheme name must be an identifier, got {scheme.name!r}")
    if scheme.name in SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is already registered")
    if scheme.site not in SITES:
        raise ValueError(f"scheme {scheme.name!r}: site must be one of {SITES}, got {scheme.site!r}")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    """The registered scheme called `name`, or a ValueError listing the registered ones."""
    if not isinstance(name, str) or name not in SCHEMES:
        raise ValueError(f"unknown posenc scheme {name!r}; allowed: {', '.join(sorted(SCHEMES))} (a name, a string)")
    return SCHEMES[name]


def normalize_posenc(spec: str | Mapping | None, config: Any, default: str | Mapping | None = None) -> dict:
    """Turn `"alibi"` or `{"type": "rope", "rope_type": "yarn", "factor": 4.0}` into the complete, validated dict.

    Args:
        spec: scheme name, dict with a `type` key, or None for `default`.
        config: the model config (head counts, widths and native RoPE parameters are read from it).
        default: the architecture's native scheme, used when `spec` is None.

    Returns:
        `{"type": name, **every parameter}`; normalising the result again returns it unchanged.
    """
    if spec is None:
        spec = default
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"posenc must be a scheme name or a dict with a 'type' key, got {type(spec).__name__}")
    params = dict(spec)
    if "type" not in params:
        raise ValueError(f"posenc dict needs a 'type' key, one of: {', '.join(sorted(SCHEMES))}; got {dict(spec)}")
    scheme = get_scheme(params.pop("type"))
    return {"type": scheme.name, **scheme.normalize(params, config)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_params(scheme: str, params: dict, spec: Mapping[str, Param]) -> dict:
    """Validate `params` against `spec`: no unknown keys, no missing required ones, every check passing."""
    unknown = sorted(set(params) - set(spec))
    if unknown:
        allowed = ", ".join(spec) or "none"
        raise ValueError(f"posenc {scheme!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
    out = {}
    for key, param in spec.items():
        if key not in params:
            if param.default is _REQUIRED:
                raise ValueError(f"posenc {scheme!r} needs parameter {key!r} ({param.rule})")
            out[key] = param.default
            continue
        value = params[key]
        if param.check is not None and not param.check(value):
            raise ValueError(f"posenc {scheme!r}: {key} must be {param.rule}, got {value!r}")
        out[key] = value
    return out


def _simple_scheme(name: str, site: str, relative: bool, description: str, spec: Mapping[str, Param]) -> Scheme:
    """Register a scheme whose parameters are a fixed table of `Param`s."""

    def normalize(params: dict, config: Any) -> dict:
        return _check_params(name, params, spec)

    return register_scheme(Scheme(name, site, relative, description, normalize))


GROW_METHODS = ("tile", "interpolate")


def _normalize_learned(params: dict, config: Any) -> dict:
    out = _check_params(
        "learned",
        params,
        {
            "num_positions": Param(None, lambda v: v is None or _int_at_least(1)(v), "an int >= 1"),
            "grow": Param(None, lambda v: v is None or v in GROW_METHODS, f"one of {GROW_METHODS} or None"),
        },
    )
    if out["num_positions"] is None:
        out["num_positions"] = config.max_position_embeddings
    return out


register_scheme(
    Scheme("learned", "embedding", False, "trained absolute position table (GPT-2, BERT)", _normalize_learned)
)
_simple_scheme(
    "sinusoidal",
    "embedding",
    False,
    "fixed sine/cosine table of Vaswani et al. (interleaved layout), not trained; scale multiplies it",
    {
        "base": Param(10000.0, _positive, "a number > 0"),
        # the table has amplitude 1 (norm sqrt(d/2)) against token embeddings drawn at std 0.02: 1/sqrt(d) keeps
        # position from swamping the tokens (measured in the README's compare); 1 is the paper's table
        "scale": Param(1.0, _positive, "a number > 0 (the table's factor; 1 is Vaswani et al.'s table)"),
    },
)
_simple_scheme("nope", "none", True, "no position signal at all (causal masking alone)", {})

#: float32 bounds of the ALiBi slopes (the bias is computed in float32 on every path). The weakest head's slope at
#: distance 1 must change a score of size 1 (1 - m != 1 in float32 needs m >= 2**-24, float32's unit roundoff), or
#: that head is NoPE at every length; the strongest slope times the farthest distance float32 counts exactly (2**24)
#: must stay below 1e30, far from float32's overflow at 3.4e38 (an infinite bias gives NaN scores).
ALIBI_MIN_SLOPE = 2.0**-24
ALIBI_MAX_BIAS_AT_DISTANCE = 1e30
ALIBI_MAX_SLOPE_MULTIPLIER = ALIBI_MAX_BIAS_AT_DISTANCE / 2**24  # about 5.96e22; every slope is below the multiplier


def _normalize_alibi(params: dict, config: Any) -> dict:
    out = _check_params(
        "alibi",
        params,
        {
            "max_bias": Param(8.0, _positive, "a number > 0"),
            "slope_multiplier": Param(
                1.0,
                lambda v: _positive(v) and v <= ALIBI_MAX_SLOPE_MULTIPLIER,
                f"a number > 0 and at most 1e30 / 2**24 = {ALIBI_MAX_SLOPE_MULTIPLIER:.4g} (every slope is below it, "
                "and a slope times a distance of up to 2**24 must stay below 1e30 in float32)",
            ),
        },
    )
    # the smallest slope of every head count is slope_multiplier * 2**-max_bias (see alibi_slopes)
    if out["max_bias"] > -math.log2(ALIBI_MIN_SLOPE) + math.log2(out["slope_multiplier"]):
        smallest = out["slope_multiplier"] * 2.0 ** -out["max_bias"]
        raise ValueError(
            f"posenc 'alibi': the smallest slope slope_multiplier * 2**-max_bias = {out['slope_multiplier']} * "
            f"2**-{out['max_bias']} = {smallest:.3g} must be at least 2**-24 = {ALIBI_MIN_SLOPE:.3g} (below it the "
            "weakest head's bias at distance 1 does not change a score of size 1 in float32: that head is NoPE); "
            f"allowed: max_bias <= 24 + log2(slope_multiplier) = {24 + math.log2(out['slope_multiplier']):.4g}"
        )
    return out


register_scheme(
    Scheme(
        "alibi",
        "bias",
        True,
        "linear distance penalty -m_h*|i-j| on the scores (Press et al.); slopes between 2**-24 and 1e30 / 2**24",
        _normalize_alibi,
    )
)


def _normalize_t5(params: dict, config: Any) -> dict:
    out = _check_params(
        "t5_bias",
        params,
        {
            "num_buckets": Param(32, _int_at_least(4), "an int >= 4"),
            "max_distance": Param(128, _int_at_least(2), "an int >= 2"),
        },
    )
    if out["max_distance"] <= out["num_buckets"] // 2:
        raise ValueError(
            f"posenc 't5_bias': max_distance must exceed num_buckets // 2 (the exact buckets), "
            f"got max_distance={out['max_distance']}, num_buckets={out['num_buckets']}"
        )
    return out


register_scheme(
    Scheme("t5_bias", "bias", True, "learned bucketed relative bias shared across layers (T5)", _normalize_t5)
)

KERPLE_VARIANTS = ("log", "power")
_simple_scheme(
    "kerple",
    "bias",
    True,
    "learned kernel of the distance, -r1*log(1+r2|i-j|) or -r1*|i-j|**r2, per head, shared across layers (Chi et "
    "al. 2022)",
    {"variant": Param("log", lambda v: v in KERPLE_VARIANTS, f"one of {KERPLE_VARIANTS}")},
)
_simple_scheme(
    "sandwich",
    "bias",
    True,
    "parameter-free bias: inner product of sinusoidal embeddings of the two positions, heads spread as ALiBi's "
    "(Chi et al. 2023)",
    {"dim": Param(128, lambda v: _int_at_least(2)(v) and v % 2 == 0, "an even int >= 2 (the sinusoids' width)")},
)
_simple_scheme(
    "fire",
    "bias",
    False,
    "learned MLP of the progressively normalised log distance psi(i-j)/psi(max(L,i)), per layer unless shared (Li "
    "et al. 2024)",
    {
        "hidden": Param(32, _int_at_least(1), "an int >= 1 (the MLP's hidden width)"),
        "init_threshold": Param(512, _int_at_least(1), "an int >= 1 (L's starting value, in positions)"),
        "shared": Param(False, lambda v: isinstance(v, bool), "a bool (one MLP for every layer: the paper's FIRE-S)"),
    },
)

# --------------------------------------------------------------------------------------------------------------------
# Per-layer mixing
# --------------------------------------------------------------------------------------------------------------------

#: options a pattern entry adds to its scheme: a sliding window of N keys (any entry), and Llama 4's attention
#: temperature (NoPE entries)
LAYER_OPTIONS = ("sliding_window", "attn_temperature_tuning")
#: transformers' Llama 4 defaults of the temperature (Llama4TextConfig: floor_scale, attn_scale)
TEMPERATURE_DEFAULTS = {"floor_scale": 8192, "attn_scale": 0.1}


def _normalize_temperature(value: Any) -> dict | None:
    if value is None or value is False:
        return None
    if value is True:
        return dict(TEMPERATURE_DEFAULTS)
    rule = (
        "True (Llama 4's floor_scale 8192, attn_scale 0.1), False, or a dict with floor_scale (an int >= 1) and "
        "attn_scale (a number >= 0)"
    )
    if not isinstance(value, Mapping) or set(value) - set(TEMPERATURE_DEFAULTS):
        raise ValueError(f"posenc 'layers': attn_temperature_tuning must be {rule}, got {value!r}")
    out = {**TEMPERATURE_DEFAULTS, **value}
    if not _int_at_least(1)(out["floor_scale"]) or not (_is_number(out["attn_scale"]) and out["attn_scale"] >= 0):
        raise ValueError(f"posenc 'layers': attn_temperature_tuning must be {rule}, got {value!r}")
    return out


def _normalize_layer_entry(index: int, entry: Any, config: Any) -> dict:
    where = f"posenc 'layers': pattern[{index}]"
    if isinstance(entry, str):
        entry = {"type": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a scheme name or a dict with a 'type' key, got {entry!r}")
    entry = dict(entry)
    window = entry.pop("sliding_window", None)
    temperature = entry.pop("attn_temperature_tuning", None)
    name = entry.get("type")
    if name == "layers":
        raise ValueError(f"{where} is itself a 'layers' pattern; patterns do not nest: list the entries instead")
    if isinstance(name, str) and name in SCHEMES and SCHEMES[name].site == "embedding":
        raise ValueError(
            f"{where} is {name!r}, an input-embedding table, which acts once for the whole model, not per layer: "
            f"allowed in a pattern are {', '.join(n for n, s in sorted(SCHEMES.items()) if s.site in _PER_LAYER)}; "
            f"for {name} everywhere use posenc={name!r}"
        )
    try:
        scheme = normalize_posenc(entry, config)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    if window is not None and not _int_at_least(1)(window):
        raise ValueError(f"{where}: sliding_window must be an int >= 1 (keys each query sees) or None, got {window!r}")
    out = {**scheme, "sliding_window": window}
    temperature = _normalize_temperature(temperature)
    if scheme["type"] == "nope":
        out["attn_temperature_tuning"] = temperature
    elif temperature is not None:
        raise ValueError(
            f"{where}: attn_temperature_tuning is Llama 4's temperature of its NoPE layers and goes on a 'nope' entry, "
            f"not on {scheme['type']!r}"
        )
    return out


#: the sites a pattern entry may take
_PER_LAYER = ("rotation", "bias", "none")


def _normalize_layers(params: dict, config: Any) -> dict:
    out = _check_params(
        "layers",
        params,
        {"pattern": Param(_REQUIRED, lambda v: isinstance(v, (list, tuple)) and len(v) > 0, "a non-empty list")},
    )
    pattern = [_normalize_layer_entry(i, entry, config) for i, entry in enumerate(out["pattern"])]
    layers = getattr(config, "num_hidden_layers", None)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == layers:  # hybrids: the attention layers only
        layers = sum(map(softmax_attention_kind, layer_types))
    if isinstance(layers, int) and len(pattern) > layers:
        raise ValueError(
            f"posenc 'layers': the pattern has {len(pattern)} entries but the model {layers} attention layers "
            "(num_hidden_layers, less linear-attention, convolution or MLP layers); allowed: a pattern no longer than "
            "that, repeated over the attention layers"
        )
    return {"pattern": pattern}


register_scheme(
    Scheme(
        "layers",
        "layers",
        True,
        "a pattern of rotation, bias and none schemes repeated over the depth, each entry with an optional sliding "
        "window (and Llama 4's temperature on NoPE entries)",
        _normalize_layers,
    )
)


def softmax_attention_kind(kind: Any) -> bool:
    """Whether a `layer_types` entry is a layer with softmax attention, where position schemes act ("full_attention",
    "sliding_attention", "chunked_attention", Falcon-H1's "hybrid" attention-and-Mamba layers, ...), rather than a
    linear-attention, convolution, Mamba or MLP layer ("linear_attention", LFM2's "conv", Nemotron-H's "mlp")."""
    if not isinstance(kind, str):
        return True
    return kind.startswith("hybrid") or (kind.endswith("attention") and kind != "linear_attention")


def layer_entries(posenc: Mapping, num_layers: int) -> list[dict]:
    """The normalised entry of each of `num_layers` layers: a pattern repeated over the depth (a 4-entry pattern on
    10 layers gives entries 0-3, 0-3, 0-1), or the one scheme everywhere."""
    if posenc["type"] != "layers":
        return [dict(posenc)] * num_layers
    pattern = posenc["pattern"]
    return [dict(pattern[i % len(pattern)]) for i in range(num_layers)]


def entry_scheme(entry: Mapping) -> dict:
    """A pattern entry without its layer options: the scheme's own normalised spec."""
    return {key: value for key, value in entry.items() if key not in LAYER_OPTIONS}


def posenc_schemes(posenc: Mapping) -> list[dict]:
    """The distinct scheme specs a posenc uses: itself, or each distinct entry scheme of a pattern, in order."""
    if posenc["type"] != "layers":
        return [dict(posenc)]
    out = []
    for entry in posenc["pattern"]:
        if entry_scheme(entry) not in out:
            out.append(entry_scheme(entry))
    return out


def rope_spec_of(posenc: Mapping) -> dict | None:
    """The rope spec a config's `rope_parameters` derive from: the posenc itself under RoPE, a pattern's first RoPE
    entry (the main one; other RoPE settings of the pattern get rotary modules of their own), or None."""
    return next((spec for spec in posenc_schemes(posenc) if spec["type"] == "rope"), None)


def other_rope_specs(posenc: Mapping) -> list[dict]:
    """A pattern's RoPE settings other than the main one (`rope_spec_of`), in order: each gets a rotary module."""
    main = rope_spec_of(posenc)
    return [spec for spec in posenc_schemes(posenc) if spec["type"] == "rope" and spec != main]


# --------------------------------------------------------------------------------------------------------------------
# RoPE: one scheme, every rope_type transformers ships plus static NTK
# --------------------------------------------------------------------------------------------------------------------

#: The bound of every RoPE scaling factor: a pair whose frequency a factor divides turns by (frequency / factor)
#: radian per position, and the fastest pair (frequency 1) would turn by less than 2**-24 radian, which float32 rounds
#: away (cos 1, sin below the unit roundoff of a unit vector): linear RoPE at a factor of 1e308 is NoPE. A factor
#: below 2**-24 (longrope's per-pair lists) turns a pair by more than 2**24 radians per position, where float32 angles
#: keep no digits of the turn (and 0 gives infinite frequencies: NaN).
ROPE_MAX_FACTOR = 2**24
_FACTOR_RULE = f"a number >= 1 and at most 2**24 = {ROPE_MAX_FACTOR} (past it float32 rounds the scaled turn away)"


def _factor(value: Any) -> bool:
    return _is_number(value) and 1 <= value <= ROPE_MAX_FACTOR


_FACTOR = Param(_REQUIRED, _factor, _FACTOR_RULE)
_FACTOR_LIST = Param(
    _REQUIRED,
    lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) and 2**-24 <= x <= ROPE_MAX_FACTOR for x in v),
    "a list of numbers in [2**-24, 2**24] (each divides one pair's frequency: outside, float32 rounds the turn away "
    "or keeps no digits of it; 0 gives NaN)",
)
_OPTIONAL_NUMBER = Param(None, lambda v: v is None or _is_number(v), "a number")
_OPTIONAL_LENGTH = Param(None, lambda v: v is None or _int_at_least(1)(v), "an int >= 1")
# yarn's correction range takes log(original length / (2 pi beta)): a count of rotations, > 0
_BETA = Param(None, lambda v: v is None or _positive(v), "a number > 0 (a number of rotations)")
#: transformers' yarn defaults for beta_fast and beta_slow
YARN_BETAS = (32, 1)

# Parameters of each rope_type beyond the common rope_theta and partial_rotary_factor. Types that transformers adds
# later and this table does not know are accepted with transformers' own validation.
ROPE_TYPE_PARAMS: dict[str, dict[str, Param]] = {
    "default": {},
    "ntk": {"factor": _FACTOR},
    "linear": {"factor": _FACTOR},
    "dynamic": {"factor": _FACTOR},
    "yarn": {
        "factor": _FACTOR,
        "original_max_position_embeddings": _OPTIONAL_LENGTH,
        "attention_factor": Param(None, lambda v: v is None or _positive(v), "a number > 0"),
        "beta_fast": _BETA,
        "beta_slow": _BETA,
        "mscale": _OPTIONAL_NUMBER,
        "mscale_all_dim": _OPTIONAL_NUMBER,
        "truncate": Param(None, lambda v: v is None or isinstance(v, bool), "a bool"),
    },
    "longrope": {
        "short_factor": _FACTOR_LIST,
        "long_factor": _FACTOR_LIST,
        "factor": Param(None, lambda v: v is None or _factor(v), _FACTOR_RULE),
        "original_max_position_embeddings": _OPTIONAL_LENGTH,
        "attention_factor": Param(None, lambda v: v is None or _positive(v), "a number > 0"),
    },
    "llama3": {
        "factor": _FACTOR,
        "low_freq_factor": Param(_REQUIRED, _positive, "a number > 0"),
        "high_freq_factor": Param(_REQUIRED, _positive, "a number > 0"),
        "original_max_position_embeddings": _OPTIONAL_LENGTH,
    },
    "proportional": {"factor": Param(1.0, _factor, _FACTOR_RULE)},
}
_ROPE_COMMON = {
    "rope_theta": Param(
        10000.0,
        lambda v: _is_number(v) and v >= 1,
        "a number >= 1 (the frequencies theta**(-2i/d) then stay at most 1 radian per position; below 1 they grow, "
        "and a base under float32's smallest number makes them infinite: NaN)",
    ),
    "partial_rotary_factor": Param(1.0, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
}
#: settings transformers' init function of a rope_type reads that its validation does not list: proportional RoPE
#: divides its frequencies by `factor` (`_compute_proportional_rope_parameters`) but warns that the key is unknown
_READ_NOT_VALIDATED = {"proportional": {"factor"}}
# rope_types whose transformers init function needs original_max_position_embeddings
_NEEDS_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")


def rope_types() -> list[str]:
    """Every accepted rope_type: transformers' `ROPE_INIT_FUNCTIONS` (read live), `default` and static `ntk`."""
    return sorted({"default", "ntk", *(t for t in ROPE_INIT_FUNCTIONS if not t.startswith(PARTIAL_PREFIX))})


def head_dim_of(config: Any) -> int:
    """The attention head width (of the layers `posenc` is read against, where layers differ: Gemma 4)."""
    config = _reference_layer_config(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _reference_layer_config(config: Any) -> Any:
    """A heterogeneous config's per-layer config of the first layer of the reference rope type (see
    `reference_rope_parameters`), whose head width RoPE's widths are computed with; any other config itself."""
    if not getattr(config, "is_heterogeneous", False):
        return config
    rope_parameters = getattr(config, "rope_parameters", None)
    keys = nested_rope_keys(rope_parameters)
    reference = next((key for key in keys if rope_parameters[key] == reference_rope_parameters(rope_parameters)), None)
    layer_types = list(getattr(config, "layer_types", None) or [])
    index = layer_types.index(reference) if reference in layer_types else 0
    return config.per_layer_config[index]


def rotary_head_dim_of(config: Any) -> int:
    """The width RoPE acts on: the head, or its rope part under multi-head latent attention (`qk_rope_head_dim`)."""
    return getattr(config, "qk_rope_head_dim", None) or head_dim_of(config)


def rotary_dim_of(config: Any, partial_rotary_factor: float) -> int:
    return int(rotary_head_dim_of(config) * partial_rotary_factor)


def nested_rope_keys(rope_parameters: Any) -> list[str]:
    """The layer types of per-layer-type `rope_parameters` ({"full_attention": {...}, "sliding_attention": {...}}),
    or [] for one flat dict."""
    if not isinstance(rope_parameters, Mapping) or "rope_type" in rope_parameters or "rope_theta" in rope_parameters:
        return []
    return [key for key, value in rope_parameters.items() if isinstance(value, Mapping) or value is None]


def _rope_entries(rope_parameters: Any) -> list[dict]:
    """Every flat RoPE entry of `rope_parameters` (one, or one per layer type that rotates)."""
    keys = nested_rope_keys(rope_parameters)
    if not keys:
        return [dict(rope_parameters)] if rope_parameters else []
    return [dict(rope_parameters[key]) for key in keys if rope_parameters[key]]


def reference_rope_parameters(rope_parameters: Any) -> dict:
    """The flat RoPE settings `posenc` is read against: the dict itself, or the full-attention entry of a per-layer
    one (the first entry that rotates where the full-attention layers do not)."""
    keys = nested_rope_keys(rope_parameters)
    if not keys:
        return dict(rope_parameters or {})
    rotating = [key for key in keys if rope_parameters[key]]  # an empty entry is a layer type without RoPE (NoPE)
    key = "full_attention" if "full_attention" in rotating else (rotating or keys)[0]
    return dict(rope_parameters[key] or {})


def _normalize_rope(params: dict, config: Any) -> dict:
    native = reference_rope_parameters(getattr(config, "rope_parameters", None))
    if str(native.get("rope_type", "")).startswith(PARTIAL_PREFIX):  # a partial rotation posenc derived: its own type
        native = {k: v for k, v in native.items() if k != "inner_rope_type"} | {"rope_type": native["inner_rope_type"]}
    rope_type = params.get("rope_type", native.get("rope_type", "default") if native else "default")
    if rope_type not in rope_types():
        raise ValueError(f"posenc 'rope': unknown rope_type {rope_type!r}; allowed: {', '.join(rope_types())}")
    # Start from the architecture's own RoPE settings: its theta and partial factor always, and the rest when the
    # user keeps its rope_type, named or not (a Llama-3 checkpoint stays llama3-scaled under posenc="rope"; on a yarn
    # checkpoint {"type": "rope", "factor": 8} and {"type": "rope", "rope_type": "yarn", "factor": 8} are one request).
    base = {k: native[k] for k in _ROPE_COMMON if native.get(k) is not None}
    keeps_native = native.get("rope_type", "default") == rope_type
    if keeps_native:
        base.update({k: v for k, v in native.items() if k in ROPE_TYPE_PARAMS.get(rope_type, {}) and v is not None})
    merged = {**base, **{k: v for k, v in params.items() if k != "rope_type"}}
    if rope_type in ROPE_TYPE_PARAMS:
        spec = {**_ROPE_COMMON, **ROPE_TYPE_PARAMS[rope_type]}
        out = _check_params("rope", merged, spec)
        out = {k: v for k, v in out.items() if v is not None}
    else:  # a rope_type newer than this table: transformers validates it when the config is built
        out = {**{k: p.default for k, p in _ROPE_COMMON.items()}, **merged}
    if rope_type in _NEEDS_ORIGINAL_LENGTH:
        # the pretraining length: the checkpoint's own where its RoPE states one (a scaled checkpoint's
        # max_position_embeddings is already the extended length), else max_position_embeddings, as transformers does
        original = native.get("original_max_position_embeddings")
        out.setdefault("original_max_position_embeddings", original or config.max_position_embeddings)
    if rope_type == "yarn":
        _check_yarn(out)
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(
            f"posenc 'rope' llama3: high_freq_factor must be greater than low_freq_factor (the band between their "
            f"wavelengths is interpolated), got high_freq_factor={out['high_freq_factor']}, "
            f"low_freq_factor={out['low_freq_factor']}"
        )
    rotary_dim = rotary_dim_of(config, out["partial_rotary_factor"])
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(
            f"posenc 'rope': the rotary width head_dim * partial_rotary_factor = {head_dim_of(config)} * "
            f"{out['partial_rotary_factor']} -> {rotary_dim} must be an even number >= 2"
        )
    if rope_type == "ntk":
        ntk_scaled_rope_theta(out["rope_theta"], out["factor"], rotary_dim)  # raises for a too-narrow rotary width
    for key in ("short_factor", "long_factor"):
        if key in out and len(out[key]) != rotary_dim // 2:
            raise ValueError(
                f"posenc 'rope' longrope: {key} needs rotary_dim / 2 = {rotary_dim // 2} entries, got {len(out[key])}"
            )
    return {"rope_type": rope_type, **out}


def _check_yarn(params: dict) -> None:
    """Refuse yarn settings transformers' init function would fail on (a math domain error, a division by zero) or
    turn into a reversed ramp or a non-positive attention factor; transformers' own validation only warns."""
    beta_fast, beta_slow = (params.get(key) or default for key, default in zip(("beta_fast", "beta_slow"), YARN_BETAS))
    if beta_fast <= beta_slow:
        raise ValueError(
            f"posenc 'rope' yarn: beta_fast must be greater than beta_slow (they bound the ramp between interpolated "
            f"and kept frequencies; defaults {YARN_BETAS[0]} and {YARN_BETAS[1]}), got beta_fast={beta_fast}, "
            f"beta_slow={beta_slow}"
        )
    factor, mscale, mscale_all_dim = params["factor"], params.get("mscale"), params.get("mscale_all_dim")
    if params.get("attention_factor") is None and mscale and mscale_all_dim and factor > 1:
        # transformers' attention factor: (0.1 * mscale * ln(factor) + 1) / (0.1 * mscale_all_dim * ln(factor) + 1)
        terms = [0.1 * m * math.log(factor) + 1 for m in (mscale, mscale_all_dim)]
        if min(terms) <= 0:
            raise ValueError(
                f"posenc 'rope' yarn: the attention factor (0.1 * mscale * ln(factor) + 1) / (0.1 * mscale_all_dim * "
                f"ln(factor) + 1) = {terms[0]:.4g} / {terms[1]:.4g} needs both terms > 0, got mscale={mscale}, "
                f"mscale_all_dim={mscale_all_dim}, factor={factor}"
            )


register_scheme(
    Scheme(
        "rope",
        "rotation",
        True,
        "rotary embedding of q and k; every transformers rope_type + ntk; scaling factors in [1, 2**24]",
        _normalize_rope,
    )
)


def hf_rope_parameters(posenc: Mapping, config: Any, rotates_part: bool = True) -> dict:
    """The transformers `rope_parameters` dict that realises a normalised rope spec.

    Static NTK becomes `default` with the scaled base. `rotates_part`: whether the architecture's rotary step rotates
    only the first `partial_rotary_factor` of the head natively (GPT-NeoX, Phi); where it always rotates the whole
    head (Llama), a partial rotation is the `posenc_partial` rope_type (see `partial_rope_parameters`).
    """
    params = {k: v for k, v in posenc.items() if k != "type"}
    if params["rope_type"] == "ntk":
        rotary_dim = rotary_dim_of(config, params["partial_rotary_factor"])
        theta = ntk_scaled_rope_theta(params["rope_theta"], params["factor"], rotary_dim)
        params = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": params["partial_rotary_factor"]}
    if params["partial_rotary_factor"] < 1 and not rotates_part:
        if params["rope_type"] not in PARTIAL_INNER_TYPES:
            raise ValueError(
                f"posenc 'rope': {getattr(config, 'base_model_type', 'this architecture')!r} rotates the whole head, "
                f"where partial_rotary_factor < 1 works with rope_type {', '.join(PARTIAL_INNER_TYPES)}, not "
                f"{posenc['rope_type']!r} (transformers switches longrope's frequencies by the type's name)"
            )
        return {**params, "rope_type": PARTIAL_PREFIX + params["rope_type"], "inner_rope_type": params["rope_type"]}
    return params


#: rope_type prefix of a partial rotation on an architecture that rotates the whole head: `posenc_partial_<inner>`
#: is registered with transformers' ROPE_INIT_FUNCTIONS for every inner type (the name keeps "dynamic" where
#: transformers' dynamic update looks for it), so the stock rotary modules, their updates and `_init_weights` all
#: compute it
PARTIAL_PREFIX = "posenc_partial_"
PARTIAL_INNER_TYPES = tuple(sorted({"default", *ROPE_INIT_FUNCTIONS} - {"longrope"}))


def _inner_view(config: Any, layer_type: str | None) -> Any:
    """A shallow copy of `config` whose (layer type's) rope_parameters name the inner rope_type of a partial one."""
    view = copy.copy(config)
    params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    inner = {k: v for k, v in params.items() if k != "inner_rope_type"} | {"rope_type": params["inner_rope_type"]}
    view.__dict__["rope_parameters"] = {**config.rope_parameters, layer_type: inner} if layer_type else inner
    return view


def partial_rope_parameters(config: Any, device=None, seq_len=None, layer_type=None, **kwargs):
    """Inverse frequencies of partial RoPE where the rotary step rotates the whole head: the inner rope_type's
    frequencies over the rotary width `r = head * partial_rotary_factor` (every rope_type honours that width), then
    zeros up to the head. A zero frequency turns its pair by 0 (cos 1, sin 0), so the last pairs pass unrotated in
    every layout; the rotated pairs keep `theta^(-2i/r)` (scaled as the inner type scales them)."""
    view = _inner_view(config, layer_type)
    params = view.rope_parameters[layer_type] if layer_type is not None else view.rope_parameters
    rotary_dim = rotary_dim_of(config, params.get("partial_rotary_factor", 1.0))
    if params["rope_type"] == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
        inv_freq, scaling = 1.0 / (params["rope_theta"] ** (exponents / rotary_dim)), 1.0
    else:
        options = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](view, device, seq_len=seq_len, **options)
    missing = rotary_head_dim_of(config) // 2 - inv_freq.shape[-1]
    return torch.cat([inv_freq, inv_freq.new_zeros(missing)]), scaling


def _validate_partial(self, rope_parameters: dict, ignore_keys=None) -> None:
    """transformers' validation of a `posenc_partial_<inner>` entry: that of its inner rope_type."""
    inner = {k: v for k, v in rope_parameters.items() if k != "inner_rope_type"}
    inner["rope_type"] = rope_parameters["inner_rope_type"]
    validate = getattr(self, f"_validate_{inner['rope_type']}_rope_parameters", None)
    if validate is not None:
        validate(inner, ignore_keys=ignore_keys)


for _inner in PARTIAL_INNER_TYPES:
    ROPE_INIT_FUNCTIONS[PARTIAL_PREFIX + _inner] = partial_rope_parameters


def stock_class_of(cls: type) -> type:
    """The transformers class a posenc class (config or model) is made from: the first one of transformers' models in
    its method resolution order."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("transformers.models."))


def _own_settings(native, derived: Mapping) -> dict:
    """The entries of an architecture's `rope_parameters` (`native`) that the derived rope_type does not set: the
    architecture's own settings, which `derived_rope_parameters` keeps beside the derived ones."""
    if not native:
        return {}
    rope_type = derived["rope_type"]
    inner = derived.get("inner_rope_type", rope_type)
    sets = {"rope_type", "type", "inner_rope_type", *_ROPE_COMMON, *ROPE_TYPE_PARAMS.get(inner, {}), *derived}
    return {key: value for key, value in native.items() if key not in sets}


#: keys of a posenc config's `__dict__` recording what it was built with (not serialised, see `to_dict`)
_BUILT_POSENC, _BUILT_ROPE = "_posenc_as_built", "_rope_parameters_as_built"


def kernel_of(name) -> str | None:
    """The posenc kernel an attn_implementation names, in any loaded copy's spelling ('posenc_sdpa' or
    'posenc_sdpa.<tag>' -> 'sdpa'; see posenc_attention.kernel_name), or None for a name that is not a posenc
    kernel's."""
    if isinstance(name, str) and name.startswith("posenc_"):
        return name.removeprefix("posenc_").split(".")[0]
    return None


#: how config.json's `attn_implementation` begins where a stock class would compute another model than the saved one
#: (see `PosencConfigMixin.stock_guard`)
STOCK_GUARD = "hf_posenc guard: "


class PosencConfigMixin:
    """Shared by every posenc config: `posenc` is the source of truth, normalised when the config is built.

    Subclasses put this mixin before the stock config class and declare `posenc: dict | str | None = None` as a field,
    plus three class attributes: `base_model_type` (the stock model_type), `native_posenc` (the scheme the stock
    architecture uses, taken when `posenc` is None) and `auto_map_entries` (every Auto class -> "module.Class" of the
    shipped code, written to config.json so that `trust_remote_code` finds each head).

    For RoPE, `rope_parameters` is derived from `posenc` here, so the stock rotary modules read transformers' own
    field. Per-layer-type `rope_parameters` (Gemma 3, ModernBERT, OLMo 3, ...) are read against their full-attention
    entry: they are kept as they are when `posenc` equals it (so the native scheme is the stock model), and otherwise
    every layer type that rotates gets the RoPE `posenc` asks for (a layer type without RoPE stays without).
    """

    def __post_init__(self, **kwargs):
        if str(kwargs.get("attn_implementation") or "").startswith(STOCK_GUARD):
            kwargs.pop("attn_implementation")  # the guard this config wrote for stock classes, not a user's choice
        super().__post_init__(**kwargs)
        self.posenc = normalize_posenc(self.posenc, self, default=self.native_posenc)
        spec = rope_spec_of(self.posenc)
        if self.posenc["type"] == "layers" and isinstance(getattr(self, "no_rope_layers", None), list):
            # the architecture states which layers rotate (SmolLM3, Llama 4: 1 rotates, 0 does not): the pattern's
            # RoPE layers are said there, so the stock layers rotate them (and only them) as the stock model would
            entries = layer_entries(self.posenc, len(self.no_rope_layers))
            rotating = [int(entry["type"] == "rope") for entry in entries]
            if rotating != list(self.no_rope_layers):
                self.layer_types = self._layer_types_for(rotating)
                self.no_rope_layers = rotating
            if self.temperature_natively():  # Llama 4: one temperature, which its NoPE layers apply themselves
                self._set_native_temperature(entries)
        if spec is not None:
            self.rope_parameters = self.derived_rope_parameters()
            reference = reference_rope_parameters(self.rope_parameters)
            known = {"rope_type", *_ROPE_COMMON, *ROPE_TYPE_PARAMS.get(spec["rope_type"], {}), "inner_rope_type"}
            # and the settings transformers reads but its validation does not list (it would warn of them)
            extras = (set(reference) - known) | (set(reference) & _READ_NOT_VALIDATED.get(spec["rope_type"], set()))
            if extras:  # the architecture's own settings (see _normalize_rope), unknown to the type's validation
                self.ignore_keys_at_rope_validation = {*(self.ignore_keys_at_rope_validation or ()), *extras}
            stock = stock_class_of(type(self)).__name__
            self._validate_rope_saying(f"posenc {self.posenc} gives rope_parameters that transformers' {stock} refuses")
        else:
            if self.native_posenc != "rope" and "rope_parameters" in self.__dict__:
                if "rope_parameters" not in {f.name for f in dataclasses.fields(self)}:
                    del self.rope_parameters  # left from an earlier rope scheme on an architecture without native RoPE
            self._check_identity_rotation()
        self.auto_map = dict(self.auto_map_entries)
        # what the config was built with, to refuse later hand edits (see check_posenc, check_rope_parameters)
        self.__dict__[_BUILT_POSENC] = copy.deepcopy(self.posenc)
        self.__dict__[_BUILT_ROPE] = copy.deepcopy(getattr(self, "rope_parameters", None))

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A config read from a file (config.json) must state its scheme: without `posenc` it would load silently as
        the architecture's native scheme (an ALiBi folder whose `posenc` was deleted loading as RoPE). A config built
        in code without `posenc` takes the native scheme; only the loaded dict is refused here."""
        if config_dict.get("posenc") is None:
            raise ValueError(
                f"config.json of model_type {cls.model_type!r} has no 'posenc' entry: a saved posenc config states its "
                f'scheme, which is not guessed. Add "posenc": a scheme name, one of {", ".join(sorted(SCHEMES))}, or '
                f"a dict with a 'type' key and the scheme's parameters (the architecture's own scheme is "
                f"{cls.native_posenc!r})"
            )
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in (_BUILT_POSENC, _BUILT_ROPE):  # records of this process, never written
            out.pop(key, None)
        guard = self.stock_guard()
        if guard is not None:
            out["attn_implementation"] = guard
        return out

    def stock_guard(self) -> str | None:
        """What config.json says to a stock class where the stock class would compute another model than this one.

        transformers' configs read `attn_implementation` from config.json, and a model refuses to be built with an
        unregistered one, quoting it: so `LlamaForCausalLM.from_pretrained(alibi_folder)` fails with this text instead
        of running ALiBi's weights with RoPE's positions (with only transformers' warning about the model type). A
        posenc config drops it on loading (`__post_init__`), with the plugin or its shipped code. None where the stock
        class computes the same model: the native scheme, or RoPE of transformers' own types on a RoPE architecture.
        The text has no '/' (transformers would take it for a Hub kernel) and no 'flash'."""
        scheme = self.posenc["type"]
        if self.posenc == normalize_posenc(self.native_posenc, self):
            return None
        if scheme == "layers" and self.native_posenc == "rope" and self.layers_natively():
            entries = self.posenc["pattern"]
            # the stock layers rotate where no_rope_layers says, with one RoPE setting, and apply nothing else
            plain = all(e["sliding_window"] is None for e in entries)
            plain = plain and all(e["type"] in ("rope", "nope") for e in entries)
            plain = plain and not other_rope_specs(self.posenc)
            if plain and not any(e.get("attn_temperature_tuning") for e in entries if not self.temperature_natively()):
                scheme = "rope"  # then as RoPE: the stock class computes it where it computes the RoPE setting
        if scheme == "rope" and self.native_posenc == "rope":
            types = [p.get("rope_type") for p in _rope_entries(getattr(self, "rope_parameters", None))]
            if all(t in ROPE_INIT_FUNCTIONS or t == "default" for t in types) and not any(
                str(t).startswith(PARTIAL_PREFIX) for t in types
            ):
                return None
        stock = stock_class_of(type(self)).__name__.removesuffix("Config")
        return (
            f"{STOCK_GUARD}this checkpoint was saved by hf_posenc with posenc {scheme!r}, which transformers' own "
            f"{stock} classes do not compute (they would run it with other positions). Load it with: import "
            "hf_posenc, then the Auto class as usual, e.g. AutoModelForCausalLM.from_pretrained(path); or without "
            "hf_posenc: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
        )

    def _layer_types_for(self, no_rope_layers: list[int]):
        """`layer_types` with another `no_rope_layers`: where the stock config derives them from it (Llama 4's RoPE
        layers are chunked, SmolLM3's NoPE layers slide when `use_sliding_window`), derived again by the stock config
        from the new one; kept where they were given (not what the stock config derives)."""
        current = getattr(self, "layer_types", None)
        stock = stock_class_of(type(self))
        fields = {field.name for field in dataclasses.fields(stock)}
        if "layer_types" not in fields:
            return current
        settings = {name: getattr(self, name) for name in fields if name in self.__dict__}

        def derived(rotating):
            return stock(**{**settings, "no_rope_layers": list(rotating), "layer_types": None}).layer_types

        return derived(no_rope_layers) if current == derived(self.no_rope_layers) else current

    def _set_native_temperature(self, entries: list[dict]) -> None:
        temperatures = [e["attn_temperature_tuning"] for e in entries if e["type"] == "nope"]
        if any(t != temperatures[0] for t in temperatures):
            raise ValueError(
                f"posenc 'layers' on {self.base_model_type!r}: its NoPE layers apply one attention temperature, set in "
                f"its config (attn_temperature_tuning, floor_scale, attn_scale), but the pattern's NoPE entries ask "
                f"for {temperatures}; allowed: the same attn_temperature_tuning on every NoPE entry"
            )
        temperature = temperatures[0] if temperatures else None
        self.attn_temperature_tuning = temperature is not None
        if temperature is not None:
            self.floor_scale, self.attn_scale = temperature["floor_scale"], temperature["attn_scale"]

    def score_kernels(self) -> bool:
        """Whether the model runs on the posenc attention kernels: a score-bias scheme, or a per-layer pattern with a
        bias, a sliding window or a temperature the architecture does not apply itself in some entry (its other
        layers then run on them too, without a bias: plain SDPA where nothing else applies)."""
        if self.posenc["type"] != "layers":
            return get_scheme(self.posenc["type"]).site == "bias"
        native = self.temperature_natively()
        return any(
            get_scheme(e["type"]).site == "bias"
            or e["sliding_window"] is not None
            or (e.get("attn_temperature_tuning") is not None and not native)
            for e in self.posenc["pattern"]
        )

    def layers_natively(self) -> bool:
        """Whether the architecture's config states which layers rotate (`no_rope_layers`: SmolLM3, Llama 4), so that
        a pattern's RoPE layers are said there and the stock layers rotate them (see `__post_init__`)."""
        return self.posenc["type"] == "layers" and isinstance(getattr(self, "no_rope_layers", None), list)

    def temperature_natively(self) -> bool:
        """Whether the architecture applies Llama 4's temperature to its NoPE layers itself (`attn_temperature_tuning`
        in its config), so that a pattern's NoPE entries set it there."""
        return self.layers_natively() and isinstance(getattr(self, "attn_temperature_tuning", None), bool)

    def _check_identity_rotation(self) -> None:
        """A scheme other than RoPE keeps the architecture's rotary step as an identity rotation (see
        `PositionFreeRotaryMixin`), which the stock attention still applies: its RoPE settings must still be ones the
        stock rotary step computes. Raises a ValueError naming the scheme and the setting, where transformers would
        speak of RoPE or the forward fail on a shape."""
        native = reference_rope_parameters(getattr(self, "rope_parameters", None))
        if not native or self.native_posenc != "rope":
            return
        scheme, stock = self.posenc["type"], stock_class_of(type(self)).__name__
        why = (
            f"{self.base_model_type!r} applies its rotary step under every scheme (an identity rotation for "
            f"posenc {scheme!r}), so"
        )
        width = rotary_head_dim_of(self)
        if (native.get("partial_rotary_factor") or 1.0) >= 1 and width % 2:
            raise ValueError(
                f"posenc {scheme!r} on {self.base_model_type!r}: the head width {width} is odd; {why} it rotates whole "
                "heads in pairs. Allowed: an even head_dim (or hidden_size / num_attention_heads)"
            )
        self._validate_rope_saying(
            f"posenc {scheme!r} on {self.base_model_type!r}: {why} transformers' {stock} must accept its "
            f"rope_parameters {self.rope_parameters}, and refuses them"
        )

    def _validate_rope_saying(self, message: str) -> None:
        """transformers' validation of `rope_parameters`, a refusal re-raised as a ValueError `message: why`."""
        try:
            self.validate_rope()
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{message}: {error}") from error

    def check_posenc(self, built: Mapping | None = None, what: str = "config") -> None:
        """Refuse `posenc` edited by hand after the config was built (or after the model was built with `built`): a
        model keeps the scheme it was built with, but `save_pretrained` would write the edited one, so the reloaded
        model would differ from the trained one (and a model built from the edited config would read a spec that was
        never normalised)."""
        built = self.__dict__.get(_BUILT_POSENC) if built is None else built
        if built is None or self.posenc == built:
            return
        raise ValueError(
            f"config.posenc was changed from {dict(built)} to {self.posenc!r} after the {what} was built: a model "
            "keeps the scheme it was built with, so it would be saved as another one. Build a new model instead: "
            "AutoModelForCausalLM.from_config(hf_posenc.with_posenc(config, new_posenc)) for a fresh one, or "
            "AutoModelForCausalLM.from_pretrained(saved_folder, posenc=new_posenc) to convert trained weights"
        )

    def record_posenc(self) -> None:
        """Take the current `posenc` as the one this config was built with: for a model converted in place to it (a
        learned table grown by `from_pretrained(..., posenc=...)`), once its model has checked that it is."""
        self.__dict__[_BUILT_POSENC] = copy.deepcopy(self.posenc)

    @classmethod
    def rotates_part_natively(cls) -> bool:
        """Whether the architecture's own RoPE rotates part of the head (its default config says so: GPT-NeoX, Phi,
        StableLM); if not, a partial rotation goes through the `proportional` type (see `hf_rope_parameters`)."""
        if getattr(cls, "_rotates_part", None) is None:
            stock = stock_class_of(cls)
            try:
                native = reference_rope_parameters(getattr(stock(), "rope_parameters", None))
            except Exception:  # a stock config that cannot be built with its defaults
                native = {}
            # Gemma 4 rotates part of the head through transformers' `proportional` type (zero-padded frequencies),
            # not natively: its rotary step expects full-width tables
            natively = native.get("rope_type") != "proportional"
            cls._rotates_part = natively and (native.get("partial_rotary_factor") or 1.0) < 1
        return cls._rotates_part

    def derived_rope_parameters(self, spec: Mapping | None = None):
        """`rope_parameters` as `posenc` (a rope spec, or a pattern's main RoPE entry) makes them, in the shape this
        config's own take.

        Settings of the architecture's own that the chosen type does not set stay in `rope_parameters` (not in
        `posenc`), since its model may read them whatever the type: Ministral 3's `llama_4_scaling_beta` and
        original length, Cohere's `mrope_section`, PhiMoE's mscales."""
        spec = rope_spec_of(self.posenc) if spec is None else spec
        flat = hf_rope_parameters(spec, self, self.rotates_part_natively())
        current = getattr(self, "rope_parameters", None)
        layer_types = nested_rope_keys(current)
        if not layer_types:
            return {**_own_settings(current, flat), **flat}
        if spec == normalize_posenc("rope", self):
            return current  # posenc is the native scheme: every layer type keeps its own settings
        # every layer type that rotates gets the RoPE posenc asks for; NoPE layer types (empty entries) stay NoPE
        return {
            layer_type: {**_own_settings(current[layer_type], flat), **flat}
            if current[layer_type]
            else current[layer_type]
            for layer_type in layer_types
        }

    def viewed_with_rope(self, spec: Mapping):
        """A shallow copy of this config whose `rope_parameters` are those of another RoPE setting `spec` of a
        pattern: what a rotary module for that setting is built from."""
        view = copy.copy(self)
        view.rope_parameters = self.derived_rope_parameters(spec)
        return view

    def rope_parameters_to_hand_on(self):
        """The `rope_parameters` a new config of another scheme takes as the architecture's own (`with_posenc`): this
        config's, unless they were derived from a rope spec that transformers cannot state directly (static NTK, a
        partial rotation given as `proportional`), in which case the spec's own settings, in the same shape. Read
        against the posenc the config was built with (`rope_parameters` are its), whatever a hand edit made of it."""
        current = getattr(self, "rope_parameters", None)
        posenc = rope_spec_of(self.__dict__.get(_BUILT_POSENC) or self.posenc)
        if posenc is None or posenc == normalize_posenc("rope", self):
            return current
        flat = {k: v for k, v in posenc.items() if k != "type"}
        if flat["rope_type"] == "ntk":  # not a transformers rope_type: hand on the unscaled base
            flat = {"rope_type": "default", **{k: flat[k] for k in ("rope_theta", "partial_rotary_factor")}}
        layer_types = nested_rope_keys(current)
        if not layer_types:
            return {**_own_settings(current, flat), **flat}
        return {lt: {**_own_settings(current[lt], flat), **flat} if current[lt] else current[lt] for lt in layer_types}

    def check_rope_parameters(self) -> None:
        """Refuse `rope_parameters` edited by hand: under RoPE the model would be built from them but reloaded from
        `posenc`; under any other scheme they only set the identity rotation, so the edit would change nothing."""
        self.check_posenc()
        if rope_spec_of(self.posenc) is None:
            built = self.__dict__.get(_BUILT_ROPE)
            if _BUILT_ROPE in self.__dict__ and getattr(self, "rope_parameters", None) != built:
                raise ValueError(
                    f"config.rope_parameters were changed from {built} to {self.rope_parameters} after the config was "
                    f"built: posenc {self.posenc['type']!r} does not rotate (the rotary step is an identity rotation), "
                    "so the edit would change nothing. For RoPE settings, build a RoPE config: "
                    "hf_posenc.with_posenc(config, {'type': 'rope', ...})"
                )
            return
        expected, current = self.derived_rope_parameters(), self.rope_parameters or {}
        layer_types = nested_rope_keys(expected)
        if layer_types:
            expected = {lt: expected[lt] for lt in layer_types}
            current = {
                lt: expected[lt] and {k: (current.get(lt) or {}).get(k) for k in expected[lt]} for lt in layer_types
            }
        else:
            current = {key: current.get(key) for key in expected}
        if current != expected:
            raise ValueError(
                f"config.rope_parameters {current} no longer match config.posenc {self.posenc}: the scheme is read "
                "from posenc; change it with hf_posenc.with_posenc(config, {'type': 'rope', ...}) instead"
            )

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.check_rope_parameters()  # and check_posenc
        super().save_pretrained(save_directory, *args, **kwargs)

    # transformers allows output_attentions only for the implementation literally named "eager"; bias schemes run
    # their eager kernel as "posenc_eager" (or a loaded folder's copy of it), which returns the weights just the same.
    _EAGER = (None, "eager")

    @property
    def output_attentions(self) -> bool:
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool) -> None:
        if value and self._attn_implementation is None:
            self._attn_implementation = "eager"
        self._output_attentions = value
        self.validate_output_attentions()

    def validate_output_attentions(self) -> None:
        implementation = self._attn_implementation
        eager = implementation in self._EAGER or kernel_of(implementation) == "eager"
        if self.output_attentions and not eager:
            raise ValueError(
                f"output_attentions needs the eager attention implementation, got {self._attn_implementation!r}; "
                "pass attn_implementation='eager'"
            )


for _inner in PARTIAL_INNER_TYPES:
    setattr(PosencConfigMixin, f"_validate_{PARTIAL_PREFIX}{_inner}_rope_parameters", _validate_partial)
