"""Convert a stock checkpoint to another positional scheme, fine-tune it briefly with Trainer, and measure it.

    python examples/finetune_converted_checkpoint.py                       # a small stock GPT-2 made here
    python examples/finetune_converted_checkpoint.py --checkpoint path/to/gpt2 --posenc alibi --steps 200

Without --checkpoint a small stock GPT-2 (byte vocabulary, random weights) is saved first, standing in for a real one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

import hf_posenc  # noqa: F401  (the posenc= keyword)
from hf_posenc.workflow.data import byte_tokenizer, load_tokenizer, token_stream
from hf_posenc.workflow.evaluation import perplexity
from hf_posenc.workflow.train import parse_train_arguments, run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a stock causal LM folder (default: a small GPT-2 made here)")
    parser.add_argument("--posenc", default="alibi", help="the scheme to convert to")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="hf_posenc_finetune_"))

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / "stock-gpt2"
        stock = AutoConfig.for_model("gpt2", n_layer=2, n_embd=96, n_head=4, n_positions=128, vocab_size=257)
        AutoModelForCausalLM.from_config(stock).save_pretrained(checkpoint)
        byte_tokenizer().save_pretrained(checkpoint)  # a checkpoint carries its tokenizer

    converted = AutoModelForCausalLM.from_pretrained(checkpoint, posenc=args.posenc)
    print(converted.posenc_conversion)
    tokenizer = load_tokenizer("auto", checkpoint)  # the checkpoint's own
    held_out = token_stream(None, "test", tokenizer)  # the standard-library text's held-out end
    before = perplexity(converted, held_out, 128, max_tokens=4096)["ppl"]

    arguments = parse_train_arguments(
        values=dict(
            posenc=args.posenc,
            checkpoint=str(checkpoint),
            seq_length=128,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            warmup_steps=5,
            logging_steps=max(1, args.steps // 4),
            output_dir=str(work / "run"),
        )
    )
    result = run_train(*arguments)
    tuned = AutoModelForCausalLM.from_pretrained(result["final"])
    after = {n: perplexity(tuned, held_out, n, max_tokens=4096)["ppl"] for n in (128, 512)}
    print(
        f"held-out perplexity at 128: {before:.2f} converted -> {after[128]:.2f} after {args.steps} steps; "
        f"at 512 (4x the training length): {after[512]:.2f}"
    )
    print(f"fine-tuned model: {result['final']}")


if __name__ == "__main__":
    main()
