"""A run's state on disk: resuming it, checkpointing it, and stopping it when it is not finite.

``checkpoints/last.pt`` holds what resuming needs (model, optimiser, step, best validation loss, the
fp16 grad scaler); nothing else is saved, because the batches and the step's randomness are pure
functions of (seed, step). A run directory is resumed only by a run of the same configuration, up
to :data:`RESUMABLE_FIELDS`.

Steps are counted as the log counts them: step N is the state after N optimiser updates (step 0 is
the starting model), and the loss logged at step N is that of the N-th update's batch. Errors,
the progress bar and ``last.pt`` use the same numbers. No checkpoint is ever written from a state
that is not finite (a NaN or infinite validation loss or parameter stops the run first), so a
rerun never resumes from one.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..rundir import CHECKPOINT_DIR
from ..distributed import (is_main_process, load_model_state_dict, load_optimizer_state_dict, model_state_dict,
                           optimizer_state_dict)
from ..utils import atomic_path

# Fields that may differ between a run and its resumption: where and how fast, not what is computed; and
# on_bad_sample, so that a run stopped by a bad record can go on with such records left out.
RESUMABLE_FIELDS = ("output_dir", "run_name", "device", "num_workers", "log_every", "max_steps",
                    "attention", "compile", "channels_last", "grad_checkpointing", "leakage_suite", "on_bad_sample",
                    "fsdp")

LAST_CHECKPOINT = Path(CHECKPOINT_DIR) / "last.pt"
RESTART_HINT = "--restart (Python: refine(..., restart=True))"


class NonFiniteLossError(FloatingPointError):
    """A loss term, the validation loss or a parameter became NaN or infinite; the run stopped and
    kept its last good checkpoint (the message names it, or says there is none)."""


class UnreadableCheckpointError(ConfigError):
    """``checkpoints/last.pt`` of a run to resume is truncated or corrupt."""


# ------------------------------------------------------------------------------ finiteness
def kept_checkpoint(run_dir: Path) -> str:
    """What a stopped run leaves to resume from, in words: the last checkpoint and its step, or none."""
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        return "no checkpoint was written"
    try:  # mmap: reads the step without loading the tensors
        step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 - only for the message
        return f"the last checkpoint {path} is kept"
    return f"the last good checkpoint {path} (step {step}) is kept"


def _stop(what: str, step: int, run_dir: Path, remedy: str) -> NonFiniteLossError:
    return NonFiniteLossError(f"{what} at step {step}; the run stopped and {kept_checkpoint(run_dir)}. {remedy}, "
                              f"then rerun with {RESTART_HINT} or another run_name")


def _value(t: torch.Tensor) -> str:
    return "nan" if torch.isnan(t).any() else "inf"


def check_finite(terms: dict, update_index: int, run_dir: Path) -> None:
    """Stop the run, naming the step and the term, when a loss term is NaN or infinite.

    ``update_index`` is the 0-based index of the update whose batch gave ``terms`` (the ``step``
    that ``compute_loss`` receives); it is reported as step ``update_index + 1``, the log's number
    for that update."""
    bad = [k for k, v in terms.items() if not k.startswith("_") and not torch.isfinite(v).all()]
    if bad:
        raise _stop(f"loss term '{bad[0]}' is {_value(terms[bad[0]])}", update_index + 1, run_dir,
                    "Lower lr (or set grad_clip), check the options that scale that term and the data")


def check_validation_loss(val_loss: float | None, step: int, run_dir: Path) -> None:
    """Stop the run when the validation loss at ``step`` (log numbering) is NaN or infinite."""
    if val_loss is not None and not math.isfinite(val_loss):
        remedy = ("The starting model's loss overflows: check the loss options (prior_sigma, temperature, ...) "
                  "and the data" if step == 0 else "Lower lr (or set grad_clip)")
        raise _stop(f"validation loss is {val_loss}", step, run_dir, remedy)


def check_parameters(model: torch.nn.Module, step: int, run_dir: Path) -> None:
    """Stop the run, naming the first parameter that is NaN or infinite at ``step`` (log numbering)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise _stop(f"parameter '{name}' is {_value(p)}", step, run_dir, "Lower lr (or set grad_clip)")


# ---------------------------------------------------------------------------- the directory
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
                          f"choose another run_name or output_dir, or start it over with {RESTART_HINT}")
    if not resume:
        raise ConfigError(f"{cfg.run_dir} exists; pass resume=True (CLI: --resume) to continue it, "
                          f"or start it over with {RESTART_HINT}")
    return (cfg.run_dir / "summary.json").is_file()


def _tensor_bytes(obj) -> int:
    """About the bytes ``torch.save`` writes for ``obj``: its tensors' data."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


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
    # through a Python file object: a full disk then raises OSError(ENOSPC) rather than torch's
    # "unexpected pos" from its own writer
    with atomic_path(run_dir / LAST_CHECKPOINT, size_hint=_tensor_bytes(state)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler,
               device: torch.device) -> tuple[int, float | None]:
    """(step, best validation loss) of the last checkpoint, loaded into model, optimiser and scaler;
    (0, None) when there is none. A checkpoint that cannot be read raises UnreadableCheckpointError."""
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        return 0, None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        step, best = int(state["step"]), float(state["best_val"])
        load_model_state_dict(model, state["model"])
        load_optimizer_state_dict(model, optimizer, state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    except Exception as e:  # noqa: BLE001 - truncated zip, random bytes, missing keys, wrong shapes
        raise UnreadableCheckpointError(
            f"cannot resume {run_dir}: {path} is truncated or corrupt ({_reason(e)}); start the run over with "
            f"{RESTART_HINT}, which discards its checkpoints and log") from None
    return step, (None if math.isnan(best) else best)


def _reason(error: Exception) -> str:
    """A short cause for the message (never the unpickler's advice to load untrusted files unsafely)."""
    first = (str(error).strip().splitlines() or [""])[0]
    if not first or "weights_only" in first or len(first) > 120:
        return type(error).__name__
    return f"{type(error).__name__}: {first}"
