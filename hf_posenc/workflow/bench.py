"""`hf-posenc bench`: the score-bias attention paths against plain causal SDPA, at the same shape, in one run.

Each path is timed on the same inputs: warm-up, then the median of repeats, forward and forward+backward, plus its peak
memory growth (see `PeakMemory`). Ratios are to plain causal SDPA (no bias) measured in the same run: the numbers that
mean something on a shared, noisy machine.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..modeling.posenc_attention import AlibiBias, ScoreBiasMask, posenc_eager_attention, posenc_sdpa_attention
from .compare import PeakMemory, environment


class _Attention(nn.Module):
    def __init__(self, provider):
        super().__init__()
        self.training = False
        object.__setattr__(self, "posenc_bias", provider)


def paths(heads: int) -> dict:
    """name -> f(query, key, value) for every path benchmarked; all compute causal attention over the same inputs."""
    module = _Attention(AlibiBias(heads))

    def masks(length, padded):
        positions = torch.arange(length)
        mask = torch.ones(1, 1, length, length, dtype=torch.bool).tril() if padded else None
        return ScoreBiasMask(mask, True, positions, positions)

    return {
        "causal SDPA (no bias)": lambda q, k, v: nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        "alibi: column trick": lambda q, k, v: posenc_sdpa_attention(module, q, k, v, masks(q.shape[2], False))[0],
        "alibi: chunked (padded)": lambda q, k, v: posenc_sdpa_attention(module, q, k, v, masks(q.shape[2], True))[0],
        "alibi: dense eager": lambda q, k, v: posenc_eager_attention(module, q, k, v, masks(q.shape[2], False))[0],
    }


def _forward_backward(function, q, k, v) -> None:
    function(q, k, v).sum().backward()


def time_call(function, repeats: int) -> float:
    for _ in range(2):  # warm-up
        function()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def run_bench(
    lengths=(512, 1024, 2048, 4096), heads=12, head_dim=64, batch=1, repeats=3, backward_max=4096, dense_max=4096
) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        "shape": dict(batch=batch, heads=heads, head_dim=head_dim),
        "environment": environment(device),
        "rows": [],
    }
    for length in lengths:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator).to(device) for _ in range(3))
        for name, function in paths(heads).items():
            if "dense" in name and length > dense_max:
                continue
            row = {"path": name, "length": length}
            with torch.no_grad(), PeakMemory(device) as memory:
                row["forward_s"] = time_call(functools.partial(function, q, k, v), repeats)
            row["forward_peak_mib"] = memory.peak_bytes / 2**20
            if length <= backward_max:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                row["forward_backward_s"] = time_call(
                    functools.partial(_forward_backward, function, qg, kg, vg), repeats
                )
            results["rows"].append(row)
        base = next(r for r in results["rows"] if r["length"] == length and r["path"].startswith("causal SDPA"))
        for row in results["rows"]:
            if row["length"] == length:
                row["forward_ratio"] = row["forward_s"] / base["forward_s"]
                if "forward_backward_s" in row and "forward_backward_s" in base:
                    row["forward_backward_ratio"] = row["forward_backward_s"] / base["forward_backward_s"]
    return results


def markdown(results: dict) -> str:
    lines = [
        "| L | path | forward s | x causal SDPA | fwd+bwd s | x causal SDPA | forward peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        fb = f"{row['forward_backward_s']:.4f}" if "forward_backward_s" in row else "-"
        fbr = f"{row['forward_backward_ratio']:.2f}" if "forward_backward_ratio" in row else "-"
        lines.append(
            f"| {row['length']} | {row['path']} | {row['forward_s']:.4f} | {row['forward_ratio']:.2f} | {fb} | {fbr} | "
            f"{row['forward_peak_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write(results: dict, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
