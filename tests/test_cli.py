"""The `hf-posenc` command line, run as `python -m hf_posenc.cli` and as the installed console script."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
from conftest import console_script
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import hf_posenc
from hf_posenc.cli import main

pytestmark = pytest.mark.xdist_group("cli")  # one worker starts the subprocesses the module's tests share

COMMANDS = {"version": ["--version"], "schemes": ["schemes"]}
RUNNERS = ["module", "script"]


def _in_process(argv):
    """Run main(argv) here (the fallback when the console script is not on PATH); returns (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's --version exits
            code = exit_.code
    return code, out.getvalue()


@pytest.fixture(scope="module")
def cli_output():
    """(runner, command) -> (exit code, stdout); the subprocesses start together, each pays the import only once."""
    script = console_script("hf-posenc")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    prefixes = {"module": [sys.executable, "-m", "hf_posenc.cli"], "script": [script] if script else None}
    running, results = {}, {}
    for runner, prefix in prefixes.items():
        for command, argv in COMMANDS.items():
            if prefix is None:
                results[runner, command] = None  # no console script beside this Python: that runner is skipped
            else:
                running[runner, command] = subprocess.Popen(
                    prefix + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
                )
    for key, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        results[key] = (process.returncode, stdout + stderr if process.returncode else stdout)
    return results


def _result(cli_output, runner, command):
    if cli_output[runner, command] is None:
        pytest.skip("no hf-posenc console script beside this Python (a --system-site-packages or --user install)")
    return cli_output[runner, command]


@pytest.mark.parametrize("runner", RUNNERS)
def test_version(cli_output, runner):
    """--version prints `hf-posenc <version>` with the package's own __version__ and exits 0."""
    code, out = _result(cli_output, runner, "version")
    assert code == 0, out
    assert out.strip() == f"hf-posenc {hf_posenc.__version__}"


@pytest.mark.parametrize("runner", RUNNERS)
def test_schemes_lists_every_scheme(cli_output, runner):
    """`schemes` prints one row per registered scheme, with its site, and nothing else in the table."""
    code, out = _result(cli_output, runner, "schemes")
    assert code == 0, out
    rows = out.split("\n\n")[0].splitlines()[2:]  # after the header and the rule
    assert {row.split()[0] for row in rows} == set(hf_posenc.SCHEMES)
    for row in rows:
        assert row.split()[1] == hf_posenc.SCHEMES[row.split()[0]].site


@pytest.mark.parametrize("runner", RUNNERS)
def test_schemes_lists_every_rope_type(cli_output, runner):
    """`schemes` lists every rope_type: transformers' ROPE_INIT_FUNCTIONS (live), default and ntk; and the archs."""
    code, out = _result(cli_output, runner, "schemes")
    assert code == 0, out
    lines = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    rope_types = set(lines["rope_type"].split(", "))
    # the plugin's own posenc_partial_* types (partial rotation where an architecture rotates the whole head) are an
    # implementation detail of rope_parameters, not something to ask for
    public = {t for t in ROPE_INIT_FUNCTIONS if not t.startswith("posenc_")}
    assert rope_types == set(hf_posenc.rope_types()) == {"default", "ntk", *public}
    assert lines["architectures"].split(", ") == sorted(hf_posenc.ARCHITECTURES)


def test_no_command_prints_help():
    """Without a command the CLI prints its usage, naming the `schemes` command, and exits 0."""
    code, out = _in_process([])
    assert code == 0, out
    assert out.startswith("usage: hf-posenc") and "schemes" in out


def test_main_in_process_matches_subprocess(cli_output):
    """main(["schemes"]) called directly prints what the module run prints, and returns 0."""
    assert _in_process(["schemes"]) == cli_output["module", "schemes"]
