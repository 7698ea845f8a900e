"""`hf-posenc train` and `hf-posenc eval` as a user runs them: HfArgumentParser fields from YAML and the command line,
real tokenizers saved with the model, held-out evaluation, passkey retrieval, packing, resuming, and errors that name
the field before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build

from hf_posenc.cli import main
from hf_posenc.workflow import data
from hf_posenc.workflow.train import parse_train_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["steps=6", "layers=1", "hidden_size=32", "heads=2", "seq_length=32", "batch_size=4", "logging_steps=2"]
TEXT = "position is how a transformer knows word order.\nthe cat chased the dog; the dog chased the cat.\n" * 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`hf-posenc train` on a local text file with Trainer options from the command line (evaluation every 3 steps,
    gradient accumulation): the output folder and what the command printed."""
    folder = tmp_path_factory.mktemp("train")
    (folder / "text.txt").write_text(TEXT)
    command = ["train", "--config", str(CONFIGS / "train_gpt2_alibi.yaml"), *TINY, f"data={folder / 'text.txt'}"]
    command += ["--eval_strategy", "steps", "--eval_steps", "3", "--gradient_accumulation_steps", "2"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*command, f"output_dir={folder / 'run'}"]) == 0
    return folder, out.getvalue()


@pytest.mark.smoke
def test_train_saves_a_model_with_its_tokenizer(trained):
    """The final folder holds the model, the byte-level tokenizer it trained with (so `pipeline` takes the folder
    alone), and the record eval and push read; Trainer options from the command line took effect."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder, printed = trained
    final = folder / "run" / "final"
    assert "trained on 1 process(es)" in printed and "held-out loss" in printed
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.posenc["type"] == "alibi" and model.config.eos_token_id == 256
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer("abc")["input_ids"] == [97, 98, 99] and tokenizer.eos_token_id == 256
    generated = pipeline("text-generation", model=str(final))("the cat", max_new_tokens=5, do_sample=False)
    assert generated[0]["generated_text"].startswith("the cat")
    from hf_posenc.workflow.push import weights_digest

    record = json.loads((final / "hf_posenc_training.json").read_text())
    assert record["data"] == str((folder / "text.txt").resolve()) and record["tokenizer"] == "bytes"
    assert record["packing"] is False and record["steps"] == 6 and math.isfinite(record["eval_loss"])
    assert record["weights_sha256"] == weights_digest(final) and len(record["held_out_sha256"]) == 64
    args = torch.load(final / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 2 and args.eval_steps == 3 and args.max_steps == 6


def test_eval_scores_the_held_out_part_by_default(trained, capsys):
    """`hf-posenc eval` with no --data scores the held-out end of the text the model trained on (what train
    recorded), never the part it trained on; the JSON names the model, its weights and the data."""
    from hf_posenc.workflow.push import weights_digest

    folder, _ = trained
    final, out = folder / "run" / "final", folder / "eval.json"
    assert main(["eval", str(final), "--lengths", "16,32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"held-out part of {folder / 'text.txt'}" in printed and "non-overlapping windows" in printed
    results = json.loads(out.read_text())
    assert results["task"] == "perplexity" and results["split"] == "test" and results["stride"] is None
    assert results["weights_sha256"] == weights_digest(final)
    held_out = data.token_stream(str(folder / "text.txt"), "test", data.byte_tokenizer())
    assert results["lengths"]["32"]["tokens"] == (len(held_out) // 32) * 31  # every window of the held-out text
    train, test = (data.read_text(str(folder / "text.txt"), split) for split in ("train", "test"))
    assert train + test == TEXT and len(test) < 0.06 * len(TEXT)  # the end, which training never read


def test_eval_refuses_data_whose_held_out_part_moved(trained, tmp_path, capsys):
    """Training records the held-out text's digest: if the data changed since (the cut moved, so trained-on text
    would be scored), `eval` refuses, naming the data; --data on other text is taken."""
    import shutil

    folder, _ = trained
    copy = tmp_path / "final"
    shutil.copytree(folder / "run" / "final", copy)
    record = json.loads((copy / "hf_posenc_training.json").read_text())
    (tmp_path / "text.txt").write_text("a new first line\n" * 40 + TEXT)
    record["data"] = str(tmp_path / "text.txt")
    (copy / "hf_posenc_training.json").write_text(json.dumps(record))
    assert main(["eval", str(copy), "--lengths", "16"]) == 2
    assert "is not the text training held out" in capsys.readouterr().err
    assert main(["eval", str(copy), "--lengths", "16", "--data", str(folder / "text.txt")]) == 0  # given: taken


def test_eval_refuses_a_tokenizer_the_model_cannot_embed(tmp_path, capsys):
    """A folder without tokenizer files whose vocabulary is not the byte tokenizer's: the bytes fallback is refused
    (it would index past the embedding and be reported as something else); naming a tokenizer is the way."""
    build("llama", "alibi", config_overrides={"vocab_size": 96}).save_pretrained(tmp_path)
    assert main(["eval", str(tmp_path), "--lengths", "16"]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files and the byte-level tokenizer has 257 ids but the model embeds 96" in err
    assert main(["eval", str(tmp_path), "--lengths", "16", "--tokenizer", str(tmp_path / "none")]) == 2
    assert "tokenizer: cannot load" in capsys.readouterr().err


def test_eval_passkey(trained, capsys):
    """`hf-posenc eval --task passkey`: accuracy by length and depth from held-out filler, a table, JSON and plot;
    a length that cannot hold the prompt is reported for that length."""
    folder, _ = trained
    out = folder / "passkey.json"
    command = ["eval", str(folder / "run" / "final"), "--task", "passkey", "--lengths", "64,160", "--samples", "2"]
    assert main([*command, "--depths", "0,1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["task"] == "passkey" and "error" in results["lengths"]["64"]
    assert 0 <= results["lengths"]["160"]["accuracy"] <= 1 and set(results["lengths"]["160"]["by_depth"]) == {
        "0.0",
        "1.0",
    }
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| 160 |" in capsys.readouterr().out


@pytest.mark.smoke
def test_help_lists_every_field_with_its_default(capsys):
    """`hf-posenc train --help` is HfArgumentParser's: the plugin's fields and every TrainingArguments field, with
    the defaults `train` uses."""
    assert main(["train", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    for flag in ("--posenc", "--packing", "--held_out_fraction", "--gradient_accumulation_steps", "--bf16"):
        assert flag in printed
    assert "--gradient_checkpointing" in printed and "--resume_from_checkpoint" in printed
    assert "(default: 200)" in printed  # max_steps, the plugin's default


@pytest.mark.smoke
def test_yaml_then_command_line(tmp_path):
    """Every TrainingArguments field works from the YAML file and the command line; the command line wins, in
    either spelling; `steps` and `batch_size` are the short names compare uses too; a mapping posenc parses."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "posenc: {type: rope, rope_type: yarn, factor: 4.0}\nmax_steps: 10\ngradient_checkpointing: true\n"
    )
    posenc, data_args, training = parse_train_arguments(
        ["--config", str(config), "steps=7", "--learning_rate", "3e-4", "packing=true", "report_to=none"]
    )
    assert posenc.posenc == {"type": "rope", "rope_type": "yarn", "factor": 4}
    assert training.max_steps == 7 and training.learning_rate == 3e-4 and training.gradient_checkpointing
    assert data_args.packing and training.report_to == []
    posenc, _, _ = parse_train_arguments(["--posenc", "{type: alibi, max_bias: 4}"])
    assert posenc.posenc == {"type": "alibi", "max_bias": 4}
    # a value holding "=" stays a value; an alias works in the --name=value form too
    _, _, training = parse_train_arguments(["--run_name", "lr=3e-4", "--steps=9", "output_dir=runs/a=b"])
    assert training.run_name == "lr=3e-4" and training.max_steps == 9 and training.output_dir == "runs/a=b"
    # lists, negative numbers, small floats in a posenc mapping, a bool flag given alone before name=value
    config.write_text(
        "report_to: [tensorboard]\noptim_target_modules: [attn, mlp]\nrun_name: -x\n"
        "posenc: {type: alibi, max_bias: 1.0e-5}\n"
    )
    posenc, data_args, training = parse_train_arguments(
        ["--config", str(config), "--packing", "max_steps=5", "learning_rate=-1e-3"]
    )
    assert training.report_to == ["tensorboard"] and training.optim_target_modules == ["attn", "mlp"]
    assert training.run_name == "-x" and posenc.posenc == {"type": "alibi", "max_bias": 1e-5}
    assert data_args.packing and training.max_steps == 5 and training.learning_rate == -1e-3
    posenc, _, _ = parse_train_arguments(["--posenc", '{"type": "alibi", "max_bias": 1e-5}'])  # JSON floats
    assert posenc.posenc == {"type": "alibi", "max_bias": 1e-5}
    # values from a file are checked as the command line's are
    config.write_text("max_steps: 1.5\n")
    with pytest.raises(ValueError, match="invalid int value: '1.5'"):
        parse_train_arguments(["--config", str(config)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stepz=3"], r"unknown field\(s\) \['stepz'\]"),
        (["--stepz", "3"], r"unknown field\(s\) \['stepz'\]"),
        (["--config", "missing.yaml"], r"--config: no such file missing.yaml"),
        (["posenc=alibbi"], r"posenc: unknown posenc scheme 'alibbi'; allowed: alibi, fire"),
        (["arch=bert"], r"arch must be a verified decoder"),
        (["data=missing/text.txt"], r"data: 'missing/text.txt' is neither a file nor a folder"),
        (["checkpoint=/no/such/model"], r"checkpoint: cannot load the config of /no/such/model"),
        (["seq_length=0"], r"seq_length must be >= 1"),
        (["steps=abc"], r"argument --max_steps/--max-steps: invalid int value: 'abc'"),
        (["layers=[1]"], r"argument --layers: invalid int value: '\[1\]'"),
        (["threads=0"], r"threads must be >= 1"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, message, monkeypatch, capsys):
    """Each bad field fails in validation, naming it, before any text is read or model built; exit status 2."""

    def no_data(*args, **kwargs):
        raise AssertionError("read data before validating")

    monkeypatch.setattr(data, "documents", no_data)
    with pytest.raises(ValueError, match=message):
        parse_train_arguments(argv)
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-posenc train:") and "usage:" not in err  # the message, not argparse's usage block


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "runs/missing/final"], "model: no saved model folder at runs/missing/final"),
        (["eval", ".", "--lengths", "a,b"], "--lengths must be comma-separated ints"),
        (["eval", "MODEL", "--data", "missing.txt"], "data: 'missing.txt' is neither a file nor a folder"),
        (["eval", "MODEL", "--task", "passkey", "--depths", "0,2"], "depths must be numbers in [0, 1]"),
        (["eval", "MODEL", "--task", "passkey", "--samples", "0"], "samples must be an int >= 1, got 0"),
        (["compare", "steps=abc"], "steps must be an integer, got 'abc'"),
        (["compare", "--config", "missing.yaml"], "--config: no such file missing.yaml"),
    ],
)
def test_other_commands_name_what_is_wrong(argv, message, tmp_path, capsys):
    if "MODEL" in argv:
        build("llama", "alibi", config_overrides={"vocab_size": 257}).save_pretrained(tmp_path)
        argv = [str(tmp_path) if a == "MODEL" else a for a in argv]
    if argv[1] == ".":
        (tmp_path / "config.json").write_text("{}")
        argv[1] = str(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _tiny_bpe(folder: Path):
    """A small BPE tokenizer trained here (no download), saved in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")
    wrapped.save_pretrained(folder)
    return wrapped


def test_converted_checkpoint_trains_with_its_own_tokenizer(tmp_path, capsys):
    """A converted checkpoint trains with its own tokenizer (tokenizer: auto) and saves it; asking for bytes instead
    says so at WARNING; the conversion report shows on the command line beside transformers' load report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_posenc.archs import small_config

    bpe = _tiny_bpe(tmp_path / "stock")
    stock = small_config("gpt2", vocab_size=len(bpe), positions=64)
    AutoModelForCausalLM.from_config(stock).save_pretrained(tmp_path / "stock")
    (tmp_path / "text.txt").write_text(TEXT)
    run = ["train", "--config", str(CONFIGS / "train_convert_to_yarn.yaml"), *TINY, "posenc=rope"]
    run += [f"checkpoint={tmp_path / 'stock'}", f"data={tmp_path / 'text.txt'}", f"output_dir={tmp_path / 'run'}"]
    assert main(run) == 0
    captured = capsys.readouterr()
    assert "converted" in captured.err and "dropped transformer.wpe.weight" in captured.err  # GPT-2's table
    assert "load report are these tensors" in captured.err
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert saved.get_vocab() == bpe.get_vocab()
    assert main([*run[:-1], f"output_dir={tmp_path / 'bytes'}", "tokenizer=bytes"]) == 2  # 257 ids > the model's
    err = capsys.readouterr().err
    assert "has its own tokenizer, and training feeds it byte ids" in err and "the model embeds" in err
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "stock" / name).unlink(missing_ok=True)
    assert main([*run[:-1], f"output_dir={tmp_path / 'none'}"]) == 2  # no tokenizer to take: say which to name
    assert "has no tokenizer files; name the one it was trained with" in capsys.readouterr().err


def test_resume_from_checkpoint(tmp_path):
    """Trainer's resume works through the command line: a run saved at step 4 continues to step 6."""
    (tmp_path / "text.txt").write_text(TEXT)
    base = ["train", *TINY, f"data={tmp_path / 'text.txt'}", f"output_dir={tmp_path}", "--save_strategy", "steps"]
    assert main([*base[:1], *[a for a in base[1:] if a != "steps=6"], "steps=4", "--save_steps", "4"]) == 0
    assert (tmp_path / "checkpoint-4").is_dir()
    assert main([*base, "--save_steps", "2", "--resume_from_checkpoint", "true"]) == 0
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and not (tmp_path / "checkpoint-2").exists()  # resumed: steps 1-4 not rerun


def test_packed_training_runs_and_keeps_generating(tmp_path, capsys):
    """`train --packing true` trains on document blocks through DataCollatorWithFlattening; the saved model
    generates with its cache again."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "a.txt").write_text(TEXT[:700])
    (tmp_path / "b.txt").write_text(TEXT[:300])
    assert main(["train", *TINY, f"data={tmp_path}", "--packing", "true", f"output_dir={tmp_path / 'run'}"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert model.config.use_cache is True
    assert json.loads((tmp_path / "run" / "final" / "hf_posenc_training.json").read_text())["packing"] is True


def test_document_blocks_never_cross_a_document():
    from datasets import Dataset

    tokenized = Dataset.from_dict({"input_ids": [list(range(10)), list(range(100, 103)), [7]]})
    assert data.document_blocks(tokenized, 4)["input_ids"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [100, 101, 102]]
    assert data.group_into_blocks(tokenized, 4)["input_ids"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 100, 101]]
