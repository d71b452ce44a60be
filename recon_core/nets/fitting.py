"""The fitting loop of scan-specific network methods (TD-DIP now; GIP, INR and ConvDecoder next).

A scan-specific method fits a freshly initialised network to the data of one scan. What differs
between methods is one step's loss; what they share is here: the optimiser and learning-rate
schedule, a seeded random generator for frame draws and noise, progress events with lazy image
previews, stop requests, the time budget (``max_time_s``: stop, keep the estimate so far, say so),
an optional best-loss snapshot, checkpoint/resume of a long fit, and — on CUDA only, never
required — mixed precision (bfloat16 autocast of the network) and ``torch.compile``.

Usage inside a method's ``reconstruct``::

    fit = NetworkFit(self, net, FitSchedule(n_steps=p.n_steps, lr=p.lr, lr_step=p.lr_step),
                     seed=problem.seed, progress=progress, preview=generate)
    def step(i: int) -> Tensor:              # returns the scalar loss of step i
        idx = torch.randint(F, (1,), generator=fit.generator)
        with fit.autocast():
            x = net(z[idx])
        return loss_of(x, idx)
    fit.run(step)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from recon_core.methods.base import ProgressCallback, ReconMethod, StopRequested

Tensor = torch.Tensor

__all__ = ["FitSchedule", "FitResult", "NetworkFit", "init_seeded"]


@dataclass
class FitSchedule:
    """Optimiser and schedule of a fit.

    Attributes
    ----------
    n_steps:
        Number of optimiser steps.
    lr:
        Learning rate.
    lr_step, lr_gamma:
        StepLR: multiply the learning rate by ``lr_gamma`` every ``lr_step`` steps (``lr_step`` 0 = constant).
    optimizer:
        ``adam`` (default) or ``adamw``.
    weight_decay:
        Weight decay of the optimiser.
    """

    n_steps: int
    lr: float = 1e-3
    lr_step: int = 0
    lr_gamma: float = 1.0
    optimizer: str = "adam"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {self.n_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_step < 0 or self.lr_gamma <= 0:
            raise ValueError(f"lr_step must be >= 0 and lr_gamma > 0, got {self.lr_step}, {self.lr_gamma}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")


@dataclass
class FitResult:
    """What a fit did: steps run, last and best loss, and why it stopped early ("" if it did not)."""

    steps: int
    last_loss: float
    best_loss: float
    best_step: int
    stopped_early: str = ""
    resumed_from: int = 0


def init_seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a network with its initial weights drawn from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


class NetworkFit:
    """One scan-specific fit of ``net`` (see the module docstring).

    Parameters
    ----------
    method:
        The calling method: its progress reporting, stop request and time budget are used.
    net:
        The module whose parameters are fitted (and whose state is checkpointed / snapshotted).
    schedule:
        Optimiser and learning-rate schedule.
    seed:
        Seed of :attr:`generator` (CPU ``torch.Generator``) for the method's random draws.
    progress:
        The progress callback handed to ``reconstruct``.
    stage:
        Stage name of the progress events.
    preview:
        Zero-argument function returning the current images; attached lazily to every
        ``preview_every``-th progress event.
    keep_best:
        Keep a copy of the parameters at the lowest loss and restore it at the end (ConvDecoder's
        best-loss snapshot); off: the final parameters are kept.
    checkpoint:
        File to save the fit's state to every ``checkpoint_every`` steps and at the end; if it exists
        when the fit starts (and belongs to the same network) the fit resumes from it.
    amp, compile:
        CUDA only (ignored elsewhere): bfloat16 autocast inside :meth:`autocast`, ``torch.compile`` of
        ``net`` for the steps.
    """

    def __init__(self, method: ReconMethod, net: nn.Module, schedule: FitSchedule, *, seed: int = 0,
                 progress: ProgressCallback | None = None, stage: str = "fit",
                 preview: Optional[Callable[[], Tensor]] = None, preview_every: int = 0,
                 keep_best: bool = False, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 0, amp: bool = False, compile: bool = False) -> None:
        self.method = method
        self.net = net
        self.schedule = schedule
        self.progress = progress
        self.stage = stage
        self.preview = preview
        self.preview_every = int(preview_every)
        self.keep_best = bool(keep_best)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.checkpoint_every = int(checkpoint_every)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        params = [q for q in net.parameters() if q.requires_grad]
        opt_cls = torch.optim.AdamW if schedule.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=schedule.lr_step,
                                                          gamma=schedule.lr_gamma)
                          if schedule.lr_step > 0 else None)
        dev = next(iter(net.parameters())).device if params else torch.device("cpu")
        self.on_cuda = dev.type == "cuda"
        self.amp = bool(amp) and self.on_cuda
        self.compiled: nn.Module = net
        if compile and self.on_cuda and hasattr(torch, "compile"):
            self.compiled = torch.compile(net)  # type: ignore[assignment]
        self._best_state: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast on CUDA when ``amp`` is on; a no-op context otherwise."""
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _state(self, step: int, best: tuple[float, int]) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "step": step, "generator": self.generator.get_state(), "best": best,
                "best_state": self._best_state, "seed": self.seed, "method": self.method.name,
                "n_params": sum(q.numel() for q in self.net.parameters())}

    def _save(self, step: int, best: tuple[float, int]) -> None:
        assert self.checkpoint is not None
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(self._state(step, best), tmp)
        tmp.replace(self.checkpoint)   # atomic: an interrupted save never leaves a broken checkpoint

    def _resume(self) -> tuple[int, tuple[float, int]]:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return 0, (math.inf, 0)
        dev = next(iter(self.net.parameters())).device
        state = torch.load(self.checkpoint, map_location=dev, weights_only=False)
        n_params = sum(q.numel() for q in self.net.parameters())
        if state.get("method") != self.method.name or state.get("n_params") != n_params \
                or state.get("seed") != self.seed:
            raise ValueError(
                f"checkpoint {self.checkpoint} is of method {state.get('method')!r} with {state.get('n_params')} "
                f"parameters and seed {state.get('seed')}; this fit is {self.method.name!r} with {n_params} "
                f"parameters and seed {self.seed}: remove it or choose another checkpoint file")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self._best_state = state.get("best_state")
        return int(state["step"]), tuple(state["best"])  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------
    def run(self, step_fn: Callable[[int], Tensor]) -> FitResult:
        """Run the fit: ``step_fn(step)`` returns the scalar loss of step ``step`` (1-based).

        Stops after ``n_steps``, when the method's time budget is spent (the estimate so far is
        kept and :attr:`ReconMethod.stopped_early` says so) or, by :class:`StopRequested`, on a stop
        request (the checkpoint, if any, is saved first). Returns a :class:`FitResult`.
        """
        n = self.schedule.n_steps
        start, (best_loss, best_step) = self._resume()
        last = math.nan
        step = start
        self.net.train()
        with torch.enable_grad():
            for step in range(start + 1, n + 1):
                loss = step_fn(step)
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"{self.method.name}: loss became {float(loss.detach())} at step {step}; "
                                             f"lower the learning rate")
                last = float(loss.detach())
                if last < best_loss:   # the weights that gave this loss: snapshot before the update
                    best_loss, best_step = last, step
                    if self.keep_best:
                        self._best_state = copy.deepcopy(self.net.state_dict())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                lr_now = self.optimizer.param_groups[0]["lr"]
                if self.scheduler is not None:
                    self.scheduler.step()
                if self.checkpoint is not None and self.checkpoint_every and step % self.checkpoint_every == 0:
                    self._save(step, (best_loss, best_step))
                preview = self.preview if (self.preview is not None and self.preview_every
                                           and step % self.preview_every == 0) else None
                try:
                    self.method._report(self.progress, step, n, self.stage, preview=preview, loss=last, lr=lr_now)
                except StopRequested:   # a cancelled fit can be resumed from where it stopped
                    if self.checkpoint is not None:
                        self._save(step, (best_loss, best_step))
                    raise
                if step < n and self.method.out_of_time(step, n):
                    break
        if self.checkpoint is not None and step > start:
            self._save(step, (best_loss, best_step))
        if self.keep_best and self._best_state is not None:
            self.net.load_state_dict(self._best_state)
        return FitResult(steps=step, last_loss=last, best_loss=best_loss, best_step=best_step,
                         stopped_early=self.method.stopped_early, resumed_from=start)
