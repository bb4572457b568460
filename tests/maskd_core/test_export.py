"""The student's deployable copies (``maskd_core.export``): ONNX and torch.export graphs, their
parity with the PyTorch student, refusal past the tolerances, and latency.

The students are untrained (random weights, written as a job would write them): parity does not
depend on what a network learned, and untrained detectors still produce head outputs and, at a
score threshold of 0, boxes for the metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
import torch

from maskd_core.checkpoint import atomic_save
from maskd_core.data import build_dataset
from maskd_core.export import (
    ExportRefused,
    OneStageHeadGraph,
    Parity,
    export_student,
    flatten_level,
    speedups,
    student_graph,
)
from maskd_core.files import atomic_write_json
from maskd_core.models import build_model, model_document
from maskd_core.spec import ExportSpec, JobSpec
from maskd_core.workdir import WorkDir

DETECTOR_ARGS = {
    "backbone": "tiny",
    "tiny_width": 8,
    "fpn_channels": 64,  # FCOS at batch 1: 2 channels per GroupNorm(32) group on a 1×1 P7
    "min_size": 64,
    "max_size": 64,
    "score_thresh": 0.0,
}
BOXES = {"num_samples": 8, "image_size": 64, "max_object_size": 24, "vary_size": True}


def segmentation_spec(**export: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"]},
            "student": {"arch": "seg_tiny_student", "layers": ["backbone"]},
            "dataset": {"name": "procedural_shapes", "args": {"num_samples": 8, "image_size": 32}},
            "stage1": {"iterations": 1},
            "stage2": {"iterations": 1},
            "device": "cpu",
            "batch_size": 2,
            "export": {"batches": 2, "latency_runs": 3, **export},
        }
    )


def detection_spec(arch: str, args: dict[str, Any] = DETECTOR_ARGS, **export: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "task": "detection",
            "teacher": {"arch": arch, "layers": ["backbone"], "args": args},
            "student": {"arch": arch, "layers": ["backbone"], "args": args},
            "dataset": {"name": "procedural_boxes", "args": BOXES, "val_fraction": 0.25},
            "stage1": {"iterations": 1},
            "stage2": {"iterations": 1},
            "device": "cpu",
            "batch_size": 2,
            "export": {"batches": 1, "latency_runs": 2, **export},
        }
    )


def trained_student(spec: JobSpec, root: Path) -> WorkDir:
    """A work directory holding a (random) student as ``run_job`` writes one."""
    workdir = WorkDir(root).create()
    classes = build_dataset(spec).num_classes
    torch.manual_seed(1)
    student = build_model(spec.distilled_student, classes, field="student")
    atomic_save(student.state_dict(), workdir.student)
    atomic_write_json(
        workdir.model_spec, model_document(spec.distilled_student, classes, spec.task)
    )
    return workdir


def test_segmentation_onnx_matches_the_student_and_runs_in_onnxruntime(tmp_path: Path) -> None:
    spec = segmentation_spec(formats=["onnx", "torch_export"])
    workdir = trained_student(spec, tmp_path)

    report = export_student(spec, workdir)

    onnx = report["exports"]["onnx"]
    assert onnx["status"] == "accepted", onnx
    assert onnx["max_abs_diff"] <= 1e-3
    assert abs(onnx["metric_delta"]) <= 5e-3
    assert report["exports"]["torch_export"]["status"] == "accepted"
    assert workdir.exported("torch_export").is_file()
    assert set(report["latency_ms"]) == {"teacher", "student", "onnx", "torch_export"}
    assert all(value > 0 for value in report["latency_ms"].values())
    assert json.loads(workdir.export_report.read_text()) == report
    # Against the dense reference: the student network itself, on a size never exported.
    classes = build_dataset(spec).num_classes
    network = build_model(spec.distilled_student, classes, field="student")
    network.load_state_dict(torch.load(workdir.student, weights_only=True))
    images = torch.rand(3, 3, 40, 48)
    session = onnxruntime.InferenceSession(str(workdir.exported("onnx")))
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = network.eval()(images)["out"]
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)


def test_a_finished_report_is_read_back_not_exported_again(tmp_path: Path) -> None:
    spec = segmentation_spec(formats=["onnx"])
    workdir = trained_student(spec, tmp_path)
    first = export_student(spec, workdir)
    workdir.exported("onnx").unlink()

    assert export_student(spec, workdir) == first
    assert not workdir.exported("onnx").exists()


def test_an_export_past_the_tolerance_is_refused_and_its_file_removed(tmp_path: Path) -> None:
    spec = segmentation_spec(formats=["onnx"], tolerance=0.0, metric_tolerance=1.0)
    workdir = trained_student(spec, tmp_path)
    # float32 ONNX kernels differ from PyTorch's in the last bits: a tolerance of 0 refuses.

    report = export_student(spec, workdir)

    onnx = report["exports"]["onnx"]
    assert onnx["status"] == "refused"
    assert onnx["max_abs_diff"] > 0
    assert "export.tolerance" in onnx["reason"]
    assert not workdir.exported("onnx").exists()
    assert "onnx" not in report["latency_ms"]
    assert {"teacher", "student"} <= set(report["latency_ms"])


def test_parity_refuses_a_metric_change_and_names_the_setting() -> None:
    settings = ExportSpec(tolerance=1.0, metric_tolerance=0.01)
    Parity(0.5, "miou", 0.50, 0.495).check("onnx", settings)
    with pytest.raises(ExportRefused, match=r"export\.metric_tolerance 0\.01"):
        Parity(0.5, "miou", 0.50, 0.48).check("onnx", settings)
    with pytest.raises(ExportRefused, match=r"export\.tolerance"):
        Parity(float("nan"), "miou", 0.5, 0.5).check("onnx", settings)


def test_speedups_are_teacher_latency_over_each() -> None:
    assert speedups({"teacher": 12.0, "student": 3.0, "onnx": 2.0}) == {
        "student": 4.0,
        "onnx": 6.0,
    }


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_head_graph_levels_flatten_to_the_detectors_own_head_outputs(arch: str) -> None:
    spec = detection_spec(arch)
    torch.manual_seed(0)
    detector: Any = build_model(spec.distilled_student, 3, field="student").eval()
    graph = student_graph(spec, detector)
    assert not isinstance(graph, str)
    module = graph.module
    assert isinstance(module, OneStageHeadGraph)
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        outputs = module(images)
        expected = detector.head(list(detector.backbone(images).values()))
    kinds = module.output_kinds()
    widths = {"cls_logits": 4, "bbox_regression": 4, "bbox_ctrness": 1}
    for index, kind in enumerate(kinds):
        flat = torch.cat([flatten_level(o, widths[kind]) for o in outputs[index :: len(kinds)]], 1)
        assert torch.equal(flat, expected[kind])


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_detection_onnx_exports_raw_head_outputs_with_parity(arch: str, tmp_path: Path) -> None:
    spec = detection_spec(arch)
    workdir = trained_student(spec, tmp_path)

    report = export_student(spec, workdir)

    onnx = report["exports"]["onnx"]
    assert onnx["status"] == "accepted", onnx
    assert onnx["metric"] == "map"
    assert abs(onnx["metric_delta"]) <= 5e-3
    assert report["outputs"]["names"][:2] == ["cls_logits_0", "bbox_regression_0"]
    assert "raw head outputs" in report["outputs"]["contain"]
    assert report["input"]["size_divisible"] == 32
    assert {"teacher", "student", "onnx"} <= set(report["latency_ms"])


def test_a_two_stage_detector_is_reported_unsupported(tmp_path: Path) -> None:
    spec = detection_spec("fasterrcnn")
    workdir = trained_student(spec, tmp_path)

    report = export_student(spec, workdir)

    assert report["exports"]["onnx"]["status"] == "unsupported"
    assert "two-stage" in report["exports"]["onnx"]["reason"]
    assert not workdir.exported("onnx").exists()
    assert {"teacher", "student"} <= set(report["latency_ms"])


def test_a_model_that_cannot_run_one_image_is_reported_not_raised(tmp_path: Path) -> None:
    # FCOS's GroupNorm(32) over 32 channels refuses the single value per group that one
    # 64-pixel image gives on the 1×1 top level; the export and the job go on.
    spec = detection_spec("fcos", {**DETECTOR_ARGS, "fpn_channels": 32})
    workdir = trained_student(spec, tmp_path)

    report = export_student(spec, workdir)

    assert report["exports"]["onnx"]["status"] == "accepted"
    assert set(report["latency_unmeasured"]) == {"teacher", "student"}
    assert "per channel" in report["latency_unmeasured"]["teacher"]
    assert set(report["latency_ms"]) == {"onnx"}  # onnxruntime's GroupNorm takes one value
    assert report["speedup"] == {}  # nothing to compare with without the teacher
