"""Bounded distillation: the pruned student learns to reproduce the original (teacher) on unlabelled data.

The family says what to compare (a classifier's logits, a detector's raw head maps before decoding, a
language model's next-token logits) and, where mean squared difference is not the right measure, how
(next-token distributions: KL divergence). Bounded by steps and wall time; the loss on a fixed probe
batch before and after says whether it helped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    import torch

    return sum(torch.nn.functional.mse_loss(s, t) for s, t in zip(student, teacher, strict=True))


def next_token_kl(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """KL(teacher ‖ student) of next-token distributions, averaged over token positions."""
    import torch

    def log_probs(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x.float(), dim=-1).flatten(0, -2)

    return sum(torch.nn.functional.kl_div(log_probs(s), log_probs(t), log_target=True, reduction="batchmean")
               for s, t in zip(student, teacher, strict=True))


def distill(student: torch.nn.Module, teacher: torch.nn.Module, inputs: np.ndarray | torch.Tensor,
            targets: Callable[[torch.nn.Module, torch.Tensor], list[torch.Tensor]], *, steps: int, seconds: float,
            lr: float, batch: int, seed: int, progress: Callable[[Iterable[int], int], Iterable[int]],
            loss: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor] = mse) -> dict[str, Any]:
    """Train `student` (in place) towards `teacher` on `inputs` (images NCHW, token windows) for at most `steps`
    steps and `seconds` seconds; the student keeps eval-mode normalisation (batches are small). The last
    `batch` inputs are held out as a probe when there are enough; if training raised the loss there, the
    student gets its starting weights back (`reverted`)."""
    import torch

    generator = np.random.default_rng(seed)
    data = torch.as_tensor(inputs)
    held_out = len(data) >= 2 * batch  # the probe judges on inputs training never saw, where there are enough
    probe, data = (data[-batch:], data[:-batch]) if held_out else (data[:batch], data)
    start_weights = {name: value.clone() for name, value in student.state_dict().items()}

    def loss_on(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            wanted = targets(teacher, x)
        return loss(targets(student, x), wanted)

    teacher.eval()
    student.eval()
    with torch.no_grad():
        before = float(loss_on(probe))
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    start, done, losses = time.perf_counter(), 0, []
    for _ in progress(range(steps), steps):
        if time.perf_counter() - start > seconds:
            break
        x = data[generator.choice(len(data), size=min(batch, len(data)), replace=False)]
        value = loss_on(x)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        losses.append(value.item())
        done += 1
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        after = float(loss_on(probe))
    reverted = held_out and after > before  # training made the student worse on unseen inputs: undo it
    if reverted:
        student.load_state_dict(start_weights)
    return {"steps": done, "step_bound": steps, "seconds": round(time.perf_counter() - start, 1),
            "seconds_bound": seconds, "lr": lr, "batch": batch, "samples": len(data), "probe_held_out": held_out,
            "probe_loss_before": before, "probe_loss_after": after, "reverted": reverted,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
