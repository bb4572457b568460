"""Import-time rules that ``lint-imports`` cannot see, checked in fresh interpreters.

The Celery prefork parent imports ``workers.app`` and every module in the app's ``include``
before it forks the pool's children; if that pulls in torch, every child inherits a forked
torch (threads, CUDA state) and the parent pays for it. The API parses job specs, so
``maskd_core.spec`` must be importable without torch as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: records where each watched module was first imported from, runs
# ``BODY`` (which imports things), then prints the watched modules that ended up loaded.
_WATCHER = textwrap.dedent(
    """
    import importlib, json, sys, traceback

    WATCHED = {watched!r}
    first_import = {{}}

    class _Watch:
        def find_spec(self, name, path=None, target=None):
            if name in WATCHED and name not in first_import:
                stack = traceback.format_stack()[:-1]
                first_import[name] = "".join(s for s in stack if "<frozen importlib" not in s)
            return None

    sys.meta_path.insert(0, _Watch())
    extra = {{}}
    {body}
    loaded = {{name: first_import.get(name, "?") for name in WATCHED if name in sys.modules}}
    print(json.dumps({{"loaded": loaded, "extra": extra}}))
    """
)


def _imports_in_fresh_interpreter(body: str, watched: tuple[str, ...]) -> dict[str, object]:
    script = _WATCHER.format(watched=watched, body=textwrap.dedent(body).strip())
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def _describe(loaded: object) -> str:
    assert isinstance(loaded, dict)
    return "\n".join(f"{name} was first imported from:\n{stack}" for name, stack in loaded.items())


def test_the_celery_parent_never_imports_torch() -> None:
    report = _imports_in_fresh_interpreter(
        """
        import workers.app
        extra["include"] = list(workers.app.app.conf.include or ())
        for module in extra["include"]:
            importlib.import_module(module)
        """,
        watched=("torch", "maskd_core.runner"),
    )
    extra = report["extra"]
    assert isinstance(extra, dict)
    assert extra["include"], "the Celery app includes no task modules: nothing was checked"
    assert not report["loaded"], _describe(report["loaded"])


def test_parsing_a_spec_does_not_import_torch() -> None:
    report = _imports_in_fresh_interpreter("import maskd_core.spec", watched=("torch",))
    assert not report["loaded"], _describe(report["loaded"])


def test_the_client_and_its_commands_import_none_of_the_service_stack() -> None:
    """The bare ``pip install maskd`` has none of these: the client, ``maskd jobs`` and
    ``maskd models`` (their rendering included) must run without them."""
    report = _imports_in_fresh_interpreter(
        """
        import service.client, maskd_cli, maskd_cli.follow_view, maskd_cli.model_commands
        """,
        watched=("torch", "numpy", "fastapi", "starlette", "sqlalchemy", "celery", "mlflow"),
    )
    assert not report["loaded"], _describe(report["loaded"])
