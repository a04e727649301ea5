"""The adaptive-batch evidence figure draws every arm's curves, the target and the batch path."""

from __future__ import annotations

from batchlab.report.figures import adaptive_figure


def curve(batch: list[int], loss: list[float]) -> dict:
    samples = [0]
    for b in batch[1:]:
        samples.append(samples[-1] + b)
    return {"step": list(range(len(batch))), "samples": samples, "val_loss": loss,
            "batch_size": batch}  # fmt: skip


def test_adaptive_figure_has_the_three_panels() -> None:
    bench = {
        "task": "t",
        "rule": "critical",
        "seeds": 2,
        "target": {"metric": "val_loss", "value": 1.5},
        "arms": [
            {"name": "small", "batch_size": 8, "curves": [curve([8] * 4, [2, 1.9, 1.8, 1.7])] * 2},
            {"name": "large", "batch_size": 64, "curves": [curve([64] * 4, [2, 1.5, 1.2, 1.1])]},
            {
                "name": "adaptive",
                "batch_size": 8,
                "curves": [curve([8, 8, 16, 32], [2, 1.8, 1.4, 1.2])] * 3,
            },
        ],
    }
    steps, samples, batches = adaptive_figure(bench).axes
    # 2 + 1 + 3 curves and the target line on each loss panel; one batch path per adaptive seed
    assert len(steps.lines) == len(samples.lines) == 7
    assert len(batches.lines) == 3
    assert list(batches.lines[0].get_ydata()) == [8, 8, 16, 32]
    assert list(samples.lines[-2].get_xdata()) == [8, 24, 56]  # step 0 left off the log axis
    assert "target" in steps.get_legend_handles_labels()[1][-1]
