"""The loss book of a stage: the losses of every step, read back at log steps as means over ranks,
the epoch's sums and means (`TrainState`, checkpointed), and the NaN guard (a non-finite loss,
gradient norm, weight or buffer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from hybridgan.checkpoint import any_rank
from hybridgan.exports import non_finite


class NonFinite(Exception):
    """A non-finite loss, gradient norm, weight or buffer; the message names the step and the value."""


@dataclass
class TrainState:
    """Where a stage is, checkpointed with the models: the step, and the current epoch's losses.

    An epoch's losses are kept as `epoch_sums`: sums over its steps of each step's mean over ranks
    (the same on every rank), plus `rank_sums`, this rank's own sums since the last fold into
    `epoch_sums` (`LossBook.fold_epoch_sums`, at checkpoints and at the epoch's end). Only
    `epoch_sums` is checkpointed, so an epoch's means stay exact across a resume, also onto another
    world size.
    """

    step: int = 0
    epoch_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    rank_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch_steps: int = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.rank_sums[name] = self.rank_sums.get(name, 0.0) + value.float()
        self.epoch_steps += 1

    def state_dict(self) -> dict[str, Any]:
        assert not self.rank_sums, "fold the ranks' sums before saving"
        return {"step": self.step, "epoch_steps": self.epoch_steps,
                "epoch_sums": {name: value.cpu() for name, value in self.epoch_sums.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch_steps = int(state["epoch_steps"])
        self.epoch_sums = dict(state["epoch_sums"])
        self.rank_sums = {}


class LossBook:
    """The losses and gradient norms of the steps since the last read-back (detached device tensors:
    no host-device sync per step), and the models whose weights and buffers the NaN guard checks."""

    def __init__(self, accelerator: Accelerator, state: TrainState) -> None:
        self.accelerator = accelerator
        self.state = state
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, losses) since the last read-back
        self.models: dict[str, torch.nn.Module] = {}
        self._grad_norms: list[tuple[int, str, torch.Tensor]] = []  # (step, model name, norm) since then

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """The losses of step `step` (counted from 1), into the epoch's sums and the next read-back."""
        self.state.add(losses)
        self.pending.append((step, losses))

    def add_grad_norm(self, step: int, model: torch.nn.Module, norm: torch.Tensor) -> None:
        """The gradient norm of `model` (one of `models`) at step `step`, checked at the next read-back."""
        name = next((key for key, watched in self.models.items() if watched is model), "model")
        self._grad_norms.append((step, name, norm.detach()))

    def read_back(self) -> tuple[int, dict[str, float]] | None:
        """(the last step, each loss's mean over the steps since the last read-back of the steps' means
        over ranks), or None when there were none (all ranks call it at the same step). Raises NonFinite
        on the first non-finite loss, then on a non-finite gradient norm since the last read-back or
        weight or buffer now (`check_state`)."""
        if not self.pending:
            return None
        steps = [step for step, _ in self.pending]
        names = list(self.pending[0][1])
        stacked = torch.stack([torch.stack([losses[n].float() for n in names]) for _, losses in self.pending]).cpu()
        self.pending.clear()
        finite = torch.isfinite(stacked)
        world_size = self.accelerator.num_processes
        if world_size > 1:  # log each step's mean over ranks; a non-finite loss anywhere spreads
            stacked = self.accelerator.reduce(stacked.to(self.accelerator.device), reduction="sum").cpu() / world_size
        if not bool(torch.isfinite(stacked).all()):
            if bool(finite.all()):
                raise NonFinite(f"steps {steps[0]}-{steps[-1]}: another rank saw a non-finite loss")
            row, col = (~finite).nonzero()[0].tolist()
            raise NonFinite(f"step {steps[row]}: {names[col]} is {stacked[row, col].item()}")
        self.check_state()
        return steps[-1], dict(zip(names, stacked.mean(dim=0).tolist()))

    def check_state(self) -> None:
        """NonFinite (on every rank) when a gradient norm since the last read-back, or a weight or
        buffer of a model now (BatchNorm's running statistics too, which no loss shows), holds NaN or
        an infinity. Per-tensor flags, one host-device sync."""
        norms, self._grad_norms = self._grad_norms, []
        problem = None
        if norms:
            finite = torch.isfinite(torch.stack([norm.float() for _, _, norm in norms])).cpu()
            if not bool(finite.all()):
                step, name, norm = norms[int((~finite).nonzero()[0])]
                problem = f"step {step}: the gradient norm of {name} is {norm.item()}"
        if problem is None:
            bad = non_finite((f"{name}.{key}", tensor) for name, model in self.models.items()
                             for key, tensor in self.accelerator.unwrap_model(model).state_dict().items())
            if bad is not None:
                problem = f"step {self.state.step}: {bad} holds NaN or an infinity"
        if any_rank(self.accelerator, problem is not None)[0]:
            raise NonFinite(problem or f"step {self.state.step}: another rank saw a non-finite gradient "
                                       f"norm, weight or buffer")

    def fold_epoch_sums(self) -> None:
        """Add the mean over ranks of the ranks' own loss sums to `state.epoch_sums` (all ranks)."""
        state = self.state
        if not state.rank_sums:
            return
        names = sorted(state.rank_sums)
        sums = torch.stack([state.rank_sums[n].to(self.accelerator.device) for n in names])
        means = (self.accelerator.reduce(sums, reduction="sum") / self.accelerator.num_processes).cpu()
        for name, value in zip(names, means.unbind()):
            state.epoch_sums[name] = state.epoch_sums.get(name, 0.0) + value
        state.rank_sums = {}

    def epoch_means(self, reset: bool) -> dict[str, float]:
        """This epoch's mean of every loss over all steps and ranks so far; `reset` (at the epoch's
        end) starts the next epoch's sums. A run that stops inside an epoch (`max_steps`) keeps
        them, so that a longer resumed run records the whole epoch."""
        self.fold_epoch_sums()
        state = self.state
        means = {name: float(total) / state.epoch_steps for name, total in sorted(state.epoch_sums.items())}
        if reset:
            state.epoch_sums, state.epoch_steps = {}, 0
        return means
