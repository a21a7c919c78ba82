"""The package layout: the import contract (`.importlinter`, checked by import-linter) and ruff.

Both tools run as they would from the command line, on the repository itself, and each is also shown
to fail on a copy of the package with one forbidden import added: a contract nobody can break proves
nothing.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
PHASES = ("core", "training", "conversion", "targets", "analysis", "runs", "models")


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed beside {sys.executable}: run `make test` (installs .[test]).")
    return str(path)


def _lint_imports(cwd: pathlib.Path) -> subprocess.CompletedProcess:
    # grimp finds the package on sys.path: the copy under test, not the installed checkout.
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_module_lives_in_a_phase():
    loose = sorted(p.name for p in (ROOT / "tfcompress").glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside the phase sub-packages: {loose}"
    found = sorted(p.name for p in (ROOT / "tfcompress").iterdir() if (p / "__init__.py").exists())
    assert found == sorted(PHASES)


def test_import_contract_is_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, forbidden, contract", [
    ("training/prune.py", "from tfcompress.targets import micro", "Phases import downwards only"),
    ("core/errors.py", "from tfcompress.runs import pipeline", "Phases import downwards only"),
    ("training/cluster.py", "from tfcompress.conversion import verify", "Phases import downwards only"),
    ("analysis/macs.py", "import tensorflow", "TensorFlow and Keras are imported through"),
])
def test_import_contract_fails_on_a_forbidden_import(tmp_path, module, forbidden, contract):
    shutil.copytree(ROOT / "tfcompress", tmp_path / "tfcompress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    path = tmp_path / "tfcompress" / module
    path.write_text(path.read_text() + f"\n{forbidden}  # added by the test\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout
    assert "1 broken" in result.stdout


def test_ruff_finds_nothing():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_fails_on_an_unused_import(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "module.py").write_text("import os\n")
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "F401" in result.stdout
