"""Perplexity against length: non-overlapping windows, or a sliding window with a stride."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model,
    tokens: torch.Tensor,
    length: int,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: str | None = None,
) -> dict:
    """Perplexity of a causal LM on `tokens` (1-D ids) read in windows of `length`.

    Args:
        model: a causal LM returning `logits` (B, T, V).
        tokens: the evaluation text as ids.
        length: the window (context) length.
        stride: None for non-overlapping windows, each token scored once with the context its window gives. With a
            stride, windows start every `stride` tokens and only their last `stride` tokens are scored (the first
            window scores all), so most tokens see `length - stride` tokens of context.
        max_tokens: evaluate only the first `max_tokens` tokens (the same text at every length).
        batch_size: windows per forward.
        progress: a progress bar over the batches with this description (None: none).

    Returns:
        {"ppl", "nll" (mean, nats), "tokens" (scored)}.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    if stride is not None and not 1 <= stride <= length:
        raise ValueError(f"stride must be in [1, length={length}], got {stride}")
    tokens = tokens[:max_tokens] if max_tokens else tokens
    if len(tokens) < length:
        raise ValueError(f"{len(tokens)} tokens cannot fill one window of {length}")
    step = stride or length
    starts = list(range(0, len(tokens) - length + 1, step))
    device = next(model.parameters()).device
    model.eval()
    total_nll, scored = 0.0, 0
    for first in tqdm(range(0, len(starts), batch_size), desc=progress, disable=progress is None, leave=False):
        batch_starts = starts[first : first + batch_size]
        windows = torch.stack([tokens[s : s + length] for s in batch_starts]).to(device)  # (B, length)
        logits = model(windows).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (B, L-1)
        for row, start in enumerate(batch_starts):
            keep = nll[row] if stride is None or start == 0 else nll[row, -stride:]
            total_nll += keep.sum().item()
            scored += keep.numel()
    mean = total_nll / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens": scored}


def past_position_table(model, length: int, error: IndexError) -> str:
    """What an IndexError means when a stock model reads `length` tokens: past its position table (nn.Embedding's own
    error) where `length` exceeds `max_position_embeddings`, the message returned; anything else (an id past the
    vocabulary, a bug) is raised again rather than reported as that."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None or length <= limit:
        raise error
    return f"past the model's position table ({limit} positions): {error}"
