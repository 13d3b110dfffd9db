"""One entry point for every benchmark suite.

    python -m benchmarks <suite> [--quick] [--out results/]
    suites: engine, video, audio, llava, quality, llava_quality, time_quality, padding

Each suite is a module ``benchmarks/<suite>.py`` exposing ``run(out_dir: pathlib.Path, quick: bool = False)
-> list[dict]`` (flat rows) and optionally ``plot(rows, out_dir) -> list[Path]``, ``COLUMNS`` (table column
order) and ``report(rows) -> str`` (markdown text). A suite whose ``run`` accepts ``progress`` gets a tqdm
bar: it calls ``progress.reset(total=n)`` once it knows how many steps it has, then
``progress.update(1)`` per step (``set_postfix_str`` for what it is doing). This writes
``<out>/<suite>.json`` (rows plus the machine), ``<out>/<suite>.md`` and the suite's plots, and prints the
markdown (the table, and the suite's goals where it has them).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import results

SUITES = ("engine", "video", "audio", "llava", "quality", "llava_quality", "time_quality", "padding")


def load_suite(name: str):
    """The suite module ``benchmarks.<name>``; a clear error if it is unknown or not written yet."""
    if name not in SUITES:
        raise SystemExit(f"unknown suite '{name}'; choose one of: {', '.join(SUITES)}")
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"benchmarks.{name}":
            raise SystemExit(f"suite '{name}' does not exist yet: benchmarks/{name}.py is missing") from None
        raise
    if not callable(getattr(module, "run", None)):
        raise SystemExit(f"benchmarks/{name}.py has no run(out_dir, quick=False) function")
    return module


def machine() -> dict:
    from .timing import machine as describe

    return describe()


def run_suite(name: str, out_dir: Path, quick: bool = False, show_progress: bool = True) -> List[Path]:
    """Run one suite and write its outputs; returns the written paths."""
    module = load_suite(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"quick": quick}
    params = inspect.signature(module.run).parameters
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=1, desc=name, unit="step", file=sys.stderr)
        if "progress" in params:
            kwargs["progress"] = bar
    start = time.time()
    rows = module.run(out_dir, **kwargs)
    if bar is not None:
        if "progress" not in params:
            bar.update(1)
        bar.close()
    meta = {**machine(), "suite": name, "quick": quick, "seconds": round(time.time() - start, 1),
            "command": f"python -m benchmarks {name}" + (" --quick" if quick else "") + f" --out {out_dir}"}
    markdown = module.report(rows) if callable(getattr(module, "report", None)) else None
    paths = results.write_suite(name, rows, out_dir, meta=meta, columns=getattr(module, "COLUMNS", None),
                                markdown=markdown)
    if callable(getattr(module, "plot", None)):
        paths += list(module.plot(rows, out_dir))
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help=f"one of: {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results/)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    paths = run_suite(args.suite, args.out, quick=args.quick, show_progress=not args.no_progress)
    for path in paths:  # the suite's table (and goals), as written to <suite>.md
        if path.suffix == ".md":
            print(path.read_text().rstrip() + "\n")
    print("wrote: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
