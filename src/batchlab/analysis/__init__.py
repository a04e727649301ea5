"""Store rows -> plain tables; never draws, never writes.

``analyze(store_or_path, study)`` returns a ``StudyAnalysis`` holding every table: the final-loss
grid, best lr per batch size and the exponent alpha, loss curves, steps/samples to the target and
the critical-batch fit, the generalization gap, cost, and the measured noise scale.
"""

from batchlab.analysis.curves import CostRow, Curve, GapRow, GapTable
from batchlab.analysis.lr import BestLrRow, GridCell, LrScaling, best_lr_table, lr_grid
from batchlab.analysis.noise import NoiseSeries, NoiseSummary, noise_summary
from batchlab.analysis.study import StudyData, Target, load_study, resolve_study
from batchlab.analysis.summary import DivergedRun, StudyAnalysis, analyze
from batchlab.analysis.target import ScalingFit, ToTargetRow, fit_scaling, to_target_table

__all__ = [
    "BestLrRow",
    "CostRow",
    "Curve",
    "DivergedRun",
    "GapRow",
    "GapTable",
    "GridCell",
    "LrScaling",
    "NoiseSeries",
    "NoiseSummary",
    "ScalingFit",
    "StudyAnalysis",
    "StudyData",
    "Target",
    "ToTargetRow",
    "analyze",
    "best_lr_table",
    "fit_scaling",
    "load_study",
    "lr_grid",
    "noise_summary",
    "resolve_study",
    "to_target_table",
]
