"""Bounded distillation: the pruned student learns to reproduce the original (teacher) on unlabelled images.

The family says what to compare (a classifier's logits, a detector's raw head maps before decoding);
the loss is their mean squared difference. Bounded by steps and wall time; the loss on a fixed probe
batch before and after says whether it helped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def distill(student: torch.nn.Module, teacher: torch.nn.Module, images: np.ndarray,
            targets: Callable[[torch.nn.Module, torch.Tensor], list[torch.Tensor]], *, steps: int, seconds: float,
            lr: float, batch: int, seed: int, progress: Callable[[Iterable[int], int], Iterable[int]]
            ) -> dict[str, Any]:
    """Train `student` (in place) towards `teacher` on `images` (NCHW float) for at most `steps` steps and
    `seconds` seconds; the student keeps eval-mode normalisation (batches are small)."""
    import torch

    generator = np.random.default_rng(seed)
    probe = torch.from_numpy(images[:batch])

    def loss_on(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            wanted = targets(teacher, x)
        return sum(torch.nn.functional.mse_loss(s, t) for s, t in zip(targets(student, x), wanted, strict=True))

    teacher.eval()
    student.eval()
    with torch.no_grad():
        before = float(loss_on(probe))
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    start, done, losses = time.perf_counter(), 0, []
    for _ in progress(range(steps), steps):
        if time.perf_counter() - start > seconds:
            break
        x = torch.from_numpy(images[generator.choice(len(images), size=min(batch, len(images)), replace=False)])
        loss = loss_on(x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        done += 1
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        after = float(loss_on(probe))
    return {"steps": done, "step_bound": steps, "seconds": round(time.perf_counter() - start, 1),
            "seconds_bound": seconds, "lr": lr, "batch": batch, "images": len(images),
            "probe_loss_before": before, "probe_loss_after": after,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
