"""What a deployable student buys, measured side by side in one run: the median batch-1 latency
of teacher, student and exported student (``maskd_core.export``), and the export's parity.

Each pairing's student is built with random weights and written as a job writes one (a work
directory with ``student.pt`` and ``model_spec.json``); ``export_student`` then exports it
(ONNX and torch.export), checks it on validation batches and times all three on this machine's
CPU. Random weights change neither latency nor the size of a float rounding difference; the
metric delta they give is not a trained model's.

    .venv/bin/python bench/export_latency.py [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from maskd_core.checkpoint import atomic_save
from maskd_core.data import build_dataset
from maskd_core.export import export_student
from maskd_core.files import atomic_write_json
from maskd_core.models import build_model, model_document
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir

DETECTOR = {"backbone": "tiny", "fpn_channels": 64, "min_size": 256, "max_size": 256}
PAIRINGS: dict[str, dict[str, Any]] = {
    "segmentation seg_tiny_teacher -> seg_tiny_student": {
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"]},
        "student": {"arch": "seg_tiny_student", "layers": ["backbone"]},
        "dataset": {"name": "procedural_shapes", "args": {"num_samples": 16, "image_size": 128}},
    },
    "detection retinanet tiny/32 -> tiny/8": {
        "task": "detection",
        "teacher": {
            "arch": "retinanet",
            "layers": ["backbone"],
            "args": {**DETECTOR, "tiny_width": 32},
        },
        "student": {
            "arch": "retinanet",
            "layers": ["backbone"],
            "args": {**DETECTOR, "tiny_width": 8},
        },
        "dataset": {
            "name": "procedural_boxes",
            "args": {"num_samples": 16, "image_size": 256},
            "val_fraction": 0.25,
        },
    },
}


def measure(body: dict[str, Any], runs: int, root: Path) -> dict[str, Any]:
    spec = JobSpec.model_validate(
        {
            **body,
            "stage1": {"iterations": 1},
            "stage2": {"iterations": 1},
            "device": "cpu",
            "batch_size": 2,
            "export": {"formats": ["onnx", "torch_export"], "batches": 2, "latency_runs": runs},
        }
    )
    workdir = WorkDir(root).create()
    classes = build_dataset(spec).num_classes
    student = build_model(spec.distilled_student, classes, field="student")
    atomic_save(student.state_dict(), workdir.student)
    atomic_write_json(
        workdir.model_spec, model_document(spec.distilled_student, classes, spec.task)
    )
    return export_student(spec, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    for title, body in PAIRINGS.items():
        with tempfile.TemporaryDirectory(prefix="maskd-export-bench-") as tmp:
            report = measure(body, args.runs, Path(tmp))
        latency = report["latency_ms"]
        print(f"{title} ({report['device']}, threads {torch.get_num_threads()})")
        for model in ("teacher", "student", "onnx", "torch_export"):
            if model in latency:
                speedup = report["speedup"].get(model)
                versus = f"  {speedup:.2f}x the teacher" if speedup else ""
                print(f"  {model:<13} {latency[model]:8.2f} ms{versus}")
        for name, entry in report["exports"].items():
            numbers = {k: entry.get(k) for k in ("status", "max_abs_diff", "metric_delta")}
            print(f"  {name:<13} {json.dumps(numbers)}")


if __name__ == "__main__":
    main()
