"""`hf-posenc push`: the exact folder a Hub repo needs, with a model card, and its upload.

The card is a `huggingface_hub.ModelCard`: its metadata (license, library, pipeline tag, tags, base model, datasets and
the evaluation results in model-index form) comes from `ModelCardData`, and it only shows results of the model pushed:
an evaluation JSON is accepted only when its `weights_sha256` is this model's (`weights_digest`), the training record
only when its `weights_sha256` is the model folder's, and the plot is drawn here from those JSONs. The folder is built
aside and replaces everything in `--folder`, which must be empty, new, or an earlier `hf-posenc push` build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
import shutil
import tempfile
from pathlib import Path

from ..modeling.posenc_version import ALLOW_UNTESTED, tested_range_text
from .data import STDLIB, has_tokenizer, hub_data_name, local_path

logger = logging.getLogger(__name__)

TRAINING_RECORD = "hf_posenc_training.json"  # written next to a model by `hf-posenc train`
PLOT = "evaluation.png"  # drawn by `build_hub_folder` from the evaluation JSONs
# the first tag of every card `build_hub_folder` writes: with a config.json holding posenc, what marks a build
TAG = "hf_posenc"
# the weight files `from_pretrained` reads, in the order it looks for them
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# the Auto class a model is loaded with (the first one of these its auto_map names) and its pipeline tag
PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModel": "feature-extraction",
}
MODEL_KINDS = {"text-generation": "causal language model", "fill-mask": "masked language model"}
ACCEPTED = (
    "`--eval` accepts the JSON that `hf-posenc eval` writes for this model (task perplexity or passkey), "
    "whose weights_sha256 is this model's"
)


def weights_digest(folder: str | Path) -> str:
    """The sha256 hex digest that identifies the weights saved in `folder`.

    `hf-posenc eval` records it as `weights_sha256`, and `build_hub_folder` only accepts evaluations whose digest is
    the pushed model's.

    Args:
        folder: a saved model folder.

    Returns:
        For a single weight file (`model.safetensors`, else `pytorch_model.bin`): the sha256 of that file, as
        `sha256sum` prints it (and as the Hub stores it as the file's LFS oid). For a sharded folder: the sha256 of the
        index file followed by every shard it names, in sorted order (the index alone only lists tensor names, the
        same for every model of one shape).

    Raises:
        FileNotFoundError: `folder` holds none of the weight files `from_pretrained` reads.
    """
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            break
    else:
        raise FileNotFoundError(f"{folder} holds no weights (none of {', '.join(WEIGHT_FILES)})")
    digest = hashlib.sha256()
    files = [path]
    if name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        files += [folder / shard for shard in shards]
    for file in files:
        with open(file, "rb") as stream:
            for chunk in iter(lambda stream=stream: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _model_class(config):
    """The posenc class named in `config.architectures` (any head, the base model when none is named)."""
    from ..auto import model_classes

    classes = model_classes(config.base_model_type)
    name = (config.architectures or [config.auto_map_entries["AutoModel"].split(".")[1]])[0]
    if name not in classes:
        raise ValueError(f"{name} is not a posenc model class of {config.base_model_type}")
    return classes[name]


def _auto_class(config, model_class: type) -> str:
    """The Auto class that loads `model_class` (AutoModelForCausalLM for an LM head, rather than ...ForPreTraining)."""
    names = [auto for auto, target in (config.auto_map or {}).items() if target.split(".")[-1] == model_class.__name__]
    return next((auto for auto in PIPELINE_TAGS if auto in names), names[0] if names else "AutoModel")


def _hub_id(name: str | None) -> str | None:
    """`name` when it can only mean a Hub repo id (not a local path, see `data.local_path`), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or local_path(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _hub_dataset(data: str | None) -> tuple[str, str | None] | None:
    """(dataset id, config) when `data` names a Hub dataset the way the data module reads one ("name:config"), not
    the stdlib text nor a local file or folder (here or, by its shape, on the machine that trained)."""
    if not hub_data_name(data):
        return None
    name, _, config = data.partition(":")
    if _hub_id(name) is None:
        return None
    return name, config or None


def _data_markdown(data: str | None) -> str:
    """`data` (a `read_text` source) named honestly for the card."""
    if data in (None, STDLIB):
        return "Python's standard-library source code (`stdlib`)"
    hub = _hub_dataset(data)
    if hub is not None:
        return f"[`{hub[0]}`](https://huggingface.co/datasets/{hub[0]})" + (f" (config `{hub[1]}`)" if hub[1] else "")
    return f"local text `{Path(data).name}`"


def _text_note(evaluation: dict, train_data: str | None) -> str:
    """Which part of its text an evaluation read: the held-out part (`"split": "test"`, which training never reads),
    or a warning when the JSON records no split and the text is the training text."""
    data = evaluation.get("data")
    if evaluation.get("split") == "test":
        return ", its held-out part (never trained on)"
    if evaluation.get("split") is None and (data or STDLIB) == (train_data or STDLIB):
        return "; the evaluation records no split: it may be text the model was trained on"
    return f", split `{evaluation['split']}`" if evaluation.get("split") else ""


def _normalised(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _length_sorted(lengths: dict) -> list[tuple[int, dict]]:
    return sorted((int(length), result) for length, result in lengths.items())


def load_evaluation(path: str | Path, posenc: dict, digests: list[str], model_dir: str | Path | None = None) -> dict:
    """An `hf-posenc eval` JSON (perplexity or passkey), checked to be of the model whose weights digest is in
    `digests` and whose scheme is `posenc`.

    Args:
        path: the JSON.
        posenc: the model's `config.posenc`.
        digests: the model's `weights_digest`s (the folder evaluated, and the folder built for the Hub).
        model_dir: the model folder, named in the messages (what to re-run `hf-posenc eval` on).

    Returns:
        The JSON's content, with `"task"` set (JSONs that predate it are perplexity).

    Raises:
        ValueError: not such a JSON (a markdown table, `hf-posenc compare`'s results), or not of this model: its
            `weights_sha256` is missing, null or another's, or its `posenc` is another scheme.
    """
    return check_evaluation(read_evaluation(path), path, posenc, digests, model_dir)


def read_evaluation(path: str | Path) -> dict:
    """An `hf-posenc eval` JSON, with `"task"` set; a ValueError says what `--eval` accepts when it is not one."""
    path = Path(path)
    if path.suffix.lower() in (".md", ".markdown"):
        raise ValueError(
            f"{path} is a markdown table (such as the results.md of `hf-posenc compare`, whose rows are other models "
            f"that compare trains), not an evaluation of this model; {ACCEPTED}"
        )
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error}); {ACCEPTED}") from error
    if isinstance(results, dict) and "schemes" in results:
        raise ValueError(f"{path} holds `hf-posenc compare`'s results, of other models that compare trains; {ACCEPTED}")
    task = results.get("task", "perplexity") if isinstance(results, dict) else None
    value = {"perplexity": "ppl", "passkey": "accuracy"}.get(task)
    lengths = results.get("lengths") if isinstance(results, dict) else None
    if value is None or not isinstance(lengths, dict):
        raise ValueError(f"{path} is not an `hf-posenc eval` JSON (task perplexity or passkey); {ACCEPTED}")
    for length, result in lengths.items():
        if not str(length).isdigit() or not isinstance(result, dict) or not ({value, "error"} & set(result)):
            raise ValueError(f"{path}: length {length!r} has no {value!r} nor 'error'; {ACCEPTED}")
    return {**results, "task": task}


def check_evaluation(
    results: dict, path: str | Path, posenc: dict, digests: list[str], model_dir: str | Path | None = None
) -> dict:
    """`results` (`read_evaluation`), or a ValueError when it is not of this model (see `load_evaluation`)."""
    rerun = f"re-run `hf-posenc eval` on {model_dir or 'this model folder'} and pass the JSON it writes"
    digest = results.get("weights_sha256")
    if not isinstance(digest, str) or not digest:
        raise ValueError(
            f"{path} records no weights_sha256, so nothing tells that it evaluated these weights (the card only shows "
            f"results of this model); {rerun}"
        )
    if digest not in digests:
        raise ValueError(
            f"{path} is an evaluation of other weights ({results.get('model', 'a model')}, weights_sha256 "
            f"{digest[:12]}...; this model's is {digests[0][:12]}...): the card only shows results of this model; "
            f"{rerun}"
        )
    if "posenc" in results and _normalised(results["posenc"]) != _normalised(posenc):
        raise ValueError(
            f"{path} evaluated these weights with another positional scheme (posenc {json.dumps(results['posenc'])}; "
            f"this model's is {json.dumps(posenc)}): the card only shows results of this model; {rerun}"
        )
    return results


def _windows(evaluation: dict) -> str:
    stride = evaluation.get("stride")
    if stride is None:
        return "non-overlapping windows"
    return f"sliding window, stride {stride}"


def _passkey_setting(evaluation: dict) -> str:
    digits, samples, depths = evaluation.get("digits"), evaluation.get("samples"), evaluation.get("depths") or []
    per_length = f"{samples} samples at each of {len(depths)} depths per length" if depths else f"{samples} samples"
    parts = [
        f"{digits}-digit key" if digits is not None else None,
        per_length if samples else None,
    ]
    return ", ".join(part for part in parts if part) or "passkey retrieval"


def eval_results(evaluations: list[dict]) -> list:
    """The `huggingface_hub.EvalResult`s of checked evaluations (`load_evaluation`): perplexity per length
    ("perplexity@{length}") and passkey accuracy per length; lengths that failed are left out."""
    from huggingface_hub import EvalResult

    results = []
    for evaluation in evaluations:
        if evaluation["task"] == "perplexity":
            data = evaluation.get("data")
            hub = _hub_dataset(data)
            dataset = {
                "dataset_name": _dataset_name(data),
                "dataset_type": hub[0] if hub else "local",
                "dataset_config": hub[1] if hub else None,
                "dataset_split": evaluation.get("split"),
            }
            windows = "" if evaluation.get("stride") is None else f" (stride {evaluation['stride']})"
            for length, result in _length_sorted(evaluation["lengths"]):
                if "ppl" in result:
                    results.append(
                        EvalResult(
                            task_type="text-generation",
                            task_name="perplexity against length",
                            metric_type="perplexity",
                            metric_name=f"perplexity@{length}{windows}",
                            metric_value=float(result["ppl"]),
                            metric_config=_windows(evaluation),
                            **dataset,
                        )
                    )
        else:
            for length, result in _length_sorted(evaluation["lengths"]):
                if "accuracy" in result:
                    results.append(
                        EvalResult(
                            task_type="text-generation",
                            task_name="passkey retrieval",
                            dataset_name=f"passkey retrieval ({_passkey_setting(evaluation)}) in "
                            f"{_dataset_name(evaluation.get('data'))}",
                            dataset_type="synthetic",
                            metric_type="accuracy",
                            metric_name=f"passkey accuracy@{length}",
                            metric_value=float(result["accuracy"]),
                        )
                    )
    return results


def _dataset_name(data: str | None) -> str:
    if data in (None, STDLIB):
        return "Python standard-library source (stdlib)"
    hub = _hub_dataset(data)
    return f"{hub[0]}" + (f" ({hub[1]})" if hub[1] else "") if hub else f"local text {Path(data).name}"


def _evaluation_markdown(evaluation: dict, train_data: str | None) -> str:
    """One evaluation as a titled table."""
    lines = []
    text = f"{_data_markdown(evaluation.get('data'))}{_text_note(evaluation, train_data)}"
    if evaluation["task"] == "perplexity":
        lines.append(f"### Perplexity against length: {_windows(evaluation)}\n\nText: {text}.\n\n")
        lines.append("| length | perplexity | tokens scored |\n|---|---|---|\n")
        for length, result in _length_sorted(evaluation["lengths"]):
            if "error" in result:
                lines.append(f"| {length} | n/a: {result['error']} | 0 |\n")
            else:
                lines.append(f"| {length} | {result['ppl']:.3f} | {result.get('tokens', 0):,} |\n")
    else:
        lines.append(f"### Passkey retrieval: {_passkey_setting(evaluation)}\n\nFiller text: {text}.\n\n")
        depths = [str(depth) for depth in evaluation.get("depths") or []]
        lines.append("| length | accuracy |" + "".join(f" depth {depth} |" for depth in depths) + "\n")
        lines.append("|---|---|" + "---|" * len(depths) + "\n")
        for length, result in _length_sorted(evaluation["lengths"]):
            if "error" in result:
                lines.append(f"| {length} | n/a: {result['error']} |" + " |" * len(depths) + "\n")
                continue
            by_depth = {str(depth): value for depth, value in (result.get("by_depth") or {}).items()}
            cells = "".join(f" {by_depth[d]:.2f} |" if d in by_depth else " |" for d in depths)
            lines.append(f"| {length} | {result['accuracy']:.2f} |{cells}\n")
    return "".join(lines)


def plot_evaluations(evaluations: list[dict], path: str | Path, title: str, train_length: int | None = None) -> bool:
    """Draw perplexity against length (and passkey accuracy against length when there is a passkey evaluation) from
    checked evaluations (`load_evaluation`) into `path`; return False, drawing nothing, when no length has a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series = {"perplexity": [], "passkey": []}
    for evaluation in evaluations:
        key = "ppl" if evaluation["task"] == "perplexity" else "accuracy"
        points = [(length, result[key]) for length, result in _length_sorted(evaluation["lengths"]) if key in result]
        if points:
            label = (
                f"{_dataset_name(evaluation.get('data'))}, {_windows(evaluation)}"
                if evaluation["task"] == "perplexity"
                else _passkey_setting(evaluation)
            )
            series[evaluation["task"]].append((label, points))
    panels = [task for task in series if series[task]]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    from .plots import series_styles

    for axis, task in zip(axes[0], panels):
        for (label, points), style in zip(series[task], series_styles(len(series[task]))):
            lengths, values = zip(*points)
            axis.plot(lengths, values, label=label, **style)
        if train_length:
            axis.axvline(train_length, color="grey", linewidth=0.8, linestyle=":", label="training length")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({length for _, points in series[task] for length, _ in points}))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_xlabel("evaluation length (tokens)")
        if task == "perplexity":
            axis.set_yscale("log")
            for formatter in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
                formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
            axis.set_ylabel("perplexity (log scale)")
        else:
            axis.set_ylim(-0.05, 1.05)
            axis.set_ylabel("passkey accuracy")
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _checkpoint_markdown(checkpoint: str | None, base_type: str) -> str:
    """Where a converted model came from: a Hub link, or what is known of a local checkpoint (never its path)."""
    if checkpoint is None:
        return ""
    hub = _hub_id(checkpoint)
    if hub is not None:
        return f"Converted from [`{hub}`](https://huggingface.co/{hub}), then trained with the scheme below."
    source = Path(checkpoint).expanduser() / "config.json"
    known = json.loads(source.read_text()) if source.is_file() else {}
    facts = [f"`model_type` {known.get('model_type') or base_type}"]
    if known.get("_name_or_path"):
        facts.append(f"`_name_or_path` {known['_name_or_path']}")
    return f"Converted from a local checkpoint ({', '.join(facts)}), then trained with the scheme below."


def _tokenizer_markdown(saved: bool, recorded: str | None) -> str:
    """The card's tokenizer line; a local path the record holds is never shown (a Hub name, or "bytes", is)."""
    shown = recorded if recorded is None or recorded == "bytes" or not local_path(recorded) else None
    named = shown or ("the checkpoint's own" if recorded else None)
    if saved:
        return "tokenizer: saved with the model" + (
            f" (trained with `{named}`)" if shown else f" ({named})" if named else ""
        )
    if recorded in (None, "bytes"):
        return "tokenizer: none saved; token ids are UTF-8 byte values (hf_posenc's byte tokenizer)"
    if shown is None:
        return "tokenizer: a local one, not saved with the model"
    return f"tokenizer: `{recorded}`, not saved with the model: load it with `AutoTokenizer.from_pretrained`"


def is_hub_build(folder: str | Path) -> bool:
    """Whether `folder` is a folder `build_hub_folder` built: a README.md whose card metadata is tagged `hf_posenc`,
    beside a config.json with `posenc`."""
    from huggingface_hub.repocard import metadata_load

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (folder / "config.json").is_file():
        return False
    try:
        metadata = metadata_load(folder / "README.md") or {}
        config = json.loads((folder / "config.json").read_text())
    except Exception:  # unreadable, or not YAML / JSON: not a build
        return False
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return isinstance(tags, list) and TAG in tags and isinstance(config, dict) and "posenc" in config


def _check_folder(folder: Path, model_dir: Path) -> None:
    """Refuse, before anything is read or written, a `folder` whose content a build must not replace: anything but
    a new or empty folder or an earlier build, or a folder that holds the model."""
    choose = "choose an empty or new `--folder`"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; {choose}")
    if folder.resolve() == model_dir.resolve() or folder.resolve() in model_dir.resolve().parents:
        raise ValueError(f"{folder} holds the model {model_dir}, and a build replaces everything in it; {choose}")
    if folder.is_dir() and any(folder.iterdir()) and not is_hub_build(folder):
        raise ValueError(
            f"{folder} is not empty and is not an earlier `hf-posenc push` build (a README.md whose card is tagged "
            f"{TAG}, beside a config.json with posenc); a build replaces everything in its folder, so it is left "
            f"untouched: {choose}"
        )
    hidden = sorted(entry.name for entry in folder.iterdir() if entry.name.startswith(".")) if folder.is_dir() else []
    if hidden:  # a build writes none: a clone's .git, an editor's files are the user's
        raise ValueError(f"{folder} holds {', '.join(hidden)}, which a build did not write and would remove; {choose}")


def _check_evaluations_outside(folder: Path, evaluations) -> None:
    """Refuse an evaluation JSON inside `folder`: the rebuild replaces the folder's content, the JSON with it."""
    for path in evaluations or []:
        if folder.resolve() in Path(path).resolve().parents:
            raise ValueError(f"--eval {path} lies inside {folder}, whose content the build replaces: move it out")


def _training_record(model_dir: Path, digest: str) -> dict:
    """The record `hf-posenc train` left beside the weights in `model_dir` (their digest is `digest`), or {} when
    there is none or it is of other weights (a later run wrote into the folder), which is logged."""
    path = model_dir / TRAINING_RECORD
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    recorded = record.get("weights_sha256") if isinstance(record, dict) else None
    if recorded == digest:
        return record
    logger.warning(
        "%s %s: the card states none of its training facts (pass --data and --train-length to state them)",
        path,
        "records no weights_sha256, so nothing tells that it is the record of the weights beside it"
        if recorded is None
        else f"is the record of other weights (weights_sha256 {str(recorded)[:12]}...; the weights in the folder "
        f"are {digest[:12]}...)",
    )
    return {}


def _replace_contents(folder: Path, built: Path) -> None:
    """Replace the content of `folder` (created when missing) by everything in `built`: the old entries are moved
    aside first and put back if moving the new ones in fails (`shutil.move` copies where a rename cannot, e.g. into a
    mount point), so a failure leaves the earlier build as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.resolve().name}.", suffix=".previous", dir=built.parent))
    try:
        for entry in list(folder.iterdir()):
            shutil.move(str(entry), str(aside / entry.name))
        try:
            for entry in list(built.iterdir()):
                shutil.move(str(entry), str(folder / entry.name))
        except BaseException:
            for entry in list(folder.iterdir()):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            for entry in list(aside.iterdir()):
                shutil.move(str(entry), str(folder / entry.name))
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def build_hub_folder(
    model_dir: str | Path,
    folder: str | Path,
    repo_id: str,
    *,
    evaluations: list[str | Path] | None = None,
    data: str | None = None,
    train_length: int | None = None,
    license: str | None = None,
) -> Path:
    """Write into `folder` everything the Hub repo `repo_id` needs, and return it.

    - weights as safetensors, config.json with `posenc` and the full `auto_map`, the shipped code files;
    - the tokenizer when `model_dir` has one (`has_tokenizer`);
    - README.md, a `huggingface_hub.ModelCard`: metadata (license, library_name, pipeline_tag, tags, base_model for a
      checkpoint converted from the Hub, datasets for Hub training data, model-index evaluation results); the scheme
      and its parameters; the training data, length, steps, tokenizer and packing (from the arguments or the record
      `hf-posenc train` leaves, when its `weights_sha256` is the folder's weights'); how to load it with or without
      hf_posenc; the evaluations as tables and a plot (`evaluation.png`) drawn from them.

    The folder is built aside (a hidden sibling of `folder`) and only then replaces everything in `folder`: a refused
    or failed build leaves `folder` as it was, and a build never mixes with files of an earlier one.

    Args:
        model_dir: a saved posenc model.
        folder: where to build the repo folder: a new or empty folder, or an earlier build (`is_hub_build`), whose
            content is all replaced.
        repo_id: the Hub repo, for the card.
        evaluations: `hf-posenc eval` JSONs of this model (perplexity, passkey); see `load_evaluation`.
        data: the training data, overriding the training record's.
        train_length: the training length, overriding the training record's.
        license: a Hub license id; None: "apache-2.0" for a model trained from scratch, "other" for a converted
            checkpoint (its base model's license applies, which the card says).

    Returns:
        `folder`.

    Raises:
        ValueError: `model_dir` is not a posenc model; `folder` is not empty and not an earlier build, or holds the
            model; or an evaluation is not of this model (see `load_evaluation`).
    """
    from transformers import AutoConfig

    model_dir, folder = Path(model_dir), Path(folder)
    if isinstance(evaluations, (str, Path)):
        evaluations = [evaluations]
    config = AutoConfig.from_pretrained(model_dir)
    if not hasattr(config, "posenc"):
        raise ValueError(f"{model_dir} is not a posenc model (its model_type is {config.model_type!r})")
    _check_folder(folder, model_dir)
    _check_evaluations_outside(folder, evaluations)
    read = [(path, read_evaluation(path)) for path in evaluations or []]  # not evaluations at all: before any write
    parent = folder.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{folder.resolve().name}.", suffix=".building", dir=parent))
    try:
        _build(model_dir, built, repo_id, config, read, data=data, train_length=train_length, license=license)
        _replace_contents(folder, built)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return folder


def _build(
    model_dir: Path,
    folder: Path,
    repo_id: str,
    config,
    read: list[tuple[str | Path, dict]],
    *,
    data: str | None,
    train_length: int | None,
    license: str | None,
) -> None:
    """`build_hub_folder`'s work, into the empty `folder`, with `read` the evaluations it was given."""
    from huggingface_hub import ModelCard, ModelCardData

    import hf_posenc

    model_digest = weights_digest(model_dir)
    record = _training_record(model_dir, model_digest)
    model = _model_class(config).from_pretrained(model_dir)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_saved = has_tokenizer(model_dir)
    if tokenizer_saved:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    data = data or record.get("data")
    train_length = train_length or record.get("seq_length")
    digests = [model_digest, weights_digest(folder)]
    checked = [check_evaluation(results, path, config.posenc, digests, model_dir) for path, results in read]

    scheme = config.posenc["type"]
    auto_class = _auto_class(config, type(model))
    pipeline_tag = PIPELINE_TAGS.get(auto_class)
    checkpoint = record.get("checkpoint")
    base_model = _hub_id(checkpoint)
    hub_data = _hub_dataset(data)
    results = eval_results(checked)
    card_data = ModelCardData(
        license=license or ("other" if checkpoint else "apache-2.0"),
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[TAG, "positional-encoding", scheme],
        base_model=base_model,
        datasets=[hub_data[0]] if hub_data else None,
        model_name=repo_id if results else None,
        eval_results=results or None,
    )

    held_out = record.get("held_out_fraction")
    training = [
        f"- data: {_data_markdown(data) if data else 'not recorded'}"
        + (
            f"; the last {held_out:.0%} is held out for evaluation, never trained on"
            if held_out and not hub_data
            else ""
        ),
        f"- training length: {train_length or 'not recorded'} tokens",
        f"- steps: {record.get('steps', 'not recorded')}",
        f"- {_tokenizer_markdown(tokenizer_saved, record.get('tokenizer'))}",
    ]
    if "packing" in record:
        training.append(f"- sequence packing: {'on' if record['packing'] else 'off'}")
    if record.get("eval_loss") is not None:
        loss = record["eval_loss"]
        training.append(f"- held-out loss after training: {loss:.4f} (perplexity {math.exp(loss):.3f})")
    origin = _checkpoint_markdown(checkpoint, config.base_model_type)
    if checkpoint and not license:
        origin += " Its license applies to these weights: pass `--license` to name it."
    if checked:
        evaluation = (
            "Each evaluation below was checked to be of these weights: the `weights_sha256` it records is theirs.\n\n"
            + "\n".join(_evaluation_markdown(e, data) for e in checked)
        )
        title = f"{repo_id} ({scheme}" + (f", trained at {train_length})" if train_length else ")")
        if plot_evaluations(checked, folder / PLOT, title, train_length):
            evaluation += f"\n![evaluation of this model against length]({PLOT})\n"
    else:
        evaluation = "No evaluation was attached (`hf-posenc push --eval results.json`, from `hf-posenc eval`)."
    body = BODY.format(
        repo_id=repo_id,
        scheme=scheme,
        posenc=json.dumps(config.posenc),
        architecture=config.base_model_type,
        kind=MODEL_KINDS.get(pipeline_tag, "model"),
        model_class=type(model).__name__,
        auto_class=auto_class,
        params=f"{sum(p.numel() for p in model.parameters()):,}",
        origin=f"\n{origin}\n" if origin else "",
        training="\n".join(training),
        evaluation=evaluation,
        version=hf_posenc.__version__,
        tested=tested_range_text(),
        newer=NEWER_RELEASES[config.stock_guard() is None].format(scheme=scheme),
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")  # parses the metadata back: invalid metadata raises
    card.save(folder / "README.md")


def upload(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the model repo and upload `folder`; a failure names the folder, which stays as it is.

    Args:
        folder: the folder `build_hub_folder` built.
        repo_id: the Hub repo.
        private: create the repo as private (an existing repo keeps its visibility).
        token: a Hub token; None uses the saved login.

    Returns:
        The URL of the upload commit.

    Raises:
        RuntimeError: creating the repo or uploading failed; the message says how to retry with the `hf` CLI.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except Exception as error:  # network, auth, quota: all leave the local folder intact
        retry = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))}" + (" --private" if private else "")
        raise RuntimeError(
            f"uploading {folder} to {repo_id} failed ({type(error).__name__}: {error}); the folder is intact: retry "
            f"with `{retry}` or `hf-posenc push` once the Hub is reachable"
        ) from error
    return str(getattr(commit, "commit_url", commit))


#: what the card says of a release newer than the tested ones, by whether transformers' own modules compute the scheme
NEWER_RELEASES = {
    True: (
        "On a newer release it loads, with a warning: transformers' own modules compute its scheme ({scheme}), "
        "though the plugin's code that passes the calls through to them is untested there. hf_posenc itself refuses "
        "newer releases until it is tested with them."
    ),
    False: (
        "On a newer release it refuses to load, naming the tested releases: hf_posenc's code computes its scheme "
        "({scheme}), which may compute other numbers there. Install a tested release, or set "
        f"`{ALLOW_UNTESTED}=1` to try a newer one (its results are not verified)."
    ),
}

BODY = """
# {repo_id}

A `{architecture}` {kind} ({params} parameters) with the **{scheme}** positional scheme, made with hf_posenc
{version}.
{origin}
## Positional scheme

```json
{posenc}
```

## Training

{training}

## Evaluation

{evaluation}

## Use

With hf_posenc installed:

```python
import hf_posenc
from transformers import {auto_class}
model = {auto_class}.from_pretrained("{repo_id}")
```

Without it, the model's code ships in this repository:

```python
from transformers import {auto_class}
model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)
```

The class is `{model_class}`; its weights keep the stock `{architecture}` names.

## transformers releases

This repository's code was tested with `transformers{tested}` (hf_posenc {version}) and refuses an older release.
{newer}
"""
