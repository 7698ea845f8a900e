"""Every example runs end to end on CPU with tiny settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart(tmp_path):
    """The quickstart trains each scheme, generates, saves and reloads with identical logits."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--steps", "3", "--arch", "llama", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical logits" in done.stdout
    for scheme in ("learned", "rope", "alibi"):
        assert f"\n{scheme} " in done.stdout
    assert (tmp_path / "config.json").exists() and (tmp_path / "modeling_posenc_llama.py").exists()


def run_example(name, *args, timeout=600):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_finetune_converted_checkpoint(tmp_path):
    """Converts a stock GPT-2 to ALiBi (the report shows wpe dropped), fine-tunes it and measures it."""
    out = run_example("finetune_converted_checkpoint.py", "--steps", "4", "--out", str(tmp_path))
    assert "dropped transformer.wpe.weight" in out and "after 4 steps" in out
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_extend_context_yarn(tmp_path):
    """Trains a small RoPE Llama, then reads 4x its length as trained and with YaRN x4."""
    out = run_example("extend_context_yarn.py", "--steps", "4", "--out", str(tmp_path))
    assert "rope as trained" in out and "YaRN x4" in out and (tmp_path / "yarn" / "config.json").exists()


def test_compare_on_your_text(tmp_path):
    """Compares schemes on a user's text file and writes the table, plot and JSON."""
    text = tmp_path / "mine.txt"
    text.write_text("Position is how a transformer knows word order. " * 800)
    out = run_example(
        "compare_on_your_text.py", str(text), "--schemes", "rope,alibi", "--steps", "3", "--out", str(tmp_path)
    )
    assert "| alibi |" in out and (tmp_path / "results.json").exists() and (tmp_path / "ppl_vs_length.png").exists()
