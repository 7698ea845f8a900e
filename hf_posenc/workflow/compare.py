"""`hf-posenc compare`: which positional scheme should my model use? Train short, test long.

Small models of one architecture that differ only in their scheme train on the same data, from the same seed, for the
same steps at a training length L; each is then scored on the same held-out text at L, 2L, 4L, ... Length-scaling
variants are applied at evaluation time, without retraining: RoPE with PI (linear), NTK, dynamic NTK and YaRN at
factor N/L, and ALiBi with its slopes multiplied by L/N and by N/L.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__, archs
from ..auto import with_posenc
from ..modeling.posenc_schemes import SCHEMES, normalize_posenc
from .data import ByteTokenizer, read_text, train_validation_split
from .evaluation import perplexity

logger = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    """Everything one comparison depends on (the defaults run on 2 CPU cores in under 15 minutes, no download)."""

    arch: str = "gpt2"
    schemes: list[str | dict] = field(default_factory=lambda: ["learned", "sinusoidal", "rope", "alibi", "t5_bias"])
    train_length: int = 64
    eval_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    layers: int = 4
    hidden_size: int = 128
    heads: int = 4
    data: str | None = None
    validation_fraction: float = 0.05
    eval_tokens: int = 16384
    scaling_variants: bool = True
    extrapolation_tolerance: float = 1.1
    seed: int = 0
    out: str = "runs/compare"

    def validate(self) -> None:
        if self.arch not in archs.decoders():
            raise ValueError(
                f"compare trains causal LMs: arch must be a verified decoder, one of {', '.join(archs.decoders())}; "
                f"got {self.arch!r}"
            )
        if not self.schemes:
            raise ValueError("schemes must name at least one scheme")
        for scheme in self.schemes:
            name = scheme if isinstance(scheme, str) else scheme.get("type")
            if name not in SCHEMES:
                raise ValueError(f"schemes: unknown scheme {name!r}; allowed: {', '.join(sorted(SCHEMES))}")
            archs.check_scheme(self.arch, scheme)  # before any training: a refused site names its reason now
        for key in ("train_length", "steps", "batch_size", "layers", "hidden_size", "heads", "eval_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.train_length < 2:
            raise ValueError(f"train_length must be >= 2, got {self.train_length}")
        if (
            not self.eval_multiples
            or sorted(set(self.eval_multiples)) != self.eval_multiples
            or self.eval_multiples[0] < 1
        ):
            raise ValueError(f"eval_multiples must be increasing integers >= 1, got {self.eval_multiples}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of heads {self.heads}")
        if self.eval_tokens < self.train_length * self.eval_multiples[-1]:
            raise ValueError(
                f"eval_tokens ({self.eval_tokens}) must hold one window of the longest length "
                f"({self.train_length * self.eval_multiples[-1]})"
            )

    @property
    def eval_lengths(self) -> list[int]:
        return [self.train_length * m for m in self.eval_multiples]


def tiny_config(arch: str, layers: int, hidden: int, heads: int, max_positions: int, vocab: int = 256):
    """A small stock config of `arch` whose native length is the training length (so scalings start from it)."""
    return archs.small_config(
        arch,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        intermediate=4 * hidden,
        positions=max_positions,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=0,
    )


def label(spec: dict, config) -> str:
    """A short name for a normalised scheme: its type plus the parameters that differ from its defaults on `config`."""
    defaults = normalize_posenc(spec["type"], config)
    return spec["type"] + "".join(f" {k}={v}" for k, v in spec.items() if k != "type" and defaults.get(k) != v)


class PeakMemory:
    """Peak memory of the block: the CUDA allocator's peak above its start on a GPU. On CPU (Linux), the growth of
    the process's peak resident set: freed memory is first handed back (malloc_trim) and the kernel's high-water mark
    reset (/proc/self/clear_refs), so each block is measured on its own; elsewhere it is reported as NaN."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/clear_refs").exists():
            gc.collect()
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif Path("/proc/self/clear_refs").exists():
            self.peak_bytes = _proc_status_bytes("VmHWM") - self.base
        return False


def _proc_status_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def train(model, tokens: torch.Tensor, config: CompareConfig, device: torch.device, desc: str) -> dict:
    """AdamW with linear warm-up and cosine decay on random windows of `tokens`; the batches depend only on the seed,
    so every scheme sees the same data."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_factor(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    length, losses, timed_tokens, timed_seconds = config.train_length, [], 0, 0.0
    model.train()
    with PeakMemory(device) as memory:
        for step in tqdm(range(config.steps), desc=desc, leave=False):
            starts = torch.randint(0, len(tokens) - length, (config.batch_size,), generator=generator)
            batch = torch.stack([tokens[s : s + length] for s in starts.tolist()]).to(device)
            began = time.perf_counter()
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= min(5, config.steps - 1):  # the first steps warm up allocators and kernels
                timed_seconds += time.perf_counter() - began
                timed_tokens += batch.numel()
            losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_loss": sum(tail) / len(tail),
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else float("nan"),
        "peak_memory_mib": memory.peak_bytes / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
    }


def scaling_variants(spec: dict, train_length: int, length: int) -> dict[str, dict]:
    """Schemes that evaluate a model trained at `train_length` at `length` without retraining, by variant name."""
    factor = length / train_length
    if spec["type"] == "rope" and spec["rope_type"] == "default":
        base = {
            "type": "rope",
            "rope_theta": spec["rope_theta"],
            "partial_rotary_factor": spec["partial_rotary_factor"],
        }
        return {
            "PI (linear)": base | {"rope_type": "linear", "factor": factor},
            "NTK": base | {"rope_type": "ntk", "factor": factor},
            "dynamic NTK": base | {"rope_type": "dynamic", "factor": 1.0},
            "YaRN": base | {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": train_length},
        }
    if spec["type"] == "alibi":
        return {
            "slopes x L/N": spec | {"slope_multiplier": spec["slope_multiplier"] / factor},
            "slopes x N/L": spec | {"slope_multiplier": spec["slope_multiplier"] * factor},
        }
    return {}


def evaluate_scheme(model, spec: dict, tokens: torch.Tensor, config: CompareConfig) -> dict[str, dict]:
    """{variant: {length: ppl or None}} for the trained scheme and its evaluation-time scalings.

    None marks a learned table that ends before `length` (reported, never a failure)."""
    from transformers import AutoModelForCausalLM

    results = {"as trained": {}}
    for length in config.eval_lengths:
        if spec["type"] == "learned" and length > spec["num_positions"]:
            results["as trained"][length] = None
        else:
            results["as trained"][length] = perplexity(model, tokens, length, max_tokens=config.eval_tokens)["ppl"]
        if not config.scaling_variants:
            continue
        for name, variant in scaling_variants(spec, config.train_length, length).items():
            if length == config.train_length:  # factor 1: the trained model itself
                results.setdefault(name, {})[length] = results["as trained"][length]
                continue
            scaled = AutoModelForCausalLM.from_config(with_posenc(model.config, variant)).to(model.device)
            scaled.load_state_dict(model.state_dict())
            results.setdefault(name, {})[length] = perplexity(scaled, tokens, length, max_tokens=config.eval_tokens)[
                "ppl"
            ]
    return results


def run_compare(config: CompareConfig, device: str | None = None) -> dict:
    """Train and evaluate every scheme of `config`; returns the results that `write_outputs` turns into files."""
    from transformers import AutoModelForCausalLM

    config.validate()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = ByteTokenizer().encode(read_text(config.data))
    train_tokens, held_out = train_validation_split(tokens, config.validation_fraction)
    if len(held_out) < config.eval_tokens:
        raise ValueError(
            f"the held-out text has {len(held_out)} tokens, fewer than eval_tokens={config.eval_tokens}: "
            "use more data, a larger validation_fraction or fewer eval_tokens"
        )
    stock = tiny_config(config.arch, config.layers, config.hidden_size, config.heads, config.train_length)
    results = {"config": dataclasses.asdict(config), "schemes": [], "environment": environment(device)}
    for scheme in config.schemes:
        posenc_config = with_posenc(stock, scheme)
        spec, name = posenc_config.posenc, label(posenc_config.posenc, stock)
        torch.manual_seed(config.seed)  # the same initial weights wherever the schemes share parameters
        model = AutoModelForCausalLM.from_config(posenc_config).to(device)
        logger.info("training %s", name)
        stats = train(model, train_tokens, config, device, desc=f"train {name}")
        evaluation = evaluate_scheme(model, spec, held_out, config)
        results["schemes"].append({"name": name, "posenc": spec, **stats, "eval": evaluation})
        tqdm.write(
            f"{name:<24} loss {stats['train_loss']:.3f}  "
            + "  ".join(
                f"ppl@{n} {'past table' if p is None else f'{p:.2f}'}" for n, p in evaluation["as trained"].items()
            )
        )
    return results


def environment(device: torch.device) -> dict:
    import transformers

    return {
        "hf_posenc": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
    }


def extrapolates(ppl_by_length: dict, tolerance: float) -> str:
    lengths = sorted(ppl_by_length)
    first, last = ppl_by_length[lengths[0]], ppl_by_length[lengths[-1]]
    if last is None:
        return "no (table ends)"
    return "yes" if last <= tolerance * first else "no"


def markdown_table(results: dict) -> str:
    config = results["config"]
    lengths = [config["train_length"] * m for m in config["eval_multiples"]]
    header = ["scheme", "eval-time scaling", "params", "train tok/s", "peak MiB"] + [f"ppl@{n}" for n in lengths]
    header.append(f"extrapolates (ppl@{lengths[-1]} <= {config['extrapolation_tolerance']}x ppl@{lengths[0]})")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scheme in results["schemes"]:
        for variant, ppl in scheme["eval"].items():
            trained = variant == "as trained"
            cells = [scheme["name"] if trained else "", "-" if trained else variant]
            if trained:
                cells += [f"{scheme['params']:,}", f"{scheme['tokens_per_s']:,.0f}", f"{scheme['peak_memory_mib']:.0f}"]
            else:
                cells += ["", "", ""]
            cells += ["past table" if ppl[n] is None else f"{ppl[n]:.2f}" for n in lengths]
            cells.append(extrapolates(ppl, config["extrapolation_tolerance"]))
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity against evaluation length, one line per scheme and scaling (log-log). The y axis stops at 8x the
    worst perplexity at the training length; points beyond it are drawn on the top edge with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    figure, axes = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab20").colors
    at_train = [v[config["train_length"]] for s in results["schemes"] for v in s["eval"].values()]
    top = 8 * max(p for p in at_train if p is not None)
    lines = [(s, variant, ppl) for s in results["schemes"] for variant, ppl in s["eval"].items()]
    for index, (scheme, variant, ppl) in enumerate(lines):
        points = [(int(n), p) for n, p in ppl.items() if p is not None]
        name = scheme["name"] if variant == "as trained" else f"{scheme['name']} + {variant}"
        lengths, values = zip(*points)
        style = "-" if variant == "as trained" else "--"
        clipped = [min(v, top) for v in values]
        axes.plot(lengths, clipped, marker="o", linestyle=style, color=colours[index % 20], label=name)
        for n, v in points:
            if v > top:
                axes.annotate(
                    f"{v:.3g}",
                    (n, top),
                    textcoords="offset points",
                    xytext=(0, -12),
                    ha="center",
                    fontsize=7,
                    color=colours[index % 20],
                )
    axes.axvline(config["train_length"], color="grey", linewidth=0.8, linestyle=":")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_ylim(top=top * 1.05)
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(f"{config['arch']}, trained at length {config['train_length']} ({config['steps']} steps)")
    axes.legend(fontsize=7, ncol=2, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(results: dict, out: str | Path) -> dict[str, Path]:
    """results.json (raw), results.md (the table) and ppl_vs_length.png under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "results.md", "plot": out / "ppl_vs_length.png"}
    serialisable = json.loads(json.dumps(results, default=str))
    paths["json"].write_text(json.dumps(serialisable, indent=2) + "\n")
    paths["table"].write_text(markdown_table(results))
    plot(results, paths["plot"])
    return paths
