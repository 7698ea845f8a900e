"""Text for experiments, the byte-level tokenizer that needs no download, and the blocks a model trains on.

Text is read through `datasets` (`load_dataset("text")` for local files, a Hub name otherwise), one document per file,
split into a training part and a held-out part that no command trains on, tokenized with a Hugging Face tokenizer, and
grouped into blocks (or, for packing, cut into blocks that never cross a document boundary).
"""

from __future__ import annotations

import functools
import logging
import re
import sysconfig
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

STDLIB = "stdlib"
#: the tokenizer name that builds `byte_tokenizer()`; "auto" takes a model folder's own tokenizer, else bytes
BYTES, AUTO = "bytes", "auto"
#: the end of a local text held out from training by default: `hf-posenc eval` scores it, `train` never sees it
HELD_OUT_FRACTION = 0.05
#: "train": the text before the held-out part; "test": the held-out part; "all": both
SPLITS = ("train", "test", "all")
END_OF_TEXT = "<|endoftext|>"


def stdlib_files(limit: int = 4_000_000) -> list[Path]:
    """The standard library's own top-level .py files, in a fixed order, up to `limit` bytes: text that every machine
    running Python has."""
    files, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        files.append(path)
        size += path.stat().st_size
        if size >= limit:
            break
    return files


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (the alphabet of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + n for n in range(len(others))])))


@functools.lru_cache(maxsize=1)
def _byte_tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[byte]: byte for byte in range(256)} | {END_OF_TEXT: 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every byte is one token
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def byte_tokenizer():
    """A byte-level `PreTrainedTokenizerFast`: token id = UTF-8 byte value (0..255), 256 = "<|endoftext|>" (the
    bos, eos and pad token); vocabulary 257. No download, no training, every text representable; it saves and loads
    with `AutoTokenizer` like any other, so `pipeline` and the Hub take models trained with it."""
    import copy

    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_byte_tokenizer_object()),
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=int(1e30),
    )


#: files any one of which makes a folder hold a tokenizer AutoTokenizer can load
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a local model folder holds tokenizer files."""
    return any((Path(folder) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(name: str | None = AUTO, model_path: str | Path | None = None, vocab_size: int | None = None):
    """A Hugging Face tokenizer: `bytes` builds `byte_tokenizer()`; `auto` (or None) takes `model_path`'s own
    tokenizer (a folder's files, a Hub name's), else, for a folder without one, bytes; anything else is a tokenizer
    path or name. With `vocab_size` (the model's), a tokenizer with more ids than the model embeds is refused, and so
    is the bytes fallback for a model whose vocabulary is not the byte tokenizer's: name the tokenizer instead."""
    fallback = False
    if name in (None, AUTO):
        if model_path is None or (Path(model_path).exists() and not has_tokenizer(model_path)):
            name, fallback = BYTES, model_path is not None
        else:
            name = str(model_path)
    if name == BYTES:
        tokenizer = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise ValueError(f"tokenizer: cannot load {name!r}: {error}") from error
    if vocab_size is not None and (len(tokenizer) > vocab_size or (fallback and vocab_size != len(tokenizer))):
        where = f"{model_path} has no tokenizer files and " if fallback else ""
        raise ValueError(
            f"tokenizer: {where}the {'byte-level ' if name == BYTES else ''}tokenizer has {len(tokenizer)} ids but the "
            f"model embeds {vocab_size}: name the tokenizer the model was trained with (a path or name, or 'bytes')"
        )
    return tokenizer


def local_path(name: str) -> bool:
    """Whether `name` is a local path: one that exists here, or one shaped like a path wherever it was written
    (absolute, starting with ".", "/" or "~", holding a backslash or a drive, or more than one "/"); what is left
    ("name" or "owner/name") may be a Hub name."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or re.match(r"[A-Za-z]:[\\/]", name) is not None
        or Path(name).is_absolute()
        or Path(name).expanduser().exists()
    )


def recorded_source(source: str | None) -> str | None:
    """A source as a record names it: a local path as an absolute one (read from elsewhere, it still finds it); a Hub
    name and the names `stdlib`, `bytes` and `auto` as they are (even where the working folder has an entry of that
    name)."""
    if source is None or source in (STDLIB, BYTES, AUTO) or not Path(source).exists():
        return source
    return str(Path(source).resolve())


def hub_data_name(source: str | None) -> bool:
    """Whether `source` can only mean a `datasets` name ("wikitext:wikitext-2-raw-v1", "user/name"): not the stdlib
    text, not a local path (`local_path`), and no file suffix on the name before its ":config"."""
    if source in (None, STDLIB) or local_path(source):
        return False
    return not Path(source.partition(":")[0]).suffix


def check_source(source: str | None) -> None:
    """Refuse a data source that names a local path that is not there, before any work (a name that could be a Hub
    data set, "wikitext" or "user/name", is checked when it loads)."""
    if source in (None, STDLIB):
        return
    path = Path(source)
    if path.exists():
        if path.is_dir() and not any(path.rglob("*.txt")):
            raise ValueError(f"data: the folder {source} holds no .txt files")
        return
    if not hub_data_name(source):
        raise ValueError(
            f"data: {source!r} is neither a file nor a folder; allowed: 'stdlib', a text file, a folder of .txt "
            "files, or a datasets name such as 'wikitext:wikitext-2-raw-v1'"
        )


def documents(source: str | None = None, split: str = "train", held_out_fraction: float = HELD_OUT_FRACTION):
    """The text of `source` as a `datasets.Dataset` with a "text" column, one document per row.

    Args:
        source: None or "stdlib" (the standard library's .py files, a document each); a local text file (one
            document) or a folder of .txt files (a document each), read with `load_dataset("text")`, never the
            network; or a `datasets` name ("wikitext:wikitext-2-raw-v1"), whose rows are joined into one document.
        split: "train", "test" or "all". Local text is split by characters: the last `held_out_fraction` (at a line
            boundary) is the test part. A `datasets` name loads its own split ("test", else "validation").
        held_out_fraction: the fraction of local text held out for evaluation.
    """
    from datasets import Dataset, load_dataset

    _check(source, split, held_out_fraction)
    if _is_local(source):
        texts = _local_texts(source)
        return Dataset.from_dict(
            {"text": texts if split == "all" else _held_out_split(texts, split, held_out_fraction)}
        )
    name, _, config = source.partition(":")
    from datasets import get_dataset_split_names

    names = get_dataset_split_names(name, config or None)
    held_out = next((s for s in ("test", "validation") if s in names), None)
    if "train" not in names and (split != "test" or held_out is None):
        raise ValueError(
            f"dataset {source} has no train split to {'train on' if split == 'train' else 'read'}; splits: {names}"
        )
    wanted = {"train": "train", "test": held_out or "train", "all": "train"}[split]
    loaded = load_dataset(name, config or None, split=wanted)
    if "text" not in loaded.column_names:
        raise ValueError(f"dataset {source} has no 'text' column; columns: {', '.join(loaded.column_names)}")
    # rows joined into one document (line-per-row data sets such as wikitext keep their lines together)
    texts = ["\n".join(loaded["text"])]
    if held_out is None and split != "all":  # no held-out split of its own: the end of train, as for local text
        texts = _held_out_split(texts, split, held_out_fraction)
    elif split == "all" and held_out is not None:
        texts.append("\n".join(load_dataset(name, config or None, split=held_out)["text"]))
    return Dataset.from_dict({"text": texts})


def train_and_test(source: str | None = None, held_out_fraction: float = HELD_OUT_FRACTION):
    """(`documents(source, "train")`, `documents(source, "test")`), local text read once for both."""
    from datasets import Dataset

    _check(source, "all", held_out_fraction)
    if not _is_local(source):  # a datasets name: two splits, two loads
        return documents(source, "train", held_out_fraction), documents(source, "test", held_out_fraction)
    texts = _local_texts(source)
    return tuple(Dataset.from_dict({"text": _held_out_split(texts, split, held_out_fraction)}) for split in SPLITS[:2])


def _check(source: str | None, split: str, held_out_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    check_source(source)


def _is_local(source: str | None) -> bool:
    return source in (None, STDLIB) or Path(source).exists()


def _local_texts(source: str | None) -> list[str]:
    """The documents of the stdlib text, a file or a folder, read with `load_dataset("text")`, a document per file."""
    from datasets import load_dataset

    path = None if source in (None, STDLIB) else Path(source)
    files = stdlib_files() if path is None else [path] if path.is_file() else sorted(path.rglob("*.txt"))
    # bytes that are not UTF-8 become U+FFFD rather than failing the read
    loaded = _quietly(
        load_dataset, "text", data_files=[str(f) for f in files], sample_by="document", encoding_errors="replace"
    )["train"]
    return loaded["text"]


def _quietly(load, *args, **kwargs):
    """`load(*args, **kwargs)` without datasets' progress bars (which call reading a local file "Downloading")."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return load(*args, **kwargs)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _held_out_split(texts: list[str], split: str, fraction: float) -> list[str]:
    """The documents before (train) or after (test) the point `1 - fraction` of the way through their characters;
    the document holding that point is cut at the line break after it (at the point itself when none follows but the
    text's last), its head training and its tail held out."""
    cut = int(sum(map(len, texts)) * (1 - fraction))
    index, seen = 0, 0
    while index < len(texts) - 1 and seen + len(texts[index]) <= cut:
        seen += len(texts[index])
        index += 1
    text = texts[index]
    at = text.find("\n", cut - seen)
    if at < 0 or (at + 1 >= len(text) and index == len(texts) - 1):
        at = cut - seen  # no line break after the point, or only the text's last one: cut at the point itself
    else:
        at += 1
    head, tail = texts[:index] + [text[:at]], [text[at:]] + texts[index + 1 :]
    chosen = [t for t in (head if split == "train" else tail) if t]
    if not chosen:
        raise ValueError(f"the text is too short to hold out {fraction:.1%} of it for evaluation: use more text")
    return chosen


def text_digest(texts) -> str:
    """The sha256 of documents (a "text" column), to tell later whether a split still holds the same text."""
    import hashlib

    digest = hashlib.sha256()
    for text in texts["text"]:
        digest.update(text.encode("utf-8", errors="surrogatepass") + b"\x00")
    return digest.hexdigest()


def joined(texts) -> str:
    """Documents (a "text" column) as one string, separated by a blank line."""
    return "\n\n".join(texts["text"])


def read_text(source: str | None = None, split: str = "train", held_out_fraction: float = HELD_OUT_FRACTION) -> str:
    """`documents(source, split)` as one string (`joined`)."""
    return joined(documents(source, split, held_out_fraction))


def tokenize_documents(texts, tokenizer):
    """Token ids of every document (a `datasets.Dataset` "input_ids" column), each document ending in the tokenizer's
    end-of-text token when it has one (GPT-2's convention), so that documents joined together stay apart."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + [eos] if eos is not None else row for row in ids]}

    return texts.map(encode, batched=True, remove_columns=texts.column_names, desc="tokenizing")


def token_stream(
    source: str | None, split: str, tokenizer, held_out_fraction: float = HELD_OUT_FRACTION
) -> torch.Tensor:
    """Every document of `source`'s `split`, tokenized and joined, as one 1-D tensor of ids (`tokens_of`)."""
    return tokens_of(documents(source, split, held_out_fraction), tokenizer)


def tokens_of(texts, tokenizer) -> torch.Tensor:
    """Documents (a "text" column) tokenized (`tokenize_documents`) and joined, as one 1-D tensor of ids."""
    ids = tokenize_documents(texts, tokenizer)["input_ids"]
    return torch.tensor([token for row in ids for token in row], dtype=torch.long)


def group_into_blocks(tokenized, length: int):
    """Blocks of exactly `length` ids from the documents joined end to end (a block may span two documents; the
    remainder is dropped), with "labels" = "input_ids": transformers' run_clm grouping."""

    def group(batch):
        joined = [token for row in batch["input_ids"] for token in row]
        usable = len(joined) // length * length
        blocks = [joined[i : i + length] for i in range(0, usable, length)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    # one batch: blocks run across every document, so nothing but the final remainder is dropped
    return tokenized.map(group, batched=True, batch_size=None, remove_columns=tokenized.column_names, desc="grouping")


def document_blocks(tokenized, length: int):
    """Blocks of at most `length` ids that never cross a document boundary (each document cut into pieces; pieces
    under 2 ids, which teach nothing, dropped), for packing with `DataCollatorWithFlattening`."""

    def cut(batch):
        pieces = [row[i : i + length] for row in batch["input_ids"] for i in range(0, len(row), length)]
        return {"input_ids": [p for p in pieces if len(p) >= 2]}

    return tokenized.map(cut, batched=True, remove_columns=tokenized.column_names, desc="cutting documents")
