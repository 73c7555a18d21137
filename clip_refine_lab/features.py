"""Encoding data sets into CLIP features, and the one feature cache every metric and notebook uses.

Features are stored *raw* (as ``encode_image``/``encode_text`` return them, unnormalised): each
metric normalises where its definition does, and the raw norms are themselves worth plotting.

Cache key = (fingerprint of the weights, fingerprint of the data set's manifest and records,
preprocessing config). A cache entry lives at
``<cache dir>/features/<weights fp>/<data fp>.safetensors`` and is written atomically; changing
the weights (e.g. another checkpoint), the records file or the preprocessing gives a new key, so a
stale entry is never read. The key holds nothing about the run that asks: every run of a suite that
starts from the same model finds that model's features already there, and encodes only its own.

Images are decoded in DataLoader worker processes (``num_workers``), in order: the features, and the
decoded-image cache, are the same with any number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.datasets import Images
from .data.images import load_image
from .data.manifest import Manifest, flatten_captions, load_manifest
from .models.loading import LoadedModel
from .progress import progress_bar
from .utils import atomic_path, cache_dir, stable_hash


@dataclass
class FeatureSet:
    """Raw features of one data set under one model."""

    name: str
    kind: str  # "captions" or "classification"
    image: torch.Tensor  # (N, d) raw image features
    text: torch.Tensor  # captions: (M, d) caption features; classification: (C, T, d) prompt features
    text_to_image: torch.Tensor | None = None  # captions: (M,) index of each caption's image
    labels: torch.Tensor | None = None  # classification: (N,)
    classnames: list[str] | None = None
    ids: list[str] = field(default_factory=list)


def first_caption_pairs(fs: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, first caption) feature pairs of a caption feature set: the matched rows the geometry is measured on."""
    owner = fs.text_to_image
    first = torch.full((fs.image.shape[0],), -1, dtype=torch.long)
    idx = torch.arange(owner.shape[0])
    first.scatter_reduce_(0, owner, idx, reduce="amin", include_self=False)
    return fs.image, fs.text[first]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes and bytes): changes whenever any weight does."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def manifest_fingerprint(manifest: Manifest) -> str:
    """The manifest file, its image root and its records file (size, mtime). The root is in it because
    one manifest names other images under another data root (``${CLIP_REFINE_LAB_DATA}/...``)."""
    parts = [str(manifest.path.resolve()), manifest.path.read_bytes().hex(), str(Path(manifest.root).resolve())]
    rp = manifest.records_path
    if rp is not None and rp.is_file():
        st = rp.stat()
        parts += [str(rp.resolve()), str(st.st_size), str(st.st_mtime_ns)]
    return stable_hash(parts)


@contextlib.contextmanager
def _counting(bar, total: int, *, progress: bool, desc: str, unit: str):
    """``bar`` when the caller passes one (its stage has one bar), else a bar of our own."""
    if bar is not None:
        yield bar
        return
    own = progress_bar(total=total, desc=desc, enabled=progress, unit=unit, leave=False)
    try:
        yield own
    finally:
        own.close()


@torch.no_grad()
def encode_images(model: torch.nn.Module, dataset, *, batch_size: int = 256, device: str | torch.device = "cpu",
                  num_workers: int = 0, progress: bool = True, desc: str = "images", bar=None) -> torch.Tensor:
    """Raw image features of a map-style dataset yielding (image tensor, index), its items loaded by
    ``num_workers`` processes (in order); ``bar``: a progress bar to advance by each batch instead of
    one of its own."""
    loader = _loader(dataset, batch_size, num_workers)
    out = []
    model.eval()
    with _counting(bar, len(dataset), progress=progress, desc=f"encode {desc}", unit="img") as counter:
        for images, _ in loader:
            out.append(model.encode_image(images.to(device)).float().cpu())
            counter.update(images.shape[0])
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 512,
                 device: str | torch.device = "cpu", progress: bool = True, desc: str = "texts", bar=None) -> torch.Tensor:
    """Raw text features of a list of strings; ``bar`` as for :func:`encode_images`."""
    out = []
    model.eval()
    with _counting(bar, len(texts), progress=progress, desc=f"encode {desc}", unit="text") as counter:
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
            out.append(model.encode_text(tokens).float().cpu())
            counter.update(len(tokens))
    return torch.cat(out) if out else torch.empty(0)


def dataset_features(loaded: LoadedModel, manifest: str | os.PathLike | Manifest, *, device: str | torch.device = "cpu",
                     batch_size: int = 256, data_root: str | None = None, cache: bool = True,
                     progress: bool = True, weights_fp: str | None = None, image_cache: bool = False,
                     num_workers: int = 0) -> FeatureSet:
    """Features of every image and caption (or class prompt) of a manifest, through the cache.

    ``image_cache``: read images from the decoded-image cache (:class:`DecodedImages`, built on first
    use) instead of decoding and resizing every file again: the same tensors, so the same features;
    a sweep evaluates dozens of models on the same sets, and decoding dominated small models' encoding.
    ``num_workers``: DataLoader processes that decode the images (and build the image cache); the
    features are identical for any number."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest, data_root=data_root)
    if not cache:
        weights_fp = "uncached"
    weights_fp = weights_fp or weights_fingerprint(loaded.model)
    key = stable_hash([manifest_fingerprint(manifest), loaded.spec.preprocess, loaded.spec.arch, "v1"])
    path = cache_dir() / "features" / weights_fp / f"{key}.safetensors"
    if cache and path.is_file():
        return _load(path, manifest)
    records = manifest.records()
    images = (_Indexed(DecodedImages(records, loaded.preprocess, manifest, progress=progress, num_workers=num_workers))
              if image_cache else Images(records, loaded.preprocess))
    if manifest.kind == "captions":
        texts, owner = flatten_captions(records)  # type: ignore[arg-type]
    else:
        classnames = manifest.classnames or []
        texts = [p for c in classnames for p in manifest.prompts(c)]
    with progress_bar(total=len(records) + len(texts), desc=f"features of {manifest.name}", enabled=progress,
                      unit="item", leave=False) as bar:
        image = encode_images(loaded.model, images, batch_size=batch_size, device=device, num_workers=num_workers,
                              bar=bar)
        t = encode_texts(loaded.model, loaded.tokenizer, texts, batch_size=batch_size * 2, device=device, bar=bar)
    tensors: dict[str, torch.Tensor] = {"image": image}
    if manifest.kind == "captions":
        tensors["text"] = t
        tensors["text_to_image"] = torch.from_numpy(owner)
    else:
        tensors["text"] = t.reshape(len(classnames), -1, t.shape[-1])
        tensors["labels"] = torch.tensor([r.label for r in records], dtype=torch.long)
    if cache:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"manifest": str(manifest.path), "name": manifest.name})
    return _from_tensors(tensors, manifest, [r.id for r in records])


def _loader(dataset, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches of ``dataset`` in index order, loaded by ``num_workers`` processes (0: this one)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       persistent_workers=False)


def _load(path: Path, manifest: Manifest) -> FeatureSet:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return _from_tensors(tensors, manifest, None)


def _from_tensors(tensors: dict, manifest: Manifest, ids: list[str] | None) -> FeatureSet:
    return FeatureSet(
        name=manifest.name, kind=manifest.kind, image=tensors["image"], text=tensors["text"],
        text_to_image=tensors.get("text_to_image"), labels=tensors.get("labels"),
        classnames=list(manifest.classnames) if manifest.classnames else None, ids=ids or [],
    )


def decode_images(records: Sequence, image_size: int, *, progress: bool = True) -> torch.Tensor:
    """All images of ``records`` as one uint8 tensor (N, 3, S, S), for small in-memory data sets.

    Images must already be ``image_size`` square (the synthetic world's are); with the model's
    eval preprocessing (resize to the same size, centre crop, to-tensor, normalise) this equals
    ``preprocess`` followed by :func:`normalize_uint8`.
    """
    out = torch.empty((len(records), 3, image_size, image_size), dtype=torch.uint8)
    for i, rec in enumerate(progress_bar(records, total=len(records), desc="decode images", enabled=progress,
                                         unit="img", leave=False)):
        im = load_image(rec.image)
        if im.size != (image_size, image_size):
            raise ValueError(f"{rec.image}: expected {image_size}x{image_size} pixels, got {im.size[0]}x{im.size[1]}")
        out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised as open_clip's preprocessing does."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - m) / s


# ------------------------------------------------------------------------------ decoded-image cache
DECODE_BATCH = 64  # images a worker decodes per batch while the cache is built
def _pil_stages(preprocess):
    """The PIL part of an open_clip eval transform (resize, crop, RGB), without ToTensor/Normalize."""
    from torchvision import transforms as T

    stages = list(getattr(preprocess, "transforms", []))
    kinds = [type(s).__name__ for s in stages]
    if len(stages) < 2 or kinds[-2] not in ("ToTensor", "MaybeToTensor") or kinds[-1] != "Normalize":
        raise ValueError(f"the decoded-image cache needs a transform ending in ToTensor, Normalize; got {kinds}")
    return T.Compose(stages[:-2]), stages[-1].mean, stages[-1].std


class _PilDecoded:
    """uint8 (H, W, 3) arrays of the records' images after the PIL stages: the items the cache stores."""

    def __init__(self, records: Sequence, pil):
        self.records, self.pil = records, pil

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.pil(load_image(self.records[index].image)), dtype=np.uint8).copy())


class DecodedImages:
    """Preprocessed images as a uint8 memory map (N, 3, S, S): decode and resize once, reuse in every run.

    Built with progress under ``<cache dir>/images/<key>.u8`` (key = records file + preprocessing), written
    atomically, its images decoded by ``num_workers`` DataLoader processes (in order); indexing returns
    the normalised float tensor that ``preprocess`` would return, exactly.
    """

    def __init__(self, records: Sequence, preprocess, manifest: Manifest | None = None, *, progress: bool = True,
                 num_workers: int = 0):
        pil, self.mean, self.std = _pil_stages(preprocess)
        sample = np.asarray(pil(load_image(records[0].image)), dtype=np.uint8) if records else np.zeros((1, 1, 3), np.uint8)
        h, w = sample.shape[:2]
        ident = [r.image for r in records] if manifest is None else manifest_fingerprint(manifest)
        key = stable_hash([ident, len(records), repr(pil), "u8-v1"])
        path = cache_dir() / "images" / f"{key}.u8"
        shape = (len(records), h, w, 3)
        if not path.is_file():
            def write(tmp: Path) -> None:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                start = 0
                with progress_bar(total=len(records), desc="decode images (cached)", enabled=progress,
                                  unit="img") as bar:
                    for batch in _loader(_PilDecoded(records, pil), DECODE_BATCH, num_workers):
                        mm[start:start + len(batch)] = batch.numpy()
                        start += len(batch)
                        bar.update(len(batch))
                mm.flush()
                del mm

            with atomic_path(path) as tmp:
                write(tmp)
        self.path, self.array = path, np.load(path, mmap_mode="r")
        if self.array.shape != shape:
            raise ValueError(f"{path}: cached shape {self.array.shape} != expected {shape}; delete the file")

    def __getstate__(self) -> dict:
        # a worker started by spawn (macOS, Windows) maps the file again instead of receiving a copy of it
        return {**self.__dict__, "array": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        u8 = torch.from_numpy(np.array(self.array[index])).permute(2, 0, 1)
        return normalize_uint8(u8.unsqueeze(0), self.mean, self.std)[0]


class _Indexed:
    """(image, index) items, as :class:`clip_refine_lab.data.Images` yields them, from an image cache."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base[index], index


class Subset:
    """Index a cache through a list of positions (e.g. the training split of a manifest)."""

    def __init__(self, base, positions: Sequence[int]):
        self.base, self.positions = base, list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        return self.base[self.positions[index]]
