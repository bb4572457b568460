"""A distilled student as a deployable file: ONNX (run with onnxruntime) and/or a
``torch.export`` program (``.pt2``), checked against the PyTorch student before anyone gets it.

What is exported is the student's *network*, as a graph from one image tensor to tensors:

- **Segmentation**: ``images float32 [N, 3, H, W]`` (normalised like the training data) to
  ``logits [N, K, h, w]``, the network's main output (``"out"``), before the task resizes it to
  the mask.
- **Detection** (one-stage families, RetinaNet and FCOS): the **raw head outputs per FPN
  level**, not post-processed boxes. The input is the batch the detector's own ``transform``
  makes (resized, normalised with its mean and std, zero-padded to a multiple of its
  ``size_divisible``; the report records all of them) and the outputs are, per level ``i``,
  ``cls_logits_i [N, A·C, H_i, W_i]`` and ``bbox_regression_i [N, A·4, H_i, W_i]`` (FCOS also
  ``bbox_ctrness_i [N, A, H_i, W_i]``, its regression already through the ReLU FCOS applies).
  Anchors, box decoding and NMS stay outside the graph: they are data-dependent loops an
  exporter turns into fragile graphs, and every runtime has its own NMS. Two-stage detectors
  (Faster R-CNN) are not exported: their second stage runs on proposals the graph would have
  to sample, and the report says so (status ``unsupported``).

**Parity.** The exported file is run on the job's first ``export.batches`` validation batches
beside the same graph in PyTorch, on the CPU: the largest absolute difference of any output
must stay within ``export.tolerance``. The task's metric is then computed both ways on those
batches (for detection, the exported head outputs are decoded by the student's own anchor
generator, box coder and NMS), and its change must stay within ``export.metric_tolerance``.
An export past either is **refused** (``ExportRefused``): its file is removed and the report
keeps the numbers and the reason. A refused or failed export never fails the job: the user
still gets the PyTorch student, which is what the job was for, and the registry shows why no
deployable copy came with it.

**Latency.** The median of ``export.latency_runs`` timed batch-1 runs after warm-up, on the
worker's device, of the teacher, the student and each accepted export (onnxruntime on the
providers it has, which the report names); detection times the whole detector, pre- and
post-processing included, so the three are compared like for like.

The report (``WorkDir.export_report``) is written last and read back by a retry, so a job
resumed after a crash in REGISTERING does not export twice.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import nn

from maskd_core.data import build_dataset
from maskd_core.files import atomic_write_json, file_sha256
from maskd_core.loader import train_val_split, val_batches
from maskd_core.models import build_from_document, build_model
from maskd_core.models.detection import FCOS_FAMILY, RETINANET, detector_family
from maskd_core.spec import ExportFormat, ExportSpec, JobSpec
from maskd_core.stages import resolve_device
from maskd_core.tasks import Task, build_task
from maskd_core.tasks.base import Batch
from maskd_core.tasks.detection import DetectionBatch
from maskd_core.workdir import WorkDir

REPORT_FORMAT = 1
"""Version of the report's layout (``export.json``)."""
ONNX_OPSET = 18
WARMUP_RUNS = 3
NO_VALIDATION_BATCHES = "the job has no validation batches to check an export's parity on"

Outputs = list[torch.Tensor]
"""A graph's outputs, in the order of its output names."""
Runner = Callable[[torch.Tensor], Outputs]
"""Runs one exported graph on an input batch."""


class ExportRefused(RuntimeError):  # noqa: N818 - names what happened, like JobCancelled
    """The exported student's outputs or metric drifted past the spec's tolerances."""


@dataclass(frozen=True)
class Parity:
    """How far an exported graph is from the PyTorch one on the same validation batches."""

    max_abs_diff: float
    metric: str
    metric_pytorch: float
    metric_exported: float

    @property
    def metric_delta(self) -> float:
        """Exported minus PyTorch: negative when the export scores worse."""
        return self.metric_exported - self.metric_pytorch

    def check(self, export_format: str, spec: ExportSpec) -> None:
        """Raises ``ExportRefused`` naming the number past its tolerance and the setting."""
        if not self.max_abs_diff <= spec.tolerance:  # NaN is refused too
            raise ExportRefused(
                f"the {export_format} student's outputs differ from the PyTorch student's by up "
                f"to {self.max_abs_diff:.3g}, past export.tolerance {spec.tolerance:g}; raise "
                "export.tolerance if that difference is acceptable"
            )
        if not abs(self.metric_delta) <= spec.metric_tolerance:
            raise ExportRefused(
                f"the {export_format} student's {self.metric} is {self.metric_exported:.4f} "
                f"against the PyTorch student's {self.metric_pytorch:.4f}, past "
                f"export.metric_tolerance {spec.metric_tolerance:g}; raise "
                "export.metric_tolerance if that change is acceptable"
            )


# -- the graphs --------------------------------------------------------------------------------


class SegmentationGraph(nn.Module):
    """A segmentation network's main logits, whatever it returns (a tensor or ``{"out": …}``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.network(images)
        logits: torch.Tensor = output["out"] if isinstance(output, dict) else output
        return logits


class OneStageHeadGraph(nn.Module):
    """A RetinaNet or FCOS detector from its transformed input batch to its raw head outputs
    per FPN level (the module docstring gives the layout).

    The head's convolutions are called level by level, before torchvision flattens and
    concatenates the levels: a level's spatial size is what anchors are generated from, and a
    flat concatenation would lose it.
    """

    def __init__(self, detector: nn.Module, *, centerness: bool) -> None:
        super().__init__()
        self.detector: Any = detector
        self.centerness = centerness

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = list(self.detector.backbone(images).values())
        classification = self.detector.head.classification_head
        regression = self.detector.head.regression_head
        outputs: list[torch.Tensor] = []
        for level in features:
            outputs.append(classification.cls_logits(classification.conv(level)))
            box_features = regression.conv(level)
            boxes = regression.bbox_reg(box_features)
            if self.centerness:
                outputs += [nn.functional.relu(boxes), regression.bbox_ctrness(box_features)]
            else:
                outputs.append(boxes)
        return tuple(outputs)

    def output_kinds(self) -> tuple[str, ...]:
        """The head outputs of one level, in the order ``forward`` gives them."""
        if self.centerness:
            return ("cls_logits", "bbox_regression", "bbox_ctrness")
        return ("cls_logits", "bbox_regression")

    def output_names(self, levels: int) -> list[str]:
        return [f"{kind}_{level}" for level in range(levels) for kind in self.output_kinds()]


@dataclass(frozen=True)
class _Graph:
    """What is exported for one student, and how the task's metric is computed through it."""

    module: nn.Module
    output_names: list[str]
    input_description: dict[str, Any]
    output_description: str
    prepare: Callable[[Batch], torch.Tensor]
    """A validation batch as the graph's input tensor."""
    as_model: Callable[[Runner], nn.Module]
    """A model the task evaluates whose outputs come from running the graph with a runner."""


class _RunnerSegmenter(nn.Module):
    def __init__(self, run: Runner) -> None:
        super().__init__()
        self.run = run

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)[0]


class _RunnerDetector(nn.Module):
    """A one-stage detector whose head outputs come from an exported graph: the PyTorch
    detector's own transform before it, and its own anchors, box decoding and NMS after.

    This is what the report's detection metric and latency measure, and what a deployment
    reproduces around the graph.
    """

    def __init__(self, detector: nn.Module, graph: OneStageHeadGraph, run: Runner) -> None:
        super().__init__()
        torchvision_detector: Any = detector  # a RetinaNet or FCOS: .head, .transform, ...
        self.detector = torchvision_detector
        self.kinds = graph.output_kinds()
        self.classes = int(torchvision_detector.head.classification_head.num_classes)
        self.run = run

    def forward(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        detector = self.detector
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch, _ = detector.transform(list(images))
        outputs = self.run(batch.tensors)
        by_kind = [outputs[index :: len(self.kinds)] for index in range(len(self.kinds))]
        levels = by_kind[0]
        anchors = detector.anchor_generator(batch, levels)  # reads only the levels' shapes
        per_location = int(levels[0].shape[1]) // self.classes
        sizes = [int(level.shape[-2] * level.shape[-1]) * per_location for level in levels]
        anchors_per_level = [list(image_anchors.split(sizes)) for image_anchors in anchors]
        split = {
            kind: [flatten_level(output, self._width(kind)) for output in maps]
            for kind, maps in zip(self.kinds, by_kind, strict=True)
        }
        detections = detector.postprocess_detections(split, anchors_per_level, batch.image_sizes)
        result: list[dict[str, torch.Tensor]] = detector.transform.postprocess(
            detections, batch.image_sizes, original_sizes
        )
        return result

    def _width(self, kind: str) -> int:
        """Values per anchor of a head output: the class logits, a box, or a centerness."""
        return {"cls_logits": self.classes, "bbox_regression": 4}.get(kind, 1)


def flatten_level(output: torch.Tensor, width: int) -> torch.Tensor:
    """One level's head output ``[N, A·width, H, W]`` as torchvision's heads lay it out for
    decoding: ``[N, H·W·A, width]``, location-major, the anchors of a location together."""
    n, _, height, breadth = output.shape
    return output.view(n, -1, width, height, breadth).permute(0, 3, 4, 1, 2).reshape(n, -1, width)


def student_graph(spec: JobSpec, network: nn.Module) -> _Graph | str:
    """What is exported of ``network`` (the job's student), or why nothing can be."""
    if spec.task == "segmentation":
        return _Graph(
            module=SegmentationGraph(network).eval(),
            output_names=["logits"],
            input_description={
                "name": "images",
                "layout": "float32 [N, 3, H, W], normalised like the training data",
            },
            output_description="logits [N, K, h, w]: the network's main output, before resizing "
            "to the input size and argmax",
            prepare=lambda batch: batch[0],
            as_model=_RunnerSegmenter,
        )
    family = detector_family(spec.distilled_student.arch, "student.arch")
    if family not in (RETINANET, FCOS_FAMILY):
        return (
            f"{spec.distilled_student.arch} is a two-stage detector, whose second stage runs on "
            "proposals sampled inside the network; only one-stage detectors (retinanet, fcos) "
            "are exported"
        )
    graph = OneStageHeadGraph(network, centerness=family == FCOS_FAMILY).eval()
    detector: Any = network
    transform = detector.transform
    levels = _level_count(graph)

    def prepare(batch: DetectionBatch) -> torch.Tensor:
        transformed, _ = transform(list(batch.images))
        images: torch.Tensor = transformed.tensors
        return images

    return _Graph(
        module=graph,
        output_names=graph.output_names(levels),
        input_description={
            "name": "images",
            "layout": "float32 [N, 3, H, W]: images in [0, 1] resized so the short side is "
            "min_size (the long side at most max_size), normalised with image_mean and "
            "image_std, zero-padded to a multiple of size_divisible",
            "min_size": list(transform.min_size),
            "max_size": int(transform.max_size),
            "image_mean": list(transform.image_mean),
            "image_std": list(transform.image_std),
            "size_divisible": int(transform.size_divisible),
        },
        output_description="raw head outputs per FPN level i, before anchors, box decoding "
        "and NMS: cls_logits_i [N, A*C, H_i, W_i] (C classes, background included), "
        "bbox_regression_i [N, A*4, H_i, W_i]"
        + (", bbox_ctrness_i [N, A, H_i, W_i]" if graph.centerness else ""),
        prepare=prepare,
        as_model=lambda run: _RunnerDetector(network, graph, run),
    )


def _level_count(graph: OneStageHeadGraph) -> int:
    """The FPN levels the detector's backbone gives (run once on a small zero batch)."""
    with torch.no_grad():
        return len(graph(torch.zeros(2, 3, 128, 128))) // len(graph.output_kinds())


# -- export and runners ------------------------------------------------------------------------


def _dynamic_shapes() -> dict[str, dict[int, Any]]:
    """Batch, height and width free: the networks are fully convolutional."""
    free = torch.export.Dim.DYNAMIC
    return {"images": {0: free, 2: free, 3: free}}


def export_onnx(graph: _Graph, example: torch.Tensor, path: Any) -> None:
    """``graph`` as ONNX at ``path`` through the dynamo exporter (the TorchScript one is
    deprecated), with dynamic batch and size and its weights inside (a 2 GB limit that no
    student approaches)."""
    torch.onnx.export(
        graph.module,
        (example,),
        str(path),
        dynamo=True,
        input_names=["images"],
        output_names=graph.output_names,
        opset_version=ONNX_OPSET,
        dynamic_shapes=_dynamic_shapes(),
        external_data=False,  # one self-contained file, not a graph and a .data file beside it
        verbose=False,
    )


def onnx_providers() -> list[str]:
    """onnxruntime's providers on this worker, the GPU's first when it has one."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return preferred or list(available)


def onnx_runner(path: Any, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Runner:
    """Runs the ONNX file at ``path`` with onnxruntime (checked first with ``onnx.checker``)."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=list(providers))
    input_name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> Outputs:
        feed = {input_name: images.detach().cpu().numpy().astype(np.float32)}
        return [torch.from_numpy(np.asarray(out)) for out in session.run(None, feed)]

    return run


def export_program(graph: _Graph, example: torch.Tensor, path: Any) -> None:
    """``graph`` as a ``torch.export`` program saved at ``path`` (``.pt2``)."""
    program = torch.export.export(
        graph.module, (example,), dynamic_shapes=_dynamic_shapes(), strict=False
    )
    torch.export.save(program, str(path))


def program_runner(path: Any) -> Runner:
    """Runs a ``.pt2`` program this module saved (a job's own file, never a user's)."""
    module = torch.export.load(str(path)).module()

    def run(images: torch.Tensor) -> Outputs:
        with torch.no_grad():
            return _as_list(module(images))

    return run


def pytorch_runner(module: nn.Module) -> Runner:
    def run(images: torch.Tensor) -> Outputs:
        with torch.no_grad():
            return _as_list(module(images))

    return run


def _as_list(output: torch.Tensor | Sequence[torch.Tensor]) -> Outputs:
    return [output] if isinstance(output, torch.Tensor) else list(output)


# -- parity and latency ------------------------------------------------------------------------


def parity(graph: _Graph, exported: Runner, batches: Sequence[Batch], task: Task) -> Parity:
    """The exported graph against the PyTorch one on ``batches``, on the CPU."""
    reference = pytorch_runner(graph.module)
    worst = 0.0
    for batch in batches:
        images = graph.prepare(batch)
        expected, got = reference(images), exported(images)
        if len(expected) != len(got):
            return Parity(float("inf"), task.primary_metric, 0.0, 0.0)
        for want, have in zip(expected, got, strict=True):
            if want.shape != have.shape:
                return Parity(float("inf"), task.primary_metric, 0.0, 0.0)
            worst = max(worst, float((want.float() - have.float()).abs().max()))
    cpu = torch.device("cpu")
    metric = task.primary_metric
    before = task.evaluate(graph.as_model(reference).eval(), batches, cpu)[metric]
    after = task.evaluate(graph.as_model(exported).eval(), batches, cpu)[metric]
    return Parity(worst, metric, float(before), float(after))


def median_latency_ms(call: Callable[[], object], runs: int, device: torch.device) -> float:
    """The median wall time of ``call`` over ``runs`` runs after ``WARMUP_RUNS``, in ms;
    CUDA work is waited for, so the time is the device's, not the launch's."""

    def timed() -> float:
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000.0

    with torch.no_grad():
        for _ in range(WARMUP_RUNS):
            timed()
        return statistics.median(timed() for _ in range(runs))


def _one_image_call(
    spec: JobSpec, model: nn.Module, batch: Batch, device: torch.device
) -> Callable[[], object]:
    """A batch-1 forward of ``model`` on ``device``: the first image of ``batch``."""
    if spec.task == "segmentation":
        image = batch[0][:1].to(device)
        return lambda: model(image)
    images = [batch.images[0].to(device)]
    return lambda: model(images)


# -- the whole export --------------------------------------------------------------------------


def export_student(spec: JobSpec, workdir: WorkDir) -> dict[str, Any]:
    """Exports the student in ``workdir`` in each of ``spec.export.formats``, checks each one
    (``Parity``), times teacher, student and accepted exports, and writes the report; returns
    it (``export.json``'s contents). A report already written is returned as it is.

    ``spec`` is the student's resolved run spec (local paths); the teacher is rebuilt from
    it for its latency alone. Each format's entry has a ``status``: ``accepted``, ``refused``
    (past a tolerance), ``failed`` (the exporter or runtime raised) or ``unsupported``, and a
    ``reason`` for all but the first.
    """
    if workdir.export_report.exists():
        report: dict[str, Any] = json.loads(workdir.export_report.read_text())
        return report
    settings = spec.export
    document = json.loads(workdir.model_spec.read_text())
    student = build_from_document(document, workdir.student)
    task = build_task(spec)
    dataset = build_dataset(spec)
    _, val_data = train_val_split(spec, dataset)
    batches = list(islice(val_batches(val_data, task, spec.batch_size), settings.batches))
    device = resolve_device(spec)
    torch.manual_seed(spec.seed)  # a teacher without weights is the job's, as in the runner
    teacher = build_model(spec.teacher, dataset.num_classes, field="teacher")
    report = {
        "format": REPORT_FORMAT,
        "task": spec.task,
        "arch": spec.distilled_student.arch,
        "tolerance": settings.tolerance,
        "metric_tolerance": settings.metric_tolerance,
        "batches": len(batches),
        "device": str(device),
        "exports": {},
        "latency_ms": {},
    }
    graph = student_graph(spec, student) if batches else NO_VALIDATION_BATCHES
    runners: dict[str, Runner] = {}
    if isinstance(graph, str):
        report["exports"] = {
            name: {"status": "unsupported", "reason": graph} for name in settings.formats
        }
    else:
        report["input"] = graph.input_description
        report["outputs"] = {"names": graph.output_names, "contain": graph.output_description}
        workdir.export_dir.mkdir(parents=True, exist_ok=True)
        for name in settings.formats:
            entry, runner = _export_one(name, graph, batches, task, workdir, settings)
            report["exports"][name] = entry
            if runner is not None:
                runners[name] = runner
    report["latency_ms"], unmeasured = _latencies(
        spec, teacher, student, graph, runners, batches, device, settings
    )
    if unmeasured:
        report["latency_unmeasured"] = unmeasured
    report["speedup"] = speedups(report["latency_ms"])
    workdir.export_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(workdir.export_report, report)
    return report


def _export_one(
    name: ExportFormat,
    graph: _Graph,
    batches: Sequence[Batch],
    task: Task,
    workdir: WorkDir,
    settings: ExportSpec,
) -> tuple[dict[str, Any], Runner | None]:
    """One format: exported, checked, kept or removed; its report entry and, when accepted,
    its runner (for latency).

    Any exporter or runtime error is recorded as ``failed`` rather than raised: the exporters
    refuse some operators of some networks, and the job's product, the PyTorch student, is
    fine regardless.
    """
    path = workdir.exported(name)
    example = graph.prepare(batches[0])
    if example.shape[0] < 2:  # a batch of 1 would be taken for a fixed batch size
        example = example.expand(2, *example.shape[1:]).contiguous()
    entry: dict[str, Any] = {"file": path.name}
    try:
        if name == "onnx":
            export_onnx(graph, example, path)
            entry["opset"] = ONNX_OPSET
            check_runner = onnx_runner(path)
        else:
            export_program(graph, example, path)
            check_runner = program_runner(path)
        result = parity(graph, check_runner, batches, task)
    except Exception as error:  # recorded, not raised: an export never fails the job
        path.unlink(missing_ok=True)
        return {**entry, "status": "failed", "reason": f"{type(error).__name__}: {error}"}, None
    entry.update(
        max_abs_diff=result.max_abs_diff,
        metric=result.metric,
        metric_pytorch=result.metric_pytorch,
        metric_exported=result.metric_exported,
        metric_delta=result.metric_delta,
    )
    try:
        result.check(name, settings)
    except ExportRefused as refused:
        path.unlink(missing_ok=True)
        return {**entry, "status": "refused", "reason": str(refused)}, None
    runner = onnx_runner(path, onnx_providers()) if name == "onnx" else check_runner
    if name == "onnx":
        entry["providers"] = onnx_providers()
    entry["sha256"] = file_sha256(path)
    return {**entry, "status": "accepted", "reason": None}, runner


def _latencies(
    spec: JobSpec,
    teacher: nn.Module,
    student: nn.Module,
    graph: _Graph | str,
    runners: dict[str, Runner],
    batches: Sequence[Batch],
    device: torch.device,
    settings: ExportSpec,
) -> tuple[dict[str, float], dict[str, str]]:
    """Median batch-1 latency (ms) of teacher, student and each accepted export, and why a
    model could not be timed.

    A model that cannot run on one image is reported, not raised: an FCOS head's GroupNorm
    refuses a single value per group, which a batch of one gives on a 1×1 top level of a
    small image, and a latency is no reason to fail the job.
    """
    if not batches:
        return {}, {}
    cpu = torch.device("cpu")
    timed: list[tuple[str, nn.Module, torch.device]] = [
        ("teacher", teacher, device),
        ("student", student, device),
    ]
    if not isinstance(graph, str):
        timed += [(name, graph.as_model(run), cpu) for name, run in runners.items()]
    latency: dict[str, float] = {}
    unmeasured: dict[str, str] = {}
    for label, model, on in timed:
        model.to(on).eval()
        try:
            call = _one_image_call(spec, model, batches[0], on)
            latency[label] = median_latency_ms(call, settings.latency_runs, on)
        except (RuntimeError, ValueError) as error:
            unmeasured[label] = f"{type(error).__name__}: {error}"
        finally:
            model.to(cpu)
    return latency, unmeasured


def speedups(latency_ms: dict[str, float]) -> dict[str, float]:
    """Teacher latency over each other model's: how many times faster it is."""
    teacher = latency_ms.get("teacher")
    if not teacher:
        return {}
    return {
        name: teacher / value
        for name, value in latency_ms.items()
        if name != "teacher" and value > 0
    }
