"""Loading a checkpoint into another positional scheme, and the report of what that kept, dropped, added and grew."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedConfig

from .modeling.posenc_layers import LearnedPositionEmbedding
from .modeling.posenc_schemes import GROW_METHODS, PosencConfigMixin

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What `from_pretrained(checkpoint, posenc=...)` did to the checkpoint's tensors.

    Attributes:
        source: the checkpoint path or name.
        posenc: the scheme the model now has.
        kept: checkpoint tensors loaded unchanged.
        dropped: checkpoint tensors the scheme does not use (e.g. GPT-2's `wpe` under RoPE).
        added: new tensors, initialised as transformers initialises them (e.g. a T5 bias table).
        grown: learned position tables lengthened, as "name: old -> new rows (method)".
    """

    source: str
    posenc: dict
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    grown: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def names(items):
            return ", ".join(items) if items else "nothing"

        return "\n".join(
            [
                f"converted {self.source} to posenc={self.posenc}",
                f"  kept    {len(self.kept)} tensors unchanged",
                f"  dropped {names(self.dropped)}",
                f"  added   {names(self.added)}",
                f"  grown   {names(self.grown)}",
            ]
        )


def grown_table(weight: torch.Tensor, rows: int, method: str, reserved: int = 0) -> torch.Tensor:
    """A learned position table of `rows` rows made from `weight` (n, d), n <= rows.

    The first `reserved` rows are not positions (RoBERTa keeps rows 0..padding_idx, its positions start after) and
    stay as they are; only the n - reserved position rows grow:
    - `tile`: the trained rows stay exactly; position p past them reuses row p mod (n - reserved).
    - `interpolate`: the rows are stretched linearly over the new length (the first and last stay), the learned-table
      analogue of position interpolation: every position moves, none is out of distribution.
    """
    n = weight.shape[0]
    if rows < n:
        raise ValueError(f"cannot grow a learned table of {n} positions to {rows}: that would drop trained rows")
    head, body = weight[:reserved], weight[reserved:]
    size = rows - reserved
    if method == "tile":
        grown = body[torch.arange(size, device=weight.device) % body.shape[0]]
    elif method == "interpolate":
        stretched = nn.functional.interpolate(body.T[None].float(), size=size, mode="linear", align_corners=True)
        grown = stretched[0].T.to(weight.dtype)
    else:
        raise ValueError(f"unknown grow method {method!r}; allowed: {', '.join(GROW_METHODS)}")
    return torch.cat([head, grown]).contiguous()


def learned_rows(config: PreTrainedConfig, architectures: dict) -> int | None:
    """Rows of the learned position table a checkpoint with this config holds, or None when it holds none."""
    if isinstance(config, PosencConfigMixin):
        return config.posenc["num_positions"] if config.posenc["type"] == "learned" else None
    posenc_class = architectures.get(config.model_type)
    if posenc_class is not None and posenc_class.native_posenc == "learned":
        return config.max_position_embeddings
    return None


def load_converted(load, source: str, source_config, target_config, architectures: dict, with_posenc, kwargs: dict):
    """Load `source` with `load(config=..., **kwargs)` into `target_config`'s scheme and report what changed.

    A learned table longer than the checkpoint's is loaded at the checkpoint's length, then grown by the spec's
    `grow` method; without one, or to a shorter table, this refuses rather than resize silently.
    """
    target = target_config.posenc
    rows = learned_rows(source_config, architectures)
    load_config = target_config
    if target["type"] == "learned" and rows is not None and rows != target["num_positions"]:
        if target["num_positions"] < rows:
            raise ValueError(
                f"the checkpoint's learned position table has {rows} positions and posenc asks for "
                f"{target['num_positions']}: shrinking would drop trained rows"
            )
        if target["grow"] is None:
            raise ValueError(
                f"the checkpoint's learned position table has {rows} positions and posenc asks for "
                f"{target['num_positions']}; say how to fill the new rows with 'grow': one of {GROW_METHODS}"
            )
        load_config = with_posenc(target_config, {**target, "num_positions": rows})

    want_info = kwargs.pop("output_loading_info", False)
    model, info = load(config=load_config, output_loading_info=True, **kwargs)
    added = sorted(info["missing_keys"] | {key for key, *_ in info["mismatched_keys"]})
    report = ConversionReport(
        source=str(source),
        posenc=dict(target),
        kept=sorted(set(model.state_dict()) - set(added)),
        dropped=sorted(info["unexpected_keys"]),
        added=added,
    )
    if load_config is not target_config:
        for name, module in model.named_modules():
            if isinstance(module, LearnedPositionEmbedding):
                reserved = 0 if module.padding_idx is None else module.padding_idx + 1  # RoBERTa's padding rows
                with torch.no_grad():
                    weight = grown_table(module.weight, target["num_positions"], target["grow"], reserved)
                    module.weight = nn.Parameter(weight)
                module.num_embeddings = target["num_positions"]
                report.grown.append(f"{name}.weight: {rows} -> {target['num_positions']} rows ({target['grow']})")
                report.kept.remove(f"{name}.weight")
        # the model now computes the grown table's scheme: the config and the model both record it as built
        model.config.posenc = dict(target)
        model.config.record_posenc()
        for module in model.modules():
            if hasattr(module, "_posenc_built"):
                module._posenc_built = dict(target)
    model.posenc_conversion = report
    if report.dropped or report.added or report.grown:
        # transformers reports the same tensors as MISSING/UNEXPECTED at WARNING level, which alarms: say at the same
        # level that they are what the conversion meant to do
        logger.warning(
            "%s\n  (the MISSING and UNEXPECTED keys of transformers' load report are these tensors: "
            "the conversion expects them)",
            report,
        )
    else:
        logger.info("%s", report)
    return (model, info) if want_info else model
