"""The wheel holds what an installed ``maskd`` needs, and works away from the source tree.

``[tool.setuptools] packages`` in pyproject.toml is an explicit list, so a new subpackage that
is not added there silently goes missing from the wheel while every test run from the source
tree still passes; the migrations and examples ship as data read through importlib.resources.
Building the wheel takes a while, hence ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from service.db import head_revision

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("maskd_core", "service", "workers", "maskd_cli")
DATA_FILES = (
    "maskd_migrations/env.py",
    "maskd_migrations/script.py.mako",
    "maskd_migrations/versions/0001_initial_schema.py",
    "maskd_examples/quickstart-segmentation.yaml",
)
# Not copied into the build: environments, caches and earlier build output (a stale build/lib
# would put files in the wheel that the current configuration no longer selects).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "*cache",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    "build",
    "dist",
    "var",
    "runs",
    "mlruns",
    "mlartifacts",
)


def _run(
    args: list[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built without network from a copy of the working tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    out = tmp / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(source),
        ],
        timeout=300,
    )
    (built,) = out.glob("maskd-*.whl")
    return built


def _source_packages() -> set[str]:
    return {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in CODE_PACKAGES
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_the_wheel_holds_every_package_and_the_data_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    wheel_packages = {
        name.removesuffix("/__init__.py").replace("/", ".")
        for name in names
        if name.endswith("/__init__.py")
    }

    missing_files = [name for name in DATA_FILES if name not in names]
    assert not missing_files, f"not in {wheel.name}: {missing_files}"
    missing_packages = sorted(_source_packages() - wheel_packages)
    assert not missing_packages, (
        f"packages in the source tree but not in {wheel.name}: {missing_packages}; "
        "add them to [tool.setuptools] packages in pyproject.toml"
    )


def test_the_installed_wheel_finds_its_migrations_and_examples(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--target",
            str(site),
            str(wheel),
        ],
        timeout=300,
    )
    probe = textwrap.dedent(
        """
        import json
        from importlib.resources import files

        import service.db
        from service.db import head_revision

        example = files("maskd_examples") / "quickstart-segmentation.yaml"
        print(json.dumps({
            "head": head_revision(),
            "db_file": service.db.__file__,
            "example": example.read_text(),
        }))
        """
    )
    # Run from tmp_path, so neither the current directory nor the source tree is importable.
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = _run([sys.executable, "-c", probe], cwd=tmp_path, env=env, timeout=120)
    report = json.loads(result.stdout.strip().splitlines()[-1])

    # The same head as the source tree's scripts: every revision made it into the wheel.
    assert report["head"] == head_revision()
    assert Path(report["db_file"]).resolve().is_relative_to(site.resolve()), report["db_file"]
    assert "teacher" in report["example"]
