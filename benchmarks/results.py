"""Writers for benchmark results: JSON, a markdown table, matplotlib PNG plots.

Rows are flat dicts (str keys; str / int / float / bool / None values). Every writer creates the folder
it writes into and returns the path it wrote.

    write_json(rows, out / "video.json", meta={"machine": ...})
    write_markdown(rows, out / "video.md", columns=[...], title="...", notes=["..."])
    plot_lines(rows, out / "acc.png", x="speedup", y="accuracy", line="method", panel="time_mode")
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

Row = Dict[str, Any]


def _clean(value: Any) -> Any:
    """JSON-safe value: NaN/inf become None, tensors/numpy scalars become Python numbers."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return value


def write_json(rows: Sequence[Mapping[str, Any]], path: Path, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """``{"meta": meta, "rows": rows}`` as strict JSON (no NaN), indented."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": _clean(dict(meta or {})), "rows": [_clean(dict(r)) for r in rows]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def read_json(path: Path) -> List[Row]:
    """The rows of a file written by ``write_json``."""
    return list(json.loads(Path(path).read_text())["rows"])


def columns_of(rows: Iterable[Mapping[str, Any]]) -> List[str]:
    """Every key that occurs, in first-seen order."""
    seen: Dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A GitHub markdown table; missing cells are empty, floats get 4 significant digits."""
    columns = list(columns or columns_of(rows))
    if not columns:
        return "(no rows)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[Mapping[str, Any]], path: Path, columns: Optional[Sequence[str]] = None,
                   title: Optional[str] = None, notes: Sequence[str] = (), text: Optional[str] = None) -> Path:
    """A markdown file: optional ``# title``, note paragraphs, then the table (or ``text`` if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    if title:
        parts.append(f"# {title}\n")
    parts += [f"{n}\n" for n in notes]
    parts.append(text if text is not None else markdown_table(rows, columns))
    path.write_text("\n".join(parts))
    return path


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def plot_lines(rows: Sequence[Mapping[str, Any]], path: Path, x: str, y: str, line: str,
               panel: Optional[str] = None, title: Optional[str] = None, xlabel: Optional[str] = None,
               ylabel: Optional[str] = None, reference: Optional[Mapping[str, Any]] = None,
               extra_panels_y: Sequence[str] = (), order: Optional[str] = None) -> Path:
    """PNG of ``y`` against ``x``, one line per value of ``line`` (points sorted by x).

    ``panel``: one subplot per value of that key (e.g. time mode), side by side, shared axes.
    ``reference``: a row drawn as a black star and a dashed horizontal line in every panel (the unmerged model).
    ``extra_panels_y``: more rows of subplots, same x and lines, one per extra y key.
    ``order``: connect a line's points in the order of this key (e.g. the FLOPs target) instead of by x.
    Rows whose x or y is missing or not finite are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = list(dict.fromkeys(r.get(panel) for r in rows)) if panel else [None]
    lines = list(dict.fromkeys(r.get(line) for r in rows))
    ys = [y, *extra_panels_y]
    fig, axes = plt.subplots(len(ys), len(panels), figsize=(4.2 * len(panels), 3.4 * len(ys)), squeeze=False,
                             sharex=True, sharey="row")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    for row_i, y_key in enumerate(ys):
        for col_i, p in enumerate(panels):
            ax = axes[row_i][col_i]
            for i, name in enumerate(lines):
                picked = [r for r in rows if r.get(line) == name and (panel is None or r.get(panel) == p)]
                if order is not None:
                    picked = sorted(picked, key=lambda r: _number(r.get(order)) or 0.0)
                pts = [(_number(r.get(x)), _number(r.get(y_key))) for r in picked]
                pts = [(a, b) for a, b in pts if a is not None and b is not None]
                if order is None:
                    pts.sort()
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], marker=markers[i % len(markers)],
                            color=colours[i % len(colours)], label=str(name), linewidth=1.5, markersize=5)
            if reference is not None:
                rx, ry = _number(reference.get(x)), _number(reference.get(y_key))
                if ry is not None:
                    ax.axhline(ry, color="black", linestyle="--", linewidth=0.8)
                if rx is not None and ry is not None:
                    ax.plot([rx], [ry], marker="*", color="black", markersize=10, label="unmerged")
            if row_i == 0 and panel:
                ax.set_title(f"{panel} = {p}")
            if row_i == len(ys) - 1:
                ax.set_xlabel(xlabel or x)
            if col_i == 0:
                ax.set_ylabel(ylabel if (ylabel and row_i == 0) else y_key)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # collect labels from every panel, once each
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_suite(suite: str, rows: Sequence[Mapping[str, Any]], out_dir: Path, meta: Optional[Mapping[str, Any]] = None,
                columns: Optional[Sequence[str]] = None, markdown: Optional[str] = None) -> List[Path]:
    """``<suite>.json`` and ``<suite>.md`` in ``out_dir`` (``markdown`` replaces the generated table)."""
    out_dir = Path(out_dir)
    notes = []
    if meta:
        notes.append("Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items() if not isinstance(v, dict)))
    return [write_json(rows, out_dir / f"{suite}.json", meta),
            write_markdown(rows, out_dir / f"{suite}.md", columns, title=f"Benchmark: {suite}", notes=notes,
                           text=markdown)]
