"""Text for experiments, and the byte tokenizer that needs no download."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

STDLIB = "stdlib"


def stdlib_text(limit: int = 4_000_000) -> bytes:
    """The standard library's own .py source, in a fixed order: text that every machine running Python has."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"\n".join(chunks)


def read_text(source: str | None = None, split: str = "train") -> bytes:
    """Text from `source`: None or "stdlib"; a local file or a folder of .txt files; or a `datasets` name
    ("wikitext:wikitext-2-raw-v1") whose `text` column is joined. Local paths never touch the network."""
    if source in (None, STDLIB):
        return stdlib_text()
    path = Path(source)
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"data folder {source} holds no .txt files")
        return b"\n".join(f.read_bytes() for f in files)
    from datasets import load_dataset

    name, _, config = source.partition(":")
    dataset = load_dataset(name, config or None, split=split)
    if "text" not in dataset.column_names:
        raise ValueError(f"dataset {source} has no 'text' column; columns: {', '.join(dataset.column_names)}")
    return "\n".join(dataset["text"]).encode("utf-8")


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): no download, no training, every text representable."""

    vocab_size = 256

    def encode(self, text: bytes | str) -> torch.Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def train_validation_split(tokens: torch.Tensor, validation_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first part for training, the last `validation_fraction` held out (contiguous, so no window straddles)."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    cut = int(len(tokens) * (1 - validation_fraction))
    return tokens[:cut], tokens[cut:]
