"""Every CUDA path against the fp32 eager reference, on a GPU; skipped where there is none.

    python -m pytest -q -m gpu                                  # on a machine with CUDA
    HF_POSENC_TEST_DEVICE=cpu python -m pytest -q -m gpu         # the same tests on the CPU (CI runs this)

On CUDA the default `posenc_auto` runs compiled flex_attention for prefill and training (flash-attn's alibi_slopes
where flash-attn is installed and applies) and SDPA for decode steps; each test checks which path each call took.
Models are tiny (two layers, head width 16: compiled flex needs 16 or more) with random weights. bf16 runs are judged
against the fp32 eager model by the error of the same model in bf16 on the textbook eager path: the fast path may not
be worse than bf16 itself is. On the CPU the default path is posenc_sdpa and flex does not train; the CPU run keeps
these tests' own code from rotting between the rare runs on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SCHEME_CASES, WIDE_KWARGS, build, pad_aware_positions
from test_bf16_columns import column_errors
from test_math import assert_rope_equals_gptj

import hf_posenc
from hf_posenc import archs
from hf_posenc.modeling import posenc_attention
from hf_posenc.modeling.posenc_attention import flash_attn_available

DEVICE = os.environ.get("HF_POSENC_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device (HF_POSENC_TEST_DEVICE=cpu runs these on the CPU)"),
]
CUDA = DEVICE is not None and DEVICE.startswith("cuda")

ARCHS = ["llama", "gpt2"]
#: every case of a score-bias scheme (a bias site or a pattern with a bias layer)
BIAS_CASES = [
    case
    for case, spec in SCHEME_CASES.items()
    if hf_posenc.SCHEMES[spec if isinstance(spec, str) else spec["type"]].site == "bias" or "alibi" in case
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB, LENGTH, PAD = 96, 40, 5


def model_on(arch: str, case: str, dtype: torch.dtype, **kwargs):
    """The case's posenc model of `arch` (head width 16) on DEVICE in `dtype`, train mode (no dropout)."""
    model = build(arch, SCHEME_CASES[case], config_overrides=dict(WIDE_KWARGS[arch], vocab_size=VOCAB), **kwargs)
    return model.to(DEVICE, dtype).train()


def batch(padded: bool) -> dict:
    """Two rows of LENGTH tokens; with `padded`, the second row left-padded by PAD tokens (labels -100 there and at
    the first token after them)."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (2, LENGTH), generator=generator)
    mask = torch.ones_like(tokens)
    if padded:
        mask[1, :PAD] = 0
    labels = tokens.masked_fill(mask == 0, -100)
    labels[1, PAD] = -100  # predicted from the last padding row, whose attention no two paths define alike
    inputs = dict(input_ids=tokens, labels=labels)
    if padded:
        inputs.update(attention_mask=mask, position_ids=pad_aware_positions(mask))
    return {name: tensor.to(DEVICE) for name, tensor in inputs.items()}


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True, scope="module")
def compiled_throughout():
    """A call that would fall back to uncompiled flex (materialised scores) past the recompile limit raises instead:
    every test here runs the compiled kernels it means to."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


_TESTS_SEEN: list[str] = []


@pytest.fixture(autouse=True)
def compiles_per_test(request):
    """Each test function starts from no compiled entries (its parameters share them): what one test compiles does
    not count against the next one's recompile limit."""
    if _TESTS_SEEN[-1:] != [request.function.__name__]:
        torch._dynamo.reset()
        _TESTS_SEEN.append(request.function.__name__)


@pytest.fixture
def paths(monkeypatch) -> list[str]:
    """The path posenc_auto chose for each call."""
    chosen = []
    original = posenc_attention.choose_path

    def recording(*args, **kwargs):
        chosen.append(original(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(posenc_attention, "choose_path", recording)
    return chosen


def prefill_paths(case: str, dtype: torch.dtype, padded: bool) -> set[str]:
    """What posenc_auto may choose for prefill and training calls here: flex on CUDA (flash-attn's kernel for
    unpadded bf16 ALiBi where it is installed), SDPA on the CPU."""
    if not CUDA:
        return {"sdpa"}
    flash = flash_attn_available() and dtype != torch.float32 and not padded and "alibi" in case
    return {"flex", "flash"} if flash else {"flex"}


def step(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One forward and backward: the logits of the real tokens, the gradients by name, the loss."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    grads = {name: p.grad.detach().float() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float()[keep], grads, out.loss.detach().float()


def errors(got, expected) -> dict[str, float]:
    """Relative errors of logits, of all gradients together, and of the position parameters' gradients."""
    logits, grads, loss = got
    ref_logits, ref_grads, ref_loss = expected
    assert set(grads) == set(ref_grads), "the same parameters get gradients"
    names = sorted(ref_grads)
    positional = [n for n in names if "position_bias" in n or "relative_attention_bias" in n]

    def flat(gradients, keys):
        return torch.cat([gradients[name].flatten() for name in keys])

    out = dict(logits=relative(logits, ref_logits), grads=relative(flat(grads, names), flat(ref_grads, names)))
    out["loss"] = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    if positional:
        out["position_grads"] = relative(flat(grads, positional), flat(ref_grads, positional))
    return out


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", BIAS_CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_matches_fp32_eager(arch, case, dtype, padded, paths):
    """A training step (forward, loss, backward) on the default path equals the fp32 eager model's: logits, loss and
    every gradient, the bias parameters' (T5's table, KERPLE's, FIRE's MLP) among them."""
    if not archs.takes(arch, SCHEME_CASES[case]):
        pytest.skip(f"{arch} does not take {case}")
    dtype = DTYPES[dtype]
    inputs = batch(padded)
    reference = model_on(arch, case, torch.float32, attn_implementation="eager")
    expected = step(reference, inputs)
    model = model_on(arch, case, dtype)
    model.load_state_dict(reference.state_dict())
    paths.clear()
    got = errors(step(model, inputs), expected)
    assert paths and set(paths) <= prefill_paths(case, dtype, padded), paths
    if dtype == torch.float32:
        assert got["logits"] < 1e-5 and got["loss"] < 1e-5, got
        assert got["grads"] < 1e-4 and got.get("position_grads", 0.0) < 1e-4, got
        return
    eager = model_on(arch, case, dtype, attn_implementation="eager")  # bf16 itself: the textbook path in bf16
    eager.load_state_dict(reference.state_dict())
    floor = errors(step(eager, inputs), expected)
    for name, value in got.items():
        # kernels round the probabilities and score gradients to bf16 where eager keeps its scores in fp32: a few
        # times its error (the CPU's posenc_sdpa measured up to 3.2x on the position gradients); a wrong bias or a
        # lost gradient is off by its whole size
        assert value <= 5 * floor[name] + 2e-3, f"{name}: {value:.2e}, bf16 eager {floor[name]:.2e} ({got})"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["alibi", "t5_bias", "kerple", "sandwich", "fire", "layers_window_alibi"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_full_forward(arch, case, dtype, paths):
    """Greedy generation with the KV cache, one row left-padded, gives at every step the logits of one full forward
    over the generated sequence (prefill on flex, decode steps on SDPA on CUDA)."""
    if not archs.takes(arch, SCHEME_CASES[case]):
        pytest.skip(f"{arch} does not take {case}")
    model = model_on(arch, case, DTYPES[dtype]).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    inputs = batch(padded=True)
    paths.clear()
    with torch.no_grad():
        out = model.generate(
            inputs["input_ids"][:, :24],
            attention_mask=inputs["attention_mask"][:, :24],
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        mask = torch.ones_like(out.sequences)
        mask[1, :PAD] = 0
        full = model(out.sequences, attention_mask=mask, position_ids=pad_aware_positions(mask)).logits
    steps = torch.stack(out.logits, 1).float()
    error = relative(steps, full[:, 23:-1].float())
    assert error < (1e-5 if dtype == "fp32" else 2e-2), error
    assert set(paths) == ({"flex", "sdpa"} if CUDA else {"sdpa"}), paths  # prefill (padded: no flash), decode steps


def test_auto_chooses_per_call(paths):
    """posenc_auto's choice for each call on this device: prefill and training on flex, decode steps, attention
    dropout and head widths under 16 on SDPA (flash-attn, where installed, for every unpadded bf16 ALiBi call: it
    takes one query row and dropout too); the CPU always SDPA."""
    sdpa = "flash" if CUDA and flash_attn_available() else "sdpa"  # what a bf16 ALiBi call takes instead of SDPA
    model = model_on("llama", "alibi", torch.bfloat16).eval()
    inputs = batch(padded=False)
    with torch.no_grad():
        cache = model(inputs["input_ids"][:, :20], use_cache=True).past_key_values
        prefill = list(paths)
        paths.clear()
        model(inputs["input_ids"][:, 20:21], past_key_values=cache, use_cache=True)
    assert len(prefill) == 2 and set(prefill) <= prefill_paths("alibi", torch.bfloat16, False), prefill
    assert paths == [sdpa] * 2, paths  # one query row: no fused kernel needed
    paths.clear()
    dropout = model_on("llama", "alibi", torch.bfloat16)
    dropout.config.attention_dropout = 0.1
    for layer in dropout.model.layers:
        layer.self_attn.attention_dropout = 0.1
    dropout(**batch(padded=False)).loss.backward()
    assert paths == [sdpa] * 2, paths
    paths.clear()
    narrow = build("llama", "alibi").to(DEVICE).train()  # head width 8
    narrow(**batch(padded=False)).loss.backward()
    assert paths == ["sdpa"] * 2, paths


def test_training_after_inference_mode(paths):
    """A training step after an inference_mode forward (a pipeline call) of the same model: nothing the first call
    cached (ALiBi's slopes, block masks) is an inference tensor the backward would have to save."""
    inputs = batch(padded=False)
    reference = model_on("llama", "alibi", torch.float32, attn_implementation="eager")
    expected = step(reference, inputs)
    model = model_on("llama", "alibi", torch.float32)
    model.load_state_dict(reference.state_dict())
    with torch.inference_mode():
        model(inputs["input_ids"])
    got = errors(step(model, inputs), expected)
    assert got["logits"] < 1e-5 and got["grads"] < 1e-4, got
    assert set(paths) <= prefill_paths("alibi", torch.float32, False), paths


@pytest.mark.skipif(not (CUDA and flash_attn_available()), reason="flash-attn is not installed (or no CUDA)")
def test_flash_alibi_matches_eager():
    """posenc_flash (flash-attn's alibi_slopes) in bf16: a training step within bf16's own error of fp32 eager."""
    inputs = batch(padded=False)
    reference = model_on("llama", "alibi", torch.float32, attn_implementation="eager")
    expected = step(reference, inputs)
    results = {}
    for implementation in ("flash_attention_2", "eager"):
        model = model_on("llama", "alibi", torch.bfloat16, attn_implementation=implementation)
        model.load_state_dict(reference.state_dict())
        results[implementation] = errors(step(model, inputs), expected)
    for name, value in results["flash_attention_2"].items():
        assert value <= 2 * results["eager"][name] + 2e-3, results


def test_flex_varying_lengths_compile_a_few_times():
    """Training on posenc_flex over batches of eight lengths compiles a few times (while torch finds the sizes that
    vary), then not at all for new lengths. The CPU, where flex has no backward, runs the forwards."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = model_on("llama", "alibi", torch.bfloat16 if CUDA else torch.float32, attn_implementation="posenc_flex")
    if not CUDA:
        model.eval()

    def run(lengths) -> int:
        before = counters["stats"]["unique_graphs"]
        for length in lengths:
            tokens = torch.randint(3, VOCAB, (2, length), device=DEVICE)
            if CUDA:
                model(tokens, labels=tokens, use_cache=False).loss.backward()
            else:
                with torch.no_grad():
                    model(tokens, use_cache=False)
        return counters["stats"]["unique_graphs"] - before

    assert run([64, 80, 150, 200]) <= 8  # flex's and its block mask's (4 each at most)
    assert run([96, 300, 129, 33]) == 0


@pytest.mark.skipif(not CUDA, reason="the CPU's peak resident set counts what malloc keeps (test_flush checks the CPU)")
def test_training_keeps_no_square_tensor():
    """A training step of a bias scheme at 4096 tokens, with a padding token and without, takes less peak memory above
    the same model with NoPE than half of one (H, L, L) fp32 tensor (128 MiB here): no (L, L) tensor per layer."""
    from hf_posenc.workflow.compare import PeakMemory

    length, heads = 4096, 4
    tokens = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    peaks = {}
    for case in ("nope", "alibi", "t5_bias"):
        model = model_on("llama", case, torch.bfloat16 if CUDA else torch.float32)
        assert model.config.num_attention_heads == heads
        for padded in (False, True):
            mask = torch.ones_like(tokens)
            mask[0, 0] = 0 if padded else 1
            labels = tokens.masked_fill(mask == 0, -100)
            model(tokens, attention_mask=mask, labels=labels).loss.backward()  # warm-up: compile, caches
            model.zero_grad(set_to_none=True)
            with PeakMemory(torch.device(DEVICE)) as memory:
                model(tokens, attention_mask=mask, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
            peaks[case, padded] = memory.peak_bytes
        del model
    square = heads * length * length * 4
    mib = {f"{case} padded={padded}": round(peak / 2**20) for (case, padded), peak in peaks.items()}
    for (case, padded), peak in peaks.items():
        assert peak - peaks["nope", padded] < square / 2, (case, padded, list(mib.items()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rotary_step_matches_transformers(dtype):
    """The plugin's rotary step (GPT-2, BERT) on this device, forward and backward, equals transformers' GPT-J
    rotary step on the same angles, as test_math checks it on the CPU."""
    assert_rope_equals_gptj(dtype, 1.0, DEVICE)


def test_split_columns_keep_alibi_exact_in_bf16():
    """The bf16 split-column lead (scripts/alibi_bf16_columns.py) through this device's SDPA kernels: the split
    columns stay at the dense bf16 mask's error against float64, the single column does not."""
    errors = column_errors(4096 if CUDA else 1024, DEVICE)
    assert errors["split"] <= 1.1 * errors["mask"] and errors["single"] > 10 * errors["split"], errors
