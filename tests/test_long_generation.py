"""Cached generation at an 8k context: the cache's steps equal a full forward, and no step of a bias scheme asks for
a bias of the full (L, L) size; a decode step needs one row of it at most."""

from __future__ import annotations

import pytest
import torch
from conftest import build, pad_aware_positions

CONTEXT = 8192
NEW = 3


@pytest.mark.parametrize("scheme", ["alibi", "rope", "t5_bias"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded"])
def test_generate_at_8k_context(scheme, padded, spy):
    """Greedy generation after an 8192-token prompt equals the full forward over the result; the bias blocks are a
    fraction of (L, L) at prefill and single rows while decoding."""
    model = build("llama", scheme, config_overrides={"max_position_embeddings": CONTEXT + NEW})
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    batch = 2 if padded else 1
    x = torch.randint(3, 96, (batch, CONTEXT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    if padded:
        x[1, :100], mask[1, :100] = 0, 0
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        steps = torch.stack(out.logits, dim=1)  # (B, NEW, V)
        requests = list(spy)
        full_mask = torch.cat([mask, torch.ones(batch, NEW, dtype=mask.dtype)], dim=1)
        full = model(out.sequences, attention_mask=full_mask, position_ids=pad_aware_positions(full_mask)).logits
    torch.testing.assert_close(steps, full[:, CONTEXT - 1 : -1], atol=2e-4, rtol=2e-4)
    largest = max((rows * keys for rows, keys in requests), default=0)
    assert largest <= CONTEXT * (CONTEXT + NEW) // 8, f"a bias block of {largest} elements"
    layers = model.config.num_hidden_layers
    decode_steps = requests[-(NEW - 1) * layers :] if scheme != "rope" else []
    assert all(rows == 1 for rows, _ in decode_steps)  # one bias row per layer and step
    if scheme == "alibi" and not padded:
        assert requests == decode_steps  # the prefill ran the column trick: no bias tensor at all
