"""A run's state on disk: resuming it, checkpointing it, and stopping it when the loss is not finite.

``checkpoints/last.pt`` holds what resuming needs (model, optimiser, step, best validation loss, the
fp16 grad scaler); nothing else is saved, because the batches and the step's randomness are pure
functions of (seed, step). A run directory is resumed only by a run of the same configuration, up
to :data:`RESUMABLE_FIELDS`.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..distributed import (is_main_process, load_model_state_dict, load_optimizer_state_dict, model_state_dict,
                           optimizer_state_dict)
from ..utils import atomic_path

# Fields that may differ between a run and its resumption (where and how fast, not what is computed).
RESUMABLE_FIELDS = ("output_dir", "run_name", "device", "num_workers", "log_every", "max_steps",
                    "attention", "compile", "channels_last", "leakage_suite", "fsdp")

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stopped and kept its last good checkpoint."""


def check_finite(terms: dict, step: int, run_dir: Path) -> None:
    """Stop the run, naming the step and the term, when a loss term is NaN or infinite."""
    bad = [k for k, v in terms.items() if not torch.isfinite(v)]
    if bad:
        raise NonFiniteLossError(
            f"loss term '{bad[0]}' is {terms[bad[0]].item()} at step {step}; the run stopped and kept its "
            f"last checkpoint ({run_dir / LAST_CHECKPOINT}). Lower lr or check the data.")


def run_is_complete(cfg: RunConfig, *, resume: bool) -> bool:
    """Whether ``cfg.run_dir`` already holds this run finished; refuses a directory that holds another
    configuration, or this one unfinished when ``resume`` is off."""
    saved = cfg.run_dir / "config.yaml"
    if not saved.is_file():
        return False
    previous = RunConfig.from_yaml(saved)
    mismatch = [k for k in asdict(cfg) if k not in RESUMABLE_FIELDS and k != "extra"
                and getattr(previous, k) != getattr(cfg, k)]
    if mismatch:
        raise ConfigError(f"{cfg.run_dir} holds a run with a different configuration ({', '.join(mismatch)}); "
                          "choose another run_name or output_dir")
    if not resume:
        raise ConfigError(f"{cfg.run_dir} exists; pass resume=True (CLI: --resume) to continue it")
    return (cfg.run_dir / "summary.json").is_file()


def save_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, step: int,
               best_val: float | None) -> None:
    """Write ``checkpoints/last.pt`` from rank 0. Called on every rank: a sharded model's full state
    dicts are gathered by all of them (:mod:`clip_refine_lab.distributed`); the file is the same
    ordinary state dicts either way."""
    state = {"model": model_state_dict(model), "optimizer": optimizer_state_dict(model, optimizer), "step": step,
             "best_val": best_val if best_val is not None else float("nan")}
    if not is_main_process():
        return
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    with atomic_path(run_dir / LAST_CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler,
               device: torch.device) -> tuple[int, float | None]:
    """(step, best validation loss) of the last checkpoint, loaded into model, optimiser and scaler;
    (0, None) when there is none."""
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        return 0, None
    state = torch.load(path, map_location=device, weights_only=True)
    load_model_state_dict(model, state["model"])
    load_optimizer_state_dict(model, optimizer, state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    best = float(state["best_val"])
    return int(state["step"]), (None if math.isnan(best) else best)
