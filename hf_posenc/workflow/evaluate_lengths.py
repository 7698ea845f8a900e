"""`hf-posenc eval`: perplexity against length for any causal LM, posenc or stock."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import ByteTokenizer, read_text
from .evaluation import perplexity


def load_tokens(model_path: str, data: str | None, tokenizer: str | None) -> torch.Tensor:
    """The evaluation text of `data` as ids (see `tokenize`)."""
    return tokenize(read_text(data, split="test"), model_path, tokenizer)


def tokenize(text: bytes, model_path: str, tokenizer: str | None = None) -> torch.Tensor:
    """`text` as ids: with `tokenizer` ("bytes", a path or name), else the model folder's own tokenizer if it has one,
    else bytes."""
    if tokenizer in (None, "auto") and not (Path(model_path) / "tokenizer_config.json").exists():
        tokenizer = "bytes"
    if tokenizer == "bytes":
        return ByteTokenizer().encode(text)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(model_path if tokenizer in (None, "auto") else tokenizer)
    return torch.tensor(loaded(text.decode("utf-8", errors="replace"))["input_ids"])


def evaluate_lengths(
    model_path: str,
    lengths: list[int],
    data: str | None = None,
    stride: int | None = None,
    max_tokens: int | None = 16384,
    tokenizer: str | None = None,
    device: str | None = None,
) -> dict:
    """{"model", "lengths": {length: {"ppl", "nll", "tokens"} or {"error"}}} for every length."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    tokens = load_tokens(model_path, data, tokenizer)
    results = {"model": model_path, "posenc": getattr(model.config, "posenc", None), "stride": stride, "lengths": {}}
    for length in lengths:
        window_stride = None if stride is None else min(stride, length)
        try:
            results["lengths"][length] = perplexity(model, tokens, length, stride=window_stride, max_tokens=max_tokens)
        except ValueError as error:  # a posenc learned table that ends, or too little text: reported, not fatal
            results["lengths"][length] = {"error": str(error)}
        except IndexError as error:  # a stock model's position table ends (nn.Embedding's own error)
            limit = getattr(model.config, "max_position_embeddings", "?")
            results["lengths"][length] = {"error": f"past the model's position table ({limit} positions): {error}"}
    return results


def markdown(results: dict) -> str:
    rows = ["| length | perplexity | tokens scored |", "|---|---|---|"]
    for length, result in results["lengths"].items():
        if "error" in result:
            rows.append(f"| {length} | n/a: {result['error']} | 0 |")
        else:
            rows.append(f"| {length} | {result['ppl']:.3f} | {result['tokens']:,} |")
    return "\n".join(rows) + "\n"


def write(results: dict, out: str | Path | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
