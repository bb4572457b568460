"""Screenshots of MLflow's comparison view for docs/tracking.md, taken in a headless browser.

A small comparison job (the compare-methods example shrunk to minutes on a CPU: MasKD, no
distillation and FitNet, one seed) runs through ``maskd_core.runner.run_job`` with the worker's
``MlflowTracker``, into a fresh SQLite MLflow store. Then ``mlflow server`` starts on that store
the way ``maskd mlflow`` starts it, and Chromium, driven by Playwright, captures:

- ``docs/images/mlflow-runs.png``: the project's experiment opening on its runs table;
- ``docs/images/mlflow-charts.png``: the chart view with the runs' ``student_miou`` curves
  overlaid, one colour per method;
- ``docs/images/mask-grid-level0.png``: the stage-1 run's mask grid, as logged.

Run from the repository root (minutes; nothing is downloaded)::

    .venv/bin/pip install playwright     # the Python package only: never `playwright install`
    apt-get install -y chromium          # the browser it drives
    .venv/bin/python docs/screenshots.py [--workdir DIR] [--out docs/images]

Each PNG is reduced to a 256-colour palette so the committed pictures stay small.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

PROJECT = "docs"
COMPARE_SPEC = "compare-methods-segmentation.yaml"
TEACHER_STEPS = 800
"""Enough for a teacher whose masks and distillation mean something on the procedural shapes."""
SHRUNK: dict[str, Any] = {
    "name": "compare-methods",
    "dataset": {"name": "procedural_shapes", "args": {"num_samples": 256, "image_size": 64}},
    "batch_size": 8,
    "stage1": {"iterations": 60},
    "stage2": {"iterations": 400},
    "eval_every": 40,
    "checkpoint_every": 400,
}
"""The example's settings that make it run in minutes; its methods and recipe stay."""
METHODS = [{"name": "maskd", "params": {"loss_weight": 0.1}}, "none", "fitnet"]
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHROMIUM = "/usr/bin/chromium"
VIEWPORT_WIDTH, VIEWPORT_HEIGHT = 1440, 860
METHOD_COLOURS = {"maskd": "#d62728", "none": "#7f7f7f", "fitnet": "#1f77b4"}
"""One clear colour per method in the charts (MLflow otherwise picks them from the run ids)."""


def comparison_spec(teacher: Path) -> dict[str, Any]:
    """The shipped comparison example, shrunk (``SHRUNK``), on ``teacher``."""
    spec: dict[str, Any] = yaml.safe_load((files("maskd_examples") / COMPARE_SPEC).read_text())
    for key, value in SHRUNK.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    spec["teacher"]["weights"] = str(teacher)
    spec["comparison"] = {"methods": METHODS, "seeds": [0]}
    return spec


def run_tracked_comparison(root: Path, tracking_uri: str) -> str:
    """Trains the teacher, runs the comparison with the worker's tracker; the experiment id."""
    import torch

    from maskd_core.runner import run_job, train_teacher
    from maskd_core.spec import JobSpec
    from workers.tracking import job_tracker

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    teacher = root / "teacher.pt"
    spec = JobSpec.model_validate(comparison_spec(teacher))
    if not teacher.is_file():
        metrics = train_teacher(spec, teacher, TEACHER_STEPS)
        print(f"teacher trained: miou {metrics['teacher_miou']:.3f}", flush=True)
    tracker = job_tracker(
        tracking_uri,
        PROJECT,
        "compare-methods",
        spec,
        root / "mlartifacts",
        system_metrics_interval_seconds=2.0,
    )
    result = run_job(spec, root / "job", callbacks=[tracker])
    tracker.log_comparison(result.metrics)
    tracker.finish()
    print(f"comparison tracked: {dict(sorted(result.metrics.items()))}", flush=True)
    return tracker.experiment_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def mlflow_ui(root: Path, tracking_uri: str) -> Iterator[str]:
    """``mlflow server`` on the store, as ``maskd mlflow`` runs it; yields its address."""
    from maskd_cli.mlflow_command import mlflow_server_command

    port = _free_port()
    argv, env = mlflow_server_command(tracking_uri, str(root / "served"), port=port)
    with (root / "mlflow-server.log").open("w") as log:
        server = subprocess.Popen(argv, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"mlflow server did not start; see {log.name}") from None
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def _settle(seconds: float = 3.0) -> None:
    """Lets the UI finish its requests and animations before a picture is taken (it polls
    the server, so there is no moment without requests to wait for)."""
    time.sleep(seconds)


def _close_assistant(page: Page) -> None:
    """Closes the assistant panel MLflow opens beside the page; it is not what the docs show."""
    panel_close = page.get_by_role("button", name="Close")
    if panel_close.count():
        panel_close.first.click()


def _run_row(page: Page, text: str) -> Locator:
    return page.locator("[role=row]", has_text=text).first


TABLE_COLUMNS_SHOWN = ["student_miou"]
TABLE_COLUMNS_HIDDEN = ["Dataset", "Source", "Models"]


def _show_columns(page: Page) -> None:
    """The runs table with the numbers a comparison is read by, and run names in full."""
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    menu = search.locator("xpath=ancestor::*[.//*[text()='Reset to defaults']][1]")
    for name in TABLE_COLUMNS_HIDDEN + TABLE_COLUMNS_SHOWN:
        search.fill(name)
        menu.get_by_text(name, exact=True).first.click()
    page.keyboard.press("Escape")
    _drag_right_edge(page.locator(".ag-header-cell", has_text="Run Name").first, 150)


def _drag_right_edge(element: Locator, pixels: int, *, corner: bool = False) -> None:
    """Widens a resizable column, pane or chart by dragging its right edge (or its
    bottom-right corner, where a chart card's handle is), as a person would."""
    box = element.bounding_box()
    if box is None:
        raise RuntimeError(f"{element} is not on the page; has MLflow's UI changed?")
    x = box["x"] + box["width"] - 3
    y = box["y"] + box["height"] - 3 if corner else box["y"] + min(box["height"] / 2, 20)
    page = element.page
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + pixels, y, steps=10)
    page.mouse.up()
    page.mouse.move(0, VIEWPORT_HEIGHT - 1)  # no tooltip in the picture


def capture(url: str, experiment_id: str, out: Path) -> list[Path]:
    """The runs table and the chart view of ``experiment_id``."""
    from playwright.sync_api import sync_playwright

    from service.mlflow_names import experiment_ui_path

    runs_png, charts_png = out / "mlflow-runs.png", out / "mlflow-charts.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": VIEWPORT_WIDTH, "height": VIEWPORT_HEIGHT})
        page.goto(f"{url}/#{experiment_ui_path(experiment_id)}")
        parent = _run_row(page, "compare-methods")
        parent.wait_for()
        _settle()
        _close_assistant(page)
        parent.locator("button").first.click()  # shows the nested runs
        _show_columns(page)
        _settle(2.0)
        page.screenshot(path=str(runs_png))
        page.locator("label", has=page.locator("input[value=CHART]")).click()
        _settle()
        _drag_right_edge(page.locator(".react-resizable").first, 190)  # run names in full
        for method, colour in METHOD_COLOURS.items():
            _run_row(page, f"stage2/{method}/").locator("input[type=color]").fill(
                colour, force=True
            )
        page.get_by_placeholder("Search metric charts").fill("student_miou")
        _settle()
        # Image cards ignore the search; the metric charts come below them.
        metrics = page.get_by_text("Model metrics").first
        metrics.evaluate("section => section.scrollIntoView({block: 'start'})")
        _settle(1.0)
        _drag_right_edge(page.locator(".react-resizable").last, 380, corner=True)
        _settle(2.0)
        page.screenshot(path=str(charts_png))
        browser.close()
    return [runs_png, charts_png]


def save_mask_grid(tracking_uri: str, experiment_id: str, out: Path) -> Path:
    """The stage-1 run's grid of level 0, as MLflow stores it."""
    from mlflow import MlflowClient
    from PIL import Image

    client = MlflowClient(tracking_uri)
    (stage1,) = client.search_runs([experiment_id], filter_string="tags.stage = 'stage1'")
    images = client.list_artifacts(stage1.info.run_id, "images")
    (grid,) = [
        f.path
        for f in images
        if f.path.split("/")[-1].startswith("masks~level0+") and f.path.endswith(".png")
    ]
    with tempfile.TemporaryDirectory() as scratch:
        local = client.download_artifacts(stage1.info.run_id, grid, scratch)
        target = out / "mask-grid-level0.png"
        Image.open(local).save(target)
    return target


def shrink(path: Path) -> None:
    """A 256-colour palette: a UI screenshot loses nothing visible and a third of its bytes."""
    from PIL import Image

    with Image.open(path) as picture:
        palette = picture.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    palette.save(path, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the job and the MLflow store go")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="maskd-screenshots-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    print(f"working in {root}", flush=True)
    experiment_id = run_tracked_comparison(root, tracking_uri)
    with mlflow_ui(root, tracking_uri) as url:
        pictures = capture(url, experiment_id, args.out)
    pictures.append(save_mask_grid(tracking_uri, experiment_id, args.out))
    for picture in pictures:
        shrink(picture)
        print(f"{picture}: {picture.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
