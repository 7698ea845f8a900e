"""The `hf-posenc` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")


def _command_index(argv: list[str]) -> int | None:
    """Where the command is in `argv` (after the top-level options), None without one."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):
        at += 2 if argv[at] == "--log-level" else 1  # its value follows, unless given as --log-level=LEVEL
    return at if at < len(argv) else None


class _Stderr(logging.Handler):
    """Writes to whatever `sys.stderr` is when a record comes (so a redirected stderr gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


@contextlib.contextmanager
def _logging_at(level: str):
    """hf_posenc's logger at `level`, printed to stderr, for the duration of one command: conversion reports (warning
    when a conversion dropped or added tensors, info otherwise) and progress notes. transformers keeps its own
    verbosity (TRANSFORMERS_VERBOSITY, or `train --log_level`)."""
    library = logging.getLogger("hf_posenc")
    handler, before = _Stderr(), library.level
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    library.addHandler(handler)
    library.setLevel(level.upper())
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(before)


def _schemes() -> str:
    from .auto import ARCHITECTURES
    from .modeling.posenc_schemes import SCHEMES, rope_types

    lines = [f"{'scheme':<12} {'site':<10} {'relative':<9} description", "-" * 78]
    for name, scheme in sorted(SCHEMES.items()):
        lines.append(f"{name:<12} {scheme.site:<10} {str(scheme.relative):<9} {scheme.description}")
    lines += ["", f"rope_type: {', '.join(rope_types())}", f"architectures: {', '.join(sorted(ARCHITECTURES))}"]
    lines += ["(verified ones; `hf-posenc archs` lists every model type with its status)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    at = _command_index(argv)
    level = "info"
    for index, item in enumerate(argv[:at]):
        if item == "--log-level" and index + 1 < len(argv):
            level = argv[index + 1]
        elif item.startswith("--log-level="):
            level = item.partition("=")[2]
    with _logging_at(level if level in LOG_LEVELS else "info"):
        return _main(argv)


def _main(argv: list[str]) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-posenc", description="Positional schemes for transformers models.")
    parser.add_argument("--version", action="version", version=f"hf-posenc {__version__}")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="what hf_posenc logs to stderr (conversion reports, progress notes)",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("schemes", help="list the positional schemes, their sites and the supported architectures")
    archs = commands.add_parser(
        "archs",
        help="the support matrix: every model type transformers has, verified, untried, refused (why) or not text",
    )
    archs.add_argument("--status", choices=["verified", "untried", "refused", "not a text model"], help="only these")
    archs.add_argument("--markdown", action="store_true", help="the README's table (verified and refused, counted)")
    compare = commands.add_parser(
        "compare",
        help="train one architecture with several schemes at length L, evaluate at L..16L (the main job)",
        description="Train small models that differ only in their positional scheme, then measure perplexity "
        "against length. Options override the YAML --config; any other field as key=value.",
    )
    compare.add_argument("--config", help="YAML file of CompareConfig fields (see configs/compare.yaml)")
    compare.add_argument("--arch", help="a verified decoder (default gpt2; `hf-posenc archs --status verified`)")
    compare.add_argument("--schemes", help="comma-separated schemes, e.g. learned,rope,alibi")
    compare.add_argument("--train-length", type=int, help="training length L")
    compare.add_argument("--data", help="'stdlib' (default), a text file, a folder of .txt files or a datasets name")
    compare.add_argument("--steps", type=int, help="training steps per scheme")
    compare.add_argument("--out", help="output folder (results.md, results.json, ppl_vs_length.png)")
    compare.add_argument("overrides", nargs="*", help="more CompareConfig fields as key=value")
    commands.add_parser(
        "train",
        add_help=False,  # `hf-posenc train --help` is HfArgumentParser's: every field, with its default
        help="pre-train or fine-tune a posenc model with transformers' Trainer: every TrainingArguments field, from "
        "a YAML --config and the command line (`hf-posenc train --help`)",
    )
    push = commands.add_parser(
        "push", help="build the Hub folder of a saved posenc model (weights, code, model card) and upload it"
    )
    push.add_argument("model", help="folder of a saved posenc model (e.g. runs/train/final)")
    push.add_argument("--repo-id", required=True, help="the Hub repo, e.g. user/gpt2-alibi")
    push.add_argument("--folder", help="where to build the repo folder (default: MODEL/../hub-REPO)")
    push.add_argument(
        "--eval",
        action="append",
        metavar="PATH",
        help="an `hf-posenc eval` JSON of this model (perplexity or passkey; checked against its weights); repeat "
        "for several; the card draws its plot from them",
    )
    push.add_argument(
        "--license",
        help="the card's license id (default: apache-2.0 for a model trained from scratch, 'other' for a converted "
        "checkpoint, whose license applies)",
    )
    push.add_argument("--data", help="training data, for the card (default: what `hf-posenc train` recorded)")
    push.add_argument("--train-length", type=int, help="training length, for the card")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--dry-run", action="store_true", help="build the folder, do not upload")
    bench = commands.add_parser(
        "bench",
        help="what each scheme costs: attention paths vs causal SDPA, the rotary step vs transformers', whole models "
        "vs NoPE and stock (ratios, peak memory, JSON)",
    )
    bench.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    bench.add_argument("--heads", type=int, default=12)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--backward-max", type=int, default=4096, help="longest length timed with backward too")
    bench.add_argument("--dense-max", type=int, default=4096, help="longest length for the dense (stock) ALiBi path")
    bench.add_argument("--model-length", type=int, default=1024, help="sequence length of the models table")
    bench.add_argument(
        "--model-repeats", type=int, default=9, help="training steps timed per model (whole steps drift the most)"
    )
    bench.add_argument(
        "--sections",
        default="attention,rotary,models",
        help="comma-separated subset of attention,rotary,models,memory (memory: training steps at --memory-length)",
    )
    bench.add_argument("--memory-length", type=int, default=8192, help="sequence length of the memory table")
    bench.add_argument(
        "--dtypes",
        help="comma-separated dtypes of the attention table (default: float32,bfloat16 on CUDA, else float32)",
    )
    bench.add_argument("--out", default="runs/bench.json", help="the JSON file (the markdown goes beside it, .md)")
    evaluate = commands.add_parser(
        "eval",
        help="perplexity or passkey retrieval against length for a saved causal LM (posenc or stock), on held-out "
        "text, as a table, JSON and plot",
        description="Scores a saved causal LM at several lengths on held-out text: by default the held-out part of "
        "the data `hf-posenc train` recorded next to the model (else of the standard-library text), which training "
        "never reads.",
    )
    evaluate.add_argument("model", help="folder of a saved model (or a Hub name, where the Hub is reachable)")
    evaluate.add_argument("--task", choices=["perplexity", "passkey"], default="perplexity")
    evaluate.add_argument("--lengths", default="64,128,256,512,1024", help="comma-separated context lengths (tokens)")
    evaluate.add_argument(
        "--data", help="'stdlib', a text file, a folder of .txt files or a datasets name (its held-out part)"
    )
    evaluate.add_argument("--stride", type=int, help="perplexity: score the last STRIDE tokens of sliding windows")
    evaluate.add_argument("--max-tokens", type=int, default=16384, help="perplexity: the first N tokens (0: all)")
    evaluate.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: where the key sits (0 = start)")
    evaluate.add_argument("--samples", type=int, default=5, help="passkey: keys per length and depth")
    evaluate.add_argument("--digits", type=int, default=5, help="passkey: digits of each key")
    evaluate.add_argument("--seed", type=int, default=0, help="passkey: the keys and filler offsets")
    evaluate.add_argument("--tokenizer", help="'bytes', a tokenizer path/name; default: the model folder's, else bytes")
    evaluate.add_argument("--threads", type=int, help="torch threads on the CPU (default: the cores left free)")
    evaluate.add_argument("--out", help="write the results as JSON here (and the plot beside it, as .png)")
    at = _command_index(argv)
    if at is not None and argv[at] == "train":  # everything after `train` is HfArgumentParser's
        parser.parse_args(argv[: at + 1])
        from .workflow.train import main as train_main

        return train_main(argv[at + 1 :])
    args = parser.parse_args(argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "push":
        return _push(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "schemes":
        print(_schemes())
        return 0
    if args.command == "archs":
        return _archs(args)
    if args.command == "compare":
        return _compare(args)
    parser.print_help()
    return 0


def _archs(args) -> int:
    from . import archs

    rows = archs.matrix()
    if args.markdown:
        print(archs.markdown(rows))
        return 0
    rows = [row for row in rows if args.status in (None, row[1])]
    width = max(len(model_type) for model_type, *_ in rows) if rows else 10
    for model_type, state, reason in rows:
        print(f"{model_type:<{width}}  {state:<16}  {reason}")
    total = archs.counts(archs.matrix())
    print("\n" + ", ".join(f"{number} {state}" for state, number in total.items()))
    return 0


def _compare(args) -> int:
    from .workflow.compare import CompareConfig, run_compare, write_outputs
    from .workflow.config import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    for key in ("arch", "train_length", "data", "steps", "out"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.schemes is not None:
        overrides["schemes"] = [s.strip() for s in args.schemes.split(",") if s.strip()]
    try:
        config = load_config(CompareConfig, args.config, overrides)
    except ValueError as error:
        print(f"hf-posenc compare: {error}", file=sys.stderr)
        return 2
    print(
        f"hf-posenc compare: {config.arch}, schemes {config.schemes}, L={config.train_length}, "
        f"{config.steps} steps, evaluated at {config.eval_lengths}"
    )
    try:
        results = run_compare(config)
    except ValueError as error:  # found once the data is read (too little held-out text, ...)
        print(f"hf-posenc compare: {error}", file=sys.stderr)
        return 2
    paths = write_outputs(results, config.out)
    print(paths["table"].read_text())
    print("\n".join(f"wrote {path}" for path in paths.values()))
    return 0


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        return [kind(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated {kind.__name__}s, got {text!r}") from None


def _eval(args) -> int:
    from .workflow.evaluate_lengths import check_model_path, describe, markdown, write
    from .workflow.threads import torch_threads

    try:  # everything that needs no model and no data, before any work
        check_model_path(args.model)
        lengths = _numbers(args.lengths, int, "--lengths")
        if not lengths or min(lengths) < 2:
            raise ValueError(f"--lengths must be integers >= 2, got {args.lengths!r}")
        if args.data is not None:
            from .workflow.data import check_source

            check_source(args.data)
        if args.stride is not None and args.stride < 1:
            raise ValueError(f"--stride must be >= 1, got {args.stride}")
        if args.max_tokens < 0:
            raise ValueError(f"--max-tokens must be >= 0 (0: all), got {args.max_tokens}")
        depths = _numbers(args.depths, float, "--depths")
        if args.task == "passkey":
            from .workflow.passkey import check_arguments

            check_arguments(lengths, depths, args.samples, args.digits)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        with torch_threads(args.threads):
            results = _evaluate(args, lengths, depths)
    except ValueError as error:
        print(f"hf-posenc eval: {error}", file=sys.stderr)
        return 2
    print(describe(results))
    print(markdown(results))
    if (path := write(results, args.out)) is not None:
        print(f"wrote {path}")
        if args.task == "passkey":
            from .workflow.passkey import plot

            plot(results, path.with_suffix(".png"))
            print(f"wrote {path.with_suffix('.png')}")
    return 0


def _evaluate(args, lengths: list[int], depths: list[float]) -> dict:
    from .workflow.evaluate_lengths import evaluate_lengths, evaluate_passkey

    if args.task == "passkey":
        return evaluate_passkey(
            args.model,
            lengths,
            data=args.data,
            tokenizer=args.tokenizer,
            depths=depths,
            samples=args.samples,
            digits=args.digits,
            seed=args.seed,
        )
    return evaluate_lengths(
        args.model,
        lengths,
        data=args.data,
        stride=args.stride,
        max_tokens=args.max_tokens or None,
        tokenizer=args.tokenizer,
    )


def _push(args) -> int:
    from pathlib import Path

    from .workflow.push import build_hub_folder, upload

    folder = args.folder or Path(args.model).resolve().parent / f"hub-{args.repo_id.replace('/', '--')}"
    try:
        build_hub_folder(
            args.model,
            folder,
            args.repo_id,
            evaluations=args.eval,
            data=args.data,
            train_length=args.train_length,
            license=args.license,
        )
    except (ValueError, OSError) as error:
        print(f"hf-posenc push: {error}", file=sys.stderr)
        return 2
    print(f"built {folder}")
    if args.dry_run:
        return 0
    try:
        url = upload(folder, args.repo_id, private=args.private)
    except RuntimeError as error:
        print(f"hf-posenc push: {error}", file=sys.stderr)
        return 1
    print(f"uploaded to {url}")
    return 0


def _bench(args) -> int:
    from pathlib import Path

    import torch

    from .workflow.bench import markdown, run_bench, write

    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(sections) - {"attention", "rotary", "models", "memory"}
    if unknown:
        print(
            f"hf-posenc bench: unknown sections {sorted(unknown)}; allowed: attention, rotary, models, memory",
            file=sys.stderr,
        )
        return 2
    if Path(args.out).suffix.lower() != ".json":
        print(
            f"hf-posenc bench: --out must be a .json file (the markdown is written beside it); got {args.out}",
            file=sys.stderr,
        )
        return 2
    dtypes = None
    if args.dtypes:
        names = [name.strip() for name in args.dtypes.split(",") if name.strip()]
        allowed = ("float32", "bfloat16", "float16")
        if not names or set(names) - set(allowed):
            print(f"hf-posenc bench: --dtypes {args.dtypes!r}; allowed: {', '.join(allowed)}", file=sys.stderr)
            return 2
        dtypes = [getattr(torch, name) for name in names]
    results, status = {}, 0
    try:
        run_bench(
            [int(n) for n in args.lengths.split(",") if n.strip()],
            args.heads,
            args.head_dim,
            repeats=args.repeats,
            backward_max=args.backward_max,
            dense_max=args.dense_max,
            model_length=args.model_length,
            model_repeats=args.model_repeats,
            sections=sections,
            memory_length=args.memory_length,
            dtypes=dtypes,
            results=results,
        )
    except KeyboardInterrupt:  # keep what was measured (a device run stopped at its time limit)
        if "environment" not in results:
            raise
        results["interrupted"], status = True, 130
        print("hf-posenc bench: interrupted; writing what was measured", file=sys.stderr)
    print(markdown(results))
    print(f"wrote {write(results, args.out)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
