"""`hf-posenc push`: the Hub folder (weights, code, tokenizer, card) loads without the plugin; the card is a
huggingface_hub ModelCard whose metadata round-trips and that only shows results of this model; uploads use
huggingface_hub."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from hf_posenc.cli import main
from hf_posenc.modeling import posenc_version
from hf_posenc.workflow import push
from hf_posenc.workflow.data import byte_tokenizer

POSENC = {"type": "rope", "rope_type": "yarn", "factor": 2.0}
VOCAB = 257  # byte_tokenizer's: the 256 bytes and <|endoftext|>
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def recorded_posenc(model_dir):
    """The model's config.posenc as `hf-posenc eval` records it: the scheme with the defaults its config fills in."""
    return json.loads((model_dir / "config.json").read_text())["posenc"]


def perplexity_json(path, model_dir, digest="auto", stride=None, data="stdlib", posenc=None, split="test", **lengths):
    """An `hf-posenc eval` perplexity JSON of `model_dir` (digest "auto": its weights_sha256; None: left out)."""
    posenc = posenc or recorded_posenc(model_dir)
    results = {"task": "perplexity", "model": str(model_dir), "posenc": posenc, "stride": stride, "data": data}
    if split is not None:
        results["split"] = split
    if digest is not None:
        results["weights_sha256"] = push.weights_digest(model_dir) if digest == "auto" else digest
    results["lengths"] = lengths or {
        "64": {"ppl": 5.5, "nll": 1.705, "tokens": 1000},
        "128": {"ppl": 9.25, "nll": 2.225, "tokens": 1000},
        "512": {"error": "1000 tokens cannot fill one window of 512"},
    }
    path.write_text(json.dumps(results))
    return path


def passkey_json(path, model_dir):
    """An `hf-posenc eval` passkey JSON of `model_dir`."""
    depths = [0.0, 0.5, 1.0]
    lengths = {
        "64": {"accuracy": 1.0, "by_depth": {"0.0": 1.0, "0.5": 1.0, "1.0": 1.0}},
        "256": {"accuracy": 0.4, "by_depth": {"0.0": 0.2, "0.5": 0.4, "1.0": 0.6}},
        "1024": {"error": "past the position table"},
    }
    results = {"task": "passkey", "model": str(model_dir), "posenc": recorded_posenc(model_dir), "data": "stdlib"}
    results |= {"split": "test", "weights_sha256": push.weights_digest(model_dir), "digits": 5, "samples": 10}
    results |= {"depths": depths, "lengths": lengths}
    path.write_text(json.dumps(results))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved posenc model with its tokenizer, the training record and two evaluation JSONs of it, as `train` and
    `eval` leave them."""
    folder = tmp_path_factory.mktemp("model")
    model = build("gpt2", POSENC, config_overrides={"vocab_size": VOCAB})
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    record = {"data": "stdlib", "held_out_fraction": 0.05, "seq_length": 64, "steps": 100, "posenc": POSENC}
    record |= {"checkpoint": None, "tokenizer": "bytes", "packing": True, "eval_loss": 1.5}
    record |= {"weights_sha256": push.weights_digest(folder)}
    (folder / push.TRAINING_RECORD).write_text(json.dumps(record))
    evaluation = perplexity_json(folder.parent / "eval.json", folder)
    passkey = passkey_json(folder.parent / "passkey.json", folder)
    return folder, evaluation, model, passkey


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another training of the same architecture and scheme (other seed): same shapes, other weights."""
    folder = tmp_path_factory.mktemp("other")
    build("gpt2", POSENC, seed=1, config_overrides={"vocab_size": VOCAB}).save_pretrained(folder)
    return folder


def bare_copy(model_dir, destination, record=None):
    """`model_dir` without its tokenizer, with `record` as its training record (with the copy's weights_sha256 unless
    `record` sets one)."""
    destination.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model_dir / name, destination / name)
    if record is not None:
        record = {"weights_sha256": push.weights_digest(destination)} | record
        (destination / push.TRAINING_RECORD).write_text(json.dumps(record))
    return destination


def folder_state(folder):
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent):
    """Hidden build folders left in `parent`."""
    return [p.name for p in parent.iterdir() if p.name.endswith(".building")]


def test_dry_run_builds_the_repo_folder(trained, tmp_path, capsys):
    """--dry-run writes safetensors, config with posenc and auto_map, the code closure, the tokenizer, a card and the
    plot of the evaluations given with --eval (repeatable); nothing uploads. Needs the CLI's `--eval` as
    action="append" and `--license`."""
    model_dir, evaluation, _, passkey = trained
    out = tmp_path / "hub"
    argv = ["push", str(model_dir), "--repo-id", "me/gpt2-yarn", "--folder", str(out), "--dry-run"]
    assert main(argv + ["--eval", str(evaluation), "--eval", str(passkey), "--license", "mit"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "configuration_posenc_gpt2.py",
        "modeling_posenc_gpt2.py",
        "posenc_factory.py",
        "posenc_layers.py",
        "posenc_attention.py",
        "tokenizer.json",
        "tokenizer_config.json",
        push.PLOT,
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["posenc"]["rope_type"] == "yarn" and "AutoModelForCausalLM" in config["auto_map"]
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit"
    for expected in (
        "**rope**",
        '"factor": 2.0',
        "data: Python's standard-library source code (`stdlib`); the last 5% is held out for evaluation",
        "training length: 64",
        "| 64 | 5.500 | 1,000 |",
        "| 256 | 0.40 | 0.20 | 0.40 | 0.60 |",
        f"]({push.PLOT})",
        "trust_remote_code=True",
        f"tested with `transformers{posenc_version.tested_range_text()}` (hf_posenc",
        "On a newer release it refuses to load",  # GPT-2 with RoPE: transformers' GPT-2 computes no RoPE
        "HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS=1",
    ):
        assert expected in card.text
    assert "built" in capsys.readouterr().out


def test_card_metadata_round_trips(trained, tmp_path):
    """The card's YAML is ModelCardData's: license, library, pipeline tag, tags and one model-index result per length
    with a value (perplexity and passkey accuracy); it loads back equal, and re-validates offline."""
    model_dir, evaluation, _, passkey = trained
    out = push.build_hub_folder(model_dir, tmp_path / "hub", "me/gpt2-yarn", evaluations=[evaluation, passkey])
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "transformers", "text-generation")
    assert data.tags == ["hf_posenc", "positional-encoding", "rope"]
    assert data.base_model is None and data.datasets is None  # trained from scratch, on the stdlib text
    stdlib = {"task_type": "text-generation", "task_name": "perplexity against length", "dataset_type": "local"}
    stdlib |= {"dataset_split": "test"}
    stdlib |= {"dataset_name": "Python standard-library source (stdlib)", "metric_type": "perplexity"}
    synthetic = {"task_type": "text-generation", "task_name": "passkey retrieval", "dataset_type": "synthetic"}
    setting = "5-digit key, 10 samples at each of 3 depths per length"
    synthetic |= {"dataset_name": f"passkey retrieval ({setting}) in Python standard-library source (stdlib)"}
    synthetic |= {"metric_type": "accuracy"}
    windows = "non-overlapping windows"
    expected = [
        EvalResult(**stdlib, metric_name="perplexity@64", metric_value=5.5, metric_config=windows),
        EvalResult(**stdlib, metric_name="perplexity@128", metric_value=9.25, metric_config=windows),
        EvalResult(**synthetic, metric_name="passkey accuracy@64", metric_value=1.0),
        EvalResult(**synthetic, metric_name="passkey accuracy@256", metric_value=0.4),
    ]
    assert data.eval_results == expected and data.model_name == "me/gpt2-yarn"  # failed lengths are left out
    # offline checks of what the Hub validates: the model-index parses back to the same results, the metadata to the
    # same ModelCardData, and the README is exactly the card's own rendering
    index = data.to_dict()["model-index"]
    assert index == eval_results_to_model_index("me/gpt2-yarn", expected)
    assert model_index_to_eval_results(index) == ("me/gpt2-yarn", expected)
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()
    assert str(ModelCard(str(card))) == (out / "README.md").read_text()
    assert "stride None" not in card.text


def test_card_says_how_perplexity_was_evaluated(trained, tmp_path):
    """A strided evaluation reads "sliding window, stride N" in the card and the metric config; a non-strided one
    "non-overlapping windows"; the card says which part of the text was read (held out, or unknown when the JSON
    records no split of the training text)."""
    model_dir, evaluation, _, _ = trained
    strided = perplexity_json(tmp_path / "strided.json", model_dir, stride=32, split=None)
    out = push.build_hub_folder(model_dir, tmp_path / "hub", "me/x", evaluations=[evaluation, strided])
    card = ModelCard.load(out / "README.md")
    assert "### Perplexity against length: non-overlapping windows" in card.text
    assert "### Perplexity against length: sliding window, stride 32" in card.text
    assert "Text: Python's standard-library source code (`stdlib`), its held-out part (never trained on)." in card.text
    assert "; the evaluation records no split: it may be text the model was trained on." in card.text
    assert "stride None" not in card.text
    configs = {(r.metric_name, r.metric_config) for r in card.data.eval_results}
    assert ("perplexity@64", "non-overlapping windows") in configs
    assert ("perplexity@64 (stride 32)", "sliding window, stride 32") in configs


def test_evaluations_of_other_models_are_refused(trained, other, tmp_path):
    """Only this model's evaluations are accepted: compare's results.md and results.json and other JSONs are refused
    before anything is written; another training's (its weights_sha256), these weights under another scheme (posenc)
    and a JSON that records no digest are refused, and the earlier build in the folder is left as it was."""
    model_dir, evaluation, _, _ = trained
    hub = tmp_path / "hub"

    def build_with(path):
        return push.build_hub_folder(model_dir, hub, "me/x", evaluations=[evaluation, path])

    (tmp_path / "results.md").write_text("| scheme | 64 |\n|---|---|\n| alibi | 5.1 |\n")
    with pytest.raises(ValueError, match="markdown table .*compare.*`--eval` accepts the JSON that `hf-posenc eval`"):
        build_with(tmp_path / "results.md")
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "schemes": [{"name": "alibi"}]}))
    with pytest.raises(ValueError, match="compare`'s results, of other models .*`--eval` accepts"):
        build_with(tmp_path / "results.json")
    (tmp_path / "bench.json").write_text(json.dumps({"attention": []}))
    with pytest.raises(ValueError, match="not an `hf-posenc eval` JSON .*`--eval` accepts"):
        build_with(tmp_path / "bench.json")
    assert not hub.exists()

    push.build_hub_folder(model_dir, hub, "me/x", evaluations=[evaluation])  # a complete build, then refused ones
    before = folder_state(hub)
    with pytest.raises(ValueError, match="evaluation of other weights .*the card only shows results of this model"):
        build_with(perplexity_json(tmp_path / "other.json", other))
    alibi = perplexity_json(tmp_path / "alibi.json", model_dir, posenc={"type": "alibi"})
    with pytest.raises(ValueError, match='these weights with another positional scheme \\(posenc {"type": "alibi"}'):
        build_with(alibi)
    (tmp_path / "old.json").write_text(json.dumps({"stride": None, "lengths": {"64": {"ppl": 5.5}}}))
    with pytest.raises(ValueError, match="records no weights_sha256"):
        build_with(tmp_path / "old.json")
    assert folder_state(hub) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("digest", ["missing", "null"])
def test_an_evaluation_without_digest_is_refused(trained, tmp_path, digest):
    """A JSON whose weights_sha256 is missing or null is refused even when its posenc is this model's: the message
    says to re-run `hf-posenc eval` on the model folder; nothing is built."""
    model_dir, _, _, _ = trained
    undigested = perplexity_json(tmp_path / "eval.json", model_dir, digest=None)
    if digest == "null":
        undigested.write_text(json.dumps(json.loads(undigested.read_text()) | {"weights_sha256": None}))
    with pytest.raises(
        ValueError, match=f"records no weights_sha256.*re-run `hf-posenc eval` on {re.escape(str(model_dir))}"
    ):
        push.build_hub_folder(model_dir, tmp_path / "hub", "me/x", evaluations=[undigested])
    assert not (tmp_path / "hub").exists() and not leftovers(tmp_path)


def test_an_evaluation_of_other_weights_says_to_rerun_eval(trained, other, tmp_path):
    """The refusal of another model's evaluation says which folder to re-run `hf-posenc eval` on."""
    model_dir, _, _, _ = trained
    theirs = perplexity_json(tmp_path / "other.json", other)
    with pytest.raises(
        ValueError, match=f"evaluation of other weights .*re-run `hf-posenc eval` on {re.escape(str(model_dir))}"
    ):
        push.load_evaluation(theirs, recorded_posenc(model_dir), [push.weights_digest(model_dir)], model_dir)


def test_real_eval_jsons_are_accepted(trained, other, tmp_path):
    """What `hf-posenc eval` writes (perplexity and passkey, through `write`) is accepted as this model's evaluation
    by its weights digest, and another model's is refused."""
    from hf_posenc.workflow.evaluate_lengths import evaluate_lengths, evaluate_passkey, write

    model_dir, _, _, _ = trained
    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n" * 400)
    data = str(tmp_path / "text.txt")
    perplexity = evaluate_lengths(str(model_dir), [32, 64], data=data, max_tokens=512, device="cpu", progress=False)
    passkey = evaluate_passkey(
        str(model_dir), [128, 160], data=data, device="cpu", progress=False, depths=[0.0, 1.0], samples=2, digits=2
    )
    paths = [write(perplexity, tmp_path / "eval.json"), write(passkey, tmp_path / "passkey.json")]
    out = push.build_hub_folder(model_dir, tmp_path / "hub", "me/x", evaluations=paths)
    card = ModelCard.load(out / "README.md")
    names = [r.metric_name for r in card.data.eval_results]
    assert names == ["perplexity@32", "perplexity@64", "passkey accuracy@128", "passkey accuracy@160"]
    assert card.data.eval_results[0].dataset_name == "local text text.txt"
    assert "was checked to be of these weights" in card.text
    assert (out / push.PLOT).read_bytes().startswith(PNG_MAGIC)
    theirs = evaluate_lengths(str(other), [32], data=data, max_tokens=256, device="cpu", progress=False)
    with pytest.raises(ValueError, match="evaluation of other weights"):
        push.build_hub_folder(model_dir, tmp_path / "hub", "me/x", evaluations=[write(theirs, tmp_path / "o.json")])


def test_plot_is_only_drawn_from_this_models_evaluations(trained, tmp_path):
    """The plot is drawn from the evaluation JSONs; a rebuild without them leaves no plot (neither its own from
    before nor a copied `ppl_vs_length.png`), and the card then shows no image."""
    model_dir, evaluation, _, passkey = trained
    out = tmp_path / "hub"
    push.build_hub_folder(model_dir, out, "me/x", evaluations=[evaluation, passkey])
    assert (out / push.PLOT).read_bytes().startswith(PNG_MAGIC)
    (out / "ppl_vs_length.png").write_bytes(PNG_MAGIC)  # what `--plot` used to copy in
    push.build_hub_folder(model_dir, out, "me/x")
    assert not (out / push.PLOT).exists() and not (out / "ppl_vs_length.png").exists()
    card = ModelCard.load(out / "README.md")
    assert "![" not in card.text and "No evaluation was attached" in card.text
    assert card.data.eval_results is None
    failed = perplexity_json(tmp_path / "failed.json", model_dir, **{"512": {"error": "too short"}})
    checked = push.load_evaluation(failed, recorded_posenc(model_dir), [push.weights_digest(model_dir)])
    assert not push.plot_evaluations([checked], tmp_path / "failed.png", "title")
    assert not (tmp_path / "failed.png").exists()


def test_weights_digest(trained, other, tmp_path):
    """The digest of a single file is its sha256; a sharded folder's covers its shards, not only the index (which is
    the same for every model of one shape); a folder without weights is an error."""
    model_dir, _, _, _ = trained
    assert push.weights_digest(model_dir) == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert push.weights_digest(model_dir) != push.weights_digest(other)
    from transformers import AutoModelForCausalLM

    for name, source in (("a", model_dir), ("b", other)):
        AutoModelForCausalLM.from_pretrained(source).save_pretrained(tmp_path / name, max_shard_size="100KB")
    index = "model.safetensors.index.json"
    assert (tmp_path / "a" / index).read_bytes() == (tmp_path / "b" / index).read_bytes()
    assert push.weights_digest(tmp_path / "a") != push.weights_digest(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        push.weights_digest(tmp_path)


def test_card_of_a_converted_checkpoint(trained, tmp_path):
    """A checkpoint converted from the Hub is the card's base_model (license "other" unless given, its license
    applies); a local one is named by its model_type only, never its path; Hub training data is in `datasets`;
    the recorded tokenizer and packing are stated."""
    model_dir, _, _, _ = trained
    record = {
        "data": "wikitext:wikitext-2-raw-v1",
        "seq_length": 64,
        "steps": 50,
        "checkpoint": "openai-community/gpt2",
    }
    hub = bare_copy(model_dir, tmp_path / "hub-converted", record | {"tokenizer": "openai-community/gpt2"})
    out = push.build_hub_folder(hub, tmp_path / "out-hub", "me/gpt2-yarn")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "openai-community/gpt2" and card.data.license == "other"
    assert card.data.datasets == ["wikitext"]
    for expected in (
        "Converted from [`openai-community/gpt2`](https://huggingface.co/openai-community/gpt2)",
        "Its license applies to these weights",
        "data: [`wikitext`](https://huggingface.co/datasets/wikitext) (config `wikitext-2-raw-v1`)",
        "tokenizer: `openai-community/gpt2`, not saved with the model",
    ):
        assert expected in card.text
    assert "sequence packing" not in card.text  # not recorded
    assert not (out / "tokenizer_config.json").exists()

    checkpoint = tmp_path / "my-llama"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": "meta/some-llama"}))
    local = bare_copy(model_dir, tmp_path / "local-converted", record | {"checkpoint": str(checkpoint)})
    local_record = record | {
        "checkpoint": str(checkpoint),
        "packing": False,
        "weights_sha256": push.weights_digest(local),
    }
    (local / push.TRAINING_RECORD).write_text(json.dumps(local_record))
    out = push.build_hub_folder(local, tmp_path / "out-local", "me/x", data="corpus/train.txt", license="llama2")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and card.data.datasets is None and card.data.license == "llama2"
    assert "Converted from a local checkpoint (`model_type` llama, `_name_or_path` meta/some-llama)" in card.text
    assert str(checkpoint) not in card.text and "data: local text `train.txt`" in card.text
    assert "sequence packing: off" in card.text and "Its license applies" not in card.text
    assert "tokenizer: none saved; token ids are UTF-8 byte values" in card.text


def test_tokenizer_travels_with_the_model(trained, tmp_path):
    """The model folder's tokenizer (a PreTrainedTokenizerFast of bytes) is saved with the model and encodes alike;
    the card says so, with the recorded tokenizer and packing."""
    from transformers import AutoTokenizer

    model_dir, _, _, _ = trained
    out = push.build_hub_folder(model_dir, tmp_path / "hub", "me/x")
    text = "héllo, wörld\n"
    ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"] == list(text.encode("utf-8"))
    card = (out / "README.md").read_text()
    assert "tokenizer: saved with the model (trained with `bytes`)" in card
    assert "sequence packing: on" in card


def test_masked_lm_card_is_fill_mask(tmp_path):
    """A masked LM's card has pipeline_tag fill-mask and loads with AutoModelForMaskedLM."""
    build("bert", "alibi").save_pretrained(tmp_path / "bert")
    out = push.build_hub_folder(tmp_path / "bert", tmp_path / "hub", "me/bert-alibi")
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "fill-mask" and card.data.tags == ["hf_posenc", "positional-encoding", "alibi"]
    assert "masked language model" in card.text and "AutoModelForMaskedLM.from_pretrained" in card.text


def test_card_says_which_transformers_releases_load_it(tmp_path):
    """The card names the releases the shipped code was tested with, and what a newer release does with this folder:
    loads it where transformers' own modules compute the scheme (YaRN on Llama), refuses it otherwise (ALiBi)."""
    tested = (
        f"tested with `transformers{posenc_version.tested_range_text()}` (hf_posenc {posenc_version.PLUGIN_VERSION})"
    )
    for posenc, newer in (
        ({"type": "rope", "rope_type": "yarn", "factor": 4.0}, "On a newer release it loads, with a warning"),
        ("alibi", "On a newer release it refuses to load"),
    ):
        name = posenc if isinstance(posenc, str) else "yarn"
        build("llama", posenc).save_pretrained(tmp_path / name)
        card = ModelCard.load(push.build_hub_folder(tmp_path / name, tmp_path / f"hub-{name}", "me/x") / "README.md")
        assert tested in card.text and newer in card.text


def test_hub_folder_loads_without_the_plugin(trained, tmp_path):
    """The built folder loads in a fresh process where hf_posenc cannot be imported, with the same logits."""
    model_dir, _, model, _ = trained
    out = push.build_hub_folder(model_dir, tmp_path / "hub", "me/gpt2-yarn")
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x).logits}, tmp_path / "io.pt")
    loader = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_posenc"] = None
        import torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            print("SAME", torch.equal(model(io["x"]).logits, io["y"]))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SAME True" in done.stdout


@pytest.mark.parametrize("recorded", ["missing", "other"])
def test_a_record_of_other_weights_is_ignored(trained, other, tmp_path, caplog, recorded):
    """A training record without weights_sha256, or with another's (a later run wrote other weights into the
    folder), is logged and left out: the card states no data, length, steps nor held-out loss of another run."""
    model_dir, _, _, _ = trained
    record = json.loads((model_dir / push.TRAINING_RECORD).read_text())
    record |= {"data": "wikitext:wikitext-2-raw-v1", "checkpoint": "openai-community/gpt2", "tokenizer": "gpt2"}
    if recorded == "missing":
        del record["weights_sha256"]
    else:
        record["weights_sha256"] = push.weights_digest(other)
    source = bare_copy(model_dir, tmp_path / "model")
    (source / push.TRAINING_RECORD).write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="hf_posenc.workflow.push"):
        out = push.build_hub_folder(source, tmp_path / "hub", "me/x")
    expected = "records no weights_sha256" if recorded == "missing" else "is the record of other weights"
    assert expected in caplog.text and push.TRAINING_RECORD in caplog.text
    card = ModelCard.load(out / "README.md")
    for line in ("- data: not recorded", "- training length: not recorded tokens", "- steps: not recorded"):
        assert line in card.text
    assert (
        "held-out loss" not in card.text and "sequence packing" not in card.text and "Converted from" not in card.text
    )
    assert "tokenizer: none saved; token ids are UTF-8 byte values" in card.text
    assert card.data.base_model is None and card.data.datasets is None and card.data.license == "apache-2.0"


def test_a_record_of_these_weights_is_used(trained, tmp_path, caplog):
    """The record whose weights_sha256 is the folder's weights is the card's training facts, with no warning."""
    model_dir, _, _, _ = trained
    with caplog.at_level("WARNING", logger="hf_posenc.workflow.push"):
        out = push.build_hub_folder(model_dir, tmp_path / "hub", "me/x")
    assert push.TRAINING_RECORD not in caplog.text
    card = (out / "README.md").read_text()
    assert "- steps: 100" in card and "- training length: 64 tokens" in card
    assert "- held-out loss after training: 1.5000" in card


def test_rebuild_leaves_nothing_of_an_earlier_build(trained, tmp_path):
    """Rebuilding into the folder of an earlier build replaces all of it: the tokenizer of a model that had one is
    not uploaded with a model that has none, nor any other file or folder left there."""
    model_dir, _, _, _ = trained
    out = tmp_path / "hub"
    push.build_hub_folder(model_dir, out, "me/x")
    assert push.is_hub_build(out) and (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    (out / "notes.txt").write_text("left here")
    (out / "sub").mkdir()
    (out / "sub" / "f.bin").write_bytes(b"x")
    bare = bare_copy(model_dir, tmp_path / "bare")
    push.build_hub_folder(bare, out, "me/x")
    names = {p.name for p in out.iterdir()}
    assert not {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "notes.txt", "sub"} & names
    assert {"model.safetensors", "config.json", "README.md"} <= names
    assert "tokenizer: none saved" in (out / "README.md").read_text() and not leftovers(tmp_path)


def test_a_foreign_folder_is_refused_and_left_untouched(trained, tmp_path, capsys):
    """A non-empty folder that is not an earlier build (any files; a model folder, whose config has posenc but which
    has no hf_posenc card; the model itself) is refused, naming it, and left as it was; an empty one is used."""
    model_dir, _, _, _ = trained
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    (foreign / "README.md").write_text("---\ntags: [other]\n---\n# mine\n")
    shutil.copyfile(model_dir / "config.json", foreign / "config.json")
    before = folder_state(foreign)
    refused = f"{re.escape(str(foreign))} is not empty and is not an earlier `hf-posenc push` build"
    with pytest.raises(ValueError, match=refused + ".*choose an empty or new `--folder`"):
        push.build_hub_folder(model_dir, foreign, "me/x")
    assert folder_state(foreign) == before and not push.is_hub_build(foreign) and not leftovers(tmp_path)
    argv = ["push", str(model_dir), "--repo-id", "me/x", "--folder", str(foreign), "--dry-run"]
    assert main(argv) != 0 and "choose an empty or new `--folder`" in capsys.readouterr().err
    assert folder_state(foreign) == before
    with pytest.raises(ValueError, match="holds the model"):
        push.build_hub_folder(model_dir, model_dir, "me/x")
    with pytest.raises(ValueError, match="holds the model"):
        push.build_hub_folder(model_dir, model_dir.parent, "me/x")
    (tmp_path / "empty").mkdir()
    assert push.is_hub_build(push.build_hub_folder(model_dir, tmp_path / "empty", "me/x"))


def test_recorded_paths_are_never_hub_names(trained, tmp_path):
    """The record's absolute local data and checkpoint (even gone) are not base_model nor datasets; relative paths
    that are gone are local when shaped like paths; "name" and "owner/name" are Hub names."""
    model_dir, _, _, _ = trained
    gone = tmp_path / "gone"
    record = {"data": str(gone / "corpus"), "seq_length": 64, "steps": 5, "checkpoint": str(gone / "ckpt")}
    source = bare_copy(model_dir, tmp_path / "model", record)
    card = ModelCard.load(push.build_hub_folder(source, tmp_path / "hub", "me/x") / "README.md")
    assert card.data.base_model is None and card.data.datasets is None
    assert "data: local text `corpus`" in card.text and "Converted from a local checkpoint" in card.text
    assert str(gone) not in card.text
    for local in ("./ckpt", "../ckpt", "~/ckpt", "/abs/ckpt", "runs/train/final", ".ckpt", "runs\\final", "C:/x/y"):
        assert push._hub_id(local) is None and push._hub_dataset(local) is None, local
    assert push._hub_id("openai-community/gpt2") == "openai-community/gpt2" and push._hub_id("gpt2") == "gpt2"
    assert push._hub_dataset("wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1")
    assert push._hub_dataset("user/data") == ("user/data", None)


class FakeApi:
    """huggingface_hub.HfApi at the boundary: records calls, optionally fails the upload."""

    calls: list = []
    fail = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, **kwargs):
        FakeApi.calls.append(("upload_folder", folder_path, repo_id))
        if FakeApi.fail:
            raise ConnectionError("Hub unreachable")
        return "https://huggingface.co/me/gpt2-yarn/commit/abc"


@pytest.mark.parametrize("fail", [False, True], ids=["uploads", "upload_fails"])
def test_upload_at_the_hub_boundary(trained, tmp_path, monkeypatch, capsys, fail):
    """push creates the repo and uploads the folder; a failed upload says so, names the folder and leaves it intact."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls, FakeApi.fail = [], fail
    model_dir, _, _, _ = trained
    out = tmp_path / "hub"
    code = main(["push", str(model_dir), "--repo-id", "me/gpt2-yarn", "--folder", str(out), "--private"])
    assert FakeApi.calls[0] == (
        "create_repo",
        "me/gpt2-yarn",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert FakeApi.calls[1] == ("upload_folder", str(out), "me/gpt2-yarn")
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    captured = capsys.readouterr()
    if fail:
        assert code == 1 and "failed (ConnectionError: Hub unreachable)" in captured.err and str(out) in captured.err
    else:
        assert code == 0 and "uploaded to https://huggingface.co/me/gpt2-yarn" in captured.out


def test_failed_upload_suggests_the_hf_cli(tmp_path, monkeypatch):
    """The retry hint is the current CLI's `hf upload REPO FOLDER` (huggingface-cli is no longer installed)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls, FakeApi.fail = [], True
    folder = tmp_path / "hub folder"
    with pytest.raises(RuntimeError) as error:
        push.upload(folder, "me/x", private=True)
    assert f"retry with `hf upload me/x '{folder}' --private`" in str(error.value)
    assert "huggingface-cli" not in str(error.value)


def test_push_refuses_a_stock_model(tmp_path):
    """A folder that is not a posenc model is refused with its model_type named."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2)).save_pretrained(
        tmp_path / "m"
    )
    with pytest.raises(ValueError, match="not a posenc model .*'gpt2'"):
        push.build_hub_folder(tmp_path / "m", tmp_path / "hub", "me/x")


def test_the_card_never_shows_a_local_tokenizer_path():
    """A recorded tokenizer that is a local path (the checkpoint's own, trained elsewhere) is not printed."""
    assert "/home/alice" not in push._tokenizer_markdown(True, "/home/alice/private/llama-ckpt")
    assert "/home/alice" not in push._tokenizer_markdown(False, "/home/alice/private/llama-ckpt")
    assert "`bytes`" in push._tokenizer_markdown(True, "bytes")
    assert "`gpt2`" in push._tokenizer_markdown(True, "gpt2")


def test_a_failed_replacement_leaves_the_earlier_build(tmp_path, monkeypatch):
    """Moving the new build in fails half-way: the earlier build's files are all back, nothing new is left."""
    folder, built = tmp_path / "hub", tmp_path / "built"
    folder.mkdir()
    built.mkdir()
    for name in ("README.md", "config.json", "tokenizer.json"):
        (folder / name).write_text(f"old {name}")
    for name in ("README.md", "config.json", "model.safetensors"):
        (built / name).write_text(f"new {name}")
    real_move, moved = push.shutil.move, []

    def failing_move(source, target):
        if "built" in source and moved:
            raise OSError("disk full")
        if "built" in source:
            moved.append(source)
        return real_move(source, target)

    monkeypatch.setattr(push.shutil, "move", failing_move)
    with pytest.raises(OSError, match="disk full"):
        push._replace_contents(folder, built)
    assert {p.name: p.read_text() for p in folder.iterdir()} == {
        name: f"old {name}" for name in ("README.md", "config.json", "tokenizer.json")
    }


def test_an_evaluation_inside_the_folder_or_hidden_files_are_refused(trained, tmp_path):
    """The rebuild would remove them: an --eval JSON kept in the folder, a clone's .git."""
    model_dir, evaluation, *_ = trained
    out = tmp_path / "hub"
    push.build_hub_folder(model_dir, out, "me/x")
    inside = out / "eval.json"
    inside.write_text(evaluation.read_text())
    with pytest.raises(ValueError, match="lies inside"):
        push.build_hub_folder(model_dir, out, "me/x", evaluations=[inside])
    inside.unlink()
    (out / ".git").mkdir()
    with pytest.raises(ValueError, match=r"holds \.git, which a build did not write"):
        push.build_hub_folder(model_dir, out, "me/x")
