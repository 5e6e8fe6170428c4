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
    return sum(kl_from_log_probs(log_probs(s), log_probs(t)) for s, t in zip(student, teacher, strict=True))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the last axis, one row per position."""
    import torch

    return torch.log_softmax(logits.float(), dim=-1).flatten(0, -2)


def kl_from_log_probs(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student), averaged over rows, from both sides' log-probabilities (`log_probs`)."""
    import torch

    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def quarter_probe(batch: int, count: int) -> int:
    """A recovery's held-out probe: a quarter of its `count` inputs, at least a `batch`. A task metric on the last
    batch alone (4-8 images) says too little to keep or undo the training by."""
    return max(batch, count // 4)


def _probe_split(data: torch.Tensor, batch: int, probe: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(training inputs, probe, whether the probe is held out): the probe is the last `probe` inputs, which training
    never sees, where a batch is left to train on; else the first `probe`, which it does."""
    if len(data) >= batch + probe:
        return data[:-probe], data[-probe:], True
    return data, data[:probe], False


def distill(student: torch.nn.Module, teacher: torch.nn.Module, inputs: np.ndarray | torch.Tensor,
            targets: Callable[[torch.nn.Module, torch.Tensor], list[torch.Tensor]], *, steps: int, seconds: float,
            lr: float, batch: int, seed: int, progress: Callable[[Iterable[int], int], Iterable[int]],
            loss: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor] = mse,
            labels: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
            judge: Callable[[torch.Tensor], float] | None = None, probe_size: int | None = None) -> dict[str, Any]:
    """Train `student` (in place) towards `teacher` on `inputs` (images NCHW, token windows), or towards the labels
    of the input rows where `labels` gives them (`loss(student's targets, labels(rows))`: a fine-tune), for at most
    `steps` steps and `seconds` seconds; the student keeps eval-mode normalisation (batches are small). The last
    `probe_size` (default `batch`) inputs are held out as a probe when there are enough; if training made the student
    worse there, it gets its starting weights back (`reverted`). Worse is a higher loss, or where `judge` scores the
    student on the probe rows (a task metric, higher is better: a lower loss need not mean a better model), a lower
    score, the loss breaking a tie."""
    import torch

    generator = np.random.default_rng(seed)
    order = torch.arange(len(inputs))
    data, probe, held_out = _probe_split(order, batch, probe_size or batch)  # indices
    x_all = torch.as_tensor(inputs)
    start_weights = {name: value.clone() for name, value in student.state_dict().items()}

    def loss_on(rows: torch.Tensor) -> torch.Tensor:
        x = x_all[rows]
        with torch.no_grad():
            wanted = targets(teacher, x) if labels is None else labels(rows)
        return loss(targets(student, x), wanted)

    teacher.eval()
    student.eval()
    with torch.no_grad():
        before = float(loss_on(probe))
        score_before = judge(probe) if judge else None
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    start, done, losses = time.perf_counter(), 0, []
    for _ in progress(range(steps), steps):
        if time.perf_counter() - start > seconds:
            break
        value = loss_on(data[generator.choice(len(data), size=min(batch, len(data)), replace=False)])
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        losses.append(value.item())
        done += 1
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        after = float(loss_on(probe))
        score_after = judge(probe) if judge else None
    worse = (after > before if score_before is None or score_after is None or score_after == score_before
             else score_after < score_before)
    reverted = held_out and worse  # training made the student worse on unseen inputs: undo it
    if reverted:
        student.load_state_dict(start_weights)
    scores = {} if judge is None else {"probe_score_before": score_before, "probe_score_after": score_after}
    return {"steps": done, "step_bound": steps, "seconds": round(time.perf_counter() - start, 1),
            "seconds_bound": seconds, "lr": lr, "batch": batch, "samples": len(data), "probe_held_out": held_out,
            "probe_size": len(probe), "probe_loss_before": before, "probe_loss_after": after, **scores,
            "reverted": reverted, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def distill_blocks(student: torch.nn.Module, teacher: torch.nn.Module, inputs: np.ndarray | torch.Tensor,
                   blocks: list[tuple[str, list[int] | None]],
                   targets: Callable[[torch.nn.Module, torch.Tensor], list[torch.Tensor]], *, steps: int,
                   seconds: float, lr: float, batch: int, seed: int,
                   progress: Callable[[Iterable[int], int], Iterable[int]]) -> dict[str, Any]:
    """Block-wise distillation: block by block in the order they run, `student`'s block learns the original
    block's output on the original's own input (its kept channels: `blocks[i][1]`, all where None), fed with
    the input the student itself gives it. Local targets converge in a few hundred small steps where the
    whole-model loss barely moves, and each block also takes out the drift of the blocks before it.

    `steps` per block, `seconds` for all (blocks past the bound stay as they are). The last `batch` inputs are
    held out: a block whose error there rose keeps its starting weights; the whole model's loss there
    (`targets`, mean squared) is reported before and after."""
    import torch

    from edgekit.passes.reconstruct import recorded

    data = torch.as_tensor(inputs)
    training, probe, held_out = _probe_split(data, batch, batch)
    train = len(training)  # blocks see every input; the first `train` teach, the rest judge
    modules = dict(student.named_modules())
    wanted = recorded(teacher, data, [name for name, _ in blocks], [])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        before = float(mse(targets(student, probe), targets(teacher, probe)))
    start, trained, kept_start = time.perf_counter(), 0, 0
    for index in progress(range(len(blocks)), len(blocks)):
        if time.perf_counter() - start > seconds:
            break
        name, kept = blocks[index]
        block = modules[name]
        x = recorded(student, data, [], [name])[name, False]
        y = wanted[name, True]
        if kept is not None:
            with torch.no_grad():
                shape = block(x[:1]).shape
            y = y.index_select(next(d for d in range(1, y.dim()) if y.shape[d] != shape[d]), torch.tensor(kept))
        kept_start += not _fit_block(block, x, y, train, steps, lr, batch, generator)
        trained += 1
    with torch.no_grad():
        after = float(mse(targets(student, probe), targets(teacher, probe)))
    return {"scope": "blocks", "blocks": len(blocks), "blocks_trained": trained, "blocks_kept_start": kept_start,
            "steps": steps * trained, "steps_per_block": steps, "seconds": round(time.perf_counter() - start, 1),
            "seconds_bound": seconds, "lr": lr, "batch": batch, "samples": train, "probe_held_out": held_out,
            "probe_loss_before": before, "probe_loss_after": after, "reverted": False}


def _fit_block(block: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, train: int, steps: int, lr: float,
               batch: int, generator: torch.Generator) -> bool:
    """Adam on `block`'s parameters, mapping `x[:train]` to `y[:train]`; judged on the rest where there is a rest.
    Says whether the block kept its trained weights."""
    import torch

    def error(part: slice) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(block(x[part]), y[part]))

    judge = slice(train, None) if train < len(x) else slice(None)
    before = error(judge)
    start = {name: value.clone() for name, value in block.state_dict().items()}
    parameters = list(block.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(parameters, lr=lr)
    for _ in range(steps):
        chosen = torch.randperm(train, generator=generator)[:batch]
        loss = torch.nn.functional.mse_loss(block(x[chosen]), y[chosen])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for parameter in parameters:
        parameter.requires_grad_(False)
    if error(judge) > before:
        block.load_state_dict(start)
        return False
    return True


def distilled(done: dict[str, Any], loss: str) -> str:
    """A distillation's one-line account for the progress display."""
    return (f"{done['steps']} steps, probe {loss} {done['probe_loss_before']:.4g} -> {done['probe_loss_after']:.4g}"
            + (" (worse: reverted)" if done["reverted"] else ""))
