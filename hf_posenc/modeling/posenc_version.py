"""The versions a saved posenc model's code was made and tested with, and what it does on other transformers releases.

Part of the `trust_remote_code` closure: imports only the standard library, transformers and `packaging` (which
transformers requires).

The rule, for the plugin and for the code every saved folder ships:
- a release inside `TRANSFORMERS_RANGE` is tested: everything runs;
- an older release is refused (the code uses what later releases added);
- a newer release is refused by `import hf_posenc`, since any scheme may compute other numbers there. A saved folder's
  own code loads it where transformers' own modules compute the folder's scheme (the native scheme, or RoPE of
  transformers' own types on a RoPE architecture: see `check_scheme_on_release`), with a warning, and refuses the rest;
- `HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS=1` lets both run on a newer release, with a warning.
"""

from __future__ import annotations

import os
import traceback

from packaging.version import InvalidVersion, Version

#: hf_posenc's version, recorded in the files a saved model ships (the closure cannot import the package)
PLUGIN_VERSION = "0.3.0"

#: the transformers releases this code is tested with, [low, high): CI runs the contract on each minor release
TRANSFORMERS_RANGE = ("5.20", "5.26")

#: the environment variable that lets the plugin and the shipped code run on a release newer than the range
ALLOW_UNTESTED = "HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS"

_TRUE = ("1", "true", "yes", "on")


class UntestedTransformersError(ImportError):
    """The installed transformers release is outside the range this code was tested with."""


def _release(version: str) -> Version:
    """`version` parsed as pip reads it, or the refusal that names it where it is no release number."""
    try:
        return Version(version)
    except InvalidVersion:
        raise UntestedTransformersError(
            f"transformers reports the version {version!r}, which is no release number: hf_posenc (hf_posenc "
            f"{PLUGIN_VERSION}) cannot tell whether it lies in the tested range {tested_range_text()}"
        ) from None


def installed() -> str:
    """The installed transformers release (read at each call: tests and users may set it before loading)."""
    import transformers

    return transformers.__version__


def release_status(version: str | None = None) -> str:
    """'tested', 'older' or 'newer': where `version` (the installed release by default) stands to the range.

    As pip reads `>=low`, a pre-release of the lowest minor release is older (5.20.0rc1 predates 5.20.0). Every
    release of the first minor past the range is newer, its pre-releases and development builds too (5.26.0.dev0).
    """
    low, high = (Version(bound) for bound in TRANSFORMERS_RANGE)
    release = _release(version or installed())
    if release < low:
        return "older"
    return "tested" if release.release[:2] < high.release[:2] else "newer"


def untested_allowed() -> bool:
    """Whether the user set `HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS` to run on a release newer than the range."""
    return os.environ.get(ALLOW_UNTESTED, "").strip().lower() in _TRUE


def tested_range_text() -> str:
    low, high = TRANSFORMERS_RANGE
    return f">={low},<{high}"


def untested(what: str) -> str:
    """What was tested with which releases, and the release found."""
    return (
        f"{what} (hf_posenc {PLUGIN_VERSION}) was tested with transformers {tested_range_text()}; found {installed()}"
    )


def refusal(what: str, why: str = "") -> str:
    """The message of a refused release: what was refused, the tested range, the release found, and what to do."""
    text = f'{untested(what)}{why}. Install a tested release: pip install "transformers{tested_range_text()}"'
    if release_status() == "newer" and not untested_allowed():
        text += f", or set {ALLOW_UNTESTED}=1 to try this one (its results are not verified)"
    return text


def broken_on_release(what: str, error: BaseException) -> str:
    """The message of code that failed on a release newer than the tested ones: the release is the likely cause."""
    return (
        f"{untested(what)}, and it failed there ({type(error).__name__}: {error}): transformers' internals it builds "
        f'on have likely moved. Install a tested release: pip install "transformers{tested_range_text()}"'
    )


def raised_by_this_code(error: BaseException) -> bool:
    """Whether `error` was raised in this closure's own files (a refusal of the plugin's), not in code they called.

    Read from the innermost frame of its traceback: the closure's files are this file's siblings, in the package or
    in the copy a `trust_remote_code` load makes.
    """
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.dirname(os.path.abspath(frames[-1].filename)) == os.path.dirname(
        os.path.abspath(__file__)
    )


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Log `message` at WARNING through transformers' logging, once per process."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    from transformers.utils import logging

    logging.get_logger("hf_posenc").warning(message)


def check_transformers_version(what: str = "this posenc model's code", newer: str = "refuse") -> None:
    """Raise UntestedTransformersError where the installed release is outside the tested range.

    `newer` says what a newer release gets: "refuse" (the plugin: any scheme may compute other numbers there) or
    "scheme" (a saved folder's code: its config decides, see `check_scheme_on_release`). With
    `HF_POSENC_ALLOW_UNTESTED_TRANSFORMERS=1` a newer release runs, with a warning. Older releases are always refused.
    """
    status = release_status()
    if status == "tested":
        return
    if status == "newer" and untested_allowed():
        warn_once(f"{untested(what)}; running it because {ALLOW_UNTESTED} is set: its results are not verified")
        return
    if status == "newer" and newer == "scheme":
        return
    raise UntestedTransformersError(refusal(what))


def check_scheme_on_release(scheme: str, stock_computes: bool, what: str = "this posenc model's code") -> None:
    """On a release newer than the range, let a saved folder's code load a scheme transformers' own modules compute
    (their code computes the numbers there, the plugin's only passes the calls through; a warning says the release is
    untested) and refuse any other scheme (the plugin's code computes it, untested on this release), unless the user
    allowed untested releases."""
    if release_status() != "newer" or untested_allowed():
        return
    if stock_computes:
        warn_once(
            f"{untested(what)}; it loads this checkpoint because its scheme ({scheme!r}) is computed by transformers' "
            f'own modules. The tested releases: pip install "transformers{tested_range_text()}"'
        )
        return
    raise UntestedTransformersError(
        refusal(
            what,
            f", and this checkpoint's scheme ({scheme!r}) is computed by hf_posenc's code, not by "
            "transformers' own modules",
        )
    )
