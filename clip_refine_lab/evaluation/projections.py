"""2-D and 3-D projections (PCA, UMAP) of image and text features, for notebook 06.

Features are L2-normalised first (the geometry CLIP's similarity sees), so Euclidean distances in
the projection's input are monotone in cosine similarity. Each model is projected on its own (its
features live in its own space); the same images are sampled for every model so panels compare.

* classification sets: the sampled images (labelled by class) and every class prompt (each
  labelled by its class) as texts;
* caption sets: the sampled images and their first captions; the class is the image's index, so
  colouring by class pairs each image with its caption.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

METHODS = ("pca", "umap")


def sample_indices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` sorted distinct indices of range(n), drawn with ``seed`` (all of them when size >= n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def feature_points(fs, indices: np.ndarray | None = None) -> tuple[np.ndarray, "object"]:
    """Normalised features of the images (``indices``) and texts of a FeatureSet, and a DataFrame with
    one row per point: modality ('image' or 'text'), class, item (hover text)."""
    import pandas as pd
    import torch

    from ..features import first_caption_pairs
    from ..metrics import normalize

    n = fs.image.shape[0]
    idx = np.arange(n) if indices is None else np.asarray(indices)
    image = fs.image[torch.as_tensor(idx, dtype=torch.long)]
    if fs.kind == "classification":
        names = fs.classnames or [str(i) for i in range(fs.text.shape[0])]
        c, t, d = fs.text.shape
        text = fs.text.reshape(c * t, d)
        img_class = [names[int(fs.labels[i])] for i in idx]
        txt_class = [names[k // t] for k in range(c * t)]
        img_item = [f"image {int(i)}: {names[int(fs.labels[i])]}" for i in idx]
        txt_item = [f"prompt {k % t + 1} of '{names[k // t]}'" for k in range(c * t)]
    else:
        _, first = first_caption_pairs(fs)
        text = first[torch.as_tensor(idx, dtype=torch.long)]
        img_class = txt_class = [f"pair {int(i)}" for i in idx]
        img_item = [f"image {int(i)}" for i in idx]
        txt_item = [f"caption of image {int(i)}" for i in idx]
    x = normalize(torch.cat([image.float(), text.float()])).numpy().astype(np.float32)
    meta = pd.DataFrame({"modality": ["image"] * len(idx) + ["text"] * text.shape[0],
                         "class": img_class + txt_class, "item": img_item + txt_item})
    return x, meta


def project(x: np.ndarray, method: str = "pca", dims: int = 2, *, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """(N, dims) coordinates of the rows of ``x`` by PCA or UMAP (seeded: repeatable)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    n = x.shape[0]
    if n < dims + 2:
        raise ValueError(f"need at least {dims + 2} points to project, got {n}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=dims, random_state=seed).fit_transform(x)
    import warnings

    import umap  # the first fit compiles with numba (~20 s, once per process)

    k = max(2, min(int(n_neighbors), n - 1))
    # spectral initialisation needs a reasonably sized graph; random is fine for a handful of points
    reducer = umap.UMAP(n_components=dims, n_neighbors=k, min_dist=0.1, random_state=seed,
                        init="spectral" if n > 30 else "random")
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": we want repeatable
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        return reducer.fit_transform(x)


def projection_frame(feature_sets: Mapping[str, object], *, method: str = "pca", dims: int = 2, sample_size: int = 300,
                     n_neighbors: int = 15, seed: int = 0):
    """A tidy DataFrame of projected points (model, modality, class, item, x, y[, z]) for every model in
    ``feature_sets`` ({label: FeatureSet} of the same data set); the same images for every model."""
    import pandas as pd

    frames = []
    idx = None
    for label, fs in feature_sets.items():
        if idx is None:
            idx = sample_indices(fs.image.shape[0], sample_size, seed)
        x, meta = feature_points(fs, idx)
        coords = project(x, method, dims, n_neighbors=n_neighbors, seed=seed)
        meta = meta.assign(model=label, x=coords[:, 0], y=coords[:, 1])
        if dims == 3:
            meta = meta.assign(z=coords[:, 2])
        frames.append(meta)
    if not frames:
        raise ValueError("feature_sets is empty")
    cols = ["model", "modality", "class", "item", "x", "y"] + (["z"] if dims == 3 else [])
    return pd.concat(frames, ignore_index=True)[cols]
