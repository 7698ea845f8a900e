"""The workflow pieces: data, perplexity against length, run configs, and `hf-posenc compare` end to end (tiny)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build

from hf_posenc.cli import main
from hf_posenc.workflow.compare import CompareConfig, run_compare, write_outputs
from hf_posenc.workflow.config import load_config, parse_overrides
from hf_posenc.workflow.data import ByteTokenizer, read_text, stdlib_text, train_validation_split
from hf_posenc.workflow.evaluation import perplexity

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(steps=3, train_length=16, eval_multiples=[1, 2, 4], eval_tokens=256, layers=1, hidden_size=32, heads=2)


def test_byte_tokenizer_and_data(tmp_path):
    """Bytes round-trip; local files and folders are read without the network; the stdlib text is there."""
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    assert read_text(str(tmp_path / "a.txt")) == b"one"
    assert read_text(str(tmp_path)) == b"one\ntwo"
    assert len(stdlib_text(limit=10_000)) >= 10_000
    train, held_out = train_validation_split(torch.arange(100), 0.1)
    assert len(train) == 90 and torch.equal(held_out, torch.arange(90, 100))


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
        else:
            raise AssertionError(f"{path.name}: no run config class for this file name")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stepz": 3}, r"unknown key\(s\) \['stepz'\]; allowed: arch, schemes"),
        ({"steps": "many"}, r"steps must be <class 'int'>, got 'many'"),
        ({"arch": "bert"}, r"arch must be one of gpt2, llama"),
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
    config = load_config(
        CompareConfig, overrides=TINY | {"schemes": ["learned", "rope", "alibi"], "out": str(tmp_path)}
    )
    results = run_compare(config)
    paths = write_outputs(results, config.out)
    table = paths["table"].read_text()
    assert "past table" in table and "YaRN" in table and "slopes x L/N" in table
    saved = json.loads(paths["json"].read_text())
    learned = next(s for s in saved["schemes"] if s["name"] == "learned")
    assert learned["eval"]["as trained"]["32"] is None and learned["eval"]["as trained"]["16"] > 1
    rope = next(s for s in saved["schemes"] if s["name"] == "rope")
    assert set(rope["eval"]) == {"as trained", "PI (linear)", "NTK", "dynamic NTK", "YaRN"}
    assert rope["eval"]["YaRN"]["16"] == rope["eval"]["as trained"]["16"]  # factor 1 at the training length
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["environment"]["hf_posenc"]


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
    build("llama", "alibi", config_overrides={"vocab_size": 256}).save_pretrained(tmp_path / "alibi")
    stock_config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)
    AutoModelForCausalLM.from_config(stock_config).save_pretrained(tmp_path / "stock")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "alibi"), "--lengths", "32,128", "--data", str(text), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["posenc"]["type"] == "alibi" and saved["lengths"]["128"]["tokens"] > 0
    assert main(["eval", str(tmp_path / "stock"), "--lengths", "32,128", "--data", str(text), "--stride", "16"]) == 0
    printed = capsys.readouterr().out
    assert "| 32 |" in printed and "past the model's position table (64 positions)" in printed
