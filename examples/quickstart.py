"""Quickstart: one architecture, three positional schemes, trained briefly and compared, then saved and reloaded.

Runs on CPU in about a minute with no download: the text is Python's own standard-library source, read at run time,
and the tokenizer is the identity on bytes (vocabulary 256).

    python examples/quickstart.py                      # GPT-2 shape, learned vs rope vs alibi
    python examples/quickstart.py --arch llama --steps 20
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc  # noqa: F401  (registers the posenc model types and the posenc= keyword)

TINY = {
    "gpt2": dict(n_layer=3, n_embd=96, n_head=4, n_positions=1024, vocab_size=256),
    "llama": dict(
        num_hidden_layers=3,
        hidden_size=96,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=256,
        max_position_embeddings=1024,
    ),
}


def stdlib_bytes(limit: int = 2_000_000) -> torch.Tensor:
    """Bytes of the standard library's .py files, in a fixed order (present on every machine that runs Python)."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.tensor(list(b"\n".join(chunks)), dtype=torch.long)


def batches(data: torch.Tensor, length: int, batch: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + length] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, data: torch.Tensor, length: int, total: int = 4096) -> float:
    """Next-byte perplexity of the same first `total` bytes, cut into non-overlapping windows of `length`."""
    model.eval()
    x = data[:total].view(-1, length)
    return math.exp(model(x, labels=x).loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(TINY), default="gpt2")
    parser.add_argument("--schemes", default="learned,rope,alibi", help="comma-separated posenc schemes")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-length", type=int, default=64)
    parser.add_argument("--out", default=None, help="where to save the last model (default: a temporary folder)")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = stdlib_bytes()
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    print(
        f"data: {len(data):,} bytes of standard-library source; {args.arch}, {args.steps} steps at length "
        f"{args.train_length}"
    )

    eval_lengths = [args.train_length, 4 * args.train_length]
    columns = " ".join(f"{'ppl@' + str(n):>9}" for n in eval_lengths)
    header = f"{'scheme':<10} {'params':>8} {'train loss':>11} {columns}"
    print(header + f" {'s':>6}\n" + "-" * (len(header) + 7))
    config = AutoConfig.for_model(args.arch, **TINY[args.arch])
    for scheme in args.schemes.split(","):
        model = AutoModelForCausalLM.from_config(config, posenc=scheme)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        stream = batches(train, args.train_length, 16, torch.Generator().manual_seed(0))
        start = time.perf_counter()
        model.train()
        for _ in range(args.steps):
            x = next(stream)
            loss = model(x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        ppl = " ".join(f"{perplexity(model, held_out, n):>9.2f}" for n in eval_lengths)
        params = sum(p.numel() for p in model.parameters())
        print(f"{scheme:<10} {params:>8,} {loss.item():>11.3f} {ppl} {time.perf_counter() - start:>6.1f}")

    prompt = torch.tensor([list(b"import ")])
    generated = model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    print(f"\n{scheme} continues 'import ': {bytes(generated[0].tolist())!r}")

    out = Path(args.out or tempfile.mkdtemp(prefix="hf_posenc_quickstart_"))
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = held_out[:128][None]
    with torch.no_grad():
        same = torch.equal(reloaded(x).logits, model.eval()(x).logits)
    print(f"saved to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(
        f"reloaded {type(reloaded).__name__} with posenc={reloaded.config.posenc}: "
        f"{'identical logits' if same else 'DIFFERENT LOGITS'}"
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
