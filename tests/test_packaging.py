"""Packaging: dependency ranges and extras (setup.cfg), the CI constraints, optional imports, bare pytest."""
from __future__ import annotations

import ast
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from mmmerge.extras import EXTRA_OF, require

ROOT = Path(__file__).resolve().parent.parent
MEDIA = ("decord", "av", "soundfile", "torchvision", "torchaudio")


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def requirements(text: str):
    lines = [line.split("#")[0].strip() for line in text.strip().splitlines()]
    return [Requirement(line) for line in lines if line]


def core():
    return {r.name: r for r in requirements(setup_cfg()["options"]["install_requires"])}


def extra(name: str, seen=None):
    """The requirements of one extra, with self-references (``mmmerge[video,audio]``) expanded."""
    seen = set() if seen is None else seen
    out = {}
    for req in requirements(setup_cfg()["options.extras_require"][name]):
        if req.name == "mmmerge":
            for sub in sorted(req.extras - seen):
                seen.add(sub)
                out.update(extra(sub, seen))
        else:
            out[req.name] = req
    return out


def pins(path: Path):
    return {Requirement(r.split(";")[0]).name.lower(): Version(r.split("==")[1].split(";")[0].strip())
            for r in (line.split("#")[0].strip() for line in path.read_text().splitlines()) if r}


def test_core_declares_ranges_and_no_media_packages():
    deps = core()
    assert set(deps) == {"torch", "transformers", "einops", "numpy", "pillow"}
    assert all("==" not in str(r.specifier) for r in deps.values()), "no pins in the core: ranges only"
    torch, transformers = deps["torch"].specifier, deps["transformers"].specifier
    assert all(v in torch for v in ("2.11.0", "2.13.0", "2.14.1", "2.15.9")) and "2.16.0" not in torch
    assert "2.10.0" not in torch
    assert all(v in transformers for v in ("5.17.0", "5.24.0", "5.99")) and "6.0" not in transformers
    assert "5.16.1" not in transformers


def test_extras_carry_the_media_packages():
    video, audio, test, bench = extra("video"), extra("audio"), extra("test"), extra("bench")
    assert {"decord", "av", "torchvision"} <= set(video) and {"soundfile", "torchaudio"} <= set(audio)
    assert 'platform_machine == "x86_64"' in str(video["decord"].marker)
    assert {"pytest", "hypothesis", "decord", "av", "soundfile", "torchvision", "torchaudio", "matplotlib",
            "safetensors", "tqdm"} <= set(test)
    assert {"tqdm", "matplotlib", "safetensors"} <= set(bench)
    # torchvision and torchaudio ranges follow torch's 2.11..2.15
    assert "0.26.0" in video["torchvision"].specifier and "0.31.0" not in video["torchvision"].specifier
    assert "2.11.0" in audio["torchaudio"].specifier
    for module, name in EXTRA_OF.items():  # each loader's error names the extra that really installs it
        assert module in extra(name), f"{module} is not in the {name} extra"


def test_ci_constraints_pin_every_declared_dependency_inside_its_range():
    pinned = pins(ROOT / ".ci" / "constraints.txt")
    declared = {**core(), **extra("test"), **extra("bench")}
    for name, req in declared.items():
        assert name.lower() in pinned, f"{name} is not pinned in .ci/constraints.txt"
        assert pinned[name.lower()] in req.specifier, f"{name}=={pinned[name.lower()]} is outside {req}"
    oldest = pins(ROOT / ".ci" / "oldest.txt")
    assert str(oldest["transformers"]) == "5.17.0" and oldest["transformers"] in core()["transformers"].specifier
    assert oldest["huggingface-hub"] < Version("2")  # transformers 5.17 requires huggingface-hub < 2


def test_ci_runs_the_readme_test_command_then_the_oldest_transformers():
    readme = (ROOT / "README.md").read_text()
    command = 'pip install -e ".[test]" -c .ci/constraints.txt && python -m pytest -q'
    assert f"```bash\n{command}\n```" in readme
    assert "```bash\npip install -e \".[video]\" && python examples/video_classification.py\n```" in readme
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in script
    assert any("--target" in line and ".ci/oldest.txt" in line for line in script[script.index(command):])
    assert script[-1].startswith('PYTHONPATH="$oldest"') and script[-1].endswith("python -m pytest -q")


def module_level_imports(path: Path):
    """Top-level module names imported when ``path`` is imported (not inside functions)."""
    names = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                names.extend(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.append(child.module.split(".")[0])
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


@pytest.mark.parametrize("folder", ["mmmerge", "adapters", "examples", "benchmarks"])
def test_no_optional_package_is_imported_at_module_level(folder):
    optional = set(MEDIA)
    if folder in ("mmmerge", "adapters"):  # the installed library: nor the benchmarks' and tests' tools
        optional |= {"tqdm", "matplotlib", "safetensors", "pytest", "hypothesis", "benchmarks"}
    files = sorted((ROOT / folder).rglob("*.py"))  # packages too (adapters/llava/)
    assert files
    for path in files:
        found = set(module_level_imports(path)) & optional
        assert not found, f"{path.relative_to(ROOT)} imports {found} at module level: import it where it is used"


def test_missing_extra_raises_import_error_naming_it(monkeypatch, tmp_path):
    from mmmerge.adapters import audio, video

    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")
    for module in ("decord", "soundfile", "torchaudio.compliance.kaldi", "torchaudio.functional", "av"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(ImportError, match=r'load_video needs decord.*pip install "mmmerge\[video\]"'):
        video.load_video(clip)
    with pytest.raises(ImportError, match=r'load_audio needs soundfile.*pip install "mmmerge\[audio\]"'):
        audio.load_audio(clip)
    with pytest.raises(ImportError, match=r'features needs torchaudio.*pip install "mmmerge\[audio\]"'):
        audio.features(torch.zeros(16000))
    with pytest.raises(ImportError, match=r"the example's generated clip needs av.*mmmerge\[video\]"):
        require("av", "the example's generated clip")
    with pytest.raises(ValueError, match="not an optional dependency"):
        require("numpy", "anything")


def test_library_imports_and_patches_without_media_packages():
    """The GPU image has no decord, av or soundfile: the library must import and run without them."""
    code = """
import sys
for name in ("decord", "av", "soundfile"):
    sys.modules[name] = None
import torch
import mmmerge
from mmmerge.adapters import audio, video
from transformers import VideoMAEConfig, VideoMAEModel
config = VideoMAEConfig(image_size=16, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
model = VideoMAEModel(config).eval()
mmmerge.patch(model, r=2)
with torch.no_grad():
    out = model(pixel_values=torch.randn(1, 4, 3, 16, 16)).last_hidden_state
assert mmmerge.last_info(model).tokens_per_layer[:2] == [8, 6], mmmerge.last_info(model).tokens_per_layer
try:
    video.load_video(sys.executable)
except ImportError as err:
    assert 'mmmerge[video]' in str(err), err
else:
    raise AssertionError("load_video ran without decord")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_bare_pytest_collects_the_benchmark_tests(tmp_path):
    """The ``pytest`` script puts its own folder first on sys.path, not the working directory (unlike
    ``python -m pytest``); this runs pytest exactly that way, from a script outside the repository."""
    script = tmp_path / "pytest_entry.py"
    script.write_text("import sys\nimport pytest\nsys.exit(pytest.console_main())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    result = subprocess.run([sys.executable, str(script), "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/test_benchmarks.py"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"\d+ tests? collected", result.stdout), result.stdout[-2000:]
