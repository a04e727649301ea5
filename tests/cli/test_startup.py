"""Start-up: the CLI and the commands that only read a store (or do arithmetic) never import torch,
so ``batchlab --help`` and ``batchlab advise`` start quickly; ``--version`` names the installed one."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from tests.analysis.synthetic import Truth, write_study
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.sweep.store import Store

# Runs each command line in one fresh interpreter; prints each exit code, then whether torch loaded.
_RUN_COMMANDS = """
import json, sys
from batchlab.cli import app
codes = []
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="batchlab")
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def _fresh_interpreter(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )


def test_importing_the_cli_loads_no_torch() -> None:
    _fresh_interpreter("import batchlab.cli, sys; assert 'torch' not in sys.modules, 'torch'")


def test_help_advise_and_store_readers_run_without_torch(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    with Store(db) as store:
        write_study(store, "demo", Truth(), [16, 64], seeds=(0,), steps=400, eval_every=100)
    read = ["--db", str(db)]
    commands = [
        ["--help"],
        ["--version"],
        ["sweep", "--help"],
        ["train", "--help"],
        ["advise", "--batch-size", "256", "--to-batch-size", "1024", "--lr", "0.1", "--json"],
        ["runs", *read, "--json"],
        ["summary", *read, "--json"],
        ["export", *read, "--out", str(tmp_path / "export")],
        ["report", *read, "--out", str(tmp_path / "report")],
    ]
    done = _fresh_interpreter(_RUN_COMMANDS, json.dumps(commands))
    outcome = json.loads(done.stderr.strip().splitlines()[-1])
    assert outcome["codes"] == [0] * len(commands), done.stderr
    assert outcome["torch"] is False
    assert (tmp_path / "export" / "runs.csv").is_file()
    assert (tmp_path / "report" / "index.html").is_file()


def test_version_prints_the_installed_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"batchlab {version('batchlab')}\n"
