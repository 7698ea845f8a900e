"""Pass-key retrieval: a random number hidden at a chosen depth of filler text, asked for at the end.

The evaluation of Mohtashami & Jaggi (2023, "Landmark attention"), as the YaRN and LongRoPE repositories run it on
long-context models: the prompt is filler text of a given total length with a needle ("The pass key is 71432.
Remember it. 71432 is the pass key.") placed at a depth in [0, 1] of the filler, then a question ("What is the pass
key? The pass key is"); the model must continue with the key. Accuracy is reported by context length and by depth.

The template is compact (the project's small models are trained at 64 byte-tokens) and every piece is tokenized on
its own and concatenated as ids, so a sample's length in tokens is exact. Retrieval is scored without `generate`: one
teacher-forced forward pass over prompt + answer, the key retrieved iff the argmax at every answer position is the
answer token, which is exactly when greedy decoding would produce the answer (for this tokenization of it).

Example:
    >>> results = passkey_accuracy(model, tokenizer, held_out_text, lengths=[64, 128, 256])  # doctest: +SKIP
    >>> print(markdown(results))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import numbers
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .evaluation import past_position_table

logger = logging.getLogger(__name__)

#: The needle; `{key}` is replaced by the key. Leading and trailing spaces separate it from the filler.
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
#: The question that ends the prompt; the answer continues it.
QUESTION = " What is the pass key? The pass key is"
#: The expected continuation; `{key}` is replaced by the key.
ANSWER = " {key}"
#: The default depths: the fraction of the filler placed before the needle.
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

Sample = tuple[list[int], list[int]]


def _ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as ids, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filler_ids(tokenizer: Any, filler: str | bytes | Sequence[int]) -> list[int]:
    """The filler as ids: text (str, or UTF-8 bytes) is tokenized once; ids are taken as they are."""
    if isinstance(filler, bytes):
        filler = filler.decode("utf-8", errors="replace")
    if isinstance(filler, str):
        return _ids(tokenizer, filler)
    return [int(i) for i in filler]


def _bos(tokenizer: Any, add_bos: bool) -> list[int]:
    if not add_bos:
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    return [int(bos)]


def random_key(rng: random.Random, digits: int) -> str:
    """A `digits`-digit decimal key drawn from `rng`, its first digit nonzero.

    Args:
        rng: the random source.
        digits: the number of digits (>= 1).

    Returns:
        The key as a string, e.g. "71432".
    """
    if not isinstance(digits, int) or isinstance(digits, bool) or digits < 1:
        raise ValueError(f"digits must be an int >= 1, got {digits!r}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def sample_plan(samples: int, digits: int = 5, seed: int = 0) -> list[tuple[str, float]]:
    """The keys and filler starts of an evaluation: one (key, start fraction) per sample.

    Drawn from `random.Random(seed)` alone, so every model, tokenizer and length evaluated with the same seed sees the
    same keys, and the filler of sample `i` starts at the same fraction of the filler text. Sample `i` keeps its key
    and filler at every depth, so the columns of a result differ only by where the needle is.

    Args:
        samples: how many samples (>= 1).
        digits: digits of each key (>= 1).
        seed: the random seed.

    Returns:
        `samples` pairs (key, start), start in [0, 1): where the filler window begins, as a fraction of the room the
        filler text leaves (see `build_samples`).
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    rng = random.Random(seed)
    plan = []
    for _ in range(samples):
        key = random_key(rng, digits)
        plan.append((key, rng.random()))
    return plan


def template_length(
    tokenizer: Any,
    key: str,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str = ANSWER,
    add_bos: bool = False,
) -> int:
    """Tokens a sample of `key` takes besides its filler: the shortest length it fits (with no filler at all).

    Args:
        tokenizer: a Hugging Face tokenizer.
        key: the pass key.
        needle: the needle template (`{key}` is replaced by the key).
        question: the question ending the prompt.
        answer: the answer template (`{key}` is replaced by the key).
        add_bos: whether the prompt starts with the tokenizer's BOS token.

    Returns:
        len(BOS) + len(needle) + len(question) + len(answer), in tokens.
    """
    pieces = (needle.format(key=key), question, answer.format(key=key))
    return len(_bos(tokenizer, add_bos)) + sum(len(_ids(tokenizer, piece)) for piece in pieces)


def build_sample(
    tokenizer: Any,
    filler: str | bytes | Sequence[int],
    length: int,
    depth: float,
    key: str | int,
    offset: int = 0,
    *,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str = ANSWER,
    add_bos: bool = False,
) -> Sample:
    """One pass-key sample of exactly `length` tokens: `len(prompt_ids) + len(answer_ids) == length`.

    The prompt is `[BOS] + filler[:k] + needle + filler[k:] + question` and the answer is `answer` with the key, each
    piece tokenized on its own (no special tokens) and concatenated as ids. The filler is the `length - fixed` tokens
    of the tokenized filler text starting at `offset` (cut on token boundaries, so the length is exact), and
    `k = round(depth * filler tokens)`: depth 0 puts the needle before all the filler, depth 1 after all of it (just
    before the question). Deterministic: the same arguments give the same ids.

    Args:
        tokenizer: a Hugging Face tokenizer (`tokenizer(text, add_special_tokens=False)["input_ids"]`).
        filler: the filler text (str, or UTF-8 bytes), or its ids already tokenized by `tokenizer` (pass ids when
            building many samples: the text is then tokenized once).
        length: the total length in tokens, prompt plus answer.
        depth: the fraction of the filler placed before the needle, in [0, 1].
        key: the pass key (digits).
        offset: the index of the first filler token used.
        needle: the needle template (`{key}` is replaced by the key).
        question: the question ending the prompt.
        answer: the answer template (`{key}` is replaced by the key).
        add_bos: start the prompt with the tokenizer's BOS token (counted in `length`).

    Returns:
        (prompt_ids, answer_ids), lists of ints.

    Raises:
        ValueError: a depth outside [0, 1], a length too short for the template and the key (the message gives the
            minimum), or a filler too short for the length from `offset`.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    key = str(key)
    head = _bos(tokenizer, add_bos)
    needle_ids = _ids(tokenizer, needle.format(key=key))
    question_ids = _ids(tokenizer, question)
    answer_ids = _ids(tokenizer, answer.format(key=key))
    fixed = len(head) + len(needle_ids) + len(question_ids) + len(answer_ids)
    room = length - fixed
    if room < 0:
        raise ValueError(
            f"length {length} is too short for the pass-key template with a {len(key)}-digit key: it needs at least "
            f"{fixed} tokens (needle, question and answer) before any filler"
        )
    filler_ids = _filler_ids(tokenizer, filler)
    if offset + room > len(filler_ids):
        raise ValueError(
            f"the filler text is too short for length {length}: it needs {room} filler tokens from offset {offset}, "
            f"the filler has {len(filler_ids)} tokens"
        )
    window = filler_ids[offset : offset + room]
    before = math.floor(depth * room + 0.5)
    prompt = head + window[:before] + needle_ids + window[before:] + question_ids
    return prompt, answer_ids


def build_samples(
    tokenizer: Any,
    filler: str | bytes | Sequence[int],
    length: int,
    depths: Sequence[float] = DEPTHS,
    samples: int = 5,
    digits: int = 5,
    seed: int = 0,
    *,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str = ANSWER,
    add_bos: bool = False,
) -> list[dict]:
    """Every sample of one length: `samples` keys (see `sample_plan`) at every depth.

    Sample `i` has the key and filler window of `sample_plan(samples, digits, seed)[i]` at every depth; its window
    starts at `floor(start * (filler tokens - window + 1))`, so different samples read different parts of the filler.

    Args:
        tokenizer: a Hugging Face tokenizer.
        filler: the filler text (str or UTF-8 bytes) or its ids.
        length: the total length in tokens of every sample.
        depths: the needle depths, each in [0, 1].
        samples: samples per depth.
        digits: digits of each key.
        seed: the random seed of the keys and filler offsets.
        needle: the needle template.
        question: the question ending the prompt.
        answer: the answer template.
        add_bos: start every prompt with the tokenizer's BOS token.

    Returns:
        One dict per (depth, sample), depth-major: {"depth", "sample", "key", "offset", "prompt_ids", "answer_ids"}.

    Raises:
        ValueError: a length too short for the template and any of the keys (the message gives the minimum), or a
            filler too short for the length.
    """
    templates = dict(needle=needle, question=question, answer=answer, add_bos=add_bos)
    plan = sample_plan(samples, digits, seed)
    filler_ids = _filler_ids(tokenizer, filler)
    fixed = max(template_length(tokenizer, key, **templates) for key, _ in plan)
    if length < fixed:
        raise ValueError(
            f"length {length} is too short for the pass-key template with {digits}-digit keys: it needs at least "
            f"{fixed} tokens (needle, question and answer) before any filler"
        )
    built = []
    for depth in depths:
        for index, (key, start) in enumerate(plan):
            room = length - template_length(tokenizer, key, **templates)
            spare = len(filler_ids) - room
            if spare < 0:
                raise ValueError(
                    f"the filler text is too short for length {length}: it has {len(filler_ids)} tokens, a sample "
                    f"needs {room}"
                )
            offset = math.floor(start * (spare + 1))
            prompt, answer_ids = build_sample(tokenizer, filler_ids, length, depth, key, offset, **templates)
            built.append(
                {
                    "depth": depth,
                    "sample": index,
                    "key": key,
                    "offset": offset,
                    "prompt_ids": prompt,
                    "answer_ids": answer_ids,
                }
            )
    return built


def _device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score(model: torch.nn.Module, samples: Sequence[Sample], batch_size: int = 8) -> list[bool]:
    """Whether `model` retrieves each key: teacher-forced greedy on prompt + answer.

    A key counts as retrieved iff the argmax of the logits at every answer position is the answer token, which is
    exactly when greedy decoding from the prompt would produce the answer ids (see `token_scores`).

    Returns:
        One bool per sample, in order.
    """
    return [fraction == 1.0 for fraction in token_scores(model, samples, batch_size)]


@torch.no_grad()
def token_scores(model: torch.nn.Module, samples: Sequence[Sample], batch_size: int = 8) -> list[float]:
    """The fraction of each answer's tokens that `model` predicts, teacher-forced (1.0: the key is retrieved).

    Partial credit shows a model that copies some of a key's digits, where exact retrieval is 0 for every model
    (small ones, far past their training length). Samples of the same total length are stacked into batches of up to
    `batch_size` rows; only the logits of the answer positions are computed when the model takes `logits_to_keep`.

    Args:
        model: a causal LM whose output has `.logits` (B, T, V); put in eval mode.
        samples: (prompt_ids, answer_ids) pairs, each prompt and answer non-empty.
        batch_size: rows per forward pass.

    Returns:
        One fraction per sample, in order.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for prompt, answer in samples:
        if not prompt or not answer:
            raise ValueError("every sample needs a non-empty prompt and a non-empty answer")
    model.eval()
    device = _device(model)
    keep_kwarg = _accepts_logits_to_keep(model)
    by_length: dict[int, list[int]] = {}
    for index, (prompt, answer) in enumerate(samples):
        by_length.setdefault(len(prompt) + len(answer), []).append(index)
    hits = [0.0] * len(samples)
    for length, indices in by_length.items():
        for first in range(0, len(indices), batch_size):
            rows = indices[first : first + batch_size]
            ids = torch.tensor([list(samples[i][0]) + list(samples[i][1]) for i in rows], device=device)
            keep = max(len(samples[i][1]) for i in rows) + 1  # the last prompt position predicts the first answer
            kwargs = {"logits_to_keep": keep} if keep_kwarg else {}
            logits = model(input_ids=ids, **kwargs).logits
            start = length - logits.shape[1]  # the position of logits[:, 0] (0 when the model returned them all)
            for row, i in enumerate(rows):
                prompt, answer = samples[i]
                first_logit = len(prompt) - 1 - start
                predicted = logits[row, first_logit : first_logit + len(answer)].argmax(-1)
                hits[i] = (predicted == ids[row, len(prompt) :]).float().mean().item()
    return hits


def check_arguments(
    lengths: Sequence[int], depths: Sequence[float], samples: int, digits: int, batch_size: int = 8
) -> None:
    """Refuse arguments `passkey_accuracy` cannot take, naming them (before any model or text is loaded)."""
    if not lengths:
        raise ValueError("lengths must be a non-empty list of ints >= 1, got an empty one")
    for length in lengths:
        if not isinstance(length, numbers.Integral) or isinstance(length, bool) or length < 1:
            raise ValueError(f"lengths must be ints >= 1, got {length!r}")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths must be distinct, got {list(lengths)}")
    if not depths:
        raise ValueError("depths must be a non-empty list of numbers in [0, 1], got an empty one")
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must be numbers in [0, 1] (the fraction of filler before the key), got {depth!r}")
    if len(set(depths)) != len(depths):
        raise ValueError(f"depths must be distinct, got {list(depths)}")
    for name, value in (("samples", samples), ("digits", digits), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    filler: str | bytes,
    lengths: list[int],
    depths: Sequence[float] = DEPTHS,
    samples: int = 5,
    digits: int = 5,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    *,
    add_bos: bool = False,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer: str = ANSWER,
) -> dict:
    """Pass-key retrieval accuracy of a causal LM by context length and needle depth.

    For every length, `samples` keys at every depth (see `build_samples`); the same seed gives the same keys and filler
    windows for every model, so schemes are compared on identical prompts (given the same tokenizer). Each sample is
    scored by `score`. A length that cannot be built (too short for the template and the key, or longer than the
    filler allows) or that the model cannot run (a learned position table that ends: ValueError or IndexError) is
    recorded as {"error": ...} for that length, and the other lengths are still evaluated.

    Args:
        model: a causal LM returning `.logits`; evaluated in eval mode on its own device.
        tokenizer: a Hugging Face tokenizer (`tokenizer(text, add_special_tokens=False)["input_ids"]`).
        filler: held-out text to hide the key in (str, or UTF-8 bytes), tokenized once.
        lengths: total lengths in tokens (prompt plus answer, exactly).
        depths: needle depths in [0, 1]: the fraction of the filler before the needle.
        samples: samples per (length, depth).
        digits: digits of each key.
        seed: seed of the keys and filler offsets.
        batch_size: rows per forward pass.
        progress: show a tqdm progress bar.
        add_bos: start every prompt with the tokenizer's BOS token (counted in the length).
        needle: the needle template (`{key}` is replaced by the key); a shorter one lowers the shortest length.
        question: the question ending the prompt.
        answer: the answer template (`{key}` is replaced by the key).

    Returns:
        JSON-serialisable results: {"task": "passkey", "digits", "samples", "seed", "depths": [...],
        "filler_tokens", "template": {"needle", "question", "answer"}, "lengths": {length: {"accuracy": overall,
        "by_depth": {depth: accuracy}, "token_accuracy": the mean fraction of key tokens predicted} or
        {"error": message}}}.

    Raises:
        ValueError: empty lengths, lengths not ints >= 1, depths outside [0, 1], samples, digits or batch_size < 1.
    """
    lengths, depths = list(lengths), list(depths)
    check_arguments(lengths, depths, samples, digits, batch_size)
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]  # plain numbers: JSON keys and values
    for name, text in (("needle", needle), ("answer", answer)):
        if "{key}" not in text:
            raise ValueError(f"{name} must contain '{{key}}' (replaced by the pass key), got {text!r}")
    templates = dict(needle=needle, question=question, answer=answer, add_bos=add_bos)
    filler_ids = _filler_ids(tokenizer, filler)
    results: dict[str, Any] = {
        "task": "passkey",
        "digits": digits,
        "samples": samples,
        "seed": seed,
        "depths": depths,
        "filler_tokens": len(filler_ids),
        "template": {"needle": needle, "question": question, "answer": answer, "add_bos": add_bos},
        "lengths": {},
    }
    per_length = len(depths) * samples
    bar = tqdm(total=len(lengths) * per_length, desc="passkey", unit="sample", disable=not progress)
    try:
        for length in lengths:
            bar.set_postfix(length=length)
            try:
                built = build_samples(tokenizer, filler_ids, length, depths, samples, digits, seed, **templates)
            except ValueError as error:  # too short for the template, or too little filler: reported, not fatal
                logger.warning("passkey: length %d skipped: %s", length, error)
                results["lengths"][length] = {"error": str(error)}
                bar.update(per_length)
                continue
            pairs = [(s["prompt_ids"], s["answer_ids"]) for s in built]
            hits: list[float] = []
            try:
                for first in range(0, len(pairs), batch_size):
                    chunk = pairs[first : first + batch_size]
                    hits += token_scores(model, chunk, batch_size=batch_size)
                    bar.update(len(chunk))
            except ValueError as error:  # a posenc learned position table that ends
                logger.warning("passkey: length %d failed: %s", length, error)
                results["lengths"][length] = {"error": str(error)}
                bar.update(per_length - len(hits))
                continue
            except IndexError as error:  # a stock model's position table ends
                message = past_position_table(model, length, error)
                logger.warning("passkey: length %d failed: %s", length, message)
                results["lengths"][length] = {"error": message}
                bar.update(per_length - len(hits))
                continue
            by_depth = {}
            for depth in depths:
                row = [hit == 1.0 for hit, s in zip(hits, built) if s["depth"] == depth]
                by_depth[depth] = sum(row) / len(row)
            results["lengths"][length] = {
                "accuracy": sum(hit == 1.0 for hit in hits) / len(hits),
                "by_depth": by_depth,
                "token_accuracy": sum(hits) / len(hits),  # partial credit: key tokens predicted
            }
            logger.info("passkey: length %d accuracy %.3f", length, results["lengths"][length]["accuracy"])
    finally:
        bar.close()
    return results


def _lookup(mapping: Mapping, key: Any) -> Any:
    """`mapping[key]`, also after a JSON round trip turned the key into a string."""
    if key in mapping:
        return mapping[key]
    return mapping[str(key)]


def _sorted_lengths(results: dict) -> list[tuple[int, dict]]:
    return sorted(((int(length), result) for length, result in results["lengths"].items()), key=lambda item: item[0])


def _depth_label(depth: float) -> str:
    return f"{depth:g}"


def markdown(results: dict) -> str:
    """A markdown table of `passkey_accuracy` results: one row per length, one column per depth, then overall.

    Args:
        results: the dict `passkey_accuracy` returns (or that dict read back from JSON).

    Returns:
        The table, ending in a newline; a length that failed shows "n/a" in its depth cells and its error last.
    """
    depths = [float(d) for d in results["depths"]]
    header = ["length"] + [f"depth {_depth_label(d)}" for d in depths] + ["overall", "key tokens right"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for length, result in _sorted_lengths(results):
        if "error" in result:
            cells = [str(length)] + ["n/a"] * len(depths) + [f"n/a: {result['error']}", "n/a"]
        else:
            by_depth = result["by_depth"]
            cells = [str(length)] + [f"{_lookup(by_depth, d):.2f}" for d in depths] + [f"{result['accuracy']:.2f}"]
            cells.append(f"{result['token_accuracy']:.2f}" if "token_accuracy" in result else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict, path: str | Path) -> Path:
    """A heatmap of accuracy, depth (rows) by length (columns), each cell labelled with its value.

    Args:
        results: the dict `passkey_accuracy` returns (or read back from JSON).
        path: the image to write (its format from the suffix, e.g. .png).

    Returns:
        The path written. Lengths that failed are grey cells marked "n/a".
    """
    import numpy as np

    plt = _pyplot()
    depths = [float(d) for d in results["depths"]]
    lengths = _sorted_lengths(results)
    grid = np.full((len(depths), len(lengths)), np.nan)
    for column, (_, result) in enumerate(lengths):
        if "error" not in result:
            for row, depth in enumerate(depths):
                grid[row, column] = _lookup(result["by_depth"], depth)
    figure, axes = plt.subplots(figsize=(max(4.5, 1.0 + 0.9 * len(lengths)), max(3.0, 1.2 + 0.5 * len(depths))))
    colours = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    for row in range(len(depths)):
        for column in range(len(lengths)):
            value = grid[row, column]
            text, colour = (
                ("n/a", "black") if np.isnan(value) else (f"{value:.2f}", "black" if value > 0.6 else "white")
            )
            axes.text(column, row, text, ha="center", va="center", fontsize=9, color=colour)
    axes.set_xticks(range(len(lengths)), [str(length) for length, _ in lengths])
    axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("depth of the key (filler before it)")
    axes.set_title(
        f"pass-key retrieval: {results['digits']}-digit keys, {results['samples']} samples per cell", fontsize=10
    )
    bar = figure.colorbar(image, ax=axes)
    bar.set_label("accuracy")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_by_scheme(named: dict[str, dict], path: str | Path) -> Path:
    """Overall accuracy against length (log2 x axis), one line per name.

    Every series has its own colour, marker (hollow, shrinking with the index) and line style, so series with the same
    values stay visible on top of each other. Lengths that failed are left out of that series.

    Args:
        named: {name: the dict `passkey_accuracy` returned for it}.
        path: the image to write.

    Returns:
        The path written.
    """
    plt = _pyplot()
    figure, panels = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    from .plots import series_styles

    styles = series_styles(len(named))
    ticks: set[int] = set()
    count = max(len(named), 1)
    for axes, key, title in (
        (panels[0], "accuracy", "keys retrieved whole"),
        (panels[1], "token_accuracy", "key tokens predicted (partial credit)"),
    ):
        for index, (name, results) in enumerate(named.items()):
            rows = _sorted_lengths(results)
            points = [(length, r.get(key, r["accuracy"])) for length, r in rows if "error" not in r]
            failed = [length for length, r in rows if "error" in r]
            label = name if not failed else f"{name} (n/a at {', '.join(map(str, failed))})"
            xs, ys = zip(*points) if points else ((), ())
            ticks.update(xs)
            axes.plot(
                xs,
                ys,
                color=styles[index]["color"],
                marker=styles[index]["marker"],
                markersize=11 - 6 * index / count,
                markerfacecolor="none",
                markeredgewidth=1.5,
                linestyle=styles[index]["linestyle"],
                linewidth=1.6,
                label=label,
            )
        axes.set_xscale("log", base=2)
        if ticks:
            axes.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            axes.minorticks_off()
        axes.set_ylim(-0.05, 1.05)
        axes.set_xlabel("context length (tokens, log2)")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
    panels[0].set_ylabel("pass-key accuracy")
    figure.suptitle("pass-key retrieval against context length")
    panels[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
