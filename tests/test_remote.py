"""A saved posenc model loads without hf_posenc through trust_remote_code, and fails loudly without the flag.

One subprocess, in which `import hf_posenc` is impossible, loads every saved case; each test checks one case.
"""

from __future__ import annotations

import json
import os
import random
import shutil
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

# saved folders are what differs most between transformers releases; one worker shares the loads
pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group("remote")]

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
    import sys, torch
    sys.modules["hf_posenc"] = None
    import transformers
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ImportError as error:
        print("REFUSED " + str(error))
    else:
        x = torch.load(sys.argv[1] + "/x.pt")
        with torch.no_grad():
            print("LOADED", torch.equal(model(x).logits, torch.load(sys.argv[1] + "/expected.pt")))
    """
)


def load_elsewhere(cases: dict, tmp_path) -> dict:
    """What a process without hf_posenc prints loading a folder through trust_remote_code, for each case
    `name: (folder, tested, allow)`: a copy of `folder` whose code says it was tested with the releases `tested` (None:
    as saved), with HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS set if `allow`. The processes run at once.
    (transformers.__version__ cannot be faked in them: transformers sets it again while it loads.)"""
    saved_range = 'TRANSFORMERS_RANGE = ("{}", "{}")'.format(*hf_posenc.TRANSFORMERS_RANGE)
    running = {}
    for name, (folder, tested, allow) in cases.items():
        copy = tmp_path / f"case-{name}"
        shutil.copytree(folder, copy)
        version_file = copy / "posenc_version.py"
        assert saved_range in version_file.read_text()
        if tested is not None:
            edited = 'TRANSFORMERS_RANGE = ("{}", "{}")'.format(*tested)
            version_file.write_text(version_file.read_text().replace(saved_range, edited))
        env = {k: v for k, v in os.environ.items() if k != hf_posenc.modeling.posenc_version.ALLOW_UNTESTED}
        env |= {"HF_MODULES_CACHE": str(tmp_path / f"modules-{name}"), "HF_HUB_OFFLINE": "1"}
        if allow:
            env[hf_posenc.modeling.posenc_version.ALLOW_UNTESTED] = "1"
        running[name] = subprocess.Popen(
            [sys.executable, "-c", VERSION_CHECK, str(copy)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    try:
        return {name: process.communicate(timeout=300)[0] for name, process in running.items()}
    finally:
        for process in running.values():
            process.kill()  # (a no-op for those that ended)


def saved(posenc, folder) -> str:
    """A Llama of `posenc` saved in `folder` with an input and its logits; the text of its posenc_version.py."""
    model = build("llama", posenc)
    model.save_pretrained(folder)
    x = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.save(x, folder / "x.pt")
    with torch.no_grad():
        torch.save(model(x).logits, folder / "expected.pt")
    return (folder / "posenc_version.py").read_text()


def test_saved_code_records_the_tested_range(tmp_path):
    """A saved folder's code states the transformers releases it was tested with and the plugin that made it."""
    text = saved("alibi", tmp_path / "model")
    assert 'TRANSFORMERS_RANGE = ("{}", "{}")'.format(*hf_posenc.TRANSFORMERS_RANGE) in text
    assert f'PLUGIN_VERSION = "{hf_posenc.__version__}"' in text


def test_saved_code_on_releases_outside_its_range(tmp_path):
    """A saved folder's own code, loaded without the plugin on a release outside its tested range (the folder's
    range edited): an older release is refused; a newer one loads a scheme transformers' own modules compute (YaRN on
    Llama: the same logits, with a warning) and refuses one the plugin's code computes (ALiBi), naming the range, the
    release, the pip line and HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS, which lets that one load too, with a warning."""
    alibi, yarn = tmp_path / "alibi", tmp_path / "yarn"
    saved("alibi", alibi)
    saved({"type": "rope", "rope_type": "yarn", "factor": 4.0}, yarn)
    found = transformers.__version__
    below, above = ("4.0", "4.1"), ("9.0", "9.1")  # the installed release is newer, older than these
    allowed = hf_posenc.modeling.posenc_version.untested_allowed()  # (set by CI's step past the range)
    out = load_elsewhere(
        {
            "older": (yarn, above, False),
            "newer-alibi": (alibi, below, False),
            "newer-yarn": (yarn, below, False),
            "newer-alibi-allowed": (alibi, below, True),
            "as-saved": (alibi, None, allowed),  # loads on a tested release (and where CI allows a newer one)
        },
        tmp_path,
    )
    head = f"REFUSED this posenc model's code (hf_posenc {hf_posenc.__version__}) was tested with transformers "
    assert head in out["older"] and "ALLOW_UNTESTED" not in out["older"], out["older"][-2000:]
    assert f'>=9.0,<9.1; found {found}. Install a tested release: pip install "transformers>=9.0,<9.1"' in out["older"]
    refused = out["newer-alibi"]
    assert head in refused, refused[-2000:]
    assert (
        f">=4.0,<4.1; found {found}, and this checkpoint's scheme ('alibi') is computed by hf_posenc's code" in refused
    )
    assert 'pip install "transformers>=4.0,<4.1", or set HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS=1' in refused
    loaded = out["newer-yarn"]
    assert "LOADED True" in loaded and "its scheme ('rope') is computed by transformers' own modules" in loaded, loaded
    allowed_out = out["newer-alibi-allowed"]
    assert "LOADED True" in allowed_out and "HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS is set" in allowed_out, allowed_out
    assert "LOADED True" in out["as-saved"], out["as-saved"][-2000:]


def test_release_status_reads_versions_as_pip_does(monkeypatch):
    """Where a version stands to the range, as pip reads `>=low,<high` at the minor releases: a pre-release of the
    lowest minor predates it, every build of the first minor past the range (pre-releases, dev builds) is newer, and
    a version that is no release number is refused by name, not with a parse error."""
    from hf_posenc.modeling import posenc_version

    monkeypatch.setattr(posenc_version, "TRANSFORMERS_RANGE", ("5.20", "5.26"))
    expected = {
        "4.57.1": "older",
        "5.19.9": "older",
        "5.20.0rc1": "older",
        "5.20.0.dev0": "older",
        "5.20.0": "tested",
        "5.25.0rc1": "tested",
        "5.25.3.post1": "tested",
        "5.26.0.dev0": "newer",
        "5.26.0rc1": "newer",
        "5.26": "newer",
        "6.0.0": "newer",
    }
    assert {version: posenc_version.release_status(version) for version in expected} == expected
    with pytest.raises(posenc_version.UntestedTransformersError, match="'nightly', which is no release number.*>=5.20"):
        posenc_version.release_status("nightly")


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
@pytest.mark.parametrize("which", ["older", "newer"])
def test_plugin_on_releases_outside_its_range(which, allow):
    """`import hf_posenc` on a release outside the tested range fails, naming the range, the release and the pip
    line; on a newer one HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS=1 lets it import, with a warning (never an older one)."""
    low, high = (int(v.split(".")[1]) for v in hf_posenc.TRANSFORMERS_RANGE)
    version = f"5.{low - 1}.2" if which == "older" else f"5.{high}.0"
    code = "\n".join(
        [
            f"import transformers; transformers.__version__ = {version!r}",
            "try:\n    import hf_posenc\nexcept ImportError as error:\n    print('REFUSED', error)",
            "else:\n    print('IMPORTED')",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != hf_posenc.modeling.posenc_version.ALLOW_UNTESTED}
    if allow:
        env[hf_posenc.modeling.posenc_version.ALLOW_UNTESTED] = "yes"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    range_text = hf_posenc.modeling.posenc_version.tested_range_text()
    message = (
        f"hf_posenc (hf_posenc {hf_posenc.__version__}) was tested with transformers {range_text}; found {version}"
    )
    if allow and which == "newer":
        assert "IMPORTED" in done.stdout and message in done.stderr and "is set" in done.stderr
    else:
        assert f"REFUSED {message}" in done.stdout, done.stdout + done.stderr[-2000:]
        assert ("HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS=1" in done.stdout) == (which == "newer")


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


def test_a_failure_on_a_newer_release_names_the_release(monkeypatch):
    """On a release newer than the tested ones (here: the range edited, the release allowed), a failure inside the
    config's setup where transformers' internals may have moved names the release and the tested range; a refusal
    of the config itself (a setting the scheme does not take) stays the ValueError it is on any release."""
    from hf_posenc.modeling import posenc_factory, posenc_version

    monkeypatch.setattr(posenc_version, "TRANSFORMERS_RANGE", ("5.0", "5.1"))
    monkeypatch.setenv(posenc_version.ALLOW_UNTESTED, "1")
    config = test_archs.tiny("llama")
    with pytest.raises(ValueError, match="factor"):
        hf_posenc.with_posenc(config, {"type": "rope", "rope_type": "yarn", "factor": 0.5})
    with pytest.raises(TypeError, match="a scheme name or a dict"):  # the plugin's refusal of a setting's type
        hf_posenc.with_posenc(config, 5)

    def moved(config_class):
        raise AttributeError("'_LazyAutoMapping' object has no attribute '_model_mapping'")

    def renamed(config_class):  # a function of transformers' that took `past_key_values` before a release renamed it
        return config_class

    def signature_moved(config_class):
        return renamed(config_class, past_key_values=None)

    for broken, cause in (
        (moved, "(AttributeError: '_LazyAutoMapping' object has no attribute '_model_mapping')"),
        (signature_moved, "renamed() got an unexpected keyword argument 'past_key_values')"),
    ):
        monkeypatch.setattr(posenc_factory, "posenc_model_classes", broken)
        with pytest.raises(posenc_version.UntestedTransformersError) as refused:
            hf_posenc.with_posenc(config, "alibi")
        message = str(refused.value)
        assert f"tested with transformers >=5.0,<5.1; found {transformers.__version__}, and it failed there" in message
        assert cause in message, message
        assert 'pip install "transformers>=5.0,<5.1"' in message and posenc_version.ALLOW_UNTESTED not in message
