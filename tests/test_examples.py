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
