"""`hf-posenc train`: pre-train or fine-tune a posenc causal LM with transformers' Trainer (accelerate underneath)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import archs
from .compare import tiny_config
from .data import STDLIB, ByteTokenizer, read_text
from .push import TRAINING_RECORD

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """A training run: a new small model of `arch` or a `checkpoint` converted to `posenc`, trained on `data`."""

    posenc: str | dict = "alibi"
    arch: str = "gpt2"
    checkpoint: str | None = None
    layers: int = 4
    hidden_size: int = 128
    heads: int = 4
    data: str | None = STDLIB
    tokenizer: str = "bytes"
    seq_length: int = 128
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    logging_steps: int = 10
    save_steps: int | None = None
    seed: int = 0
    output_dir: str = "runs/train"

    def validate(self) -> None:
        if self.checkpoint is None and self.arch not in archs.decoders():
            raise ValueError(
                f"arch must be a verified decoder, one of {', '.join(archs.decoders())}; got {self.arch!r}"
            )
        for key in ("seq_length", "steps", "batch_size", "layers", "hidden_size", "heads", "logging_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"save_steps must be >= 1 or null, got {self.save_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def token_stream(config: TrainConfig) -> tuple[torch.Tensor, object | None]:
    """The training text (`read_text`: stdlib, local files, or a `datasets` name) as ids, and the Hugging Face
    tokenizer used (None for bytes)."""
    text = read_text(config.data)
    if config.tokenizer == "bytes":
        return ByteTokenizer().encode(text), None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    return torch.tensor(tokenizer(text.decode("utf-8", errors="replace"))["input_ids"]), tokenizer


def build_model(config: TrainConfig, vocab_size: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    if config.checkpoint is not None:
        return AutoModelForCausalLM.from_pretrained(config.checkpoint, posenc=config.posenc)
    stock = tiny_config(config.arch, config.layers, config.hidden_size, config.heads, config.seq_length, vocab_size)
    return AutoModelForCausalLM.from_config(stock, posenc=config.posenc)


def run_train(config: TrainConfig) -> dict:
    """Train and save the final model (a loadable posenc model) under `output_dir/final`.

    Returns {"final": folder, "world_size": processes that trained, "train_loss": mean training loss}."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    config.validate()
    tokens, tokenizer = token_stream(config)
    vocab_size = ByteTokenizer.vocab_size if tokenizer is None else len(tokenizer)
    usable = (len(tokens) // config.seq_length) * config.seq_length
    if usable == 0:
        raise ValueError(f"the data has {len(tokens)} tokens, fewer than one sequence of {config.seq_length}")
    chunks = tokens[:usable].view(-1, config.seq_length)
    dataset = Dataset.from_dict({"input_ids": chunks.tolist(), "labels": chunks.tolist()}).with_format("torch")
    model = build_model(config, vocab_size)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} ids but the model only {model.config.vocab_size}")
    args = TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=[],
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    outcome = trainer.train()
    final = Path(config.output_dir) / "final"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():  # what the model card needs to say how the model was trained
        record = {"data": config.data, "seq_length": config.seq_length, "steps": config.steps, "posenc": config.posenc}
        (final / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("trained on %d process(es); final model in %s", args.world_size, final)
    return {"final": final, "world_size": args.world_size, "train_loss": outcome.training_loss}
