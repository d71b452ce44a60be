"""Supervised training of a learned reconstruction method on a dataset of problems.

The method supplies the network and its forward pass (``build_network``, ``forward_normalised``,
``arch``: see :class:`recon_core.methods.dc_cnn.DCCNN`, and optionally ``training_loss(net, problem,
ground_truth)`` for its paper's loss); the loop supplies the rest: a seeded sample order, Adam
(+ ℓ2 weight decay), MSE on the normalised complex images unless the method has its own loss, validation
(PSNR, project metric: magnitude, ÷ max|gt|, per frame) every ``val_every`` steps, the best
weights kept (by validation PSNR) in ``out`` with their metadata, and a checkpoint
(``out`` + ``.ckpt``: network, optimizer, step, RNG, history) for resuming.

The sample drawn at step ``s`` depends only on ``(seed, s)``, so a resumed run sees the same
samples as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from recon_core.methods.base import ProgressEvent, ReconMethod
from recon_core.training.data import TrainingSample

Tensor = torch.Tensor

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "checkpoint_path"]

CKPT_FORMAT = "torchgadgets-checkpoint/1"


@dataclass
class TrainConfig:
    """Optimisation settings (Schlemper et al.: Adam lr 1e-3, ℓ2 1e-6)."""

    steps: int = 1000
    batch: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-6
    val_every: int = 50
    seed: int = 0
    grad_clip: float = 1.0


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    best_step: int
    best_val_psnr: float
    zero_filled_val_psnr: float
    history: list[dict[str, float]] = field(default_factory=list)
    steps_done: int = 0
    wall_s: float = 0.0


def checkpoint_path(out: str | Path) -> Path:
    """Where the resumable checkpoint of a run writing ``out`` lives (``out`` + ``.ckpt``)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _psnr(x: Tensor, gt: Tensor) -> float:
    from recon_core.metrics import psnr

    return float(psnr(x.detach().cpu(), gt.detach().cpu()))


def evaluate(method: ReconMethod, net: torch.nn.Module, samples: Sequence[TrainingSample]) -> dict[str, float]:
    """Mean validation loss (normalised MSE), PSNR of the network and of zero-filled, over ``samples``."""
    from recon_core.methods.dc_cnn import zero_filled_image

    was = net.training
    net.eval()
    losses, psnrs, zf = [], [], []
    with torch.no_grad():
        for s in samples:
            x, scale = method.forward_normalised(net, s.problem)  # type: ignore[attr-defined]
            gt = s.ground_truth.to(x.device) / scale
            losses.append(float((x - gt).abs().pow(2).mean()))
            psnrs.append(_psnr(x, gt))
            zf.append(_psnr(zero_filled_image(s.problem), s.ground_truth))
    net.train(was)
    return {"val_loss": sum(losses) / len(losses), "val_psnr": sum(psnrs) / len(psnrs),
            "zero_filled_psnr": sum(zf) / len(zf)}


def _save_checkpoint(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, step: int, state: dict[str, Any]
                     ) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CKPT_FORMAT, "step": int(step), "model": net.state_dict(), "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(), **state}, tmp)
    tmp.replace(path)


def train(method: ReconMethod, train_set: Sequence[TrainingSample], val_set: Sequence[TrainingSample],
          out: str | Path, config: TrainConfig | None = None, trained_on: str = "", resume: str | Path | None = None,
          device: torch.device | str = "cpu", progress: Optional[Callable[[ProgressEvent], None]] = None
          ) -> TrainResult:
    """Train ``method``'s network; the best weights (by validation PSNR) go to ``out``.

    ``resume``: a checkpoint written by an earlier run (same method and architecture); training
    continues at its step up to ``config.steps``, and ``trained_on`` is appended to the earlier
    run's (so the weights name every command that trained them). Deterministic for a given
    ``config.seed``.
    """
    from recon_core.training.weights import read_metadata, save_weights

    cfg = config or TrainConfig()
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError("train and validation sets must not be empty")
    out = Path(out)
    ckpt = checkpoint_path(out)
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    arch = method.arch()  # type: ignore[attr-defined]
    net = method.build_network().to(device)  # type: ignore[attr-defined]
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history = 0, []
    best_psnr, best_step = -math.inf, -1
    if resume is not None:
        state = torch.load(resume, map_location=device, weights_only=True)
        if state.get("format") != CKPT_FORMAT:
            raise ValueError(f"{resume} is not a torchgadgets training checkpoint")
        if state["method"] != method.name or state["arch"] != arch:
            raise ValueError(f"checkpoint {resume} is for {state['method']} {state['arch']}, this run trains "
                             f"{method.name} {arch}")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        step, history = int(state["step"]), list(state["history"])
        best_psnr, best_step = float(state["best_val_psnr"]), int(state["best_step"])
        earlier = str(state.get("trained_on", ""))
        if not earlier and out.is_file():  # checkpoints without it: the earlier run's best weights have it
            earlier = str(read_metadata(out).get("trained_on", ""))
        if earlier and trained_on != earlier:  # the weights' provenance keeps every stage of the run
            trained_on = f"{earlier} | resumed at step {step}: {trained_on}"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zf_psnr = float("nan")
    meta_extra = {"train_config": asdict(cfg), "n_train": len(train_set), "n_val": len(val_set)}

    def validate(at: int) -> None:
        nonlocal best_psnr, best_step, zf_psnr
        ev = evaluate(method, net, val_set)
        zf_psnr = ev["zero_filled_psnr"]
        history.append({"step": float(at), **ev})
        if ev["val_psnr"] > best_psnr:
            best_psnr, best_step = ev["val_psnr"], at
            save_weights(out, net.state_dict(), method.name, arch, trained_on,
                         extra={**meta_extra, "step": at, "val_psnr": ev["val_psnr"],
                                "zero_filled_val_psnr": ev["zero_filled_psnr"]})

    def save_ckpt() -> None:
        _save_checkpoint(ckpt, net, opt, step, {"method": method.name, "arch": arch, "history": history,
                                                "best_val_psnr": best_psnr, "best_step": best_step,
                                                "trained_on": trained_on})

    if step == 0 and not history:
        validate(0)
    net.train()
    loss_fn = getattr(method, "training_loss", None)
    loss_avg = float("nan")
    while step < cfg.steps:
        rng = random.Random(cfg.seed * 7_919 + step)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.batch):
            s = train_set[rng.randrange(len(train_set))]
            if loss_fn is not None:   # the method's own (paper) loss, e.g. CGPD-CSNet's deep supervision
                loss = loss_fn(net, s.problem, s.ground_truth) / cfg.batch
            else:
                x, scale = method.forward_normalised(net, s.problem)  # type: ignore[attr-defined]
                loss = (x - s.ground_truth.to(x.device) / scale).abs().pow(2).mean() / cfg.batch
            loss.backward()
            total += float(loss.detach())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss_avg = total if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * total
        metrics = {"loss": loss_avg}
        if step % cfg.val_every == 0 or step == cfg.steps:
            validate(step)
            save_ckpt()
            metrics.update(val_psnr=history[-1]["val_psnr"], best=best_psnr)
        if progress is not None:
            progress(ProgressEvent(method.name, step, cfg.steps, "train", metrics, time.perf_counter() - t0))
    if not ckpt.is_file():
        save_ckpt()
    return TrainResult(out=out, checkpoint=ckpt, best_step=best_step, best_val_psnr=best_psnr,
                       zero_filled_val_psnr=zf_psnr if not math.isnan(zf_psnr) else
                       (history[-1]["zero_filled_psnr"] if history else float("nan")),
                       history=history, steps_done=step, wall_s=time.perf_counter() - t0)
