"""Stage-2 methods side by side: one comparison job per dataset, mean ± std over fixed seeds.

Runs ``run_comparison`` (the job a user submits with a ``comparison`` section) on the procedural
segmentation data (``examples/compare-methods-segmentation.yaml``: the segmentation quickstart's
setup), the procedural detection data (``examples/quickstart-detection.yaml``) or any job spec
given with ``--spec`` (image folders, COCO, VOC). The teacher is trained first on the job's own
data when its weights file does not exist yet. Every method keeps its registry defaults; MasKD
keeps the spec's ``stage2.loss_weight`` (0.1 on the segmentation logits, 10 on the FCOS levels).
Prints the comparison table in markdown. Not a test: a measurement to record. Rerunning with the
same ``--workdir`` resumes and skips finished runs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_methods.py segmentation
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_methods.py detection --iterations 200
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_methods.py --spec my-job.yaml
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from quality_segmentation import with_trained_teacher

from maskd_cli.core_commands import load_spec
from maskd_core.runner import comparison_markdown, run_comparison
from maskd_core.spec import ComparisonSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = {
    "segmentation": EXAMPLES / "compare-methods-segmentation.yaml",
    "detection": EXAMPLES / "quickstart-detection.yaml",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", choices=sorted(RECIPES), default="segmentation")
    parser.add_argument("--spec", type=Path, help="a job spec of your own (overrides DATA)")
    parser.add_argument(
        "--methods",
        nargs="+",
        help="methods to compare (default: the spec's comparison, else maskd none fitnet mgd)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, help="stage-2 steps per run (default: spec's)")
    parser.add_argument("--stage1-iterations", type=int, help="default: the spec's")
    parser.add_argument("--teacher-iterations", type=int, default=1200)
    parser.add_argument("--workdir", type=Path, help="default runs/bench-quality-methods-<name>")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = load_spec(args.spec or RECIPES[args.data])
    workdir = args.workdir or Path("runs") / f"bench-quality-methods-{spec.name}"
    methods = args.methods or (
        [m.name for m in spec.comparison.methods] if spec.comparison else None
    )
    comparison = ComparisonSpec.model_validate(
        {"methods": methods or ["maskd", "none", "fitnet", "mgd"], "seeds": args.seeds}
    )
    stage1 = spec.stage1.model_copy(
        update={"iterations": args.stage1_iterations or spec.stage1.iterations}
    )
    stage2 = spec.stage2.model_copy(
        update={"iterations": args.iterations or spec.stage2.iterations}
    )
    spec = spec.model_copy(update={"comparison": comparison, "stage1": stage1, "stage2": stage2})
    teacher = Path(spec.teacher.weights) if spec.teacher.weights else workdir / "teacher.pt"
    spec = with_trained_teacher(spec, teacher, args.teacher_iterations)

    started = time.perf_counter()
    result = run_comparison(spec, workdir)
    print(
        f"\n{spec.name} ({spec.task}, {spec.dataset.name}): stage 1 {spec.stage1.iterations} "
        f"steps, stage 2 {spec.stage2.iterations} steps per run, {len(result.runs)} runs, "
        f"{time.perf_counter() - started:.0f} s (teacher training excluded)\n"
    )
    print(comparison_markdown(result.table), end="")


if __name__ == "__main__":
    main()
