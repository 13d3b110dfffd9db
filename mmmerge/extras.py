"""Optional dependencies: which extra installs each one, and one clear error when one is missing.

The core (patching, merging) needs torch and transformers only. Media decoding and the examples' tools come
with extras (setup.cfg), imported where they are used, never at module level:

    video   decord (load_video; wheels for x86_64 only), av (writing clips), torchvision (clip preprocessing)
    audio   soundfile (load_audio), torchaudio (fbank features, resampling)
"""
from __future__ import annotations

import importlib
import platform
from pathlib import Path
from types import ModuleType
from typing import Optional

# top-level module -> the extra that installs it (pip names equal the module names)
EXTRA_OF = {"decord": "video", "av": "video", "torchvision": "video", "soundfile": "audio", "torchaudio": "audio"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"torchaudio.compliance.kaldi"``) for ``purpose`` (e.g. ``"load_video"``).

    Raises:
        ImportError naming the package, the extra that installs it and the pip command, with the original
        error appended (a package that is installed but broken says why).
    """
    top = module.split(".")[0]
    if top not in EXTRA_OF:
        raise ValueError(f"{top} is not an optional dependency of mmmerge (known: {', '.join(EXTRA_OF)})")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRA_OF[top]
        note = ""
        if top == "decord" and platform.machine().lower() not in ("x86_64", "amd64"):
            note = f"; decord publishes wheels for x86_64 only, and this machine is {platform.machine()}"
        raise ImportError(f"{purpose} needs {top}, which comes with mmmerge's {extra} extra: "
                          f"pip install \"mmmerge[{extra}]\"{note} ({err})") from err


def model_folder_problem(name: Optional[str]) -> Optional[str]:
    """What is wrong with a ``--model`` that names a local path (one line), or None: no such folder, or a folder
    with no config.json. Hub ids such as ``org/name`` are left to transformers (None)."""
    if name is None:
        return None
    path = Path(name).expanduser()
    looks_local = (path.is_dir() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
                   or name.endswith("/"))
    if not looks_local:
        return None
    if not path.is_dir():
        return f"--model {name}: no such model folder"
    if not (path / "config.json").is_file():
        return f"--model {name}: not a model folder (no config.json in it)"
    return None
