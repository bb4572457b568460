"""The files of a job's work directory, named in one place.

The core writes these files, the worker reads them (to know where a resumed job starts, to
publish the student), MLflow stores some under the same names, and the API reports their paths.
Every one of them asks ``WorkDir`` for the path instead of spelling the file name again.

Layout of a job's directory::

    tokens.pt               stage 1's result (or tokens reused from an earlier job)
    evaluations/<name>.json the frozen teacher's evaluations ("teacher", "masked_teacher"),
                            read back by a resumed attempt (``maskd_core.evaluations``)
    stage1/checkpoint.pt    stage 1 in progress
    stage2/checkpoint.pt    stage 2 in progress
    baseline/checkpoint.pt  the no-KD student of ``maskd run --baseline``
    student.pt              the distilled student's state dict
    teacher.pt              a teacher job's trained teacher (its model_spec.json and summary.json
                            beside it, as a student's)
    model_spec.json         how to rebuild the student's network (``maskd_core.models``)
    summary.json            metrics, speeds, plan and versions
    export/                 the student's deployable copies (student.onnx, student.pt2) and
                            export.json, their parity and latency (``maskd_core.export``)
    comparison.json         a comparison job's table (and comparison.md, the same as markdown)
    runs/<method>-seed<n>/  one comparison run, laid out like a single job (stage2/, student.pt,
                            model_spec.json, summary.json), or with failure.json in place of
                            the student and summary when the run failed on its own

Torch-free, so the service side can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TOKENS_FILE = "tokens.pt"
STUDENT_FILE = "student.pt"
TEACHER_FILE = "teacher.pt"
MODEL_SPEC_FILE = "model_spec.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
FAILURE_FILE = "failure.json"
EXPORT_REPORT_FILE = "export.json"
EXPORT_FILES = {"onnx": "student.onnx", "torch_export": "student.pt2"}
"""The file of each export format (``maskd_core.spec.ExportFormat``)."""


@dataclass(frozen=True)
class WorkDir:
    """One job's work directory, or one comparison run's (``run``)."""

    root: Path

    @property
    def tokens(self) -> Path:
        return self.root / TOKENS_FILE

    @property
    def student(self) -> Path:
        return self.root / STUDENT_FILE

    @property
    def teacher(self) -> Path:
        """A teacher job's trained network."""
        return self.root / TEACHER_FILE

    @property
    def model_spec(self) -> Path:
        return self.root / MODEL_SPEC_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def export_dir(self) -> Path:
        """The student's exported copies (``exported``) and their report (``export_report``)."""
        return self.root / "export"

    @property
    def export_report(self) -> Path:
        return self.export_dir / EXPORT_REPORT_FILE

    def exported(self, export_format: str) -> Path:
        """The student exported in ``export_format`` ("onnx", "torch_export")."""
        return self.export_dir / EXPORT_FILES[export_format]

    @property
    def failure(self) -> Path:
        """Why a comparison run failed; a rerun retries the run and removes it on success."""
        return self.root / FAILURE_FILE

    @property
    def comparison_table(self) -> Path:
        return self.root / "comparison.json"

    @property
    def comparison_markdown(self) -> Path:
        return self.root / "comparison.md"

    def evaluation(self, name: str) -> Path:
        """A stored evaluation of the frozen teacher: "teacher" or "masked_teacher"."""
        return self.root / "evaluations" / f"{name}.json"

    def checkpoint(self, loop: str) -> Path:
        """The resumable state of one training loop: "stage1", "stage2", "baseline" or
        "teacher"."""
        return self.root / loop / CHECKPOINT_FILE

    def run(self, method: str, seed: int) -> WorkDir:
        """The directory of one (method, seed) run of a comparison job."""
        return WorkDir(self.root / "runs" / f"{method}-seed{seed}")

    def create(self) -> WorkDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self
