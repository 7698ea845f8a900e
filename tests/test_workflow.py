"""The workflow pieces: data, perplexity against length, run configs, and `hf-posenc compare` end to end (tiny)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE, build

from hf_posenc.cli import main
from hf_posenc.workflow.compare import CompareConfig, run_compare, write_outputs
from hf_posenc.workflow.config import load_config, parse_overrides
from hf_posenc.workflow.data import (
    byte_tokenizer,
    documents,
    read_text,
    stdlib_files,
    token_stream,
    train_and_test,
)
from hf_posenc.workflow.evaluation import perplexity
from hf_posenc.workflow.train import parse_train_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(steps=3, train_length=16, eval_multiples=[1, 2, 4], eval_tokens=256, layers=1, hidden_size=32, heads=2)


@pytest.mark.smoke
def test_byte_tokenizer_is_a_real_tokenizer(tmp_path):
    """The byte-level tokenizer: id = UTF-8 byte, 256 = end of text; it saves and loads with AutoTokenizer (on every
    supported transformers release: the smoke subset) and round-trips any text."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    tokenizer = byte_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerBase) and len(tokenizer) == 257
    text = "héllo\x00 wörld\n\tcode()"
    assert tokenizer(text)["input_ids"] == list(text.encode("utf-8"))
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == 256
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == list(text.encode("utf-8")) and loaded.decode(loaded(text)["input_ids"]) == text


def test_data_is_read_locally_and_split_for_evaluation(tmp_path):
    """Local files and folders are read through datasets without the network, a document per file; the test split
    is the end of the text, disjoint from the train split, which together make all of it."""
    (tmp_path / "a.txt").write_text("one\n" * 50)
    (tmp_path / "b.txt").write_text("two\n" * 50)
    assert list(documents(str(tmp_path), "all")["text"]) == ["one\n" * 50, "two\n" * 50]
    train, test = (list(documents(str(tmp_path), split, 0.1)["text"]) for split in ("train", "test"))
    assert train == ["one\n" * 50, "two\n" * 41] and test == ["two\n" * 9]  # cut at the line break after 90%
    assert [list(d["text"]) for d in train_and_test(str(tmp_path), 0.1)] == [train, test]  # one read, both parts
    assert read_text(str(tmp_path / "a.txt"), "test", 0.5) == "one\n" * 24  # the break after character 100
    assert sum(path.stat().st_size for path in stdlib_files(limit=10_000)) >= 10_000
    tokens = token_stream(str(tmp_path), "test", byte_tokenizer(), 0.1)
    assert tokens.tolist() == list(b"two\n" * 9) + [256]  # each document ends in end-of-text
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        documents(str(tmp_path / "missing.txt"))
    (tmp_path / "line.txt").write_text("no line break " * 10)
    assert read_text(str(tmp_path / "line.txt"), "test", 0.1) == ("no line break " * 10)[-14:]
    assert read_text(str(tmp_path / "a.txt"), "test", 0.001) == "\n"  # the point falls in the last line: cut there
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(ValueError, match="too short to hold out"):
        documents(str(tmp_path / "tiny.txt"), "train", 0.6)  # nothing left to train on


def test_stdlib_held_out_part_is_never_trained_on():
    """The default data's test split (what `eval` scores) shares no document text with its train split."""
    train, test = (list(documents(None, split)["text"]) for split in ("train", "test"))
    assert test and not set(test) & set(train)
    assert "".join(train) + "".join(test) == "".join(documents(None, "all")["text"])


def manual_perplexity(model, tokens, length):
    """Textbook perplexity over non-overlapping windows, one window at a time."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - length + 1, length):
        window = tokens[start : start + length][None]
        with torch.no_grad():
            logits = model(window).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(nll / count)


def test_perplexity_matches_a_textbook_loop():
    """Batched non-overlapping perplexity equals a window-by-window computation; a stride of the full length too."""
    model = build("gpt2", "alibi")
    tokens = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, 20, batch_size=3)
    assert result["tokens"] == 10 * 19
    assert math.isclose(result["ppl"], manual_perplexity(model, tokens, 20), rel_tol=1e-5)
    assert math.isclose(perplexity(model, tokens, 20, stride=20)["ppl"], result["ppl"], rel_tol=1e-6)


def test_sliding_window_scores_each_token_once():
    """With a stride, the first window scores all its tokens and each later one only its last `stride` tokens."""
    model = build("llama", "rope")
    tokens = torch.randint(0, 96, (100,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, tokens, 40, stride=10)
    assert result["tokens"] == 39 + 6 * 10  # windows start at 0, 10, ..., 60
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(model, tokens, 40, stride=41)


def test_config_files_all_validate():
    """Every YAML file in configs/ loads into its run config and passes validation."""
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for path in files:
        if path.name.startswith("compare"):
            load_config(CompareConfig, path)
        elif path.name.startswith("train"):
            parse_train_arguments(["--config", str(path)])
        elif path.name.startswith("accelerate"):
            continue  # accelerate's own configs (tests/test_fsdp.py)
        else:
            raise AssertionError(f"{path.name}: no run config class for this file name")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stepz": 3}, r"unknown key\(s\) \['stepz'\]; allowed: arch, schemes"),
        ({"steps": "many"}, r"steps must be an integer, got 'many'"),
        ({"recalibrate": "all"}, r"recalibrate must be a list of \(a mapping\) or null, got 'all'"),
        ({"arch": "bert"}, r"arch must be a verified decoder, one of .*gpt2.*llama"),
        ({"schemes": ["alibi", "foo"]}, r"unknown scheme 'foo'"),
        ({"eval_multiples": [4, 1]}, r"eval_multiples must be increasing"),
        ({"eval_tokens": 100}, r"eval_tokens \(100\) must hold one window"),
    ],
)
def test_bad_run_config(values, message):
    """A run config with an unknown key or a bad value fails naming the key."""
    with pytest.raises(ValueError, match=message):
        load_config(CompareConfig, overrides=values)


def test_overrides_are_yaml():
    assert parse_overrides(["steps=5", "schemes=[rope, alibi]", "data=stdlib"]) == {
        "steps": 5,
        "schemes": ["rope", "alibi"],
        "data": "stdlib",
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides(["steps"])


def test_compare_end_to_end(tmp_path):
    """A tiny comparison writes the table, the plot and the JSON; learned says 'past table' instead of failing;
    RoPE and ALiBi get their evaluation-time scalings."""
    overrides = {"schemes": ["learned", "rope", "alibi"], "out": str(tmp_path), "eval_multiples": [1, 2, 8]}
    config = load_config(CompareConfig, overrides=TINY | overrides)
    results = run_compare(config)
    paths = write_outputs(results, config.out)
    table = paths["table"].read_text()
    assert "past table" in table and "YaRN" in table and "slopes x L/N" in table
    # passkey retrieval beside perplexity: 16 and 32 cannot hold the prompt, 128 is scored for every scheme
    assert "| scheme | passkey@16 | passkey@32 | passkey@128 |" in table
    assert re.search(r"\| rope \| n/a \| n/a \| [01]\.\d\d \([01]\.\d\d\) \|", table)  # whole keys (key tokens)
    assert paths["passkey_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    learned = next(s for s in saved["schemes"] if s["name"] == "learned")
    assert learned["eval"]["as trained"]["32"] is None and learned["eval"]["as trained"]["16"] > 1
    rope = next(s for s in saved["schemes"] if s["name"] == "rope")
    assert set(rope["eval"]) == {"as trained", "PI (linear)", "NTK", "dynamic NTK", "YaRN"}
    assert rope["eval"]["YaRN"]["16"] == rope["eval"]["as trained"]["16"]  # factor 1 at the training length
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["environment"]["hf_posenc"]


def test_recalibration_arms(tmp_path):
    """A trained RoPE model converted to NoPE, to a one-entry pattern and to KERPLE: scored as converted (a pattern
    of RoPE alone is the trained model: the same scores) and after fine-tuning (which moves them); each arm's rows
    are named with their steps."""
    arms = [
        {"from": "rope", "to": "nope", "steps": 4},
        {"from": "rope", "to": {"type": "layers", "pattern": ["rope"]}, "steps": 0},
        {"from": "rope", "to": "kerple", "steps": 3},
    ]
    config = load_config(
        CompareConfig, overrides=TINY | {"schemes": ["rope"], "recalibrate": arms, "out": str(tmp_path)}
    )
    results = run_compare(config)
    rows = {row["name"]: row for row in results["schemes"]}
    assert list(rows) == [
        "rope",
        "rope -> nope (0 steps)",
        "rope -> nope (4 steps)",
        "rope -> layers [rope] (0 steps)",
        "rope -> kerple (0 steps)",
        "rope -> kerple (3 steps)",
    ]
    rope = rows["rope"]["eval"]["as trained"]
    assert rows["rope -> layers [rope] (0 steps)"]["eval"]["as trained"] == rope  # converted, nothing changed
    converted, tuned = rows["rope -> nope (0 steps)"]["eval"]["as trained"], rows["rope -> nope (4 steps)"]
    assert converted != rope and tuned["eval"]["as trained"] != converted and tuned["tokens_per_s"] > 0
    # an arm names its source by type where one trained scheme has it
    typed = TINY | {"schemes": [{"type": "rope", "rope_theta": 500.0}], "recalibrate": [arms[0]]}
    assert load_config(CompareConfig, overrides=typed).source_index("rope") == 0
    # the default arms follow the schemes: none without rope, a pattern no longer than the model
    assert load_config(CompareConfig, overrides=TINY | {"schemes": ["alibi"]}).recalibration_arms == []
    layered = [a for a in CompareConfig(layers=2).recalibration_arms if isinstance(a["to"], dict)]
    assert {"type": "layers", "pattern": ["rope", "nope"]} in [a["to"] for a in layered]


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ({"from": "alibi", "to": "nope", "steps": 1}, r"recalibrate\[0\]: 'from' must be one of the trained"),
        ({"from": "rope", "to": "nope"}, r"recalibrate\[0\] must be a dict with exactly the keys"),
        ({"from": "rope", "to": "nope", "steps": -1}, "steps must be an int >= 0"),
        ({"from": "rope", "to": "nopee", "steps": 1}, r"recalibrate\[0\]: unknown scheme 'nopee' in 'to'"),
        (
            {"from": "rope", "to": {"type": "layers", "pattern": ["rope"] * 9}, "steps": 1},
            r"recalibrate\[0\].to:.*9 entries",
        ),
    ],
)
def test_bad_recalibration(arm, message):
    """A bad arm fails before any training, naming it."""
    with pytest.raises(ValueError, match=message):
        load_config(CompareConfig, overrides=TINY | {"schemes": ["rope"], "recalibrate": [arm]})


def test_bias_parameters_learn_at_their_own_rate():
    """compare's optimizer gives the score biases' own parameters (position_bias) the multiplied learning rate."""
    from hf_posenc.workflow import compare

    config = load_config(CompareConfig, overrides=TINY | {"schemes": ["t5_bias"], "steps": 1})
    model = build("llama", "t5_bias")
    seen = {}
    original = torch.optim.AdamW.__init__

    def spy(self, groups, **kwargs):
        seen["groups"] = [(len(g["params"]), g.get("lr", kwargs["lr"])) for g in groups]
        original(self, groups, **kwargs)

    tokens = torch.randint(0, 96, (500,))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "__init__", spy)
        compare.train(model, tokens, config, torch.device("cpu"), "t5")
    rest, bias = seen["groups"]
    assert bias == (1, config.learning_rate * config.bias_learning_rate_multiplier) and rest[1] == config.learning_rate


def test_compare_cli(tmp_path, capsys):
    """`hf-posenc compare` takes flags and key=value overrides and prints the table; a bad key exits 2."""
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    code = main(["compare", "--schemes", "nope,t5_bias", "--arch", "llama", "--out", str(tmp_path), *overrides])
    assert code == 0
    assert "| t5_bias |" in capsys.readouterr().out and (tmp_path / "results.md").exists()
    assert main(["compare", "stepz=3"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_eval_cli_on_saved_posenc_and_stock_models(tmp_path, capsys):
    """`hf-posenc eval` scores a saved posenc model and a stock one; a learned table that ends is reported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = tmp_path / "text.txt"
    text.write_text("the cat chased the dog. " * 200)
    build("llama", "alibi", config_overrides={"vocab_size": 257}).save_pretrained(tmp_path / "alibi")
    stock_config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=257, n_positions=64)
    AutoModelForCausalLM.from_config(stock_config).save_pretrained(tmp_path / "stock")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "alibi"), "--lengths", "32,128", "--data", str(text), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["posenc"]["type"] == "alibi" and saved["lengths"]["128"]["tokens"] > 0
    assert main(["eval", str(tmp_path / "stock"), "--lengths", "32,128", "--data", str(text), "--stride", "16"]) == 0
    printed = capsys.readouterr().out
    assert "| 32 |" in printed and "past the model's position table (64 positions)" in printed


TRAIN_TINY = ["steps=6", "layers=1", "hidden_size=32", "heads=2", "seq_length=32", "batch_size=4", "logging_steps=2"]


@pytest.mark.parametrize(
    ("launch", "processes"),
    [(["--multi_gpu", "--num_processes", "2"], 2), (["--cpu", "--num_processes", "2"], 1)],
    ids=["multi_cpu_gloo", "cpu_flag"],
)
def test_accelerate_launch_on_cpu(tmp_path, launch, processes):
    """Under `accelerate launch` on a CPU-only machine, `--multi_gpu --num_processes 2` trains data-parallel on 2
    processes (gloo); accelerate 1.x runs `--cpu --num_processes 2` as a single process, which must work too."""
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU launch (gloo); a GPU machine would launch on its GPUs")
    command = [*ACCELERATE, "launch", *launch, "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", "-m", "hf_posenc.cli", "train", "--config"]
    command += [str(CONFIGS / "train_gpt2_alibi.yaml"), *TRAIN_TINY, f"output_dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trained on {processes} process(es)" in done.stdout
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_evaluate_metric_module_from_local_path(tmp_path, monkeypatch):
    """`evaluate.load(hf_posenc.PERPLEXITY_METRIC)` works offline and equals hf_posenc's own perplexity."""
    import evaluate

    import hf_posenc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build("llama", "alibi", config_overrides={"vocab_size": 256})
    model.save_pretrained(tmp_path / "model")
    texts = ["the cat chased the dog.", "the dog chased the cat."] * 40
    metric = evaluate.load(hf_posenc.PERPLEXITY_METRIC)
    result = metric.compute(predictions=texts, model_id=str(tmp_path / "model"), lengths=[32, 128])
    expected = perplexity(model, torch.tensor(byte_tokenizer()("\n".join(texts))["input_ids"]), 128)["ppl"]
    assert math.isclose(result["perplexities"][128], expected, rel_tol=1e-5)
    assert result["tokens"][32] > 0


def test_bench_cli(tmp_path, capsys, monkeypatch):
    """`hf-posenc bench` times every attention path against causal SDPA, the rotary step against transformers', and
    whole models against NoPE and stock, and writes the ratios as JSON."""
    from hf_posenc.workflow import bench

    monkeypatch.setitem(bench.MODEL_SHAPES, "gpt2", dict(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=64))
    monkeypatch.setitem(
        bench.MODEL_SHAPES,
        "llama",
        dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64),
    )
    out = tmp_path / "bench.json"
    command = ["bench", "--lengths", "128", "--heads", "2", "--head-dim", "8", "--repeats", "1"]  # one: compiles
    command += ["--model-repeats", "1", "--dtypes", "float32,bfloat16"]
    assert main([*command, "--model-length", "32", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith(f"# hf-posenc bench on {results['environment']['device']}")
    bf16 = {row["path"] for row in results["attention"] if row["dtype"] == "bfloat16"}
    assert "alibi: split columns (lead)" in bf16 and "alibi: column trick" not in bf16  # the fp32 trick's
    flex = {row["path"] for row in results["attention"] if "flex" in row["path"]}
    assert flex == {"alibi: flex (compiled)", "alibi: flex, table score_mod", "t5_bias: flex (compiled)"}
    rows = [row for row in results["attention"] if "flex" not in row["path"] and "decode" not in row["path"]]
    assert {row["path"] for row in rows} >= {bench.REFERENCE, "alibi: column trick", "alibi: chunked (padding mask)"}
    assert all(row["forward_x_sdpa"] == 1.0 for row in rows if row["path"] == bench.REFERENCE)
    assert all("forward_backward_x_sdpa" in row for row in rows)  # flex has no CPU backward; decode is inference
    decode = [row for row in results["attention"] if row["path"].startswith("decode step")]
    assert {row["path"] for row in decode} >= {"decode step: " + bench.REFERENCE, "decode step: alibi: no padding"}
    assert {row["path"] for row in rows if "forward_x_stock" in row} >= {bench.STOCK_ALIBI, "alibi: column trick"}
    assert {(row["length"], row["dtype"]) for row in results["rotary"]} == {
        (n, d) for n in (1, 128) for d in ("float32", "bfloat16", "float16")
    }
    passes = ("forward", "forward_backward")
    assert all(row[f"{p}_ours_x_transformers"] > 0 for row in results["rotary"] for p in passes)
    models = {(row["arch"], row["model"]): row for row in results["models"]}
    assert (
        models["gpt2", "posenc nope"]["speed_x_nope"] == 1.0
        and models["llama", "stock llama (rope)"]["speed_x_stock"] == 1.0
    )
    assert models["gpt2", "posenc alibi"]["attn_implementation"] == "posenc_auto"
    printed = capsys.readouterr().out
    assert "| 128 | float32 | alibi: column trick |" in printed and "### Whole models" in printed
    assert main(["bench", "--sections", "attention,speed"]) == 2
    assert (
        main(["bench", "--dtypes", "float64"]) == 2 and "allowed: float32, bfloat16, float16" in capsys.readouterr().err
    )
    assert main(["bench", "--out", str(tmp_path / "bench.md")]) == 2 and "must be a .json" in capsys.readouterr().err


def test_bench_interrupted_writes_what_it_measured(tmp_path, monkeypatch):
    """A bench stopped by SIGINT (a device run at its time limit) writes the lengths and sections it finished, marked
    as interrupted, and exits 130."""
    from hf_posenc.workflow import bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_rotary", interrupted)
    out = tmp_path / "bench.json"
    command = ["bench", "--sections", "attention,rotary", "--lengths", "32", "--heads", "2", "--head-dim", "8"]
    assert main([*command, "--repeats", "1", "--out", str(out)]) == 130
    results = json.loads(out.read_text())
    assert results["interrupted"] and {row["length"] for row in results["attention"]} == {32}
    assert "rotary" not in results and "(interrupted" in out.with_suffix(".md").read_text().splitlines()[0]


def test_bench_reports_a_path_out_of_gpu_memory(monkeypatch):
    """On a GPU a path that runs out of memory at a length is reported as such and left out of the timing; the other
    paths are still timed (probed with a stand-in for a CUDA tensor: CI has no GPU)."""
    from types import SimpleNamespace

    from hf_posenc.workflow import bench

    def too_big(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory")

    def backward_too_big(q, k, v):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory")
        return q

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    q = SimpleNamespace(device=torch.device("cuda"), detach=lambda: torch.zeros(1))
    paths = {"fits": (lambda q, k, v: q, True), "too big": (too_big, True), "bwd": (backward_too_big, True)}
    assert bench._out_of_memory(paths, q, q, q, backward=False) == {"too big": "forward"}
    assert bench._out_of_memory(paths, q, q, q, backward=True) == {"too big": "forward", "bwd": "forward+backward"}
    assert bench._out_of_memory(paths, torch.zeros(1), None, None, backward=False) == {}  # the CPU: not tried


def test_bench_models_gpu_step(monkeypatch):
    """The models table's GPU step (bf16 autocast, AdamW) on the CPU: every bias scheme of the GPU table trains, the
    optimizer moves the weights, and the ratios are to NoPE and stock of the same run."""
    from hf_posenc.workflow import bench

    monkeypatch.setitem(
        bench.MODEL_SHAPES,
        "llama",
        dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64),
    )
    rows = bench.run_models(32, archs=("llama",), schemes=bench.MODEL_SCHEMES["cuda"], repeats=1, gpu_step=True)
    assert {row["model"] for row in rows} == {"stock llama (rope)"} | {
        f"posenc {s}" for s in bench.MODEL_SCHEMES["cuda"]
    }
    assert all(row["step"] == "bf16 autocast, AdamW" and row["train_tokens_per_s"] > 0 for row in rows)
    assert next(row for row in rows if row["model"] == "posenc nope")["speed_x_nope"] == 1.0
    from transformers import AutoModelForCausalLM  # the step itself: AdamW moves the weights under autocast

    config = bench.AutoConfig.for_model("llama", **bench.MODEL_SHAPES["llama"])
    model = AutoModelForCausalLM.from_config(config, posenc="alibi")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bench._train_step(model, torch.randint(0, 64, (1, 16)), optimizer, torch.bfloat16)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_threads_leave_busy_cores_alone(monkeypatch):
    """compare's, train's and eval's torch threads: as asked, else the cores other processes leave free (at least
    1); busy cores are measured from /proc/stat where it exists; the setting is restored after the command."""
    import torch

    from hf_posenc.workflow import threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.choose_threads(3) == 3
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "_busy_cores", lambda seconds, cores: 0.0)
    assert threads.choose_threads() == cores
    monkeypatch.setattr(threads, "_busy_cores", lambda seconds, cores: cores - 0.4)
    assert threads.choose_threads() == 1
    for name, value in (("OMP_NUM_THREADS", "1"), ("WORLD_SIZE", "2")):  # a launcher's count is kept
        monkeypatch.setenv(name, value)
        assert threads.choose_threads() == torch.get_num_threads()
        monkeypatch.delenv(name)
    before = torch.get_num_threads()
    with threads.torch_threads() as chosen:
        assert chosen == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.undo()
    assert 0 <= threads._busy_cores(0.05, cores) <= cores + 0.01
    with pytest.raises(ValueError, match="threads must be >= 1 or null"):
        load_config(CompareConfig, overrides={"threads": 0})


def test_hub_data_sets_hold_out_their_own_split_or_the_end_of_train(monkeypatch):
    """A datasets name (offline here: the Hub calls replaced) evaluates on its test (else validation) split; without
    either, on the end of its train split, as local text; train never reads the held-out part."""
    import datasets

    splits = {"train": [f"train line {i}" for i in range(100)], "validation": ["held out line"]}

    def load_dataset(name, config=None, split=None, **kwargs):
        return datasets.Dataset.from_dict({"text": splits[split]})

    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config=None: list(splits))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(documents("someone/corpus", "test")["text"]) == ["held out line"]
    assert list(documents("someone/corpus", "train")["text"]) == ["\n".join(splits["train"])]
    del splits["validation"]
    train, test = (documents("someone/corpus", split, 0.1)["text"][0] for split in ("train", "test"))
    assert train + test == "\n".join(splits["train"]) and test.startswith("train line 9")
    splits.pop("train")
    splits["test"] = ["x"]
    with pytest.raises(ValueError, match="has no train split to train on"):
        documents("someone/corpus", "train")


def test_bench_ratios_skip_a_zero_reference():
    """A reference of zero (a call on the CPU can peak 0 MiB over its baseline) gives no multiple, not a crash; the
    other keys still get theirs."""
    from hf_posenc.workflow import bench

    rows = [{"forward_s": 2.0, "forward_peak_mib": 3.0}]
    bench._ratios(rows, {"forward_s": 1.0, "forward_peak_mib": 0.0}, ("forward_s", "forward_peak_mib"), "sdpa")
    assert rows == [{"forward_s": 2.0, "forward_peak_mib": 3.0, "forward_x_sdpa": 2.0}]
