"""Checkpoint files: reading any state-dict file with clear errors, and writing ours.

Ours are safetensors files whose header says what model they hold (:class:`ModelSpec` and the open_clip
model config itself), so they reload as themselves whatever the starting model was: an open_clip name, a
file, an ``hf-hub:`` repository or a ``local-dir:`` folder. Header keys (all strings, as safetensors
requires): ``format``, ``arch``, ``open_clip_name``, ``quick_gelu``, ``pretrained``, ``preprocess`` (JSON),
``model_cfg`` (JSON: the open_clip model config the weights were built with, QuickGELU included),
``tokenizer`` (the name open_clip's ``get_tokenizer`` takes for it), ``open_clip_version``, plus extras such
as ``method``. Two saves of equal tensors and spec give identical bytes (:func:`save_checkpoint`).

Foreign files load too (:func:`read_state_dict`): ``.safetensors``, and ``.pt``/``.pth``/``.bin`` through
``torch.load(weights_only=True)``, holding a bare state dict or one under ``"state_dict"`` or ``"model"``
(open_clip's and our training checkpoints), with ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``)
prefixes removed. A damaged or non-checkpoint file is one :class:`ModelLoadError` line naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..utils import atomic_path

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FORMAT = "clip-refine-lab/2"  # /1 files lack model_cfg and tokenizer: their arch must be an open_clip name
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")  # open_clip names whose config (and weights) live elsewhere


class ModelNotAvailableError(RuntimeError):
    """The requested weights are not on this machine and cannot be downloaded."""


class ModelLoadError(ModelNotAvailableError, ValueError):
    """A name, file or folder that cannot be loaded as the requested model: unknown, damaged, not a
    checkpoint, or another architecture. The message names the file (and the first mismatching tensor);
    being a ModelNotAvailableError, the CLI prints it as one line."""


@dataclass(frozen=True)
class ModelSpec:
    """What a loaded model is: enough to load it again and to record it with a run."""

    arch: str  # open_clip name: "ViT-B-32", "tiny-vit-48", "hf-hub:org/repo" or "local-dir:/abs/path"
    pretrained: str | None  # tag, "embedded", a file path, or None (random init, or the weights of arch's folder)
    quick_gelu: bool = False
    preprocess: dict = field(default_factory=dict)  # open_clip PreprocessCfg fields (size, mean, std, ...)
    model_cfg: dict = field(default_factory=dict)  # the open_clip model config the weights were built with
    tokenizer: str = ""  # the name open_clip.get_tokenizer takes for this model ("" = arch)

    @property
    def open_clip_name(self) -> str:
        """The name plain open_clip takes with ``pretrained=<file>`` to load these weights correctly; "" for
        ``hf-hub:``/``local-dir:`` models, where open_clip ignores ``pretrained`` (export a folder instead:
        :func:`clip_refine_lab.models.loading.export_open_clip_dir`)."""
        import open_clip

        if self.arch.startswith(SCHEMA_PREFIXES):
            return ""
        if self.quick_gelu and not self.arch.endswith("-quickgelu") and f"{self.arch}-quickgelu" in open_clip.list_models():
            return f"{self.arch}-quickgelu"
        return self.arch

    def full_model_cfg(self) -> dict:
        """The model config to record: ``model_cfg``, else open_clip's registered config of ``arch``; with
        ``quick_gelu`` set when the model uses it, so a rebuild from the config alone is the same model."""
        import open_clip

        cfg = dict(self.model_cfg) if self.model_cfg else open_clip.get_model_config(self.arch)
        if not cfg:
            raise ValueError(f"the spec of '{self.arch}' records no model config and open_clip knows no such name")
        if self.quick_gelu:
            cfg["quick_gelu"] = True
        return cfg


# ------------------------------------------------------------------------------------------ writing
def save_checkpoint(model: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike, spec: ModelSpec,
                    **extra: str) -> Path:
    """Write ``model``'s state dict (or ``model`` itself, a state dict) as safetensors, atomically, with
    the spec and model config in the header.

    Deterministic: equal tensors and spec give identical bytes. Plain open_clip loads it as
    ``create_model_and_transforms(spec.open_clip_name, pretrained=path)`` for open_clip's own architectures,
    and any of ours through a folder written by :func:`~clip_refine_lab.models.loading.export_open_clip_dir`.
    """
    from safetensors.torch import save_file

    import open_clip

    tensors = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "arch": spec.arch,
        "open_clip_name": spec.open_clip_name,
        "quick_gelu": "true" if spec.quick_gelu else "false",
        "pretrained": str(spec.pretrained or ""),
        "preprocess": _json(spec.preprocess),
        "model_cfg": _json(spec.full_model_cfg()),
        "tokenizer": spec.tokenizer or spec.arch,
        "open_clip_version": open_clip.__version__,
        **{k: str(v) for k, v in extra.items()},
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
        canonicalise_safetensors_header(tmp)
    return Path(path)


def canonicalise_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, so equal contents give equal bytes.

    safetensors' writer emits the metadata map in arbitrary (hash) order. The header is the 8-byte
    little-endian length, the JSON, then space padding to a multiple of 8 (as safetensors pads); tensor
    offsets count from the end of the header, so the data section is kept byte for byte."""
    path = Path(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) == length:
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(text)
        return
    rewritten = path.with_name(path.name + ".header")
    with open(path, "rb") as src, open(rewritten, "wb") as dst:
        src.seek(8 + length)
        dst.write(struct.pack("<Q", len(text)) + text)
        shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(rewritten, path)


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors checkpoint ({} for other files or foreign checkpoints)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for every damaged header
        raise ModelLoadError(f"{path} is damaged or not a safetensors file ({e})") from None


def header_model_cfg(meta: Mapping[str, str]) -> dict:
    """The model config recorded in a header ({} for files written before it was recorded, or foreign)."""
    text = meta.get("model_cfg") or ""
    return json.loads(text) if text else {}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file on CPU, unwrapped (``state_dict``/``model`` entry) and with DDP
    (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes removed; ModelLoadError if it is none."""
    path = Path(path)
    loaded = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        what = "an empty mapping" if isinstance(loaded, Mapping) else f"a {type(loaded).__name__}"
        raise ModelLoadError(f"{path} is not a checkpoint: it holds {what}, not a state dict of tensors")
    bad = next((k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ModelLoadError(f"{path} is not a state dict: entry {bad!r} is a {type(loaded[bad]).__name__}, "
                              "not a tensor")
    state = {k.replace("_orig_mod.", ""): v for k, v in loaded.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError for a bad header, OSError for a short read
        raise ModelLoadError(f"{path} is damaged or not a safetensors file ({e})") from None


def _read_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``; torch's own messages (which suggest ``weights_only=False``, i.e.
    running the file's code) are replaced by one saying what the file is."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        objects = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if objects:
            raise ModelLoadError(
                f"{path} is not a plain checkpoint: it holds pickled Python objects ({objects[0]}), not only "
                "tensors; save the model's state_dict() (torch.save(model.state_dict(), path)) and pass that") from None
        raise ModelLoadError(f"{path} is damaged or not a PyTorch checkpoint (it does not unpickle)") from None
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise ModelLoadError(
                f"{path} is a TorchScript archive (the OpenAI release format), which is not loaded as a file: "
                "use the architecture with its pretrained tag, e.g. --model ViT-B-32 --pretrained openai") from None
        raise ModelLoadError(f"{path} is damaged or not a PyTorch checkpoint (not a readable torch.save archive)") from None
    except (EOFError, OSError, ValueError):
        raise ModelLoadError(f"{path} is damaged or not a PyTorch checkpoint (empty or cut short)") from None


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
