"""Every ```python block of README.md and docs/*.md runs as written.

A block whose first line is ``# torchrun ...`` runs under torchrun with 2 gloo ranks; the others run
as a script. Blocks run in a fresh folder; the one that loads a trained model finds a tiny run of
the main job there under ``runs/main-*``. Shell blocks are illustrative and not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CIFAR10_JPEG, require_shared_data

from subnetdp.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)
        out += [(f"{path.relative_to(ROOT)}#{i}", code) for i, code in enumerate(blocks)]
    return out


BLOCKS = python_blocks()


def test_the_docs_have_python_blocks():
    names = [n for n, _ in BLOCKS]
    assert any(n.startswith("README.md") for n in names) and any(n.startswith("docs/") for n in names), names


@pytest.mark.parametrize("name,code", BLOCKS, ids=[n for n, _ in BLOCKS])
def test_snippet_runs_as_written(name, code, tmp_path):
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("needs the [hf] extras (transformers)")
    if "get_vision_dataset" in code or 'Path("runs")' in code:
        require_shared_data(CIFAR10_JPEG)
    if 'Path("runs")' in code:  # a tiny main-job run, evaluated on the full test set as the main job is
        assert main(["train", "--width", "4", "--train-subset", "256", "--batch-size", "32", "--simulate", "4",
                     "--steps", "2", "--no-progress", "--out", str(tmp_path / "runs" / "main-test")]) == 0
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if code.startswith("# torchrun"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if 'Path("runs")' in code:  # the loaded model scores exactly what the summary reports
        got = re.search(r"test accuracy (\S+), summary (\S+)", proc.stdout)
        assert got and got.group(1) == got.group(2), proc.stdout


def test_the_readme_code_map_names_every_module_and_only_modules_that_exist():
    """The README's "Code map" and src/subnetdp agree: each module file (package dirs by name) is in it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for cell in re.findall(r"^\| (.+?) \|", section, flags=re.M):  # the first column ("module" heads it)
        names = re.findall(r"`([^`]+)`", cell)
        folder = names[0].rsplit("/", 1)[0] + "/" if names and "/" in names[0] else ""
        named.update(n if "/" in n else folder + n for n in names)
    src = ROOT / "src" / "subnetdp"
    modules = {str(p.relative_to(src)) for p in src.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and not p.name.startswith("_")}
    covered = {m for m in modules if m in named or any(m.startswith(n) for n in named if n.endswith("/"))}
    assert covered == modules, f"modules missing from the README's code map: {sorted(modules - covered)}"
    missing = {n for n in named if not (src / n).exists()}
    assert not missing, f"the code map names what does not exist: {sorted(missing)}"
