"""The generic adapter on a GPU: a few verified architectures, each site's schemes, on CUDA (never run by CI).

    python scripts/gpu_smoke.py [--device cuda] [--out gpu_smoke.json]

Per architecture (tiny configs from hf_posenc.archs, random weights):
- identity: the native scheme with the stock weights against the stock model, bf16 and fp32, sdpa;
- for alibi and t5_bias: the default path (`posenc_auto`: compiled flex for prefill and training on CUDA, SDPA for
  decode steps) in bf16 and fp32 against the fp32 eager reference, forward and one training step (the gradients);
- generation with the KV cache against one full forward (alibi, bf16);
- for alibi and t5_bias on decoders: a packed row with position ids restarting per document (and a gap) through the
  default path in bf16 and fp32 against the fp32 eager reference; a training step with a padding mask on posenc_sdpa
  (blocks recomputed in the backward) against the eager gradients;
- for nope and sinusoidal: a forward that runs (their sites do not touch the kernels).
Prints one line per check and writes them all as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import hf_posenc
from hf_posenc import archs
from hf_posenc.modeling import posenc_attention

ARCHS = ("llama", "qwen3", "gemma2", "gpt_oss", "deepseek_v3", "smollm3", "gpt2", "modernbert", "bert")
VOCAB, T = 96, 48


def build(arch, posenc=None, device="cuda", dtype=torch.float32, **kwargs):
    auto = AutoModelForMaskedLM if arch in ("modernbert", "bert") else AutoModelForCausalLM
    size = {**archs.TEST_SIZE, "hidden": 64}  # head width 16: compiled flex needs at least 16
    config = archs.small_config(arch, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **size)
    torch.manual_seed(0)
    stock = auto.from_config(copy.deepcopy(config))
    model = stock if posenc is None else auto.from_config(copy.deepcopy(config), posenc=posenc, **kwargs)
    if posenc is not None:
        missing = model.load_state_dict(stock.state_dict(), strict=False).missing_keys
        with torch.no_grad():
            for name in missing:
                model.get_parameter(name).normal_(0.0, 1.0)
    return model.to(device=device, dtype=dtype).eval()


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def position_checks(arch, scheme, device, x, paths, record) -> None:
    """Packed documents with restarting (and gapped) position ids on the default path, and a padded training step on
    the recomputed SDPA blocks, each against the fp32 eager reference."""
    lengths = (11, 20, 17)
    ids = torch.cat([torch.arange(n) + (40 if i == 1 else 0) * (torch.arange(n) >= 6) for i, n in enumerate(lengths)])
    ids = ids[None].to(device)
    tokens = x[:1, : sum(lengths)]
    try:
        reference = build(arch, scheme, device, torch.float32, attn_implementation="eager")
        with torch.no_grad():
            expected = reference(tokens, position_ids=ids, use_cache=False).logits
        for dtype in (torch.float32, torch.bfloat16):
            model = build(arch, scheme, device, dtype)
            paths.clear()
            with torch.no_grad():
                got = model(tokens, position_ids=ids, use_cache=False).logits
            record(arch, f"{scheme} packed {dtype}", paths=sorted(set(paths)), logits_rel=relative(got, expected))
        mask = torch.ones_like(x)
        mask[0, :5] = 0
        grads = []
        for implementation in ("posenc_sdpa", "eager"):
            model = build(arch, scheme, device, torch.float32, attn_implementation=implementation).train()
            model.config.use_cache = False
            labels = x.masked_fill(mask == 0, -100)
            labels[0, 5] = -100  # predicted from the last padding row
            model(x, attention_mask=mask, labels=labels).loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        worst = max(relative(grads[0][n], g) for n, g in grads[1].items() if n in grads[0])
        record(arch, f"{scheme} padded train posenc_sdpa", worst_grad_rel=worst)
    except Exception as error:
        record(arch, f"{scheme} positions", error=f"{type(error).__name__}: {error}"[:300])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="gpu_smoke.json")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated verified architectures")
    parser.add_argument("--train-dtypes", default="float32,bfloat16", help="dtypes of the training-step checks")
    args = parser.parse_args()
    train_dtypes = [getattr(torch, name) for name in args.train_dtypes.split(",")]
    device = args.device
    rows = []
    paths = []
    original = posenc_attention.choose_path

    def recording(*a, **k):
        paths.append(original(*a, **k))
        return paths[-1]

    posenc_attention.choose_path = recording

    def record(arch, check, **values):
        rows.append({"arch": arch, "check": check, **values})
        print(json.dumps(rows[-1]), flush=True)

    x = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1)).to(device)
    for arch in args.archs.split(","):
        native = hf_posenc.ARCHITECTURES[arch].native_posenc
        for dtype in (torch.float32, torch.bfloat16):
            try:
                stock, ours = build(arch, None, device, dtype), build(arch, native, device, dtype)
                with torch.no_grad():
                    diff = (stock(x).logits.float() - ours(x).logits.float()).abs().max().item()
                record(arch, f"identity {native} {dtype}", max_abs=diff)
            except Exception as error:  # report and go on: one architecture must not hide the others
                record(arch, f"identity {native} {dtype}", error=f"{type(error).__name__}: {error}"[:300])
        for scheme in ("alibi", "t5_bias"):
            if not archs.takes(arch, scheme):
                continue
            try:
                reference = build(arch, scheme, device, torch.float32, attn_implementation="eager").train()
                reference.config.use_cache = False
                out = reference(x)
                loss = out.logits.float().square().mean()
                loss.backward()
                ref_logits = out.logits.detach()
                ref_grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.grad is not None}
                for dtype in train_dtypes:
                    model = build(arch, scheme, device, dtype).train()
                    paths.clear()
                    started = time.perf_counter()
                    out = model(x)
                    out.logits.float().square().mean().backward()
                    torch.cuda.synchronize() if device == "cuda" else None
                    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                    worst = max(relative(grads[n], g) for n, g in ref_grads.items() if n in grads)
                    record(
                        arch,
                        f"{scheme} train {dtype}",
                        paths=sorted(set(paths)),
                        logits_rel=relative(out.logits.detach(), ref_logits),
                        worst_grad_rel=worst,
                        seconds=round(time.perf_counter() - started, 2),
                    )
            except Exception as error:
                record(arch, f"{scheme} train", error=f"{type(error).__name__}: {error}"[:300])
        if arch not in ("modernbert", "bert"):
            for scheme in ("alibi", "t5_bias"):
                if archs.takes(arch, scheme):
                    position_checks(arch, scheme, device, x, paths, record)
            try:
                model = build(arch, "alibi", device, torch.bfloat16)
                model.generation_config.eos_token_id = None
                model.generation_config.pad_token_id = 0
                paths.clear()
                out = model.generate(
                    x[:, :16], max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
                )
                with torch.no_grad():
                    full = model(out.sequences).logits[:, 15:-1]
                steps = torch.stack(out.logits, 1)
                record(
                    arch,
                    "alibi generate bf16",
                    paths=sorted(set(paths)),
                    logits_rel=relative(steps, full),
                    same_tokens=bool(torch.equal(steps.argmax(-1), full.argmax(-1))),
                )
            except Exception as error:
                record(arch, "alibi generate bf16", error=f"{type(error).__name__}: {error}"[:300])
        for scheme in ("nope", "sinusoidal", {"type": "rope", "rope_type": "yarn", "factor": 4.0}):
            try:
                model = build(arch, scheme, device, torch.bfloat16)
                with torch.no_grad():
                    finite = bool(torch.isfinite(model(x).logits).all())
                record(arch, f"{scheme if isinstance(scheme, str) else 'rope yarn'} bf16", finite=finite)
            except Exception as error:
                record(arch, f"{scheme} bf16", error=f"{type(error).__name__}: {error}"[:300])
        with open(args.out, "w") as handle:  # after every architecture: a run cut short still reports
            json.dump({"torch": torch.__version__, "rows": rows}, handle, indent=1)
    with open(args.out, "w") as handle:
        json.dump(
            {
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if device == "cuda" else device,
                "rows": rows,
            },
            handle,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
