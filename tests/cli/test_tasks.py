"""``batchlab tasks``: table, JSON, named tasks (built-in and user), errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.engine.tasks import FASHION_DIR_ENV, builtin_tasks

runner = CliRunner()


def test_tasks_json_lists_every_builtin_with_sizes(monkeypatch, tmp_path):
    monkeypatch.setenv(FASHION_DIR_ENV, str(tmp_path))  # fashion files absent: listed, not fatal
    result = runner.invoke(app, ["tasks", "--json"])
    assert result.exit_code == 0, result.output
    tasks = {t["name"]: t for t in json.loads(result.stdout)["tasks"]}
    assert tuple(tasks) == builtin_tasks()
    assert tasks["mnist1d-mlp"]["n_train"] == 4000 and tasks["mnist1d-mlp"]["n_val"] == 1000
    assert tasks["mnist1d-mlp"]["n_params"] == 15210 and tasks["mnist1d-mlp"]["input_shape"] == [40]
    assert tasks["digits-mlp"]["options"]["norm"] == "none"
    assert tasks["fashion-mlp"]["n_train"] is None
    assert "apt-get install dataset-fashion-mnist" in tasks["fashion-mlp"]["error"]


def test_tasks_table(monkeypatch, tmp_path):
    monkeypatch.setenv(FASHION_DIR_ENV, str(tmp_path))
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0, result.output
    for text in (
        "mnist1d-cnn",
        "4,000",
        "1,000",
        "5,210",
        "teacher-mlp",
        "unavailable",
        "n_samples=5000",
    ):
        assert text in result.stdout, text


def test_named_tasks_show_their_options(tmp_path, monkeypatch):
    (tmp_path / "cli_user_task.py").write_text(
        "from batchlab.engine.tasks import get_task\n"
        "def make_task():\n"
        "    return get_task('digits-mlp', hidden=8)\n"
    )
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["tasks", "digits-mlp", "cli_user_task:make_task", "--json"])
    assert result.exit_code == 0, result.output
    digits, user = json.loads(result.stdout)["tasks"]
    assert digits["n_params"] == 64 * 64 + 64 + 64 * 10 + 10
    assert (
        user["name"] == "cli_user_task:make_task" and user["n_params"] == 64 * 8 + 8 + 8 * 10 + 10
    )
    table = runner.invoke(app, ["tasks", "digits-mlp"])
    assert "digits-mlp options" in table.stdout and "train_split" in table.stdout


def test_unknown_task_is_one_error_line_and_exit_2():
    result = runner.invoke(app, ["tasks", "nope"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: task: unknown task 'nope'; built-in: "
        + ", ".join(builtin_tasks())
        + "; or your own as 'module:function'"
    ]
