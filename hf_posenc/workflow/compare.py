"""`hf-posenc compare`: which positional scheme should my model use? Train short, test long.

Small models of one architecture that differ only in their scheme train on the same data, from the same seed, for the
same steps at a training length L; each is then scored on the same held-out text at L, 2L, 4L, ... Length-scaling
variants are applied at evaluation time, without retraining: RoPE with PI (linear), NTK, dynamic NTK and YaRN at
factor N/L, and ALiBi with its slopes multiplied by L/N and by N/L.

Recalibration arms take a trained model, convert it to another scheme (`from_pretrained(..., posenc=...)` in
memory: the weights kept, a new scheme's own parameters initialised) and score it as converted and again after N
fine-tuning steps at the training length: RoPE to NoPE (DroPE), to ALiBi, to p-RoPE, to a per-layer NoPE mix, to
Position Interpolation (linear) and to YaRN (PI's finding: a short fine-tune recovers what the conversion loses).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__, archs
from ..auto import with_posenc
from ..modeling.posenc_schemes import LAYER_OPTIONS, SCHEMES, entry_scheme, normalize_posenc, softmax_attention_kind
from .data import HELD_OUT_FRACTION, byte_tokenizer, check_source, joined, tokens_of, train_and_test
from .evaluation import perplexity
from .plots import plot_compare
from .threads import torch_threads

logger = logging.getLogger(__name__)


#: the default schemes: every scheme, and RoPE with NoPE every 4th layer (SmolLM3, Llama 4) as a pattern. Set so
#: that each is fair at the default size (width 128, 4 heads, L = 64; measured, see the README): the sinusoidal table
#: at 1/sqrt(width) (at amplitude 1 it swamps token embeddings drawn at std 0.02); ALiBi's max_bias 2, so that the
#: weakest of 4 heads still biases distance L by 16 (at 8 its slope 2**-8 gives 0.25: that head is NoPE at L); T5's
#: max_distance = L, so that every bucket is trained at length L
DEFAULT_SCHEMES = (
    "learned",
    {"type": "sinusoidal", "scale": 128**-0.5},
    "rope",
    {"type": "alibi", "max_bias": 2.0},
    {"type": "t5_bias", "max_distance": 64},
    "kerple",
    "sandwich",
    "fire",
    "nope",
    {"type": "layers", "pattern": ["rope", "rope", "rope", "nope"]},
)
#: the default pattern, which fits itself to a model with fewer attention layers (`CompareConfig.nope_every_4th`)
DEFAULT_PATTERN = DEFAULT_SCHEMES[-1]
#: the default recalibration arms: a RoPE model converted and fine-tuned briefly (DroPE removes RoPE after training;
#: Position Interpolation (linear) and YaRN at the factor that reaches the longest default evaluation length, 16L)
DEFAULT_RECALIBRATION = (
    {"from": "rope", "to": "nope", "steps": 100},
    {"from": "rope", "to": "alibi", "steps": 100},
    {"from": "rope", "to": {"type": "rope", "rope_type": "proportional", "partial_rotary_factor": 0.25}, "steps": 100},
    {"from": "rope", "to": {"type": "layers", "pattern": ["rope", "rope", "rope", "nope"]}, "steps": 100},
    {"from": "rope", "to": {"type": "rope", "rope_type": "linear", "factor": 16.0}, "steps": 100},
    {"from": "rope", "to": {"type": "rope", "rope_type": "yarn", "factor": 16.0}, "steps": 100},
)
RECALIBRATION_KEYS = ("from", "to", "steps")


@dataclass
class CompareConfig:
    """Everything one comparison depends on (the defaults run on 2 CPU cores in under 15 minutes, no download)."""

    arch: str = "gpt2"
    schemes: list[str | dict] = field(
        default_factory=lambda: [dict(s) if isinstance(s, dict) else s for s in DEFAULT_SCHEMES]
    )
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
    #: the end of the text held out for evaluation (`hf-posenc eval` holds out the same part by default)
    held_out_fraction: float = HELD_OUT_FRACTION
    eval_tokens: int = 16384
    scaling_variants: bool = True
    extrapolation_tolerance: float = 1.1
    #: recalibration arms: {"from": a trained scheme, "to": the scheme to convert it to, "steps": fine-tuning steps};
    #: None: the default arms (`DEFAULT_RECALIBRATION`) whose `from` is among `schemes`; [] for none
    recalibrate: list[dict] | None = None
    recalibrate_learning_rate: float = 5e-4
    #: learning rate of the score biases' own parameters (`position_bias`: T5's table, KERPLE's, FIRE's) relative to
    #: `learning_rate`: a table of a few numbers per head, shared by every layer, moves about one learning rate per
    #: AdamW step, which at the default budget leaves T5's table too flat to act (README)
    bias_learning_rate_multiplier: float = 10.0
    #: passkey retrieval at every evaluation length: keys per length and depth (0: no passkey evaluation)
    passkey_samples: int = 5
    #: torch threads; None: as many as the cores the other processes leave free (`choose_threads`)
    threads: int | None = None
    seed: int = 0
    out: str = "runs/compare"

    def validate(self) -> None:
        if self.schemes and DEFAULT_PATTERN in self.schemes and self.arch in archs.decoders():
            self.schemes[self.schemes.index(DEFAULT_PATTERN)] = self.nope_every_4th()  # fitted to the model
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
        self._validate_recalibration()
        if self.passkey_samples < 0:
            raise ValueError(f"passkey_samples must be >= 0 (0: no passkey evaluation), got {self.passkey_samples}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null (as many as the free cores), got {self.threads}")
        for key in ("train_length", "steps", "batch_size", "layers", "hidden_size", "heads", "eval_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        check_source(self.data)
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
        self.check_specs()

    @functools.cached_property
    def stock(self):
        """The small stock config every scheme of this comparison is built on (computed once: checking the specs,
        fitting the defaults and the run all read it; nothing changes it)."""
        return tiny_config(self.arch, self.layers, self.hidden_size, self.heads, self.train_length)

    @functools.cached_property
    def recalibration_arms(self) -> list[dict]:
        """The arms to run: `recalibrate`, or by default those of `DEFAULT_RECALIBRATION` that start from a trained
        scheme and go to one the architecture takes (computed once, after `validate` fitted the default pattern)."""
        if self.recalibrate is not None:
            return self.recalibrate
        arms = []
        for arm in DEFAULT_RECALIBRATION:
            arm = copy.deepcopy(arm)
            if arm["to"] == DEFAULT_PATTERN:
                arm["to"] = self.nope_every_4th()
            if self.source_index(arm["from"]) is not None and self._builds(arm["to"]):
                arms.append(arm)  # the default arms the architecture takes (an explicit arm is checked strictly)
        return arms

    def _builds(self, spec) -> bool:
        """Whether this config's model takes `spec` (its site, and settings its config accepts: Phi-3 takes
        longrope only)."""
        if not archs.takes(self.arch, spec):
            return False
        try:
            with_posenc(self.stock, spec)
        except ValueError:
            return False
        return True

    def nope_every_4th(self) -> dict:
        """The default pattern (RoPE with NoPE every 4th layer) on this config's model: with fewer than 4 attention
        layers (a small or hybrid model), RoPE on all but the last."""
        layer_types = getattr(self.stock, "layer_types", None) or [None] * self.layers
        attention = sum(map(softmax_attention_kind, layer_types))
        return {"type": "layers", "pattern": ["rope"] * (min(attention, 4) - 1) + ["nope"]}

    def source_index(self, source) -> int | None:
        """The index in `schemes` of the scheme a recalibration arm starts from: the entry equal to `source`, else the
        one entry of its type (a name "rope" for {"type": "rope", "rope_theta": 500}); None if there is none or
        several."""
        if source in self.schemes:
            return self.schemes.index(source)
        name = source if isinstance(source, str) else source.get("type") if isinstance(source, dict) else None
        of_type = [i for i, s in enumerate(self.schemes) if (s if isinstance(s, str) else s.get("type")) == name]
        return of_type[0] if len(of_type) == 1 and isinstance(source, str) else None

    def _validate_recalibration(self) -> None:
        for index, arm in enumerate(self.recalibration_arms):
            where = f"recalibrate[{index}]"
            if not isinstance(arm, dict) or set(arm) != set(RECALIBRATION_KEYS):
                raise ValueError(f"{where} must be a dict with exactly the keys {RECALIBRATION_KEYS}, got {arm!r}")
            source = arm["from"]
            if self.source_index(source) is None:
                raise ValueError(
                    f"{where}: 'from' must be one of the trained schemes {self.schemes} (the same entry, or the name "
                    f"of the one scheme of that type), got {source!r}; train it too, or leave the arm out "
                    "(recalibrate: [] runs none)"
                )
            archs.check_scheme(self.arch, arm["to"])
            name = arm["to"] if isinstance(arm["to"], str) else arm["to"].get("type")
            if name not in SCHEMES:
                raise ValueError(f"{where}: unknown scheme {name!r} in 'to'; allowed: {', '.join(sorted(SCHEMES))}")
            if not isinstance(arm["steps"], int) or isinstance(arm["steps"], bool) or arm["steps"] < 0:
                raise ValueError(f"{where}: steps must be an int >= 0 (fine-tuning steps), got {arm['steps']!r}")
        if self.recalibrate_learning_rate <= 0:
            raise ValueError(f"recalibrate_learning_rate must be > 0, got {self.recalibrate_learning_rate}")
        if self.bias_learning_rate_multiplier <= 0:
            raise ValueError(f"bias_learning_rate_multiplier must be > 0, got {self.bias_learning_rate_multiplier}")

    def check_specs(self) -> None:
        """Every scheme and recalibration target against the model it will be built on, before any training: a
        pattern longer than the model or a refused setting fails now, naming it."""
        for where, spec in [("schemes", s) for s in self.schemes] + [
            (f"recalibrate[{i}].to", arm["to"]) for i, arm in enumerate(self.recalibration_arms)
        ]:
            try:
                with_posenc(self.stock, spec)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error

    @property
    def eval_lengths(self) -> list[int]:
        return [self.train_length * m for m in self.eval_multiples]


def tiny_config(
    arch: str,
    layers: int,
    hidden: int,
    heads: int,
    max_positions: int,
    vocab: int = 257,
    eos_token_id: int | None = 256,
):
    """A small stock config of `arch` whose native length is the training length (so scalings start from it), for
    the byte-level tokenizer by default (vocabulary 257, end of text 256)."""
    return archs.small_config(
        arch,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        intermediate=4 * hidden,
        positions=max_positions,
        vocab_size=vocab,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def label(spec: dict, config) -> str:
    """A short name for a normalised scheme: its type plus the parameters that differ from its defaults on `config`."""
    if spec["type"] == "layers":  # its entries, each with its window or temperature where it has one
        entries = []
        for entry in spec["pattern"]:
            options = "".join(f" {k}={v}" for k, v in entry.items() if k in LAYER_OPTIONS and v is not None)
            entries.append(label(entry_scheme(entry), config) + options)
        return f"layers [{', '.join(entries)}]"
    defaults = normalize_posenc(spec["type"], config)
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in spec.items() if defaults.get(k) != v}
    return spec["type"] + "".join(f" {k}={v}" for k, v in shown.items() if k != "type")


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
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if "position_bias" not in n]},
        {
            "params": [p for n, p in named if "position_bias" in n],
            "lr": config.learning_rate * config.bias_learning_rate_multiplier,
        },
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.01
    )

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


def evaluate_scheme(
    model, spec: dict, tokens: torch.Tensor, config: CompareConfig, label: str = "model"
) -> dict[str, dict]:
    """{variant: {length: ppl or None}} for the trained scheme and its evaluation-time scalings (a progress bar per
    length, named by `label`).

    None marks a learned table that ends before `length` (reported, never a failure)."""
    from transformers import AutoModelForCausalLM

    results = {"as trained": {}}
    for length in config.eval_lengths:
        if spec["type"] == "learned" and length > spec["num_positions"]:
            results["as trained"][length] = None
        else:
            results["as trained"][length] = perplexity(
                model, tokens, length, max_tokens=config.eval_tokens, progress=f"eval {label} @{length}"
            )["ppl"]
        if not config.scaling_variants:
            continue
        for name, variant in scaling_variants(spec, config.train_length, length).items():
            if length == config.train_length:  # factor 1: the trained model itself
                results.setdefault(name, {})[length] = results["as trained"][length]
                continue
            scaled = AutoModelForCausalLM.from_config(with_posenc(model.config, variant)).to(model.device)
            scaled.load_state_dict(model.state_dict())
            results.setdefault(name, {})[length] = perplexity(
                scaled, tokens, length, max_tokens=config.eval_tokens, progress=f"eval {label} + {name} @{length}"
            )["ppl"]
    return results


def run_compare(config: CompareConfig, device: str | None = None) -> dict:
    """Train and evaluate every scheme of `config`; returns the results that `write_outputs` turns into files."""

    config.validate()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch_threads(config.threads if device.type == "cpu" else torch.get_num_threads()):
        return _run_compare(config, device)


def _run_compare(config: CompareConfig, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    train_texts, held_out_texts = train_and_test(config.data, config.held_out_fraction)
    train_tokens, held_out = tokens_of(train_texts, tokenizer), tokens_of(held_out_texts, tokenizer)
    if len(held_out) < config.eval_tokens:
        raise ValueError(
            f"the held-out text has {len(held_out)} tokens, fewer than eval_tokens={config.eval_tokens}: "
            "use more data, a larger held_out_fraction or fewer eval_tokens"
        )
    stock = config.stock
    passkey = Passkey(config, tokenizer, joined(held_out_texts))
    results = {"config": dataclasses.asdict(config), "schemes": [], "environment": environment(device)}
    trained = {}  # the index of each trained scheme an arm starts from -> its config and weights
    sources = {config.source_index(arm["from"]) for arm in config.recalibration_arms}
    for index, scheme in enumerate(config.schemes):
        posenc_config = with_posenc(stock, scheme)
        spec, name = posenc_config.posenc, label(posenc_config.posenc, stock)
        torch.manual_seed(config.seed)  # the same initial weights wherever the schemes share parameters
        model = AutoModelForCausalLM.from_config(posenc_config).to(device)
        logger.info("training %s", name)
        stats = train(model, train_tokens, config, device, desc=f"train {name}")
        evaluation = evaluate_scheme(model, spec, held_out, config, name)
        _report(results, {"name": name, "posenc": spec, **stats, "eval": evaluation, **passkey(model, name)})
        if index in sources:
            trained[index] = (posenc_config, {k: v.detach().clone() for k, v in model.state_dict().items()})
        del model
    for arm in config.recalibration_arms:
        for row in recalibrate(arm, trained, stock, train_tokens, held_out, config, device, passkey):
            _report(results, row)
    return results


def _report(results: dict, row: dict) -> None:
    results["schemes"].append(row)
    logger.info(
        "%s",
        f"{row['name']:<24} loss {row['train_loss']:.3f}  "
        + "  ".join(
            f"ppl@{n} {'past table' if p is None else f'{p:.2f}'}" for n, p in row["eval"]["as trained"].items()
        ),
    )


def recalibrate(
    arm: dict, trained: dict, stock, train_tokens, held_out, config: CompareConfig, device, passkey=None
) -> list[dict]:
    """One recalibration arm: the trained `from` model converted to `to` (its weights kept, the new scheme's own
    parameters initialised as a conversion of a checkpoint initialises them), scored as converted, then fine-tuned
    `steps` steps at the training length (at `recalibrate_learning_rate`, on the training text) and scored again.
    Rows: "<from> -> <to> (0 steps)" and "(<steps> steps)"."""
    from transformers import AutoModelForCausalLM

    posenc_config, state = trained[config.source_index(arm["from"])]
    target = with_posenc(posenc_config, arm["to"])
    name = f"{label(posenc_config.posenc, stock)} -> {label(target.posenc, stock)}"
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(target).to(device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    logger.info(
        "%s: kept %d tensors, initialised %s, dropped %s", name, len(state) - len(unexpected), missing, unexpected
    )
    quiet = dataclasses.replace(config, scaling_variants=False)
    rows = []
    tune = dataclasses.replace(
        config,
        steps=arm["steps"],
        learning_rate=config.recalibrate_learning_rate,
        warmup_steps=min(10, arm["steps"]),
        seed=config.seed + 1,  # other windows of the training text than the training drew
    )
    for steps in sorted({0, arm["steps"]}):
        stats = {"train_loss": float("nan"), "tokens_per_s": float("nan"), "peak_memory_mib": float("nan")}
        if steps:
            stats = train(model, train_tokens, tune, device, desc=f"recalibrate {name}")
        stats["params"] = sum(p.numel() for p in model.parameters())
        row_name = f"{name} ({steps} steps)"
        evaluation = evaluate_scheme(model, target.posenc, held_out, quiet, row_name)
        row = {"name": row_name, "posenc": target.posenc, "recalibration": arm, **stats, "eval": evaluation}
        rows.append(row | (passkey(model, row_name) if passkey is not None else {}))
    return rows


class Passkey:
    """Passkey retrieval of a trained model at every evaluation length (`passkey.passkey_accuracy`), the filler cut
    from the held-out text and the keys from the seed: every scheme answers the same prompts."""

    def __init__(self, config: CompareConfig, tokenizer, filler: str):
        self.config, self.tokenizer, self.filler = config, tokenizer, filler

    def __call__(self, model, name: str) -> dict:
        """{"passkey": results} ({} when passkey_samples is 0)."""
        from .passkey import passkey_accuracy

        if not self.config.passkey_samples:
            return {}
        results = passkey_accuracy(
            model,
            self.tokenizer,
            self.filler,
            self.config.eval_lengths,
            samples=self.config.passkey_samples,
            seed=self.config.seed,
            progress=True,
        )
        return {"passkey": results}


def environment(device: torch.device) -> dict:
    import transformers

    return {
        "hf_posenc": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads of {os.cpu_count()} cores)",
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
    return "\n".join(rows) + "\n" + passkey_table(results)


def passkey_table(results: dict) -> str:
    """Passkey retrieval accuracy by scheme and length (all depths together), or "" without passkey results."""
    named = {row["name"]: row["passkey"] for row in results["schemes"] if "passkey" in row}
    if not named:
        return ""
    first = next(iter(named.values()))
    lengths = list(first["lengths"])
    header = ["scheme"] + [f"passkey@{n}" for n in lengths]
    rows = [
        f"\nPasskey retrieval: keys retrieved whole, and in brackets the fraction of key tokens predicted, over "
        f"{first['samples']} keys of {first['digits']} digits at each of the depths "
        f"{', '.join(f'{d:g}' for d in first['depths'])} (n/a: the length cannot hold the prompt, or past the "
        "model's table)\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, passkey in named.items():
        cells = [name]
        for n in lengths:
            result = passkey["lengths"].get(n, passkey["lengths"].get(str(n), {}))
            cells.append(
                f"{result['accuracy']:.2f} ({result['token_accuracy']:.2f})" if "accuracy" in result else "n/a"
            )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_outputs(results: dict, out: str | Path) -> dict[str, Path]:
    """results.json (raw), results.md (the table) and ppl_vs_length.png under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "table": out / "results.md", "plot": out / "ppl_vs_length.png"}
    serialisable = json.loads(json.dumps(results, default=str))
    paths["json"].write_text(json.dumps(serialisable, indent=2) + "\n")
    paths["table"].write_text(markdown_table(results))
    plot_compare(results, paths["plot"])
    named = {row["name"]: row["passkey"] for row in results["schemes"] if "passkey" in row}
    if named:
        from .passkey import plot_by_scheme

        paths["passkey_plot"] = out / "passkey_vs_length.png"
        plot_by_scheme(named, paths["passkey_plot"])
    return paths
