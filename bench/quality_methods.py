"""Stage-2 methods side by side: one comparison job per dataset, mean ± std over fixed seeds.

Runs ``run_job`` on a spec with a ``comparison`` section (the job a user submits) on the procedural
segmentation data (``examples/compare-methods-segmentation.yaml``: the segmentation quickstart's
setup), the procedural detection data (``examples/quickstart-detection.yaml``) or any job spec
given with ``--spec`` (image folders, COCO, VOC). The teacher is trained first on the job's own
data when its weights file does not exist yet. Every method keeps its registry defaults; MasKD
keeps the spec's MasKD params (weight 0.1 on the segmentation logits, 10 on the FCOS levels).
Prints the comparison table in markdown. Not a test: a measurement to record. Rerunning with the
same ``--workdir`` resumes and skips finished runs. The related work's methods (DFMSD, SAMKD and,
on segmentation logits, PCD) are added to every default comparison.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_methods.py segmentation
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_methods.py detection --iterations 200
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_methods.py --spec my-job.yaml
"""

from __future__ import annotations

import argparse
import time
from importlib.resources import files
from pathlib import Path

import torch
from quality_segmentation import with_trained_teacher

from maskd_cli.core_commands import load_spec
from maskd_core.comparison import comparison_markdown
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec

EXAMPLES = files("maskd_examples")
RECIPES = {
    "segmentation": Path(str(EXAMPLES / "compare-methods-segmentation.yaml")),
    "detection": Path(str(EXAMPLES / "quickstart-detection.yaml")),
}


RELATED = ["dfmsd", "samkd", "pcd"]
"""The related work's masked methods (docs/methods.md), rows of every default comparison."""


def related_methods(spec: JobSpec) -> list[str]:
    """``RELATED`` less PCD on detection, whose taps are features, never class logits (PCD
    distils logits only, and validation would refuse the whole comparison)."""
    return [name for name in RELATED if name != "pcd" or spec.task == "segmentation"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", choices=sorted(RECIPES), default="segmentation")
    parser.add_argument("--spec", type=Path, help="a job spec of your own (overrides DATA)")
    parser.add_argument(
        "--methods",
        nargs="+",
        help="methods to compare (default: the spec's comparison, else maskd none fitnet mgd; "
        "then dfmsd samkd and, on segmentation, pcd)",
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
    # A method the spec already configures keeps its params (MasKD's weight above all).
    configured = {m.name: m for m in spec.methods()}
    names = args.methods or [m.name for m in spec.methods()]
    if len(names) == 1 and not args.methods:
        names = ["maskd", "none", "fitnet", "mgd"]
    if not args.methods:
        names += [name for name in related_methods(spec) if name not in names]
    data = spec.model_dump(mode="json")
    data["comparison"] = {
        "methods": [configured[n].model_dump(mode="json") if n in configured else n for n in names],
        "seeds": args.seeds,
    }
    data["stage1"]["iterations"] = args.stage1_iterations or spec.stage1.iterations
    data["stage2"]["iterations"] = args.iterations or spec.stage2.iterations
    spec = JobSpec.model_validate(data)
    teacher = Path(spec.teacher.weights) if spec.teacher.weights else workdir / "teacher.pt"
    spec = with_trained_teacher(spec, teacher, args.teacher_iterations)

    started = time.perf_counter()
    result = run_job(spec, workdir)
    print(
        f"\n{spec.name} ({spec.task}, {spec.dataset.name}): stage 1 {spec.stage1.iterations} "
        f"steps, stage 2 {spec.stage2.iterations} steps per run, {len(result.runs)} runs, "
        f"{time.perf_counter() - started:.0f} s (teacher training excluded)\n"
    )
    assert result.comparison is not None
    print(comparison_markdown(result.comparison), end="")


if __name__ == "__main__":
    main()
