"""`hf-posenc push`: the exact folder a Hub repo needs, with a model card, and its upload.

The card is a `huggingface_hub.ModelCard`: its metadata (license, library, pipeline tag, tags, base model, datasets and
the evaluation results in model-index form) comes from `ModelCardData`, and it only shows results of the model pushed:
an evaluation JSON is accepted when its `weights_sha256` is this model's (`weights_digest`), and the plot is drawn
here from those JSONs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shlex
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINING_RECORD = "hf_posenc_training.json"  # written next to a model by `hf-posenc train`
PLOT = "evaluation.png"  # drawn by `build_hub_folder` from the evaluation JSONs
# removed from a folder before it is rebuilt: the card, and the plots (the last: what `push --plot` used to copy)
STALE = ("README.md", PLOT, "ppl_vs_length.png")
STDLIB = "stdlib"  # `hf_posenc.workflow.data.STDLIB`, the default text of `train` and `eval`
# suffixes that make a data source a (missing) local file rather than a Hub dataset name
TEXT_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv", ".py", ".gz", ".parquet")
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
    """`name` when it can only mean a Hub repo id (not an existing local path, nor shaped like a path), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _hub_dataset(data: str | None) -> tuple[str, str | None] | None:
    """(dataset id, config) when `data` names a Hub dataset the way the data module reads one ("name:config"), not
    the stdlib text nor a local file or folder (here or, by its shape, on the machine that trained)."""
    if data in (None, STDLIB):
        return None
    name, _, config = data.partition(":")
    if Path(data).expanduser().exists() or name.lower().endswith(TEXT_SUFFIXES) or _hub_id(name) is None:
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


def load_evaluation(path: str | Path, posenc: dict, digests: list[str]) -> dict:
    """An `hf-posenc eval` JSON (perplexity or passkey), checked to be of the model whose weights digest is in
    `digests` (or, for a JSON without `weights_sha256`, whose `posenc` is `posenc`, with a logged warning).

    Args:
        path: the JSON.
        posenc: the model's `config.posenc`.
        digests: the model's `weights_digest`s (the folder evaluated, and the folder built for the Hub).

    Returns:
        The JSON's content, with `"task"` set (JSONs that predate it are perplexity) and `"checked"`: "weights" or
        "posenc", what was compared.

    Raises:
        ValueError: not such a JSON (a markdown table, `hf-posenc compare`'s results), or not of this model.
    """
    return check_evaluation(read_evaluation(path), path, posenc, digests)


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


def check_evaluation(results: dict, path: str | Path, posenc: dict, digests: list[str]) -> dict:
    """`results` (`read_evaluation`) with `"checked"` set, or a ValueError when it is not of this model (see
    `load_evaluation`)."""
    digest = results.get("weights_sha256")
    if digest is not None:
        if digest not in digests:
            raise ValueError(
                f"{path} is an evaluation of other weights ({results.get('model', 'a model')}, weights_sha256 "
                f"{digest[:12]}...; this model's is {digests[0][:12]}...): the card only shows results of this model"
            )
        checked = "weights"
    elif "posenc" not in results:
        raise ValueError(
            f"{path} records neither weights_sha256 nor posenc, so nothing tells that it evaluated this model; "
            f"rerun `hf-posenc eval` on it"
        )
    elif _normalised(results["posenc"]) != _normalised(posenc):
        raise ValueError(
            f"{path} is an evaluation of another model (posenc {json.dumps(results['posenc'])}; this model's is "
            f"{json.dumps(posenc)}): the card only shows results of this model"
        )
    else:
        logger.warning(
            "%s records no weights_sha256: only its positional scheme was checked to be this model's; rerun "
            "`hf-posenc eval` to record the weights it evaluated",
            path,
        )
        checked = "posenc"
    return {**results, "checked": checked}


def _windows(evaluation: dict) -> str:
    stride = evaluation.get("stride")
    if stride is None:
        return "non-overlapping windows"
    return f"sliding window, stride {stride}"


def _passkey_setting(evaluation: dict) -> str:
    digits, samples = evaluation.get("digits"), evaluation.get("samples")
    parts = [
        f"{digits}-digit key" if digits is not None else None,
        f"{samples} samples per length" if samples else None,
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
    if evaluation["checked"] == "posenc":
        lines.append(
            "\nThis evaluation does not record the weights it read: only its positional scheme was checked to be "
            "this model's.\n"
        )
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
    for axis, task in zip(axes[0], panels):
        for label, points in series[task]:
            lengths, values = zip(*points)
            axis.plot(lengths, values, marker="o", label=label)
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
    if saved:
        return "tokenizer: saved with the model" + (f" (trained with `{recorded}`)" if recorded else "")
    if recorded in (None, "bytes"):
        return "tokenizer: none saved; token ids are UTF-8 byte values (hf_posenc's byte tokenizer)"
    return f"tokenizer: `{recorded}`, not saved with the model: load it with `AutoTokenizer.from_pretrained`"


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
    - the tokenizer when `model_dir` has one;
    - README.md, a `huggingface_hub.ModelCard`: metadata (license, library_name, pipeline_tag, tags, base_model for a
      checkpoint converted from the Hub, datasets for Hub training data, model-index evaluation results); the scheme
      and its parameters; the training data, length, steps, tokenizer and packing (from the arguments or the record
      `hf-posenc train` leaves); how to load it with or without hf_posenc; the evaluations as tables and a plot
      (`evaluation.png`) drawn from them.

    Args:
        model_dir: a saved posenc model.
        folder: where to build the repo folder (created; the card and plot of an earlier build are removed first).
        repo_id: the Hub repo, for the card.
        evaluations: `hf-posenc eval` JSONs of this model (perplexity, passkey); see `load_evaluation`.
        data: the training data, overriding the training record's.
        train_length: the training length, overriding the training record's.
        license: a Hub license id; None: "apache-2.0" for a model trained from scratch, "other" for a converted
            checkpoint (its base model's license applies, which the card says).

    Returns:
        `folder`.

    Raises:
        ValueError: `model_dir` is not a posenc model, or an evaluation is not of this model (see `load_evaluation`).
    """
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import AutoConfig

    import hf_posenc

    model_dir, folder = Path(model_dir), Path(folder)
    if isinstance(evaluations, (str, Path)):
        evaluations = [evaluations]
    config = AutoConfig.from_pretrained(model_dir)
    if not hasattr(config, "posenc"):
        raise ValueError(f"{model_dir} is not a posenc model (its model_type is {config.model_type!r})")
    read = [(path, read_evaluation(path)) for path in evaluations or []]  # not evaluations at all: before any write
    model = _model_class(config).from_pretrained(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in STALE:  # a build refused below leaves no card, rather than the card of an earlier build
        (folder / stale).unlink(missing_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_saved = (model_dir / "tokenizer_config.json").exists()
    if tokenizer_saved:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    record = json.loads((model_dir / TRAINING_RECORD).read_text()) if (model_dir / TRAINING_RECORD).exists() else {}
    data = data or record.get("data")
    train_length = train_length or record.get("seq_length")
    digests = [weights_digest(model_dir), weights_digest(folder)]
    checked = [check_evaluation(results, path, config.posenc, digests) for path, results in read]

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
        tags=["hf_posenc", "positional-encoding", scheme],
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
        evaluation = "\n".join(_evaluation_markdown(e, data) for e in checked)
        if all(e["checked"] == "weights" for e in checked):
            evaluation = (
                "Each evaluation below was checked to be of these weights: the `weights_sha256` it records is "
                "theirs.\n\n" + evaluation
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
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")  # parses the metadata back: invalid metadata raises
    card.save(folder / "README.md")
    return folder


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
"""
