"""Self-contained HTML pages: every figure inline as a PNG data URI, no external file, script or font, so a
page opens in any browser or travels as one attachment. Used by the run report (``oof.report``) and the
sweep's study section (``train.trials``)."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .io import atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:8px 0}.note{color:#666;font-size:.9em}
td{max-width:36em;overflow-wrap:anywhere}.partial{color:#a40000}
"""
# the browser checks (tests/competition/oof/test_report.py, train/test_trials.py) read it after load
CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const ok = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesOk = ok + "/" + images.length;
});
</script>"""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any) -> str:
    """``fig`` as an inline ``<img>`` (the figure is closed)."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return img(buffer.getvalue())


def img(data: bytes, alt: str = "figure") -> str:
    """PNG bytes as an inline ``<img>``."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def table(frame: pd.DataFrame) -> str:
    """A data frame as an HTML table (4 decimals, ``-`` for missing values)."""
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-", border=0)


def note(text: str) -> str:
    """A grey explanatory paragraph (``text`` is escaped)."""
    return f'<p class="note">{html.escape(text)}</p>'


def write_page(out: str | os.PathLike, title: str, parts: Sequence[str]) -> Path:
    """Write the page ``title`` made of the HTML ``parts`` to ``out`` (atomically) and return its path."""
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style>{CHECK}</head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    return atomic_write_text(out, page, overwrite=True)
