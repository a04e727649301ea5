"""One self-contained HTML page: sections of escaped text, trusted fragments and embedded figures.

Nothing on the page is fetched: figures are PNG data URIs, the style sheet is inline, there is no
script. Every string that came from a user (study, task, error messages) goes through ``escape``;
``Section.html`` is the one trusted input, for callers that build their own fragment (escaping what
they put in it).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure

from batchlab.analysis.summary import fmt

_NAME = re.compile(r"[^a-z0-9_-]+")

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       max-width: 1100px; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #dde; }
.muted { color: #667; } .note { background: #f6f6fa; border-left: 3px solid #99a; padding: .4rem .8rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: 13px; }
th, td { border: 1px solid #dde; padding: .2rem .55rem; text-align: right; }
th { background: #f0f1f6; } td.text, th.text { text-align: left; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 14px; color: #334; max-width: 900px; }
.supported { color: #11702a; font-weight: 600; } .not_supported { color: #a3131b; font-weight: 600; }
.inconclusive { color: #8a5a00; font-weight: 600; }
nav a { margin-right: .8rem; }
"""


def escape(value: Any) -> str:
    """HTML-escaped text of any value (quotes included), for text and attribute positions.

    >>> escape("<script>alert('x')</script>")
    '&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;'
    """
    return html.escape(str(value), quote=True)


def figure_name(text: str) -> str:
    """A safe file stem for a figure (lowercase letters, digits, ``_`` and ``-``).

    >>> figure_name("Verdict: claim 7 / B_crit")
    'verdict-claim-7-b_crit'
    """
    return _NAME.sub("-", text.lower()).strip("-") or "figure"


@dataclass(frozen=True)
class ReportFigure:
    """A matplotlib figure with its file stem, a title and a plain-language caption (plain text)."""

    name: str
    title: str
    caption: str
    figure: Figure

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", figure_name(self.name))

    def png(self, dpi: int = 110) -> bytes:
        """The figure as PNG bytes."""
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
        return buf.getvalue()

    def svg(self) -> str:
        """The figure as SVG text: text kept as text, no date, fixed ids (same figure, same file)."""
        buf = io.StringIO()
        with rc_context({"svg.fonttype": "none", "svg.hashsalt": "batchlab"}):
            self.figure.savefig(buf, format="svg", metadata={"Date": None})
        return buf.getvalue()


@dataclass(frozen=True)
class Section:
    """One part of the report: the hook other modules use to add their own (e.g. a verdict).

    ``title`` is plain text (escaped here). ``html`` is a trusted fragment placed under the title,
    ``after_html`` one placed after the figures: escape every user string in them with ``escape``
    and use ``table`` for tables. ``figures`` are embedded and also saved as PNG and SVG files.
    """

    title: str
    html: str = ""
    figures: tuple[ReportFigure, ...] = ()
    after_html: str = ""
    anchor: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", tuple(self.figures))
        object.__setattr__(self, "anchor", figure_name(self.anchor or self.title))


def table(
    headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], *, text_columns: int = 0
) -> str:
    """An HTML table with every cell escaped; the first ``text_columns`` columns align left.

    Cells are formatted with ``fmt`` unless they are strings already; ``headers=None``: no header.
    """

    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="text"' if i < text_columns else ""
        text = value if isinstance(value, str) else fmt(value)
        return f"<{tag}{cls}>{escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers or ()))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def paragraph(text: str, cls: str = "") -> str:
    """One escaped paragraph (``cls`` e.g. ``note`` or ``muted``)."""
    attr = f' class="{escape(cls)}"' if cls else ""
    return f"<p{attr}>{escape(text)}</p>"


def _figure_html(fig: ReportFigure, png: bytes, files: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    links = (
        f'<a href="{escape(files)}/{fig.name}.png">PNG</a> '
        f'<a href="{escape(files)}/{fig.name}.svg">SVG</a>'
    )
    return (
        f'<figure id="fig-{fig.name}"><img src="data:image/png;base64,{data}" '
        f'alt="{escape(fig.title)}"><figcaption><strong>{escape(fig.title)}.</strong> '
        f'{escape(fig.caption)} <span class="muted">({links})</span></figcaption></figure>'
    )


def render_page(
    title: str,
    subtitle: str,
    sections: Sequence[Section],
    pngs: dict[str, bytes],
    *,
    files: str = "figures",
) -> str:
    """The whole page: header, a link list, then every section with its figures embedded.

    ``pngs`` maps figure name -> PNG bytes (rendered once by the caller, which also saves them).
    """
    nav = " ".join(f'<a href="#{s.anchor}">{escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f'<header><h1>{escape(title)}</h1><p class="muted">{escape(subtitle)}</p>',
        f"<nav>{nav}</nav></header>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.anchor}"><h2>{escape(s.title)}</h2>{s.html}')
        parts.extend(_figure_html(f, pngs[f.name], files) for f in s.figures)
        parts.append(f"{s.after_html}</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
