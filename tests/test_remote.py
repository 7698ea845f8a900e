"""A saved posenc model loads without hf_posenc through trust_remote_code, and fails loudly without the flag.

One subprocess, in which `import hf_posenc` is impossible, loads every saved case; each test checks one case.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import test_archs
import torch
import transformers
from conftest import ARCHS, ENCODERS, SCHEME_CASES, VOCAB, build

import hf_posenc
from hf_posenc import archs

pytestmark = pytest.mark.smoke  # saved folders are what differs most between transformers releases

# every (architecture, scheme) pair on the architecture's main head, plus heads built in other ways
MAIN_HEAD = {arch: "AutoModelForMaskedLM" if arch in ENCODERS else "AutoModelForCausalLM" for arch in ARCHS}
CASES = {f"{arch}-{case}": (arch, case, MAIN_HEAD[arch]) for arch in ARCHS for case in SCHEME_CASES}
CASES |= {
    "llama-alibi-seqcls": ("llama", "alibi", "AutoModelForSequenceClassification"),  # base built through AutoModel
    "gpt_neox-learned-seqcls": ("gpt_neox", "learned", "AutoModelForSequenceClassification"),
    "bert-rope_yarn-tokcls": ("bert", "rope_yarn", "AutoModelForTokenClassification"),
    "roberta-t5_bias-seqcls": ("roberta", "t5_bias", "AutoModelForSequenceClassification"),
}


def _revision() -> str:
    """The commit under test (a run of the same commit tests the same subset), or the release where git is absent."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__), check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return hf_posenc.__version__


# Every verified architecture loads without the plugin: a rotating subset of 16 per commit (successive commits cover
# them all; HF_POSENC_REMOTE_ARCHS=all runs every one), each with one scheme of a rotating choice.
GENERIC = [arch for arch in archs.verified() if arch not in ARCHS]
_pick = random.Random(_revision())
ROTATING = GENERIC if os.environ.get("HF_POSENC_REMOTE_ARCHS") == "all" else sorted(_pick.sample(GENERIC, 16))
CASES |= {
    f"{arch}-{scheme}": (arch, scheme, test_archs.auto_class(arch).__name__)
    for arch, scheme in zip(
        ROTATING, _pick.choices(["alibi", "t5_bias", "rope", "nope", "sinusoidal"], k=len(ROTATING))
    )
    if archs.takes(arch, scheme)
}

LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_posenc"] = None  # the plugin cannot be imported here
    import torch, transformers
    results = {}
    for name, folder, auto_name in json.loads(sys.argv[1]):
        auto_class = getattr(transformers, auto_name)
        try:
            auto_class.from_pretrained(folder)
            refused = ""
        except ValueError as error:
            refused = str(error)
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        inputs = torch.load(folder + "/inputs.pt")
        with torch.no_grad():
            same = torch.equal(model(**inputs).logits, torch.load(folder + "/expected.pt"))
        results[name] = {"refused": refused, "same": same, "module": type(model).__module__}
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def remote_results(tmp_path_factory):
    jobs = []
    for name, (arch, case, auto_name) in CASES.items():
        folder = str(tmp_path_factory.mktemp(name))
        auto_class = getattr(transformers, auto_name)
        overrides = {"num_labels": 3} | ({} if arch in ENCODERS else {"pad_token_id": 0})
        if arch in ARCHS:
            model = build(arch, SCHEME_CASES[case], auto_class=auto_class, config_overrides=overrides)
        else:
            model = test_archs.build(arch, case)
        inputs = {
            "input_ids": torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0)),
            "attention_mask": torch.tensor(
                [[0, 0] + [1] * 8, [1] * 10] if auto_name != "AutoModelForMaskedLM" else [[1] * 8 + [0, 0], [1] * 10]
            ),
        }
        with torch.no_grad():
            expected = model(**inputs).logits
        model.save_pretrained(folder)
        torch.save(inputs, folder + "/inputs.pt")
        torch.save(expected, folder + "/expected.pt")
        jobs.append((name, folder, auto_name))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("modules")), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=str(tmp_path_factory.mktemp("elsewhere")),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # transformers' refusal prompt is written without a newline, so the marker may follow it on the same line
    return json.loads(done.stdout.rsplit("RESULTS", 1)[1])


@pytest.mark.parametrize("name", list(CASES))
def test_loads_without_plugin(remote_results, name):
    """With trust_remote_code=True the shipped code is used and gives the same logits, bit for bit."""
    result = remote_results[name]
    assert result["module"].startswith("transformers_modules.")
    assert result["same"]


@pytest.mark.parametrize("name", list(CASES))
def test_refuses_without_flag(remote_results, name):
    """Without trust_remote_code the load fails with transformers' message asking for it, never silently."""
    assert "trust_remote_code=True" in remote_results[name]["refused"]


VERSION_CHECK = textwrap.dedent(
    """
    import sys
    sys.modules["hf_posenc"] = None
    import transformers
    try:
        transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ImportError as error:
        print("REFUSED " + str(error))
    """
)


def test_saved_code_refuses_untested_transformers(tmp_path):
    """A saved folder records the transformers range its code was tested with (posenc_version.py) and, loaded with a
    release outside it, fails naming both instead of running internals that may have changed. (The range in the
    folder is edited to one the installed release is outside of.)"""
    folder = tmp_path / "model"
    build("llama", "alibi").save_pretrained(folder)
    version_file = folder / "posenc_version.py"
    assert 'TRANSFORMERS_RANGE = ("5.20", "5.25")' in version_file.read_text()
    version_file.write_text(version_file.read_text().replace('("5.20", "5.25")', '("4.0", "4.1")'))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", VERSION_CHECK, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    expected = f"was tested with transformers >=4.0,<4.1; found {transformers.__version__}"
    assert expected in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("version", ["5.19.2", "5.25.0"])
def test_plugin_refuses_untested_transformers(version):
    """`import hf_posenc` with a transformers release outside the tested range fails, naming the range."""
    code = "\n".join(
        [
            f"import transformers; transformers.__version__ = {version!r}",
            "try:\n    import hf_posenc\nexcept ImportError as error:\n    print(error)",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert f"hf_posenc (hf_posenc 0.2.0) was tested with transformers >=5.20,<5.25; found {version}" in done.stdout


STUB_IMPORT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_posenc"] = None
    import torch
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    cls = get_class_from_dynamic_module("modeling_posenc_gpt2.PosencGPT2DoubleHeadsModel", sys.argv[1])
    model = cls.from_pretrained(sys.argv[1]).eval()
    inputs = torch.load(sys.argv[1] + "/inputs.pt")
    with torch.no_grad():
        print("SAME", torch.equal(model(**inputs).mc_logits, torch.load(sys.argv[1] + "/expected.pt")))
    """
)


def test_head_without_auto_class_loads_through_the_generated_stub(tmp_path):
    """A head with no Auto class (GPT2DoubleHeadsModel) is reached without the plugin through the generated modeling
    stub, which imports the shipped factory: the path an Auto load does not take."""
    PosencGPT2DoubleHeadsModel = hf_posenc.model_classes("gpt2")["PosencGPT2DoubleHeadsModel"]
    torch.manual_seed(0)
    model = PosencGPT2DoubleHeadsModel(hf_posenc.with_posenc(test_archs.tiny("gpt2"), "alibi")).eval()
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 3, 8)), "mc_token_ids": torch.full((2, 3), 7)}
    with torch.no_grad():
        torch.save(model(**inputs).mc_logits, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path)
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", STUB_IMPORT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert "SAME True" in done.stdout, done.stderr[-3000:]


ISOLATION = textwrap.dedent(
    """
    import sys
    if sys.argv[3] == "hidden":
        sys.modules["hf_posenc"] = None
    import torch, transformers
    first, second = sys.argv[1], sys.argv[2]
    inputs = torch.load(first + "/inputs.pt")
    load = lambda folder: transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    def logits(model):
        with torch.no_grad():
            return model(**inputs).logits
    model = load(first)
    before = logits(model)
    print("OWN", torch.equal(before, torch.load(first + "/expected.pt")))
    other = load(second)  # a folder of another release's code: its kernels differ
    print("OTHER_DIFFERS", not torch.equal(logits(other), before))
    if sys.argv[3] == "import":
        import hf_posenc
        plugin = transformers.AutoModelForCausalLM.from_pretrained(first).eval()
        print("PLUGIN", torch.equal(logits(plugin), before))
    print("KEPT", torch.equal(logits(model), before), model.config._attn_implementation)
    """
)

# appended to the second folder's kernel file: a release whose SDPA kernel gives other numbers
OTHER_RELEASE = textwrap.dedent(
    """

    _released_sdpa = posenc_sdpa_attention


    def posenc_sdpa_attention(*args, **kwargs):
        output, weights = _released_sdpa(*args, **kwargs)
        return output * 0.5, weights


    BIAS_KERNELS["sdpa"] = posenc_sdpa_attention
    AttentionInterface.register(kernel_name("sdpa"), posenc_sdpa_attention)
    """
)


@pytest.mark.parametrize("plugin", ["hidden", "import"])
def test_each_loaded_folder_keeps_its_own_kernels(tmp_path, plugin):
    """Two folders loaded with trust_remote_code in one process, the second of other code, and hf_posenc imported
    after them: the first model keeps running its own kernels (every copy registered the same names before, and the
    last one loaded or imported won)."""
    torch.manual_seed(0)
    model = hf_posenc.AutoModelForCausalLM.from_config(test_archs.tiny("llama"), posenc="alibi").eval()
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 12))}
    for name in ("first", "second"):
        model.save_pretrained(tmp_path / name)
        torch.save(inputs, tmp_path / name / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "first" / "expected.pt")
    with open(tmp_path / "second" / "posenc_attention.py", "a") as kernels:
        kernels.write(OTHER_RELEASE)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    arguments = [str(tmp_path / "first"), str(tmp_path / "second"), plugin]
    done = subprocess.run(
        [sys.executable, "-c", ISOLATION, *arguments], capture_output=True, text=True, env=env, timeout=300
    )
    out = done.stdout
    assert "OWN True" in out and "OTHER_DIFFERS True" in out, out + done.stderr[-3000:]
    assert "KEPT True posenc_auto." in out, out + done.stderr[-3000:]
    if plugin == "import":
        assert "PLUGIN True" in out, out + done.stderr[-3000:]
