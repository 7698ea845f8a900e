"""Tiny configs of every supported architecture and one case per scheme variant, shared by the contract suite."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

# The remote code that loads copy into transformers' modules cache: one of each test worker's own (set before
# transformers is imported, which reads it then), so that workers never write one folder at once, nor the user's
# ~/.cache (a cache the user named is kept in a serial run). Processes the tests start inherit it.
if "PYTEST_XDIST_WORKER" in os.environ or "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hf_posenc_tests_modules_")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)  # removed when the process ends

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

import hf_posenc
from hf_posenc.modeling.posenc_attention import BIAS_PROVIDERS

VOCAB = 96


def pytest_configure(config):
    """Under pytest-xdist (pyproject's addopts: a worker per core) each worker takes its share of the cores it may
    run on: tiny models spend their time in Python, and OpenMP teams of every worker on every core wait on each
    other (measured on 2 cores: the suite took 16 min 47 s with 2 threads per worker, 8 min 29 s with 1). A hook, so
    that it runs in the test workers only, not in a process that imports this file (the FSDP ranks); processes the
    tests start get the share through OMP_NUM_THREADS unless they are given their own."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = max(1, cores // int(workers))
        torch.set_num_threads(share)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))


def sigint_handling() -> tuple:
    """How this process takes Ctrl-C: the SIGINT handler, and whether the main thread blocks SIGINT."""
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []) if hasattr(signal, "pthread_sigmask") else 0
    return signal.getsignal(signal.SIGINT), blocked


def set_sigint_handling(handler, blocked) -> None:
    """Make Ctrl-C taken as `sigint_handling` reported it: the SIGINT handler, and SIGINT blocked or not."""
    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK, [signal.SIGINT])


@pytest.fixture(autouse=True)
def _ctrl_c_left_as_found():
    """Every test leaves Ctrl-C as it found it (the handler, the signal mask): the plugin's commands run in users'
    processes and notebooks, and a test that took SIGINT away would silently change the tests after it. One that
    does errors, named, and the handling is put back."""
    before = sigint_handling()
    yield
    after = sigint_handling()
    if after != before:
        set_sigint_handling(*before)
        pytest.fail(f"the test changed how Ctrl-C is taken (SIGINT handler, blocked): {before} -> {after}")


# One tiny stock config per architecture of the deep contract suite; dropout off so train and eval agree.
ARCH_KWARGS = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB)
    | dict(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0),
    "llama": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    ),
}
LLAMA_LIKE = ARCH_KWARGS["llama"]
ARCH_KWARGS["mistral"] = LLAMA_LIKE | dict(sliding_window=8)  # shorter than the test inputs: windows matter
ARCH_KWARGS["qwen2"] = LLAMA_LIKE | dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)
ARCH_KWARGS["gpt_neox"] = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    attention_dropout=0.0,
    hidden_dropout=0.0,
)
ENCODERS = ["bert", "roberta"]
for _encoder in ENCODERS:
    ARCH_KWARGS[_encoder] = dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
ARCHS = sorted(ARCH_KWARGS)
DECODERS = [arch for arch in ARCHS if arch not in ENCODERS]
# the deep contract suite runs on these seven (one per adapter pattern and the ones the plugin began with); every
# verified architecture gets the smoke contract of tests/test_archs.py
assert set(ARCHS) <= set(hf_posenc.ARCHITECTURES)


def _type(spec) -> str:
    return spec if isinstance(spec, str) else spec["type"]


# One case per scheme and per RoPE variant; the ids name them in test reports.
SCHEME_CASES = {
    "learned": "learned",
    "sinusoidal": "sinusoidal",
    "nope": "nope",
    "rope": "rope",
    "rope_linear": {"type": "rope", "rope_type": "linear", "factor": 2.0},
    "rope_ntk": {"type": "rope", "rope_type": "ntk", "factor": 4.0},
    "rope_dynamic": {"type": "rope", "rope_type": "dynamic", "factor": 2.0},
    "rope_yarn": {"type": "rope", "rope_type": "yarn", "factor": 4.0},
    "rope_llama3": {"type": "rope", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4},
    "rope_longrope": {
        "type": "rope",
        "rope_type": "longrope",
        "partial_rotary_factor": 1.0,  # the factor lists below cover the whole head (GPT-NeoX is partial natively)
        "short_factor": [1.0, 1.1, 1.2, 1.3],
        "long_factor": [1.0, 2.0, 3.0, 4.0],
        "original_max_position_embeddings": 32,  # above every test length: longrope switches factors past it
    },
    "rope_partial": {"type": "rope", "partial_rotary_factor": 0.5},
    # p-RoPE (Barbero et al. 2025): the highest half of the frequencies rotate, the rest have frequency 0
    "rope_p": {"type": "rope", "rope_type": "proportional", "partial_rotary_factor": 0.5},
    "alibi": "alibi",
    "alibi_scaled": {"type": "alibi", "max_bias": 4.0, "slope_multiplier": 0.5},
    "t5_bias": {"type": "t5_bias", "num_buckets": 16, "max_distance": 32},
    "kerple": "kerple",
    "kerple_power": {"type": "kerple", "variant": "power"},
    "sandwich": {"type": "sandwich", "dim": 16},
    # a threshold below the test lengths: the query's own position matters (FIRE's progressive interpolation)
    "fire": {"type": "fire", "hidden": 8, "init_threshold": 4},
    "fire_shared": {"type": "fire", "shared": True, "hidden": 8, "init_threshold": 4},
    # per-layer patterns: RoPE then NoPE (as SmolLM3, Llama 4); a windowed RoPE layer then an ALiBi layer
    "layers_rope_nope": {"type": "layers", "pattern": ["rope", "nope"]},
    "layers_window_alibi": {"type": "layers", "pattern": [{"type": "rope", "sliding_window": 5}, "alibi"]},
}
#: the cases whose logits move when every position moves by k: the absolute schemes, and FIRE (its bias depends on
#: the query's own position past its threshold)
ABSOLUTE = {case for case, spec in SCHEME_CASES.items() if not hf_posenc.SCHEMES[_type(spec)].relative}
assert {_type(c) for c in SCHEME_CASES.values()} == set(hf_posenc.SCHEMES)
assert {"learned", "sinusoidal", "fire", "fire_shared"} == ABSOLUTE


def tiny_config(arch: str, **overrides):
    """A stock config of `arch`, tiny (head_dim 8)."""
    return AutoConfig.for_model(arch, **{**ARCH_KWARGS[arch], **overrides})


WIDE_KWARGS = {
    "gpt2": dict(n_embd=64, vocab_size=128),
    "llama": dict(hidden_size=64, intermediate_size=128, vocab_size=128, max_position_embeddings=256),
}


def wide_config(arch: str, **overrides):
    """A stock config of `arch` with head_dim 16 (room for partial-rotary and NTK widths), vocab 128."""
    return tiny_config(arch, **{**WIDE_KWARGS[arch], **overrides})


def build(arch: str, posenc, seed: int = 0, config_overrides: dict | None = None, auto_class=None, **kwargs):
    """A posenc model (causal LM for decoders, masked LM for encoders) with seeded random weights, in eval mode;
    position parameters drawn large enough to matter."""
    torch.manual_seed(seed)
    auto_class = auto_class or (AutoModelForMaskedLM if arch in ENCODERS else AutoModelForCausalLM)
    model = auto_class.from_config(tiny_config(arch, **(config_overrides or {})), posenc=posenc, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_attention_bias" in name or "wpe" in name or "embed_positions" in name:
                param.normal_(0.0, 1.0)
            elif "position_bias" in name and not name.endswith((".c", ".threshold_multiplier")):  # KERPLE's, FIRE's MLP
                param.uniform_(0.5, 2.0)  # (positive: KERPLE's are clamped at 0.01; FIRE's c and threshold kept)
    return model.eval()


def console_script(name: str) -> str | None:
    """The path of the console script `name` installed beside the Python running the tests (a virtualenv's bin/,
    activated or not); None where there is none (one on PATH may run another environment's Python)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


#: `accelerate` as a command of the Python running the tests, whatever PATH holds
ACCELERATE = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def pad_aware_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids `generate` uses: 0 at the first real token of each row, padding set to 1."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


@pytest.fixture(params=DECODERS)
def arch(request):
    return request.param


@pytest.fixture(params=ENCODERS)
def encoder(request):
    return request.param


@pytest.fixture(params=list(SCHEME_CASES), ids=list(SCHEME_CASES))
def case(request):
    return request.param


@pytest.fixture
def spy(monkeypatch):
    """Records the (rows, keys) size of every bias block the score-bias providers are asked for."""
    sizes = []
    for cls in BIAS_PROVIDERS.values():
        original = cls.forward

        def recording(self, q_positions, kv_positions, *args, _original=original):
            sizes.append((q_positions.shape[-1], kv_positions.shape[-1]))  # (Q,) or each row's own (B, Q)
            return _original(self, q_positions, kv_positions, *args)

        monkeypatch.setattr(cls, "forward", recording)
    return sizes
