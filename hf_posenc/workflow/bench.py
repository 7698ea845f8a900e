"""`hf-posenc bench`: what each position scheme costs, as ratios to a reference measured in the same run.

Three tables, each path timed on the same inputs (warm-up, then the median of repeats, the paths taking turns):

- attention: every score-bias path against plain causal SDPA (no bias) at each length: forward and forward+backward
  seconds, tokens/s and peak memory growth (see `PeakMemory`), each as a ratio to causal SDPA, and to the stock
  transformers way of adding ALiBi (BLOOM/MPT: a dense bias in eager attention) where that fits in memory;
- rotary: the plugin's rotary step (GPT-2, BERT) against transformers' `apply_rotary_pos_emb` and the time to copy q
  and k, forward and forward+backward, in fp32, bf16 and fp16, from a decode step (S=1) up;
- models: one training step of a whole model per scheme at one length: tokens/s, as a ratio to the same posenc model
  with NoPE and to the stock transformers model (its native scheme);
- memory: one training step of a whole model per scheme at a long length, with and without a padding token: peak
  memory growth and seconds, each as a ratio to the same model with NoPE (a bias scheme must train in O(L) memory).

On a GPU the attention table adds bf16 inputs, compiled flex for ALiBi (the analytic score_mod `posenc_flex` runs,
and the table of distances it replaced) and T5, flash-attn's alibi_slopes (when installed) and the bf16 split-column
lead (`alibi_columns`); the models table trains in bf16 autocast with AdamW steps and adds every bias scheme.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..modeling.posenc_attention import (
    AlibiBias,
    ScoreBiasMask,
    T5RelativeBias,
    flash_attn_available,
    posenc_eager_attention,
    posenc_flash_attention,
    posenc_flex_attention,
    posenc_sdpa_attention,
)
from ..modeling.posenc_layers import apply_rope
from .compare import PeakMemory, environment

REFERENCE = "causal SDPA (no bias)"
STOCK_ALIBI = "alibi: dense eager (BLOOM-style)"


class _Attention(nn.Module):
    def __init__(self, provider):
        super().__init__()
        self.training = False
        object.__setattr__(self, "posenc_bias", provider)


def _masks(q_length: int, k_length: int, padded: bool, device) -> ScoreBiasMask:
    """Causal masks of queries at the end of the keys (a decode step when q_length is 1); `padded` adds a boolean
    mask as padding would."""
    kv_positions = torch.arange(k_length, device=device)
    q_positions = kv_positions[k_length - q_length :]
    mask = None
    if padded:
        mask = (q_positions[:, None] >= kv_positions[None, :])[None, None]
    return ScoreBiasMask(mask, True, q_positions, kv_positions)


class _TabulatedAlibi(AlibiBias):
    """ALiBi gathered from a table of distances on flex, as every distance-only bias is: what the analytic score_mod
    replaced, kept here to measure the two against each other."""

    flex_analytic = False


def alibi_columns(q, k, v, slopes: torch.Tensor, split: bool = True) -> torch.Tensor:
    """Causal ALiBi as plain `is_causal` SDPA with extra head-dim columns, in q's dtype (the lead of issue 14 for bf16:
    no mask, so SDPA may run its flash/cuDNN kernels). Up to a per-row constant the bias is m_h * j; `split` writes j
    (counted from the middle key) as 256 * hi + lo, integers bf16 holds exactly while |hi| <= 256, with 256 m_h / scale
    and m_h / scale on the q side; otherwise one column j with m_h / scale. Head widths are padded to a multiple of 8
    and SDPA's scale is passed explicitly. `scripts/alibi_bf16_columns.py` measures its error against float64."""
    batch, heads, length, dim = q.shape
    scale = dim**-0.5
    positions = torch.arange(length, device=q.device, dtype=torch.float64)
    j = positions - positions[length // 2]  # counted from the middle key: half the magnitude
    m = slopes.to(q.device, torch.float64)[None, :, None]  # (1, H, 1)
    if split:
        hi = torch.floor(j / 256)
        q_columns, k_columns = [256 * m / scale, m / scale], [hi, j - 256 * hi]
    else:
        q_columns, k_columns = [m / scale], [j]
    extra = len(q_columns)
    width = dim + extra + (-(dim + extra) % 8)  # a multiple of 8, as the fused kernels want
    eq = torch.cat([q, *(c.expand(batch, heads, length)[..., None].to(q.dtype) for c in q_columns)], dim=-1)
    ek = torch.cat([k, *(c.expand(batch, heads, length)[..., None].to(k.dtype) for c in k_columns)], dim=-1)
    eq, ek = (F.pad(t, (0, width - dim - extra)) for t in (eq, ek))  # autograd reaches q and k through the cat
    out = F.scaled_dot_product_attention(eq, ek, F.pad(v, (0, width - dim)), is_causal=True, scale=scale)
    return out[..., :dim]


def attention_paths(heads: int, device: torch.device, dtype: torch.dtype) -> dict:
    """name -> (f(query, key, value), trains): causal attention over the same inputs by every path measured here."""
    alibi, t5 = _Attention(AlibiBias(heads)), _Attention(T5RelativeBias(heads).to(device))
    tabulated = _Attention(_TabulatedAlibi(heads))

    def sdpa(q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)

    def call(kernel, module, padded):
        return lambda q, k, v: kernel(module, q, k, v, _masks(q.shape[2], k.shape[2], padded, q.device))[0]

    paths = {REFERENCE: (sdpa, True)}
    if dtype == torch.float32:
        paths["alibi: column trick"] = (call(posenc_sdpa_attention, alibi, False), True)
    paths["alibi: chunked (padding mask)"] = (call(posenc_sdpa_attention, alibi, True), True)
    paths["t5_bias: chunked"] = (call(posenc_sdpa_attention, t5, False), True)
    paths[STOCK_ALIBI] = (call(posenc_eager_attention, alibi, False), True)
    if device.type == "cuda" or dtype == torch.float32:  # compiled flex: CPU inference, GPU training
        trains = device.type == "cuda"
        paths["alibi: flex (compiled)"] = (call(posenc_flex_attention, alibi, False), trains)
        paths["alibi: flex, table score_mod"] = (call(posenc_flex_attention, tabulated, False), trains)
        paths["t5_bias: flex (compiled)"] = (call(posenc_flex_attention, t5, False), trains)
    if device.type == "cuda" and dtype != torch.float32 and flash_attn_available():
        paths["alibi: flash-attn alibi_slopes"] = (call(posenc_flash_attention, alibi, False), True)
    if dtype != torch.float32:
        slopes = alibi.posenc_bias.slopes(device, heads)
        paths["alibi: split columns (lead)"] = (functools.partial(alibi_columns, slopes=slopes), True)
    return paths


def time_calls(functions: dict, repeats: int, warmup: int = 2) -> dict:
    """name -> median seconds of `repeats` calls of each function after `warmup` calls of each, synchronising a GPU.

    The functions take turns (one call of each per round), so a machine that slows down or speeds up during the run
    affects every function alike and the ratios between them stay meaningful.
    """
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for function in functions.values():
        for _ in range(warmup):
            function()
    synchronize()
    seconds = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            began = time.perf_counter()
            function()
            synchronize()
            seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _forward_backward(function, q, k, v) -> None:
    function(q, k, v).float().sum().backward()


def _out_of_memory(paths: dict, q, k, v, backward: bool) -> dict[str, str]:
    """name -> "forward" or "forward+backward": the paths that run out of GPU memory on these inputs (forward+backward
    only where it is timed), tried once each, so that a long row that does not fit is reported as such and the
    others are still timed. (A CPU that runs out of memory ends the process instead: nothing to try there.)"""
    if q.device.type != "cuda":
        return {}
    failed = {}
    for name, (function, trains) in paths.items():
        try:
            with torch.no_grad():
                function(q, k, v)
        except torch.OutOfMemoryError:
            failed[name] = "forward"
        if name not in failed and backward and trains:
            try:
                _forward_backward(function, *(t.detach().requires_grad_() for t in (q, k, v)))
            except torch.OutOfMemoryError:
                failed[name] = "forward+backward"
        torch.cuda.empty_cache()
    return failed


def _ratios(rows: list[dict], reference: dict, keys, name: str) -> None:
    """Each row's `keys` as multiples of the reference's, where the reference has one above zero (a peak of 0 MiB
    over the baseline, which a short call on the CPU can measure, has no multiple)."""
    for row in rows:
        for key in keys:
            if key in row and reference.get(key):
                row[f"{key.removesuffix('_s')}_x_{name}"] = row[key] / reference[key]


def run_attention(
    lengths, heads=12, head_dim=64, batch=1, repeats=3, backward_max=4096, dense_max=4096, dtypes=None, rows=None
):
    """The attention table, in `dtypes` (default: fp32 and bf16 on a GPU, fp32 on the CPU), appended to `rows` as each
    length is measured (an interrupted run keeps what it measured)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32])
    rows = [] if rows is None else rows
    for dtype in dtypes:
        for length in lengths:
            generator = torch.Generator().manual_seed(0)
            q, k, v = (
                torch.randn(batch, heads, length, head_dim, generator=generator).to(device, dtype) for _ in range(3)
            )
            paths = {
                name: path
                for name, path in attention_paths(heads, device, dtype).items()
                if name != STOCK_ALIBI or length <= dense_max
            }
            dtype_name = str(dtype).removeprefix("torch.")
            failed = _out_of_memory(paths, q, k, v, length <= backward_max)
            paths = {
                name: (function, trains and name not in failed)
                for name, (function, trains) in paths.items()
                if failed.get(name) != "forward"
            }
            block = [{"path": name, "length": length, "dtype": dtype_name} for name in paths]
            for row in block:
                if row["path"] in failed:
                    row["error"] = "forward+backward out of memory"
            no_room = [
                dict(path=name, length=length, dtype=dtype_name, error="out of memory")
                for name, what in failed.items()
                if what == "forward"
            ]
            warmup = 1 if length > 4096 else 2
            with torch.no_grad():
                forward = time_calls(
                    {name: functools.partial(f, q, k, v) for name, (f, _) in paths.items()}, repeats, warmup
                )
                for row in block:  # peak memory: one call of each path on its own
                    with PeakMemory(device) as memory:
                        paths[row["path"]][0](q, k, v)
                    row["forward_s"] = forward[row["path"]]
                    row["forward_peak_mib"] = memory.peak_bytes / 2**20
                    row["forward_tokens_per_s"] = batch * length / row["forward_s"]
            if length <= backward_max:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                steps = {
                    n: functools.partial(_forward_backward, f, qg, kg, vg) for n, (f, trains) in paths.items() if trains
                }
                for name, seconds in time_calls(steps, repeats, warmup).items():
                    next(row for row in block if row["path"] == name)["forward_backward_s"] = seconds
            if block and block[0]["path"] == REFERENCE:  # (unless the reference itself ran out of memory)
                _ratios(block, block[0], ("forward_s", "forward_backward_s", "forward_peak_mib"), "sdpa")
            # one query against a cache of `length` keys: a generation step. posenc_sdpa runs it chunked (one bias
            # row) with or without padding
            decode_paths = {
                "decode step: "
                + name.replace("column trick", "no padding").replace("chunked (padding mask)", "padding mask"): f
                for name, (f, _) in paths.items()
                if "flex" not in name and "lead" not in name  # (the lead's columns are causal from the first key)
            }
            with torch.no_grad():
                decode_seconds = time_calls(
                    {name: functools.partial(f, q[:, :, -1:], k, v) for name, f in decode_paths.items()}, repeats * 5
                )
            decode = [
                {
                    "path": name,
                    "length": length,
                    "dtype": dtype_name,
                    "forward_s": seconds,
                    "forward_tokens_per_s": batch / seconds,
                }
                for name, seconds in decode_seconds.items()
            ]
            if decode and decode[0]["path"] == "decode step: " + REFERENCE:
                _ratios(decode, decode[0], ("forward_s",), "sdpa")
            block.extend(decode)
            stock = next((row for row in block if row["path"] == STOCK_ALIBI), None)
            if stock is not None:
                _ratios([row for row in block if row["path"].startswith("alibi")], stock, ("forward_s",), "stock")
            rows.extend(block + no_room)
    return rows


def _scaled_copies(query, key):
    return query * 1, key * 1


def _train_step(model, tokens, optimizer=None, autocast: torch.dtype | None = None) -> None:
    """Forward and backward (in `autocast` where given), then the optimizer's step where there is one."""
    with torch.autocast(tokens.device.type, dtype=autocast, enabled=autocast is not None):
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def _rotary_step(rotate, q, k, grad=None) -> None:
    q_out, k_out = rotate(q, k)
    if grad is not None:
        torch.autograd.backward((q_out, k_out), (grad, grad))
        q.grad = k.grad = None


def run_rotary(lengths, heads=12, head_dim=64, batch=1, repeats=20) -> list[dict]:
    """The plugin's rotary step vs transformers' apply_rotary_pos_emb vs copying q and k (`x * 1`, whose backward is
    a copy too), forward and forward+backward at every length (the step is cheap), on strided (B, H, S, D) q and k
    as a fused qkv projection makes them. Each gets its tables as its rotary module makes them once per forward (not
    timed): transformers' cos/sin in the model dtype, the plugin's (cos, sin) turns in fp32."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for length in lengths:
            qkv = torch.randn(batch, length, 3 * heads * head_dim, device=device).to(dtype)
            q, k = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in qkv.split(heads * head_dim, -1)[:2])
            angles = torch.randn(batch, length, head_dim // 2, device=device)
            turns = torch.stack((angles.cos(), angles.sin()), dim=-1)
            cos, sin = (torch.cat((t, t), dim=-1).to(dtype) for t in turns.unbind(-1))
            paths = {
                "copy": _scaled_copies,
                "ours": functools.partial(apply_rope, turns=turns),
                "theirs": functools.partial(apply_rotary_pos_emb, cos=cos, sin=sin),
            }
            count = repeats * 10 if length < 64 else repeats  # calls of microseconds: more of them for a stable median
            with torch.no_grad():
                forward = time_calls({n: functools.partial(_rotary_step, f, q, k) for n, f in paths.items()}, count)
            qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
            grad = torch.randn_like(q)
            steps = time_calls({n: functools.partial(_rotary_step, f, qg, kg, grad) for n, f in paths.items()}, count)
            row = dict(length=length, dtype=str(dtype).removeprefix("torch."))
            for name, seconds in (("forward", forward), ("forward_backward", steps)):
                copy_s, ours, theirs = seconds["copy"], seconds["ours"], seconds["theirs"]
                row.update(
                    {
                        f"{name}_copy_s": copy_s,
                        f"{name}_ours_s": ours,
                        f"{name}_transformers_s": theirs,
                        f"{name}_ours_x_copy": ours / copy_s,
                        f"{name}_transformers_x_copy": theirs / copy_s,
                        f"{name}_ours_x_transformers": ours / theirs,
                    }
                )
            rows.append(row)
    return rows


#: the model shapes of the models table (GPT-2 small's head shape, four layers)
MODEL_SHAPES = {
    "gpt2": dict(n_layer=4, n_embd=768, n_head=12, n_positions=1024, vocab_size=4096),
    "llama": dict(
        num_hidden_layers=4,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=2048,
        vocab_size=4096,
        max_position_embeddings=1024,
    ),
}
NATIVE = {"gpt2": "learned", "llama": "rope"}
#: the schemes of the models table: on a GPU every bias scheme, on the CPU the two of the plugin's goals
MODEL_SCHEMES = {
    "cuda": ("nope", "alibi", "t5_bias", "kerple", "sandwich", "fire", "rope"),
    "cpu": ("nope", "alibi", "t5_bias", "rope"),
}


def run_models(length=1024, archs=("gpt2", "llama"), schemes=None, repeats=3, batch=1, gpu_step=None):
    """One training step per model, the models of an architecture taking turns: tokens/s and ratios to NoPE and to the
    stock model. `length` must fit the stock model's learned table. With `gpu_step` (the default on a GPU) a step is
    what training runs there: bf16 autocast, forward, backward and an AdamW step; otherwise fp32 forward and backward
    (no optimizer: the CPU's goals were set on the attention cost)."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    schemes = schemes or MODEL_SCHEMES[device.type]
    on_gpu = device.type == "cuda" if gpu_step is None else gpu_step
    autocast = torch.bfloat16 if on_gpu else None
    rows = []
    for arch in archs:
        config = AutoConfig.for_model(arch, **MODEL_SHAPES[arch])
        tokens = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(device)
        variants = {"stock": None, **{scheme: scheme for scheme in dict.fromkeys((NATIVE[arch], *schemes))}}
        models = {}
        for name, scheme in variants.items():
            torch.manual_seed(0)
            kwargs = {} if scheme is None else {"posenc": scheme}
            # a copy each: from_config records the attention implementation it chose on the config it is given
            models[name] = AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs).to(device).train()
        steps = {
            name: functools.partial(
                _train_step, model, tokens, torch.optim.AdamW(model.parameters(), lr=1e-5) if on_gpu else None, autocast
            )
            for name, model in models.items()
        }
        seconds = time_calls(steps, repeats, warmup=1)
        block = [
            dict(
                arch=arch,
                model=f"stock {arch} ({NATIVE[arch]})" if scheme is None else f"posenc {scheme}",
                length=length,
                attn_implementation=models[name].config._attn_implementation,
                step="bf16 autocast, AdamW" if on_gpu else "fp32, no optimizer",
                train_step_s=seconds[name],
                train_tokens_per_s=batch * length / seconds[name],
            )
            for name, scheme in variants.items()
        ]
        del models, steps
        stock, nope = block[0], next(row for row in block if row["model"] == "posenc nope")
        for row in block:
            row["speed_x_nope"] = row["train_tokens_per_s"] / nope["train_tokens_per_s"]
            row["speed_x_stock"] = row["train_tokens_per_s"] / stock["train_tokens_per_s"]
        rows.extend(block)
    return rows


def _padded_train_step(model, tokens, mask) -> None:
    model(tokens, attention_mask=mask, labels=tokens).loss.backward()
    model.zero_grad(set_to_none=True)


#: the model of the memory table: small enough that a step at 8k tokens fits a laptop with O(L^2) memory too
MEMORY_SHAPE = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, intermediate_size=512, vocab_size=4096)


def run_memory(length=8192, schemes=("nope", "alibi", "t5_bias"), repeats=2, batch=1):
    """One training step of a small Llama per scheme at `length`, without padding and with one padding token (a
    padding mask sends bias schemes off the mask-free paths): peak memory growth (one step on its own) and seconds,
    as ratios to NoPE."""
    from transformers import AutoModelForCausalLM

    arch = "llama"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.for_model(arch, **MEMORY_SHAPE, max_position_embeddings=length)
    tokens = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    padded_mask = torch.ones_like(tokens)
    padded_mask[:, 0] = 0  # one left-padding token
    rows = []
    for padded in (False, True):
        mask = padded_mask if padded else None
        models, steps = {}, {}
        for scheme in schemes:
            torch.manual_seed(0)
            models[scheme] = AutoModelForCausalLM.from_config(copy.deepcopy(config), posenc=scheme).to(device).train()
            steps[scheme] = functools.partial(_padded_train_step, models[scheme], tokens, mask)
        peaks = {}
        for scheme, step in steps.items():
            step()  # warm-up outside the measured block
            with PeakMemory(device) as memory:
                step()
            peaks[scheme] = memory.peak_bytes / 2**20
        seconds = time_calls(steps, repeats, warmup=0)
        for scheme in schemes:
            rows.append(
                dict(
                    arch=arch,
                    scheme=scheme,
                    length=length,
                    padding=padded,
                    attn_implementation=models[scheme].config._attn_implementation,
                    train_step_s=seconds[scheme],
                    train_peak_mib=peaks[scheme],
                    train_step_x_nope=seconds[scheme] / seconds["nope"],
                    train_peak_x_nope=peaks[scheme] / peaks["nope"] if peaks["nope"] else None,  # 0 MiB: none
                )
            )
        del models, steps
    return rows


def run_bench(
    lengths=(512, 1024, 2048, 4096, 8192, 16384),
    heads=12,
    head_dim=64,
    batch=1,
    repeats=3,
    backward_max=4096,
    dense_max=4096,
    model_length=1024,
    model_repeats=9,
    sections=("attention", "rotary", "models"),
    memory_length=8192,
    dtypes=None,
    results: dict | None = None,
) -> dict:
    """The sections asked for, filled into `results` (a new dict by default) as each is measured: a caller that is
    interrupted keeps what was measured."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {} if results is None else results
    results.update(shape=dict(batch=batch, heads=heads, head_dim=head_dim), environment=environment(device))
    if "attention" in sections:
        results["attention"] = []  # filled as each length is measured
        run_attention(lengths, heads, head_dim, batch, repeats, backward_max, dense_max, dtypes, results["attention"])
    if "rotary" in sections:
        results["rotary"] = run_rotary(sorted({1, *(n for n in lengths if n <= 8192)}), heads, head_dim, batch)
    if "models" in sections:
        results["models"] = run_models(model_length, repeats=model_repeats)
    if "memory" in sections:
        results["memory"] = run_memory(memory_length)
    return results


def _number(row: dict, key: str, digits: int = 2) -> str:
    value = row.get(key)
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    out = []
    if "attention" in results:
        out += [
            "### Attention (each path vs plain causal SDPA in the same run)",
            "",
            "| L | dtype | path | fwd s | x SDPA | x stock | fwd+bwd s | x SDPA | tokens/s (fwd) | peak MiB | x SDPA |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["attention"]:
            cells = [
                str(row["length"]),
                row["dtype"],
                row["path"] + (f" ({row['error']})" if "error" in row else ""),
                _number(row, "forward_s", 4),
                _number(row, "forward_x_sdpa"),
                _number(row, "forward_x_stock"),
                _number(row, "forward_backward_s", 4),
                _number(row, "forward_backward_x_sdpa"),
                _number(row, "forward_tokens_per_s", 0),
                _number(row, "forward_peak_mib", 0),
                _number(row, "forward_peak_mib_x_sdpa"),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if "rotary" in results:
        out += [
            "### Rotary step (q and k together; S=1 is a decode step)",
            "",
            "| S | dtype | pass | copy s | ours s | transf. s | ours x copy | transf. x copy | ours x transf. |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["rotary"]:
            for name, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
                cells = [str(row["length"]), row["dtype"], label]
                cells += [_number(row, f"{name}_{key}_s", 6) for key in ("copy", "ours", "transformers")]
                cells += [_number(row, f"{name}_{key}") for key in ("ours_x_copy", "transformers_x_copy")]
                cells.append(_number(row, f"{name}_ours_x_transformers"))
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if "models" in results:
        out += [
            f"### Whole models: one training step ({(results['models'] or [{}])[0].get('step', 'fp32, no optimizer')})",
            "",
            "| arch | model | L | attention | step s | tokens/s | x NoPE | x stock |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in results["models"]:
            cells = [row["arch"], row["model"], str(row["length"]), row["attn_implementation"]]
            cells += [_number(row, "train_step_s", 3), _number(row, "train_tokens_per_s", 0)]
            cells += [_number(row, "speed_x_nope"), _number(row, "speed_x_stock")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if "memory" in results:
        out += [
            "### Training memory: one step (forward + backward), one padding token or none",
            "",
            "| arch | scheme | L | padding | attention | step s | x NoPE | peak MiB | x NoPE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["memory"]:
            cells = [row["arch"], row["scheme"], str(row["length"]), "yes" if row["padding"] else "no"]
            cells += [row["attn_implementation"], _number(row, "train_step_s", 3), _number(row, "train_step_x_nope")]
            cells += [_number(row, "train_peak_mib", 0), _number(row, "train_peak_x_nope")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write(results: dict, out: str | Path) -> Path:
    """The results as JSON at `out` and as markdown beside it (`.md`), headed by the machine and versions."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    versions = ", ".join(f"{name} {value}" for name, value in results["environment"].items() if name != "device")
    partial = " (interrupted: the sections and lengths it reached)" if results.get("interrupted") else ""
    header = f"# hf-posenc bench on {results['environment']['device']}{partial}\n\n{versions}\n\n"
    path.with_suffix(".md").write_text(header + markdown(results))
    return path
