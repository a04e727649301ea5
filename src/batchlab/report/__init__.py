"""Tables -> matplotlib figures -> one self-contained HTML page.

``write_report(store_or_path, out_dir, study=..., extra_sections=[Section(...)])`` writes
``index.html`` (figures embedded, no external requests, no script) and each figure as PNG and SVG.
A ``Section`` (title, trusted HTML fragments, ``ReportFigure``s) is how other modules add their own
content on top; build its HTML with ``escape``, ``paragraph`` and ``table``.
"""

from batchlab.report.build import standard_sections, write_report
from batchlab.report.html import ReportFigure, Section, escape, fmt, paragraph, table

__all__ = [
    "ReportFigure",
    "Section",
    "escape",
    "fmt",
    "paragraph",
    "standard_sections",
    "table",
    "write_report",
]
