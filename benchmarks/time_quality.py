"""Where respecting time should pay: every method and time mode on the which-came-first video reference.

    python -m benchmarks time_quality --out benchmarks/results    # full sweep (1024 held-out clips)
    python -m benchmarks time_quality --quick --out /tmp/tq        # smoke run: 128 clips, 50% FLOPs only

The reference ``videomae_when`` (``python -m benchmarks.train_reference videomae_when``) sees two flashes that
look exactly alike, each one token (one 4 x 4 patch for one tubelet), at different tubelets and places, and
names the quadrant of the first. Merging the two flash tokens (or a flash with tokens of other tubelets) keeps
"a flash here and there" but loses which came first, so merging across time can destroy the answer, while
``within_frame`` never mixes tubelets. Same measurements and table as ``benchmarks.quality`` (accuracy,
agreement with the unmerged model, KL, FLOPs, measured speedup), for global / within_frame / adjacent /
window(2) at 75%, 50% and 35% of the FLOPs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import quality

MODELS = ("videomae_when",)
COLUMNS = quality.COLUMNS


def run(out_dir: Optional[Path] = None, quick: bool = False, progress: Any = None,
        clips: Optional[int] = None) -> List[Dict[str, Any]]:
    """``benchmarks.quality.run`` on the which-came-first reference (rows as there)."""
    return quality.run(out_dir, quick=quick, progress=progress, models=MODELS, clips=clips)


def report(rows: Sequence[Dict[str, Any]]) -> str:
    return quality.report(rows)


def plot(rows: Sequence[Dict[str, Any]], out_dir: Path) -> List[Path]:
    return quality.plot(rows, out_dir)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    from .__main__ import run_suite

    for p in run_suite("time_quality", args.out, quick=args.quick):
        print(p)
