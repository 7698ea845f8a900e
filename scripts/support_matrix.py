"""Write the support matrix (`hf-posenc archs --markdown`) into README.md between its markers.

    python scripts/support_matrix.py          # rewrite the README's block
    python scripts/support_matrix.py --check  # exit 1 if the README's block is not the generated one

tests/test_generic.py checks the same, so the README's table is always the code's.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hf_posenc import archs

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- support matrix: begin -->\n).*?(\n<!-- support matrix: end -->)", re.S)


def main(argv: list[str]) -> int:
    text = README.read_text()
    if not BLOCK.search(text):
        print("README.md has no support matrix markers", file=sys.stderr)
        return 2
    updated = BLOCK.sub(lambda match: match.group(1) + archs.markdown(archs.matrix()) + match.group(2), text)
    if "--check" in argv:
        return 0 if updated == text else 1
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
