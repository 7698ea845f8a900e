"""The `hf-posenc` command line."""

from __future__ import annotations

import argparse
import sys


def _schemes() -> str:
    from .auto import ARCHITECTURES
    from .modeling.posenc_schemes import SCHEMES, rope_types

    lines = [f"{'scheme':<12} {'site':<10} {'relative':<9} description", "-" * 78]
    for name, scheme in sorted(SCHEMES.items()):
        lines.append(f"{name:<12} {scheme.site:<10} {str(scheme.relative):<9} {scheme.description}")
    lines += ["", f"rope_type: {', '.join(rope_types())}", f"architectures: {', '.join(sorted(ARCHITECTURES))}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-posenc", description="Positional schemes for transformers models.")
    parser.add_argument("--version", action="version", version=f"hf-posenc {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("schemes", help="list the positional schemes, their sites and the supported architectures")
    args = parser.parse_args(argv)
    if args.command == "schemes":
        print(_schemes())
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
