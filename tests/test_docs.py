"""The documentation stays true: every ``batchlab`` command line in README.md and docs/*.md parses
against the real CLI (options exist, values convert), and every page's ``python`` blocks run, in order, as one script.

A block preceded by ``<!-- doc-check: skip REASON -->`` is not run (a reason is required); commands are
parsed, never executed, so the check is fast and writes nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from batchlab.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- doc-check: skip (?P<skip>[^>]+?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S
)


def _blocks(lang: str) -> list[tuple[str, str | None, str]]:
    """(page:line, skip reason, body) of every fenced block of ``lang``."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m["lang"] in lang.split("|"):
                line = text.count("\n", 0, m.start("body"))
                found.append((f"{page.relative_to(ROOT)}:{line}", m["skip"], m["body"]))
    return found


def _command_lines(body: str) -> list[str]:
    """``batchlab ...`` command lines of a shell block, continuations joined, prompts, pipes and
    comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.removeprefix("$ ").strip()
        if line.startswith("batchlab "):
            line = re.split(r"\s(?:\||>>?|2>|&&|;|#)", line)[0]
            commands.append(line)
    return commands


COMMANDS = [
    pytest.param(cmd, id=f"{where}:{cmd[:60]}")
    for where, _, body in _blocks("console|bash|sh")
    for cmd in _command_lines(body)
]
DOCTEST = """
import doctest as _doctest
_test = _doctest.DocTestParser().get_doctest({block!r}, globals(), "doc", None, 0)
_runner = _doctest.DocTestRunner(optionflags=_doctest.ELLIPSIS | _doctest.NORMALIZE_WHITESPACE)
_runner.run(_test)
assert not _runner.failures, "doctest block failed (output above)"
"""


def _script(body: str) -> str:
    """A block as script text: plain code as is, a ``>>>`` session as a doctest that checks output."""
    return DOCTEST.format(block=body) if body.lstrip().startswith(">>>") else body


PAGES_CODE: dict[str, list[str]] = {}
for _where, _skip, _body in _blocks("python"):
    if not _skip:
        PAGES_CODE.setdefault(_where.split(":")[0], []).append(_script(_body))
PYTHON = [pytest.param("\n".join(blocks), id=page) for page, blocks in PAGES_CODE.items()]


def test_docs_have_commands_and_code() -> None:
    assert len(COMMANDS) > 20 and len(PYTHON) > 5


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_parses(command: str) -> None:
    group = typer.main.get_command(app)
    name, *sub_args = shlex.split(command)[1:]
    try:  # a usage error fails; --help, --version and other eager options exit with code 0
        with group.make_context("batchlab", [name]) as ctx:
            sub = group.get_command(ctx, name)
            assert sub is not None, f"no command {name!r}"
            sub.make_context(name, sub_args, parent=ctx)
    except Exception as exc:
        if getattr(exc, "exit_code", None) != 0:
            pytest.fail(f"{command}: {getattr(exc, 'format_message', exc.__str__)()}")


@pytest.mark.parametrize("code", PYTHON)
def test_documented_python_runs(code: str, tmp_path: Path) -> None:
    """A page's Python blocks run in order as one script, as a reader would paste them."""
    for shipped in ("examples", "docs"):  # blocks name repository files by relative path
        (tmp_path / shipped).symlink_to(ROOT / shipped)
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
