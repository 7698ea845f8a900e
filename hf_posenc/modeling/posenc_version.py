"""The versions a saved posenc model's code was made and tested with, and the check that refuses any other
transformers release. Part of the `trust_remote_code` closure: imports only the standard library and transformers."""

from __future__ import annotations

import re

#: hf_posenc's version, recorded in the files a saved model ships (the closure cannot import the package)
PLUGIN_VERSION = "0.2.0"

#: the transformers releases this code is tested with, [low, high): CI runs the contract on each minor release
TRANSFORMERS_RANGE = ("5.20", "5.25")


def _minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def check_transformers_version(what: str = "this posenc model's code") -> None:
    """Raise ImportError naming the tested range when the installed transformers is outside it: the generic adapter
    builds on internals shared by every architecture (the Auto mappings, config dataclasses, the rotary call
    convention), which change between minor releases, so another release could crash inside transformers or compute
    other numbers silently."""
    import transformers

    low, high = TRANSFORMERS_RANGE
    if not _minor(low) <= _minor(transformers.__version__) < _minor(high):
        raise ImportError(
            f"{what} (hf_posenc {PLUGIN_VERSION}) was tested with transformers >={low},<{high}; found "
            f'{transformers.__version__}. Install a tested release: pip install "transformers>={low},<{high}"'
        )
