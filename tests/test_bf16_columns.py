"""The lead for ALiBi on plain causal SDPA in bf16 (issue 14): the key position split into two columns bf16 holds
exactly keeps the bias exact, where the fp32 trick's single column, in bf16, does not (scripts/alibi_bf16_columns.py
measures it at 1k-8k; this runs its functions at 1024 tokens on the CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "alibi_bf16_columns.py"


def _script():
    spec = importlib.util.spec_from_file_location("alibi_bf16_columns", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def column_errors(length: int = 1024, device="cpu") -> dict[str, float]:
    """Mean absolute error against float64 ALiBi attention of the same bf16 q, k, v (8 heads, width 64) of: float64
    rounded to bf16 ("rounding"), the dense bf16 mask, the split columns and the single column, each through
    `device`'s SDPA (tests/test_gpu.py runs it on CUDA)."""
    columns = _script()
    slopes = columns.alibi_slopes(8)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, length, 64, generator=generator).to(torch.bfloat16) for _ in range(3))
    expected = columns.reference(q, k, v, slopes)
    q, k, v = (t.to(device) for t in (q, k, v))

    def error(output):
        return (output.cpu().double() - expected).abs().mean().item()

    return {
        "rounding": error(expected.to(torch.bfloat16)),
        "mask": error(columns.with_bias_mask(q, k, v, slopes)),
        "split": error(columns.with_columns(q, k, v, slopes, split=True)),
        "single": error(columns.with_columns(q, k, v, slopes, split=False)),
    }


def test_split_columns_keep_alibi_exact_in_bf16():
    """Mean error of the bf16 output against float64 ALiBi on the same inputs: the split columns stay at the dense
    mask's (within 10%, both near bf16's own rounding), the single column is over 10x worse."""
    errors = column_errors()
    assert errors["split"] <= 1.1 * errors["mask"] and errors["split"] <= 1.5 * errors["rounding"]
    assert errors["single"] > 10 * errors["split"]
