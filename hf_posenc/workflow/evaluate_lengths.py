"""`hf-posenc eval`: perplexity, or passkey retrieval, against length for any causal LM, posenc or stock, on
held-out text.

By default the text is the held-out part of what the model was trained on: the data and held-out fraction that
`hf-posenc train` recorded next to the model, else the held-out part of the standard-library text. Training never
reads that part, so the score is never one of text the model has seen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .data import (
    HELD_OUT_FRACTION,
    STDLIB,
    documents,
    joined,
    load_tokenizer,
    local_path,
    recorded_source,
    text_digest,
    tokens_of,
)
from .evaluation import past_position_table, perplexity
from .push import TRAINING_RECORD, WEIGHT_FILES, weights_digest

logger = logging.getLogger(__name__)

TASKS = ("perplexity", "passkey")


def check_model_path(model_path: str | Path) -> None:
    """Refuse, before any work, a model that is neither a local folder with a config.json nor a Hub name."""
    path = Path(model_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model: {model_path} is a folder without config.json (not a saved model)")
        return
    if local_path(str(model_path)):  # not a Hub name either
        raise ValueError(f"model: no saved model folder at {model_path}")


def training_record(model_path: str | Path) -> dict:
    """What `hf-posenc train` recorded next to the model ({} for other models)."""
    path = Path(model_path) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def held_out_data(model_path: str | Path, data: str | None):
    """(data source, its held-out documents) to evaluate on: `data` if given, else the model's recorded training
    data, else the standard-library text; held out by the fraction the training recorded, else the default. Where
    training recorded the held-out text's digest and the data is its own, the held-out part must still be that text:
    data that changed since (a file added to a folder, text inserted, another Python's standard library) would move
    the cut and put trained-on text into the evaluation, so that is refused."""
    record = training_record(model_path)
    source = data or record.get("data") or STDLIB
    texts = documents(source, "test", record.get("held_out_fraction", HELD_OUT_FRACTION))
    if record.get("held_out_sha256") and recorded_source(source) == record.get("data"):
        if text_digest(texts) != record["held_out_sha256"]:
            raise ValueError(
                f"data: the held-out part of {source} is not the text training held out (the data changed since, "
                "and its cut moved): evaluate on text the model never saw with --data"
            )
    return source, texts


def load_model(model_path: str, device: str | None = None):
    from transformers import AutoModelForCausalLM

    check_model_path(model_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    except OSError as error:  # not a local folder, and the Hub did not have it (or could not be reached)
        raise ValueError(
            f"model: {model_path} is no local folder, and loading it as a Hub name failed: {error}"
        ) from error
    return model.to(device).eval()


def _header(model, model_path: str, task: str, data: str, tokenizer) -> dict:
    return {
        "task": task,
        "model": str(model_path),
        "posenc": getattr(model.config, "posenc", None),
        "weights_sha256": weights_digest(_weights_folder(model_path)),
        "data": data,
        "split": "test",
        "tokenizer": getattr(tokenizer, "name_or_path", None) or "bytes",
    }


def _weights_folder(model_path: str | Path) -> Path:
    """The folder holding the weights: the model folder, or a Hub model's cached snapshot (just downloaded)."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from transformers.utils import cached_file

    for name in WEIGHT_FILES:
        found = cached_file(str(model_path), name, _raise_exceptions_for_missing_entries=False)
        if found:
            return Path(found).parent
    raise ValueError(f"model: found no weight file of {model_path} in the cache")


def evaluate_lengths(
    model_path: str,
    lengths: list[int],
    data: str | None = None,
    stride: int | None = None,
    max_tokens: int | None = 16384,
    tokenizer: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity at every length on the held-out text (see the module docstring):
    {"task": "perplexity", "model", "posenc", "weights_sha256", "data", "split", "stride",
    "lengths": {length: {"ppl", "nll", "tokens"} or {"error"}}}."""
    model = load_model(model_path, device)
    source, texts = held_out_data(model_path, data)
    encoder = load_tokenizer(tokenizer, model_path, vocab_size=model.config.get_text_config().vocab_size)
    results = _header(model, model_path, "perplexity", source, encoder) | {"stride": stride, "lengths": {}}
    tokens = tokens_of(texts, encoder)
    for length in lengths:
        window_stride = None if stride is None else min(stride, length)
        try:
            results["lengths"][length] = perplexity(
                model,
                tokens,
                length,
                stride=window_stride,
                max_tokens=max_tokens,
                progress=f"perplexity @{length}" if progress else None,
            )
        except ValueError as error:  # a posenc learned table that ends, or too little text: reported, not fatal
            results["lengths"][length] = {"error": str(error)}
        except IndexError as error:  # a stock model's position table ends
            results["lengths"][length] = {"error": past_position_table(model, length, error)}
    return results


def evaluate_passkey(
    model_path: str,
    lengths: list[int],
    data: str | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """Passkey retrieval accuracy by length and depth, the filler cut from the held-out text (`passkey_accuracy`'s
    results with this module's header); `options` go to `passkey_accuracy` (depths, samples, digits, seed)."""
    from .passkey import passkey_accuracy

    model = load_model(model_path, device)
    source, texts = held_out_data(model_path, data)
    filler = joined(texts)
    encoder = load_tokenizer(tokenizer, model_path, vocab_size=model.config.get_text_config().vocab_size)
    header = _header(model, model_path, "passkey", source, encoder)  # before the work: a model it cannot read fails now
    return header | passkey_accuracy(model, encoder, filler, lengths, progress=progress, **options)


def markdown(results: dict) -> str:
    """The results as a markdown table (passkey results as passkey's own table)."""
    if results.get("task") == "passkey":
        from .passkey import markdown as passkey_markdown

        return passkey_markdown(results)
    rows = ["| length | perplexity | tokens scored |", "|---|---|---|"]
    for length, result in results["lengths"].items():
        if "error" in result:
            rows.append(f"| {length} | n/a: {result['error']} | 0 |")
        else:
            rows.append(f"| {length} | {result['ppl']:.3f} | {result['tokens']:,} |")
    return "\n".join(rows) + "\n"


def describe(results: dict) -> str:
    """One line saying what was evaluated, on what text, how."""
    how = (
        "non-overlapping windows"
        if results.get("stride") is None
        else f"sliding windows, the last {results['stride']} tokens of each scored"
    )
    if results.get("task") == "passkey":
        how = f"{results['samples']} keys of {results['digits']} digits at each depth"
    return (
        f"{results['model']} (posenc={results['posenc']}): {results['task']} on the held-out part of "
        f"{results['data']}, {how}"
    )


def write(results: dict, out: str | Path | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
