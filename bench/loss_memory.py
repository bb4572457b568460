"""Peak memory of ``maskd_loss`` versus the official [N,T,C,H,W] formulation, forward + backward.

The official code multiplies every mask into every channel, materialising [N,T,C,H,W] tensors
(masked student, masked teacher, their difference, its square, plus autograd's copies). Ours
reduces over channels first and never builds them. Sizes: N=2, T=6, C=256 on the P3-P7 maps of
an 800×1333 image (strides 8-128), summed over the five levels like the stage-2 loss.

On CPU each formulation runs in a fresh subprocess and the peak is the growth of the resident
set's high-water mark (``ru_maxrss``) over the inputs; with a GPU both also run in this process
under ``torch.cuda.max_memory_allocated``. Prints the ratio (target ≤ 0.25).

    .venv/bin/python bench/loss_memory.py
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
from collections.abc import Callable

import torch

from maskd_core.losses import maskd_loss

N, T, C = 2, 6, 256
IMAGE = (800, 1333)
STRIDES = (8, 16, 32, 64, 128)
EPS = 1e-6

Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def official_loss(
    student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The dense formulation of the official detection loss (method doc §2.1)."""
    m = masks.unsqueeze(2)  # [N,T,1,H,W]
    masked_s = m * student.unsqueeze(1)  # [N,T,C,H,W]
    masked_t = m * teacher.unsqueeze(1)
    num = (masked_s - masked_t).pow(2).sum(dim=(3, 4))  # [N,T,C]
    ratio = (num / (masks.sum(dim=(2, 3)).unsqueeze(2) + EPS)).mean(dim=2)
    return (weights * ratio).sum(dim=1).mean()


FORMULATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "ours": lambda s, t, m, p: maskd_loss(s, t, m, p, EPS),
    "official": official_loss,
}


def make_levels(device: torch.device) -> list[Level]:
    generator = torch.Generator(device).manual_seed(0)
    levels = []
    for stride in STRIDES:
        h, w = math.ceil(IMAGE[0] / stride), math.ceil(IMAGE[1] / stride)
        student = torch.randn(N, C, h, w, device=device, generator=generator).requires_grad_()
        teacher = torch.randn(N, C, h, w, device=device, generator=generator)
        masks = torch.rand(N, T, h, w, device=device, generator=generator)
        weights = torch.softmax(torch.randn(N, T, device=device, generator=generator), dim=1)
        levels.append((student, teacher, masks, weights))
    return levels


def run(name: str, levels: list[Level]) -> None:
    loss = torch.stack([FORMULATIONS[name](*level) for level in levels]).sum()
    loss.backward()


def child(name: str) -> None:
    """Prints the peak resident-set growth (bytes) of one formulation over its inputs."""
    torch.set_num_threads(1)
    levels = make_levels(torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(name, levels)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_bytes": (after - before) * 1024}))  # ru_maxrss is in KiB


def cpu_peak(name: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name], check=True, capture_output=True, text=True
    )
    peak: int = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    return peak


def cuda_peak(name: str) -> int:
    device = torch.device("cuda")
    levels = make_levels(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(name, levels)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    sizes = ", ".join(
        f"P{3 + i} {math.ceil(IMAGE[0] / s)}×{math.ceil(IMAGE[1] / s)}"
        for i, s in enumerate(STRIDES)
    )
    print(f"N={N} T={T} C={C}, {sizes}; forward + backward, summed over levels")
    measures = [("cpu (ru_maxrss growth)", cpu_peak)]
    if torch.cuda.is_available():
        measures.append(("cuda (max_memory_allocated)", cuda_peak))
    for label, measure in measures:
        ours, official = measure("ours"), measure("official")
        print(
            f"{label}: ours {ours / 2**20:.1f} MiB, official {official / 2**20:.1f} MiB, "
            f"ratio {ours / official:.3f} (target <= 0.25)"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
