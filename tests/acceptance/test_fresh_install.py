"""A newcomer's first two commands: install with the ``embedded`` extra into a
fresh virtualenv, then run the demo.  Nothing from the development venv is
used: the package is built and installed as a user installs it."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_pip_install_embedded_then_demo(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{ROOT}[embedded]"],
        capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    demo = subprocess.run(
        [str(env_dir / "bin" / "tenant-celery"), "demo"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-3000:] + demo.stdout[-3000:]
    assert "every tenant saw exactly its own rows" in demo.stdout
    assert "rows visible with no tenant set: 0" in demo.stdout
