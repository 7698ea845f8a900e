"""Extend a RoPE model's context with YaRN: same weights, new rope_parameters, measured at 4x the trained length.

    python examples/extend_context_yarn.py                        # trains a small Llama at length 64 first
    python examples/extend_context_yarn.py --checkpoint path/to/llama --train-length 2048 --factor 4

YaRN (Peng et al., 2023) rescales RoPE's frequencies by band and adds an attention temperature, so a model trained at
L reads factor x L tokens; a short fine-tune at the new length usually closes most of the remaining gap.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM

import hf_posenc  # noqa: F401  (the posenc= keyword)
from hf_posenc.workflow.data import load_tokenizer, token_stream
from hf_posenc.workflow.evaluation import perplexity
from hf_posenc.workflow.train import parse_train_arguments, run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a RoPE causal LM folder (default: a small Llama trained here)")
    parser.add_argument("--train-length", type=int, default=64)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=150, help="pre-training steps when no checkpoint is given")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="hf_posenc_yarn_"))

    checkpoint = args.checkpoint
    if checkpoint is None:
        arguments = parse_train_arguments(
            values=dict(
                posenc="rope",
                arch="llama",
                layers=2,
                hidden_size=96,
                heads=4,
                seq_length=args.train_length,
                max_steps=args.steps,
                per_device_train_batch_size=16,
                learning_rate=2e-3,
                logging_steps=50,
                output_dir=str(work / "pretrain"),
            )
        )
        checkpoint = run_train(*arguments)["final"]

    long = int(args.train_length * args.factor)
    tokenizer = load_tokenizer("auto", checkpoint)  # the checkpoint's own (a model trained here carries its tokenizer)
    held_out = token_stream(None, "test", tokenizer)  # the standard-library text's held-out end
    yarn = {
        "type": "rope",
        "rope_type": "yarn",
        "factor": args.factor,
        "original_max_position_embeddings": args.train_length,
    }
    rows = []
    for name, posenc in (("rope as trained", "rope"), (f"YaRN x{args.factor:g}", yarn)):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, posenc=posenc)
        short = perplexity(model, held_out, args.train_length, max_tokens=8192)["ppl"]
        extended = perplexity(model, held_out, long, max_tokens=8192)["ppl"]
        rows.append((name, short, extended))
    print(f"{'':<18} ppl@{args.train_length:<6} ppl@{long}")
    for name, short, extended in rows:
        print(f"{name:<18} {short:<10.2f} {extended:.2f}")
    model.save_pretrained(work / "yarn")
    tokenizer.save_pretrained(work / "yarn")
    print(f"the YaRN model (same weights, new rope_parameters) is in {work / 'yarn'}")


if __name__ == "__main__":
    main()
