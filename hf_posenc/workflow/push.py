"""`hf-posenc push`: the exact folder a Hub repo needs, with a model card, and its upload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TRAINING_RECORD = "hf_posenc_training.json"  # written next to a model by `hf-posenc train`


def _model_class(config):
    """The posenc class named in `config.architectures` (any head, the base model when none is named)."""
    from ..auto import model_classes

    classes = model_classes(config.base_model_type)
    name = (config.architectures or [config.auto_map_entries["AutoModel"].split(".")[1]])[0]
    if name not in classes:
        raise ValueError(f"{name} is not a posenc model class of {config.base_model_type}")
    return classes[name]


def build_hub_folder(
    model_dir: str | Path,
    folder: str | Path,
    repo_id: str,
    evaluation: str | Path | None = None,
    plot: str | Path | None = None,
    data: str | None = None,
    train_length: int | None = None,
) -> Path:
    """Write into `folder` everything the Hub repo `repo_id` needs, and return it.

    - weights as safetensors, config.json with `posenc` and the full `auto_map`, the shipped code files;
    - the tokenizer when `model_dir` has one (otherwise the card says ids are UTF-8 bytes);
    - README.md: a model card with the scheme and its parameters, the training data and length (from the arguments or
      the record `hf-posenc train` leaves), how to load it with or without hf_posenc, and the evaluation (a results
      JSON of `hf-posenc eval`, or a markdown table such as `hf-posenc compare`'s results.md) and plot when given.
    """
    from transformers import AutoConfig

    import hf_posenc

    model_dir, folder = Path(model_dir), Path(folder)
    config = AutoConfig.from_pretrained(model_dir)
    if not hasattr(config, "posenc"):
        raise ValueError(f"{model_dir} is not a posenc model (its model_type is {config.model_type!r})")
    model = _model_class(config).from_pretrained(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_note = "Token ids are UTF-8 bytes (vocabulary 256): no tokenizer files are needed."
    if (model_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
        tokenizer_note = "The tokenizer is saved with the model."
    record = json.loads((model_dir / TRAINING_RECORD).read_text()) if (model_dir / TRAINING_RECORD).exists() else {}
    data = data or record.get("data") or "not recorded"
    train_length = train_length or record.get("seq_length")
    evaluation_text = ""
    if evaluation is not None:
        evaluation_text = _evaluation_markdown(Path(evaluation))
    if plot is not None:
        shutil.copyfile(plot, folder / "ppl_vs_length.png")
        evaluation_text += "\n![perplexity against evaluation length](ppl_vs_length.png)\n"
    card = CARD.format(
        repo_id=repo_id,
        scheme=config.posenc["type"],
        posenc=json.dumps(config.posenc),
        architecture=config.base_model_type,
        model_class=type(model).__name__,
        auto_class=type(model)._auto_class or "AutoModel",
        params=f"{sum(p.numel() for p in model.parameters()):,}",
        data=data,
        train_length=train_length or "not recorded",
        steps=record.get("steps", "not recorded"),
        tokenizer_note=tokenizer_note,
        evaluation=evaluation_text or "No evaluation was attached (`hf-posenc push --eval results.json`).",
        version=hf_posenc.__version__,
    )
    (folder / "README.md").write_text(card)
    return folder


def _evaluation_markdown(path: Path) -> str:
    if path.suffix == ".md":
        return path.read_text()
    results = json.loads(path.read_text())
    if "lengths" not in results:
        raise ValueError(f"{path} is neither an `hf-posenc eval` JSON nor a markdown table")
    from .evaluate_lengths import markdown

    return f"Perplexity against length (stride {results.get('stride')}):\n\n" + markdown(results)


def upload(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the model repo and upload `folder`; a failure names the folder, which stays as it is."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except Exception as error:  # network, auth, quota: all leave the local folder intact
        raise RuntimeError(
            f"uploading {folder} to {repo_id} failed ({type(error).__name__}: {error}); the folder is intact: retry "
            f"with `huggingface-cli upload {repo_id} {folder}` or `hf-posenc push` once the Hub is reachable"
        ) from error
    return str(getattr(commit, "commit_url", commit))


CARD = """---
library_name: transformers
tags:
- hf_posenc
- positional-encoding
- {scheme}
---

# {repo_id}

A `{architecture}` model ({params} parameters) with the **{scheme}** positional scheme, made with hf_posenc
{version}.

## Positional scheme

```json
{posenc}
```

## Training

- data: {data}
- training length: {train_length} tokens
- steps: {steps}
- {tokenizer_note}

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
