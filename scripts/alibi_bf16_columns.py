"""Can ALiBi ride on plain causal SDPA in bf16? The error of the column trick with the key position split into parts
that bf16 holds exactly, against float64, beside the best bf16 can do with an exact float32 bias.

    python scripts/alibi_bf16_columns.py                       # L = 1024, 4096, 8192 at head width 64 (CPU)
    python scripts/alibi_bf16_columns.py --lengths 2048 --head-dim 128 --device cuda

Causal ALiBi adds -m_h (i - j) to the scores; up to a per-row constant (which softmax ignores) that is m_h j. The fp32
column trick of `posenc_sdpa` appends one head-dim column (m_h in q, j / scale in k). In bf16 a column cannot hold j
exactly past 256 (8 significant bits), so here j, counted from the middle key, is split into hi = floor(j / 256) and
lo = j - 256 hi, integers bf16 holds exactly while |hi| <= 256 (K <= 131072), one column each; q carries 256 m_h / scale
and m_h / scale (scale = 1/sqrt(head width), passed to SDPA explicitly so that the extra columns do not change it).
Each product is exact in the kernel's float32 accumulation; the bias is exact up to the bf16 rounding of m_h / scale,
the same relative rounding for both columns, so at most a slope off by 2^-9. The float32 sum then rounds at the
magnitude of m |j - middle| / scale: about 4e-3 in the scores near 128k tokens, bf16's own order; GPU tensor cores
accumulate differently, so rerun with --device cuda before relying on it there.

Rows, per length: the mean and the maximum absolute error of the bf16 attention output against float64 ALiBi
attention of the same (bf16-rounded) q, k and v, for
- "rounding only": that float64 output rounded to bf16, the floor of any bf16 output;
- "bf16 mask": SDPA with the bias as an additive mask, which SDPA takes in q's dtype (bf16: the bias rounds);
- "one column": the fp32 trick's single column, in bf16;
- "split columns": the lead.
A lead exact enough to train with stays at the floor. Speed needs a GPU (flash/cuDNN kernels).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hf_posenc.workflow.bench import alibi_columns as with_columns  # the lead, as `hf-posenc bench` times it


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes for a power-of-2 head count: 2^(-8 i / H), i = 1..H."""
    return torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)], dtype=torch.float64)


def reference(q, k, v, slopes, block: int = 512) -> torch.Tensor:
    """float64 causal ALiBi attention, by blocks of queries (no (L, L) tensor of all heads at once)."""
    q, k, v = (t.double() for t in (q, k, v))
    length, scale = q.shape[2], q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    keys = torch.arange(length, dtype=torch.float64)
    for start in range(0, length, block):
        rows = torch.arange(start, min(start + block, length), dtype=torch.float64)
        scores = q[:, :, start : start + len(rows)] @ k.transpose(-1, -2) * scale
        distance = rows[:, None] - keys[None, :]
        scores = scores - slopes[:, None, None] * distance  # (H, rows, K) broadcast over batch
        scores = scores.masked_fill(distance < 0, float("-inf"))
        out[:, :, start : start + len(rows)] = torch.softmax(scores, dim=-1) @ v
    return out


def with_bias_mask(q, k, v, slopes) -> torch.Tensor:
    """SDPA with the ALiBi bias as an additive mask in q's dtype (what a dense-mask path gives in bf16)."""
    length = q.shape[2]
    positions = torch.arange(length, device=q.device, dtype=torch.float32)
    distance = positions[:, None] - positions[None, :]
    bias = -slopes.float().to(q.device)[:, None, None] * distance
    bias = bias.masked_fill(distance < 0, float("-inf"))[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    slopes = alibi_slopes(args.heads)
    print(f"heads {args.heads} (slopes 2^-1 .. 2^-8), head width {args.head_dim}, {args.device}, q, k, v ~ N(0, 1)")
    print("| length | rounding only | bf16 mask | one column | split columns |")
    print("|---|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        generator = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(1, args.heads, length, args.head_dim, generator=generator) for _ in range(3))
        q16, k16, v16 = (t.to(args.device, torch.bfloat16) for t in (q, k, v))
        expected = reference(*(t.cpu() for t in (q16, k16, v16)), slopes)  # the same inputs, float64 after
        outputs = [
            expected.to(torch.bfloat16),
            with_bias_mask(q16, k16, v16, slopes),
            with_columns(q16, k16, v16, slopes, split=False),
            with_columns(q16, k16, v16, slopes, split=True),
        ]
        cells = []
        for output in outputs:
            error = (output.double().cpu() - expected).abs()
            cells.append(f"{error.mean().item():.1e} / {error.max().item():.1e}")
        print(f"| {length} | " + " | ".join(cells) + " |")
    print("(mean / max absolute error of the output)")
    print("\nThe gradients (of the output against a fixed random cotangent), mean relative error against float64:")
    print("| length | bf16 mask | one column | split columns |")
    print("|---|---|---|---|")
    for length in (int(n) for n in args.lengths.split(",")):
        generator = torch.Generator().manual_seed(length)
        q, k, v, cotangent = (torch.randn(1, args.heads, length, args.head_dim, generator=generator) for _ in range(4))
        inputs = [t.to(torch.bfloat16).double().requires_grad_() for t in (q, k, v)]
        (reference(*inputs, slopes) * cotangent.double()).sum().backward()
        expected = [t.grad for t in inputs]
        cells = []
        for run in (
            lambda *t: with_bias_mask(*t, slopes),
            lambda *t: with_columns(*t, slopes, split=False),
            lambda *t: with_columns(*t, slopes, split=True),
        ):
            ours = [t.to(args.device, torch.bfloat16).requires_grad_() for t in (q, k, v)]
            (run(*ours).float() * cotangent.to(args.device)).sum().backward()
            errors = [(o.grad.double().cpu() - e).abs().mean() / e.abs().mean() for o, e in zip(ours, expected)]
            cells.append(" / ".join(f"{e.item():.1e}" for e in errors))
        print(f"| {length} | " + " | ".join(cells) + " |")
    print("(dq / dk / dv)")


if __name__ == "__main__":
    main()
