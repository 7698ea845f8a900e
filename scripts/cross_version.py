"""Folders saved with one transformers release, loaded with another: the same logits, bit for bit, with the plugin and
without it (trust_remote_code). .ci/run saves with the pinned release and checks with every other supported one.

    python scripts/cross_version.py save DIR    # a few architectures and schemes, their inputs and logits
    python scripts/cross_version.py check DIR   # reload each with this release; exit 1 on any difference
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

#: (architecture, scheme): every site and both adapters, per-layer RoPE, latent attention, a head without Auto class
CASES = [
    ("llama", "alibi"),
    ("llama", {"type": "rope", "rope_type": "yarn", "factor": 4.0}),
    ("qwen3", {"type": "rope", "partial_rotary_factor": 0.5}),
    ("gemma3_text", "sinusoidal"),
    ("deepseek_v3", "nope"),
    ("gpt2", "rope"),
    ("gpt2", "learned"),
    ("bert", "t5_bias"),
    ("modernbert", "alibi"),
]
VOCAB = 96

REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_posenc"] = None  # the plugin cannot be imported here
    import torch, transformers
    same = {}
    for folder in json.loads(sys.argv[1]):
        record = json.load(open(folder + "/case.json"))
        model = getattr(transformers, record["auto"]).from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.load(folder + "/inputs.pt")).logits
        same[folder] = torch.equal(logits, torch.load(folder + "/logits.pt"))
    print("RESULTS" + json.dumps(same))
    """
)


def save(root: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from hf_posenc import archs

    for index, (arch, scheme) in enumerate(CASES):
        auto = AutoModelForMaskedLM if arch in ("bert", "modernbert") else AutoModelForCausalLM
        config = archs.small_config(arch, vocab_size=VOCAB, pad_token_id=0, **archs.TEST_SIZE)
        torch.manual_seed(index)
        model = auto.from_config(config, posenc=scheme).eval()
        folder = root / f"{index}-{arch}"
        model.save_pretrained(folder)
        inputs = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            torch.save(model(inputs).logits, folder / "logits.pt")
        torch.save(inputs, folder / "inputs.pt")
        record = {"arch": arch, "scheme": scheme, "auto": auto.__name__, "saved_with": transformers.__version__}
        (folder / "case.json").write_text(json.dumps(record))
    print(f"saved {len(CASES)} folders with transformers {transformers.__version__} in {root}")


def check(root: Path) -> int:
    import transformers

    import hf_posenc  # noqa: F401  (the posenc= keyword and the posenc_* model types)

    folders = sorted(str(path) for path in root.iterdir() if (path / "case.json").exists())
    failures = []
    for folder in folders:
        record = json.loads(Path(folder, "case.json").read_text())
        model = getattr(transformers, record["auto"]).from_pretrained(folder).eval()
        with torch.no_grad():
            same = torch.equal(model(torch.load(folder + "/inputs.pt")).logits, torch.load(folder + "/logits.pt"))
        if not same:
            failures.append(f"{record['arch']} {record['scheme']} (plugin)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE, json.dumps(folders)], capture_output=True, text=True, env=env, timeout=900
    )
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    remote = json.loads(done.stdout.rsplit("RESULTS", 1)[1])
    for folder in folders:
        if not remote[folder]:
            record = json.loads(Path(folder, "case.json").read_text())
            failures.append(f"{record['arch']} {record['scheme']} (remote code)")
    saved_with = json.loads(Path(folders[0], "case.json").read_text())["saved_with"]
    print(
        f"{len(folders)} folders saved with transformers {saved_with}, loaded with {transformers.__version__}: "
        + ("bit-exact with and without the plugin" if not failures else f"DIFFERENT: {', '.join(failures)}")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "check"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    folder = Path(sys.argv[2])
    sys.exit(save(folder) if sys.argv[1] == "save" else check(folder))
