"""`hf-posenc push`: the Hub folder (weights, code, card) loads without the plugin; uploads use huggingface_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build

from hf_posenc.cli import main
from hf_posenc.workflow import push


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved posenc model with the training record and an evaluation JSON, as `train` and `eval` leave them."""
    folder = tmp_path_factory.mktemp("model")
    model = build("gpt2", {"type": "rope", "rope_type": "yarn", "factor": 2.0}, config_overrides={"vocab_size": 256})
    model.save_pretrained(folder)
    record = {"data": "stdlib", "seq_length": 64, "steps": 100, "posenc": "rope"}
    (folder / push.TRAINING_RECORD).write_text(json.dumps(record))
    evaluation = folder.parent / "eval.json"
    evaluation.write_text(json.dumps({"stride": None, "lengths": {"64": {"ppl": 5.5, "nll": 1.7, "tokens": 100}}}))
    return folder, evaluation, model


def test_dry_run_builds_the_repo_folder(trained, tmp_path, capsys):
    """--dry-run writes safetensors, config with posenc and auto_map, the code closure and a card; nothing uploads."""
    model_dir, evaluation, _ = trained
    out = tmp_path / "hub"
    assert (
        main(
            [
                "push",
                str(model_dir),
                "--repo-id",
                "me/gpt2-yarn",
                "--folder",
                str(out),
                "--eval",
                str(evaluation),
                "--dry-run",
            ]
        )
        == 0
    )
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
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["posenc"]["rope_type"] == "yarn" and "AutoModelForCausalLM" in config["auto_map"]
    card = (out / "README.md").read_text()
    for expected in (
        "**rope**",
        '"factor": 2.0',
        "data: stdlib",
        "training length: 64",
        "| 64 | 5.500 |",
        "trust_remote_code=True",
    ):
        assert expected in card
    assert "built" in capsys.readouterr().out


def test_hub_folder_loads_without_the_plugin(trained, tmp_path):
    """The built folder loads in a fresh process where hf_posenc cannot be imported, with the same logits."""
    model_dir, _, model = trained
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
    model_dir, _, _ = trained
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


def test_push_refuses_a_stock_model(tmp_path):
    """A folder that is not a posenc model is refused with its model_type named."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2)).save_pretrained(
        tmp_path / "m"
    )
    with pytest.raises(ValueError, match="not a posenc model .*'gpt2'"):
        push.build_hub_folder(tmp_path / "m", tmp_path / "hub", "me/x")
