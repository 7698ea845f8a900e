"""`hf-posenc train`: pre-train or fine-tune a posenc causal LM with transformers' Trainer (accelerate underneath).

The command line is `HfArgumentParser` over three dataclasses: `PosencArguments` (the model and its scheme),
`DataArguments` (the text, the block length, packing) and transformers' own `TrainingArguments`, so every Trainer
option (evaluation, resuming, bf16, gradient accumulation and checkpointing, logging integrations) works from a YAML
file (`--config`) and from the command line (`--max_steps 100` or `max_steps=100`), the command line winning.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .. import archs
from .data import AUTO, BYTES, HELD_OUT_FRACTION, STDLIB, check_source, has_tokenizer, recorded_source
from .push import TRAINING_RECORD

logger = logging.getLogger(__name__)

#: the Trainer defaults of `hf-posenc train` (a small model from scratch on 2 CPU cores); any of them, and every other
#: TrainingArguments field, can be set in the YAML file or on the command line
TRAINING_DEFAULTS = {
    "output_dir": "runs/train",
    "max_steps": 200,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}
#: short names the other commands use too (`compare` has `steps` and `batch_size`)
ALIASES = {"steps": "max_steps", "batch_size": "per_device_train_batch_size"}


@dataclass
class PosencArguments:
    """The model: a new small one of `arch`, or `checkpoint` converted to `posenc`."""

    posenc: str = field(
        default="alibi",
        metadata={"help": "the scheme: a name (`hf-posenc schemes`) or a mapping, e.g. '{type: alibi, max_bias: 4}'"},
    )
    arch: str = field(default="gpt2", metadata={"help": "a verified decoder to build from scratch (no checkpoint)"})
    checkpoint: str | None = field(
        default=None, metadata={"help": "a causal LM folder (or Hub name) to convert to posenc and fine-tune"}
    )
    layers: int = field(default=4, metadata={"help": "layers of a new model"})
    hidden_size: int = field(default=128, metadata={"help": "width of a new model"})
    heads: int = field(default=4, metadata={"help": "attention heads of a new model"})
    threads: int | None = field(
        default=None,
        metadata={"help": "torch threads on the CPU (default: the cores other processes leave free)"},
    )
    tokenizer: str = field(
        default=AUTO,
        metadata={
            "help": "'auto': the checkpoint's own tokenizer, else bytes; 'bytes': the byte-level tokenizer (no "
            "download); or a tokenizer path/name"
        },
    )

    def __post_init__(self):
        if isinstance(self.posenc, str) and self.posenc.lstrip().startswith("{"):  # a mapping on the command line
            try:
                self.posenc = json.loads(self.posenc)  # JSON first: YAML reads 1e-05 as a string
            except json.JSONDecodeError:
                self.posenc = yaml.safe_load(self.posenc)


@dataclass
class DataArguments:
    """The text and how it is cut into training examples."""

    data: str = field(
        default=STDLIB,
        metadata={"help": "'stdlib' (no download), a text file, a folder of .txt files or a datasets name"},
    )
    seq_length: int = field(default=128, metadata={"help": "tokens per training block"})
    held_out_fraction: float = field(
        default=HELD_OUT_FRACTION,
        metadata={"help": "the end of local text held out for evaluation (never trained on)"},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "padding-free packing: blocks never cross a document, a batch is one row with position_ids "
            "restarting per block (transformers' DataCollatorWithFlattening)"
        },
    )
    max_eval_blocks: int = field(
        default=64, metadata={"help": "held-out blocks scored after training and at each evaluation (0: all)"}
    )


def _parser():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        (PosencArguments, DataArguments, TrainingArguments),
        prog="hf-posenc train",
        description="Pre-train or fine-tune a posenc causal LM with transformers' Trainer. Every field below can be "
        "set in the --config YAML file and on the command line (--name value or name=value); the command line wins.",
    )
    parser.add_argument("--config", help="YAML file of any fields below (see configs/train_*.yaml)")

    def error(message: str):  # argparse's own message (the field and what it takes), without the usage block
        raise ValueError(message)

    parser.error = error
    import torch

    # without a GPU: CPU (processes that accelerate launches then train data-parallel over gloo), no pinned memory
    gpu = torch.cuda.is_available()
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not gpu, dataloader_pin_memory=gpu)
    return parser


def _field_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for cls in (PosencArguments, DataArguments, TrainingArguments) for f in fields(cls) if f.init}


def _flags(argv: list[str], actions: dict) -> list[str]:
    """`name=value` items as `--name=value`, unless they are the value of the flag before them (`--run_name a=b`;
    a flag whose value is optional, `--packing`, takes none that names a field); `--alias[=value]` as the field's
    flag (`steps` is `max_steps`); everything else as it is."""
    out = []
    for index, item in enumerate(argv):
        if item.startswith("--"):
            flag, sep, value = item[2:].partition("=")
            out.append(f"--{ALIASES.get(flag.replace('-', '_'), flag)}{sep}{value}")
            continue
        name, sep, value = item.partition("=")
        field_name = ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
        before = argv[index - 1] if index else ""
        before_action = actions.get(ALIASES.get(before[2:], before[2:])) if before.startswith("--") else None
        takes_value = before.startswith("--") and "=" not in before
        optional = before_action is not None and before_action.nargs == "?"
        if takes_value and optional and field_name in actions:
            takes_value = False  # `--packing max_steps=5`: the flag stands alone
        if sep and name and not takes_value:
            out.append(f"--{field_name}={value}")
        else:
            out.append(item)
    return out


def _as_arguments(values: dict[str, Any], actions: dict) -> tuple[list[str], dict[str, Any]]:
    """A mapping of fields (as a YAML file gives them) as command-line arguments, so that argparse checks and converts
    every value as it does the command line's; and the values argparse cannot take as text (None, the posenc
    mapping, a list or a bool for a field that reads one string), which become defaults as they are."""
    out, defaults = [], {}
    for key, value in values.items():
        action = actions.get(key)
        takes_list = action is not None and action.nargs in ("+", "*")
        takes_bool = action is not None and getattr(action.type, "__name__", "") == "string_to_bool"
        if value is None or key == "posenc" or action is None:
            defaults[key] = value
        elif isinstance(value, list):
            if takes_list and all(not isinstance(v, (dict, list)) for v in value):
                out += [f"--{key}", *map(str, value)]
            else:
                defaults[key] = value
        elif isinstance(value, bool) and not takes_bool:
            defaults[key] = value
        else:
            out.append(f"--{key}={json.dumps(value) if isinstance(value, dict) else value}")
    return out, defaults


def parse_train_arguments(argv: list[str] | None = None, values: dict[str, Any] | None = None):
    """(PosencArguments, DataArguments, TrainingArguments) from `argv` (with an optional `--config` YAML file) and
    `values` (the fields as a mapping, as a YAML file gives them: the programmatic form). The command line wins over
    `values`, which win over the file. Unknown names, bad types and a missing file raise ValueError naming them."""
    parser = _parser()
    known = _field_names()
    actions = {action.dest: action for action in parser._actions}
    argv = _flags(list(argv or []), actions)
    config_path = None
    for at, item in enumerate(argv):
        if item == "--config" or item.startswith("--config="):
            config_path = item.partition("=")[2] if "=" in item else (argv[at + 1] if at + 1 < len(argv) else None)
            if not config_path:
                raise ValueError("--config needs a YAML file")
            del argv[at : at + (1 if "=" in item else 2)]
            break
    loaded = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"--config: no such file {config_path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: a run config is a mapping of fields to values")
    loaded = {ALIASES.get(key, key): value for key, value in (loaded | dict(values or {})).items()}
    flags = {item[2:].partition("=")[0].replace("-", "_") for item in argv if item.startswith("--")}
    unknown = sorted((set(loaded) | {f for f in flags if f.removeprefix("no_") not in known}) - known)
    if unknown:
        hint = "; `hf-posenc train --help` lists every field (PosencArguments, DataArguments, TrainingArguments)"
        raise ValueError(f"{config_path or 'train'}: unknown field(s) {unknown}{hint}")
    from_values, defaults = _as_arguments(loaded, actions)
    parser.set_defaults(**defaults)
    try:
        posenc_args, data_args, training_args, *_ = parser.parse_args_into_dataclasses(args=from_values + argv)
    except TypeError as error:  # a value argparse passed on that the dataclass refuses
        raise ValueError(f"invalid arguments: {error}") from error
    validate(posenc_args, data_args)
    return posenc_args, data_args, training_args


def validate(posenc_args: PosencArguments, data_args: DataArguments) -> None:
    """Every check that needs no data and no weights: the scheme against the model it will be built on, the data
    source, the sizes. Runs before any work, so a typo fails in a second, naming the field."""
    from ..auto import with_posenc

    for key in ("layers", "hidden_size", "heads", "seq_length"):
        owner = posenc_args if hasattr(posenc_args, key) else data_args
        if getattr(owner, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(owner, key)}")
    if posenc_args.threads is not None and posenc_args.threads < 1:
        raise ValueError(f"threads must be >= 1 or unset (the free cores), got {posenc_args.threads}")
    if data_args.max_eval_blocks < 0:
        raise ValueError(f"max_eval_blocks must be >= 0 (0: all), got {data_args.max_eval_blocks}")
    if not 0 < data_args.held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {data_args.held_out_fraction}")
    check_source(data_args.data)
    if posenc_args.checkpoint is None:
        if posenc_args.arch not in archs.decoders():
            raise ValueError(
                f"arch must be a verified decoder, one of {', '.join(archs.decoders())}; got {posenc_args.arch!r}"
            )
        stock = _stock_config(posenc_args, data_args, vocab_size=257)
    else:
        from transformers import AutoConfig

        try:
            stock = AutoConfig.from_pretrained(posenc_args.checkpoint)
        except (OSError, ValueError) as error:
            raise ValueError(f"checkpoint: cannot load the config of {posenc_args.checkpoint}: {error}") from error
        archs.check_scheme(stock.model_type, posenc_args.posenc)
    try:
        with_posenc(stock, posenc_args.posenc)
    except (ValueError, TypeError) as error:
        raise ValueError(f"posenc: {error}") from error


def _stock_config(posenc_args: PosencArguments, data_args: DataArguments, vocab_size: int, eos: int | None = None):
    from .compare import tiny_config

    if posenc_args.hidden_size % posenc_args.heads:
        raise ValueError(f"hidden_size {posenc_args.hidden_size} must be a multiple of heads {posenc_args.heads}")
    return tiny_config(
        posenc_args.arch,
        posenc_args.layers,
        posenc_args.hidden_size,
        posenc_args.heads,
        data_args.seq_length,
        vocab_size,
        eos_token_id=eos,
    )


def training_tokenizer(posenc_args: PosencArguments):
    """The tokenizer the model trains with: `tokenizer` as given; by default ("auto") a checkpoint's own, and the
    byte-level one for a new model. A checkpoint without tokenizer files must name one; a tokenizer with more ids
    than the checkpoint embeds is refused (before any data is read)."""
    from .data import load_tokenizer

    checkpoint = posenc_args.checkpoint
    if checkpoint is None:
        return load_tokenizer(BYTES if posenc_args.tokenizer == AUTO else posenc_args.tokenizer)
    if posenc_args.tokenizer == AUTO and Path(checkpoint).exists() and not has_tokenizer(checkpoint):
        raise ValueError(
            f"tokenizer: {checkpoint} has no tokenizer files; name the one it was trained with (tokenizer=PATH, or "
            "tokenizer=bytes for hf_posenc's byte-level one)"
        )
    if posenc_args.tokenizer == BYTES and _has_own_tokenizer(checkpoint):
        logger.warning(
            "tokenizer=bytes: %s has its own tokenizer, and training feeds it byte ids instead (as asked); leave "
            "tokenizer unset ('auto') to train it with its own",
            checkpoint,
        )
    from transformers import AutoConfig

    vocab_size = getattr(AutoConfig.from_pretrained(checkpoint).get_text_config(), "vocab_size", None)
    return load_tokenizer(posenc_args.tokenizer, checkpoint, vocab_size=vocab_size)


def _has_own_tokenizer(checkpoint: str) -> bool:
    if Path(checkpoint).exists():
        return has_tokenizer(checkpoint)
    return True  # a Hub name: its repository has a tokenizer, or AutoTokenizer says it lacks one


def build_model(posenc_args: PosencArguments, data_args: DataArguments, tokenizer, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if posenc_args.checkpoint is not None:
        model = AutoModelForCausalLM.from_pretrained(posenc_args.checkpoint, posenc=posenc_args.posenc)
    else:
        stock = _stock_config(posenc_args, data_args, len(tokenizer), tokenizer.eos_token_id)
        stock.pad_token_id = tokenizer.pad_token_id  # as Trainer would align it, without its warning
        model = AutoModelForCausalLM.from_config(stock, posenc=posenc_args.posenc)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} ids but the model only {model.config.vocab_size}: train it with its "
            "own tokenizer (tokenizer=auto)"
        )
    return model


def datasets_for(data_args: DataArguments, tokenizer, main_process_first):
    """(training blocks, held-out blocks, the held-out text's sha256): grouped blocks of `seq_length` (document
    blocks when packing); the held-out ones are always grouped, at most `max_eval_blocks`."""
    from .data import document_blocks, group_into_blocks, text_digest, tokenize_documents, train_and_test

    with main_process_first(desc="reading and tokenizing the data"):
        train_documents, held_out = train_and_test(data_args.data, data_args.held_out_fraction)
        train_text, test_text = tokenize_documents(train_documents, tokenizer), tokenize_documents(held_out, tokenizer)
        cut = document_blocks if data_args.packing else group_into_blocks
        train_set = cut(train_text, data_args.seq_length)
        eval_set = group_into_blocks(test_text, data_args.seq_length)
    if len(train_set) == 0:
        raise ValueError(f"the training text holds fewer tokens than one block of {data_args.seq_length}")
    if data_args.max_eval_blocks and len(eval_set) > data_args.max_eval_blocks:
        eval_set = eval_set.select(range(data_args.max_eval_blocks))
    return train_set, (eval_set if len(eval_set) else None), text_digest(held_out)


def run_train(posenc_args: PosencArguments, data_args: DataArguments, training_args) -> dict:
    """Train and save the final model with its tokenizer (a loadable posenc model) under `output_dir/final`.

    Returns {"final": folder, "world_size": processes that trained, "main_process": whether this one is the first,
    "train_loss": mean training loss, "eval_loss" and "eval_perplexity" on the held-out blocks (None without
    held-out text)}."""
    import torch

    from .threads import torch_threads

    validate(posenc_args, data_args)
    threads = posenc_args.threads if training_args.device.type == "cpu" else torch.get_num_threads()
    with torch_threads(threads):
        return _run_train(posenc_args, data_args, training_args)


def _run_train(posenc_args: PosencArguments, data_args: DataArguments, training_args) -> dict:
    from transformers import DataCollatorWithFlattening, Trainer, default_data_collator

    from .push import weights_digest

    tokenizer = training_tokenizer(posenc_args)
    train_set, eval_set, held_out_digest = datasets_for(data_args, tokenizer, training_args.main_process_first)
    model = build_model(posenc_args, data_args, tokenizer, training_args.seed)
    if data_args.packing:
        # transformers reads packed position_ids (and masks each block off from the others) only without a cache
        model.config.use_cache = False
        collator = DataCollatorWithFlattening()
    else:
        collator = default_data_collator
    if eval_set is None and training_args.eval_strategy != "no":
        raise ValueError(f"eval_strategy={training_args.eval_strategy} but the held-out text has no full block")
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=collator,
    )
    resume = training_args.resume_from_checkpoint
    outcome = trainer.train(resume_from_checkpoint=_resume_value(resume))
    metrics = trainer.evaluate() if eval_set is not None else {}
    eval_loss = metrics.get("eval_loss")
    final = Path(training_args.output_dir) / "final"
    if data_args.packing:
        model.config.use_cache = True  # the saved model generates with a cache
    trainer.save_model(str(final))  # the tokenizer too (processing_class)
    if trainer.is_world_process_zero():  # what the model card and `hf-posenc eval` need to know of the training
        if not (final / "config.json").exists():
            raise ValueError(
                f"no model was saved in {final}: a sharded state dict (FSDP's fsdp_state_dict_type "
                "SHARDED_STATE_DICT) writes no folder through Trainer.save_model; use FULL_STATE_DICT"
            )
        record = {
            "data": recorded_source(data_args.data),
            "held_out_fraction": data_args.held_out_fraction,
            "held_out_sha256": held_out_digest,
            "seq_length": data_args.seq_length,
            "steps": trainer.state.global_step,
            "posenc": posenc_args.posenc,
            "checkpoint": recorded_source(posenc_args.checkpoint),
            "tokenizer": _tokenizer_name(posenc_args),
            "packing": data_args.packing,
            "eval_loss": eval_loss,
            "weights_sha256": weights_digest(final),
        }
        (final / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("trained on %d process(es); final model in %s", training_args.world_size, final)
    return {
        "final": final,
        "world_size": training_args.world_size,
        "main_process": trainer.is_world_process_zero(),
        "train_loss": outcome.training_loss,
        "eval_loss": eval_loss,
        "eval_perplexity": None if eval_loss is None else math.exp(eval_loss),
    }


def _tokenizer_name(posenc_args: PosencArguments) -> str:
    """What the model trained with: "bytes", the checkpoint's own (its path or name) or the tokenizer named."""
    if posenc_args.tokenizer != AUTO:
        return recorded_source(posenc_args.tokenizer)
    return BYTES if posenc_args.checkpoint is None else recorded_source(posenc_args.checkpoint)


def _resume_value(resume: str | None):
    """TrainingArguments keeps `resume_from_checkpoint` as a string: "true" resumes from the newest checkpoint of
    output_dir, a path from that checkpoint."""
    if resume is None or resume.lower() in ("false", "no", ""):
        return None
    return True if resume.lower() in ("true", "yes", "1") else resume


def main(argv: list[str]) -> int:
    """`hf-posenc train ARGS`: errors name the field and exit 2."""
    if any(item in ("-h", "--help") for item in argv):
        _parser().print_help()
        return 0
    try:
        arguments = parse_train_arguments(argv)
        result = run_train(*arguments)
    except (ValueError, TypeError) as error:
        print(f"hf-posenc train: {error}", file=sys.stderr)
        return 2
    if not result["main_process"]:
        return 0
    held_out = (
        "no held-out text"
        if result["eval_loss"] is None
        else f"held-out loss {result['eval_loss']:.3f} (perplexity {result['eval_perplexity']:.2f})"
    )
    print(
        f"trained on {result['world_size']} process(es), mean loss {result['train_loss']:.3f}, {held_out}; "
        f"wrote {result['final']}"
    )
    return 0
