"""Helpers that build tiny real-format data sets in a temporary folder (imported by the data tests).

Every builder writes a few small generated images (PIL), the format's own index files and a
manifest YAML, and returns the manifest path. Images are 32x32 noise so that different images have
different bytes (the leakage check hashes them).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml

__all__ = [
    "image_bytes", "coco_name", "make_image", "make_corrupt_image", "write_manifest_yaml", "make_coco", "make_karpathy",
    "make_flickr8k", "make_csv", "make_jsonl", "make_webdataset", "make_imagefolder", "write_tar",
]


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 32) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_image(path: Path, seed: int = 0, fmt: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG")
    path.write_bytes(image_bytes(seed, fmt))
    return path


def make_corrupt_image(path: Path, seed: int = 99) -> Path:
    """A JPEG cut in half: opens (the header is fine) but fails to decode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image_bytes(seed, "JPEG", size=64)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_manifest_yaml(path: Path, **fields) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False), encoding="utf-8")
    return path


def coco_name(image_id: int, style: str = "2017") -> str:
    return f"{image_id:012d}.jpg" if style == "2017" else f"COCO_{style}_{image_id:012d}.jpg"


def make_coco(root: Path, image_ids: Sequence[int] = (1, 2, 3), *, style: str = "2017", seed: int = 0,
              captions_per_image: int = 2, name: str = "coco-mini", images_dir: str = "images",
              annotation: str = "annotations/captions.json", write_images: bool = True) -> Path:
    """A COCO captions JSON with ``image_ids`` (file names in 2017 or 2014 style) and its manifest."""
    root = Path(root)
    images, anns = [], []
    for k, iid in enumerate(image_ids):
        fname = coco_name(iid, style)
        images.append({"id": iid, "file_name": fname, "height": 32, "width": 32})
        if write_images:
            make_image(root / images_dir / fname, seed=seed + iid)
        for c in range(captions_per_image):
            anns.append({"id": len(anns) + 1, "image_id": iid, "caption": f"image {iid} caption {c}"})
    ann_path = root / annotation
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps({"images": images, "annotations": anns}), encoding="utf-8")
    return write_manifest_yaml(root / f"{name}.yaml", name=name, kind="captions", format="coco",
                               root=images_dir, records=annotation)


def make_karpathy(root: Path, items: Sequence[tuple[str, str, Sequence[str]]], *, name: str = "flickr-mini",
                  images_dir: str = "flickr30k-images", split: str = "test", seed: int = 0,
                  json_name: str = "dataset_flickr30k.json") -> Path:
    """Karpathy JSON; ``items`` = (file name, split, captions)."""
    root = Path(root)
    images = []
    for k, (fname, sp, caps) in enumerate(items):
        make_image(root / images_dir / fname, seed=seed + k)
        images.append({"filename": fname, "split": sp, "imgid": k,
                       "sentences": [{"raw": c, "tokens": c.split(), "imgid": k} for c in caps]})
    (root / json_name).write_text(json.dumps({"images": images, "dataset": "flickr30k"}), encoding="utf-8")
    return write_manifest_yaml(root / f"{name}.yaml", name=name, kind="captions", format="karpathy",
                               root=images_dir, records=json_name, split=split)


def make_flickr8k(root: Path, captions: dict[str, Sequence[str]], test: Sequence[str], *, seed: int = 0,
                  name: str = "flickr8k-mini") -> Path:
    root = Path(root)
    lines = []
    for k, (fname, caps) in enumerate(captions.items()):
        make_image(root / "Flicker8k_Dataset" / fname, seed=seed + k)
        lines += [f"{fname}#{i}\t{c}" for i, c in enumerate(caps)]
    text = root / "Flickr8k_text"
    text.mkdir(parents=True, exist_ok=True)
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (text / "Flickr_8k.testImages.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    return write_manifest_yaml(root / f"{name}.yaml", name=name, kind="captions", format="flickr8k",
                               root="Flicker8k_Dataset", records="Flickr8k_text/Flickr8k.token.txt",
                               split_file="Flickr8k_text/Flickr_8k.testImages.txt")


def make_csv(root: Path, rows: Sequence[dict], *, name: str = "csv-mini", kind: str = "captions",
             filename: str = "pairs.csv", delimiter: str = ",", **fields) -> Path:
    import csv

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / filename, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return write_manifest_yaml(root / f"{name}.yaml", name=name, kind=kind, format="csv", root="images",
                               records=filename, **fields)


def make_jsonl(root: Path, rows: Sequence[dict], *, name: str = "jsonl-mini", kind: str = "captions",
               filename: str = "pairs.jsonl", fmt: str = "jsonl", **fields) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / filename).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return write_manifest_yaml(root / f"{name}.yaml", name=name, kind=kind, format=fmt, root="images",
                               records=filename, **fields)


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_webdataset(root: Path, num_shards: int = 2, per_shard: int = 3, *, name: str = "wds-mini",
                    folder: str = "shards", with_json: bool = True) -> tuple[Path, list[str]]:
    """img2dataset-style shards ``folder/{00000..}.tar`` with ``{key}.jpg/.txt/.json``; returns
    (manifest, keys in order)."""
    root = Path(root)
    keys = []
    for s in range(num_shards):
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            keys.append(key)
            members.append((f"{key}.jpg", image_bytes(s * 1000 + i)))
            members.append((f"{key}.txt", f"caption of sample {key}".encode()))
            if with_json:
                members.append((f"{key}.json", json.dumps({"key": key, "caption": f"caption of sample {key}"}).encode()))
        write_tar(root / folder / f"{s:05d}.tar", members)
    pattern = f"{{00000..{num_shards - 1:05d}}}.tar"
    man = write_manifest_yaml(root / f"{name}.yaml", name=name, kind="captions", format="webdataset",
                              root=folder, shards=pattern)
    return man, keys


def make_imagefolder(root: Path, classes: dict[str, int], *, folder: str = "images", seed: int = 0,
                     ext: str = ".jpg") -> Path:
    """``root/folder/<class>/<i>.jpg`` with ``classes[name]`` images each; returns the image folder."""
    base = Path(root) / folder
    k = 0
    for cls, n in classes.items():
        for i in range(n):
            make_image(base / cls / f"{i:03d}{ext}", seed=seed + k)
            k += 1
        (base / cls).mkdir(parents=True, exist_ok=True)
    return base
