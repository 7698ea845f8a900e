"""Compare positional schemes on your own text: `hf-posenc compare` from Python, on a file you choose.

    python examples/compare_on_your_text.py my_corpus.txt --schemes rope,alibi,nope --steps 300

Without a file it writes a sample (the source of Python's collections, json and pathlib) and compares on that.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
from pathlib import Path

from hf_posenc.workflow.compare import CompareConfig, run_compare, write_outputs


def sample_text(path: Path) -> Path:
    import collections
    import json
    import pathlib

    path.write_text("\n\n".join(inspect.getsource(module) for module in (collections, json, pathlib)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", help="a text file or a folder of .txt files")
    parser.add_argument("--schemes", default="rope,alibi,sinusoidal")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-length", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored at each length")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="hf_posenc_compare_"))
    text = args.text or str(sample_text(out / "sample.txt"))
    config = CompareConfig(
        schemes=args.schemes.split(","),
        data=text,
        steps=args.steps,
        train_length=args.train_length,
        eval_multiples=[1, 2, 4, 8],
        layers=2,
        hidden_size=64,
        heads=4,
        eval_tokens=args.eval_tokens,
        held_out_fraction=0.1,
        out=str(out),
    )
    results = run_compare(config)
    paths = write_outputs(results, out)
    print(paths["table"].read_text())
    print(f"table, plot and JSON in {out}")


if __name__ == "__main__":
    main()
