"""Evaluation metrics on CLIP embeddings: modality gap, alignment, uniformity, zero-shot
classification, retrieval, the gap-shift experiment and a linear probe.

Every function here is a small pure function on embeddings, in the style of CLIP_benchmark's
metrics: torch tensors in, Python floats or small dicts of floats out. None of them knows about
models, data sets or files.

Inputs are RAW features (the projected encoder outputs as open_clip's ``encode_image`` /
``encode_text`` return them); each metric L2-normalises what it needs itself (docs/method.md,
"Metrics"). Feature tensors may be float32 or float64 (float16/bfloat16 are upcast to float32);
sums over many rows or pairs are accumulated in float64. Large inputs are processed in row (and
column) blocks so that no N×N matrix is ever materialised.

Sources:
- Modality gap and the gap-shift experiment: Liang, Zhang, Kwon, Yeung, Zou, "Mind the Gap:
  Understanding the Modality Gap in Multi-modal Contrastive Representation Learning", NeurIPS 2022.
- Alignment and uniformity: Wang & Isola, "Understanding Contrastive Representation Learning
  through Alignment and Uniformity on the Hypersphere", ICML 2020.
- Zero-shot prompt ensembles and the linear probe: Radford et al., "Learning Transferable Visual
  Models From Natural Language Supervision", ICML 2021.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "normalize",
    "gap_vector",
    "modality_gap",
    "alignment",
    "uniformity",
    "pooled_uniformity",
    "regime_statistics",
    "class_embeddings",
    "zero_shot_logits",
    "classification_metrics",
    "zero_shot_average",
    "retrieval_metrics",
    "RETRIEVAL_TIES",
    "DEFAULT_RETRIEVAL_TIES",
    "shift_along_gap",
    "linear_probe",
]

NORMALIZE_EPS = 1e-12
_ROW_BLOCK = 8192  # rows per block for linear-time reductions (normalise + sum)

# How retrieval ranks a correct item that ties with incorrect ones (see retrieval_metrics).
RETRIEVAL_TIES = ("index", "optimistic", "pessimistic")
DEFAULT_RETRIEVAL_TIES = "index"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖₂ along the last dimension (``torch.nn.functional.normalize`` with eps = 1e-12)."""
    return F.normalize(x, p=2.0, dim=-1, eps=NORMALIZE_EPS)


def _as_features(x, name: str, ndim: int = 2) -> torch.Tensor:
    """Check that ``x`` is a non-empty floating-point tensor with ``ndim`` dimensions."""
    x = torch.as_tensor(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (float32 or float64), got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _check_same_dim(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{name_a} and {name_b} have different feature dimensions: {a.shape[-1]} vs {b.shape[-1]}"
        )


def _check_paired(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    _check_same_dim(image_features, text_features, "image_features", "text_features")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            "image_features and text_features must be paired row by row, got "
            f"{image_features.shape[0]} images and {text_features.shape[0]} texts"
        )


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def _normalized_copy(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalised copy of ``x`` (in ``dtype``), built block by block to avoid extra temporaries."""
    out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    for start in range(0, x.shape[0], _ROW_BLOCK):
        stop = start + _ROW_BLOCK
        out[start:stop] = normalize(x[start:stop].to(out.dtype))
    return out


def _normalized_mean(x: torch.Tensor) -> torch.Tensor:
    """mean_i x̂_i in float64, accumulated block by block."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _ROW_BLOCK):
        total += normalize(x[start : start + _ROW_BLOCK]).sum(dim=0, dtype=torch.float64)
    return total / x.shape[0]


# ----------------------------------------------------------------------------------------------
# modality gap, alignment, uniformity
# ----------------------------------------------------------------------------------------------


def gap_vector(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """The modality-gap vector Δ = mean_i F̂_I[i] − mean_j F̂_T[j] (Liang et al., NeurIPS 2022).

    F̂ = F / ‖F‖₂ row-wise. The two sets need not be paired or of equal size. Returned as a
    float64 tensor of shape (d,) (the means are accumulated in float64).
    """
    image_features = _as_features(image_features, "image_features")
    text_features = _as_features(text_features, "text_features")
    _check_same_dim(image_features, text_features, "image_features", "text_features")
    return _normalized_mean(image_features) - _normalized_mean(text_features)


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """Modality gap (Liang et al., NeurIPS 2022) between the centroids of the normalised features.

    With Δ = mean(F̂_I) − mean(F̂_T) (see :func:`gap_vector`):

    - ``gap_l2``  = ‖Δ‖₂ (the gap as Liang et al. define it),
    - ``gap_mse`` = ‖Δ‖₂² / d (the MSE between the two centroids, which is what the CLIP-Refine
      released code logs; the paper's Table 3 reports 10³ · gap_mse).
    """
    delta = gap_vector(image_features, text_features)
    squared = float(delta.pow(2).sum())
    return {"gap_l2": squared**0.5, "gap_mse": squared / delta.numel()}


def alignment(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Alignment (Wang & Isola, ICML 2020, with α = 2): mean_k ‖F̂_I[k] − F̂_T[k]‖₂².

    Rows are matched pairs (row k of each is the same pair). Lower is better aligned; the value lies
    in [0, 4]. Accumulated in float64, block by block.
    """
    image_features = _as_features(image_features, "image_features")
    text_features = _as_features(text_features, "text_features")
    _check_paired(image_features, text_features)
    dtype = _common_dtype(image_features, text_features)
    total = 0.0
    for start in range(0, image_features.shape[0], _ROW_BLOCK):
        stop = start + _ROW_BLOCK
        diff = normalize(image_features[start:stop].to(dtype)) - normalize(text_features[start:stop].to(dtype))
        total += float(diff.pow(2).sum(dtype=torch.float64))
    return total / image_features.shape[0]


def _uniformity_of_unit_vectors(unit: torch.Tensor, t: float, block_size: int) -> dict[str, float]:
    """Uniformity of already-normalised rows over the distinct pairs i < j, blockwise."""
    n = unit.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 feature vectors, got {n}")
    if not t > 0:
        raise ValueError(f"uniformity temperature t must be > 0, got {t}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    # exp(−t‖u−v‖²) = exp(−t(2 − 2u·v)) = exp(2t·u·v − 2t): one fused addmm gives the exponent.
    offset = torch.tensor(-2.0 * t, dtype=unit.dtype, device=unit.device)
    total = 0.0  # float64 sum of the exps; each term lies in [e^{-4t}, 1], so no rescaling needed
    for row_start in range(0, n, block_size):
        rows = unit[row_start : row_start + block_size]
        # only column blocks on or right of the diagonal: the pairs i < j
        for col_start in range(row_start, n, block_size):
            cols = unit[col_start : col_start + block_size]
            values = torch.addmm(offset, rows, cols.T, alpha=2.0 * t)  # −t‖u−v‖², in place from here
            values.clamp_(max=0.0)  # ‖u−v‖² ≥ 0 (rounding can make 2 − 2u·v slightly negative)
            values.exp_()
            if col_start == row_start:  # diagonal block: keep the strict upper triangle (i < j)
                values.triu_(diagonal=1)
            # per-row partial sums (≤ block_size terms, pairwise summation in the features' dtype),
            # then float64 across rows and blocks; cheaper than casting the block to float64
            total += float(values.sum(dim=1).sum(dtype=torch.float64))
    num_pairs = n * (n - 1) // 2
    mean_kernel = total / num_pairs
    return {"uniformity_log": float(np.log(mean_kernel)), "uniformity_rbf": mean_kernel}


def uniformity(features: torch.Tensor, t: float = 2.0, block_size: int = 4096) -> dict[str, float]:
    """Uniformity (Wang & Isola, ICML 2020) of one set of features, over distinct pairs.

    With F̂ the row-normalised features and the mean taken over the N(N−1)/2 distinct pairs
    i < j (the pair set of ``torch.pdist``, as Wang & Isola's reference code uses; self-pairs are
    excluded):

    - ``uniformity_log`` = log E_{i<j} exp(−t‖F̂_i − F̂_j‖²)   (Wang & Isola; the released code),
    - ``uniformity_rbf`` = E_{i<j} exp(−t‖F̂_i − F̂_j‖²)       (no log; matches CLIP-Refine Table 3).

    Lower is more uniform. Computed blockwise: row blocks × column blocks of ``block_size`` rows,
    only blocks on or above the diagonal, so at most a block_size × block_size matrix exists at a
    time; ‖u−v‖² = 2 − 2u·v for unit vectors. The mean of the exps is accumulated as a plain float64
    sum: each term lies in [e^{−4t}, 1] (‖u−v‖² ∈ [0, 4]), so there is no overflow or underflow and
    no need for a log-sum-exp; the log is taken once at the end. (Within one block, each row's
    ≤ block_size terms are first summed in the features' own dtype; for float32 features that
    partial sum is as accurate as the float32 exps themselves, ~1e-7 relative.) Peak extra memory
    is one block_size × block_size matrix plus a normalised copy of the features.
    """
    features = _as_features(features, "features")
    return _uniformity_of_unit_vectors(_normalized_copy(features), t, block_size)


def pooled_uniformity(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    t: float = 2.0,
    block_size: int = 4096,
) -> dict[str, float]:
    """Uniformity of the pooled set {F̂_I} ∪ {F̂_T} (N_I + N_T vectors), as in CLIP-Refine.

    The image and text features are normalised and concatenated, then :func:`uniformity` is
    applied over all distinct pairs i < j of the pooled set (image–image, text–text and
    image–text pairs alike). Keys ``uniformity_log`` and ``uniformity_rbf``.
    """
    image_features = _as_features(image_features, "image_features")
    text_features = _as_features(text_features, "text_features")
    _check_same_dim(image_features, text_features, "image_features", "text_features")
    dtype = _common_dtype(image_features, text_features)
    n_image = image_features.shape[0]
    pooled = torch.empty(
        (n_image + text_features.shape[0], image_features.shape[1]), dtype=dtype, device=image_features.device
    )
    pooled[:n_image] = _normalized_copy(image_features, dtype)
    pooled[n_image:] = _normalized_copy(text_features, dtype)
    return _uniformity_of_unit_vectors(pooled, t, block_size)


def regime_statistics(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> dict[str, float]:
    """The statistics that say which regime a CLIP's feature space is in, on matched (image, caption) rows.

    The geometry (:func:`modality_gap`, :func:`alignment`, :func:`pooled_uniformity`) with the model's
    learned ``logit_scale`` (exp of the parameter, the number the cosines are multiplied by) and the mean
    raw norms. ``norm_product_over_scale`` = mean ‖f_I‖ · mean ‖f_T‖ / logit_scale: how much sharper a
    softmax over raw-feature dot products (HyCD at T = 1) is than the model's own calibrated one over
    scaled cosines; 1 means the same sharpness. Keys: ``logit_scale``, ``gap_l2``, ``gap_mse``,
    ``alignment``, ``uniformity_log``, ``uniformity_rbf``, ``image_norm``, ``text_norm``,
    ``norm_product``, ``norm_product_over_scale``.
    """
    image_features = _as_features(image_features, "image_features")
    text_features = _as_features(text_features, "text_features")
    _check_paired(image_features, text_features)
    if not logit_scale > 0:
        raise ValueError(f"logit_scale is exp(logit_scale parameter) and must be > 0, got {logit_scale}")
    out = {"logit_scale": float(logit_scale), **modality_gap(image_features, text_features),
           "alignment": alignment(image_features, text_features), **pooled_uniformity(image_features, text_features)}
    out["image_norm"] = float(image_features.double().norm(dim=-1).mean())
    out["text_norm"] = float(text_features.double().norm(dim=-1).mean())
    out["norm_product"] = out["image_norm"] * out["text_norm"]
    out["norm_product_over_scale"] = out["norm_product"] / out["logit_scale"]
    return out


# ----------------------------------------------------------------------------------------------
# zero-shot classification
# ----------------------------------------------------------------------------------------------


def class_embeddings(text_features_per_class: torch.Tensor) -> torch.Tensor:
    """Zero-shot class embeddings from prompt ensembles (Radford et al., 2021).

    ``text_features_per_class``: (C, T, d) raw text features, T prompt templates per class.
    Returns (C, d): w_c = normalize(mean_t normalize(f_{c,t})). With T = 1 this is just the
    normalised single-prompt feature.
    """
    feats = _as_features(text_features_per_class, "text_features_per_class", ndim=3)
    return normalize(normalize(feats).mean(dim=1))


def zero_shot_logits(
    image_features: torch.Tensor, class_embeds: torch.Tensor, block_size: int = 16384
) -> torch.Tensor:
    """Cosine similarities between images and classes: normalize(F_I) · normalize(W)ᵀ, shape (B, C).

    ``class_embeds`` (C, d) is normalised again (harmless if it already is). Images are normalised
    block by block into the preallocated output, so 100K × 1000 needs only the output (400 MB in
    float32) plus one block.
    """
    image_features = _as_features(image_features, "image_features")
    class_embeds = _as_features(class_embeds, "class_embeds")
    _check_same_dim(image_features, class_embeds, "image_features", "class_embeds")
    dtype = _common_dtype(image_features, class_embeds)
    weights = normalize(class_embeds.to(dtype))
    out = torch.empty((image_features.shape[0], weights.shape[0]), dtype=dtype, device=image_features.device)
    for start in range(0, image_features.shape[0], block_size):
        stop = start + block_size
        torch.matmul(normalize(image_features[start:stop].to(dtype)), weights.T, out=out[start:stop])
    return out


def zero_shot_average(results: dict[str, dict]) -> float | None:
    """Mean top-1 over zero-shot classification results ``{task: {"top1": ..., ...}}``, leaving out the
    compositional probes (results with ``"probe": True``, from manifests with ``probe: true``); None if no
    task is left. The probes are reported beside the average, not in it: CLIP-style models sit near chance
    on them (ARO, Winoground), and a chance-level entry would only dilute the average."""
    top1 = [float(r["top1"]) for r in results.values() if not r.get("probe")]
    return sum(top1) / len(top1) if top1 else None


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5), block_size: int = 8192
) -> dict[str, float]:
    """Top-k accuracies and mean per-class recall from (B, C) logits and (B,) integer labels.

    Keys (fractions in [0, 1]):

    - ``top1`` (always) and ``top{k}`` for every k in ``ks`` with C ≥ k (e.g. no ``top5`` when there
      are fewer than 5 classes);
    - ``mean_per_class_recall``: the mean, over the classes present in ``labels``, of the fraction of
      that class's samples whose top-1 prediction is correct (the "balanced accuracy" some data sets
      report instead of top-1).

    Ties: classes are ranked by logit, ties broken by the lower class index (a stable descending
    sort; the same as ``argmax``, which returns the first maximal index). So the rank of the true
    class y is #{c: l_c > l_y} + #{c < y: l_c = l_y}, and a sample is a top-k hit when that rank < k.
    """
    logits = _as_features(logits, "logits")
    labels = torch.as_tensor(labels, device=logits.device)
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.long()
    num_samples, num_classes = logits.shape
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for {num_classes} classes, got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    ks = sorted({1, *(int(k) for k in ks)})
    if ks[0] < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    class_index = torch.arange(num_classes, device=logits.device)
    ranks = torch.empty(num_samples, dtype=torch.long, device=logits.device)
    for start in range(0, num_samples, block_size):
        block = logits[start : start + block_size]
        block_labels = labels[start : start + block_size]
        true_logit = block.gather(1, block_labels[:, None])
        above = (block > true_logit).sum(dim=1)
        tied_before = ((block == true_logit) & (class_index[None, :] < block_labels[:, None])).sum(dim=1)
        ranks[start : start + block_size] = above + tied_before
    results: dict[str, float] = {}
    for k in ks:
        if k <= num_classes:
            results[f"top{k}"] = float((ranks < k).double().mean())
    correct = (ranks == 0).double()
    per_class_correct = torch.zeros(num_classes, dtype=torch.float64, device=logits.device).index_add_(
        0, labels, correct
    )
    per_class_count = torch.bincount(labels, minlength=num_classes).double()
    present = per_class_count > 0
    results["mean_per_class_recall"] = float((per_class_correct[present] / per_class_count[present]).mean())
    return results


# ----------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------


def _count_greater(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, #(scores > threshold) (a bool mask summed as int32: no int64 copy of the block)."""
    return torch.gt(scores, threshold).sum(dim=1, dtype=torch.int32)


def _ranks(scores: torch.Tensor, best: torch.Tensor, first_best: torch.Tensor, num_best: torch.Tensor,
           ties: str) -> torch.Tensor:
    """1-based rank of each row's first correct item under a tie rule (see :func:`retrieval_metrics`).

    ``best`` (rows, 1): the highest correct score of each row; ``first_best``: the lowest index of a
    correct item scoring ``best``; ``num_best``: how many correct items score ``best``."""
    rank = 1 + _count_greater(scores, best).long()
    if ties == "optimistic":
        return rank
    # ties are few (duplicates): list them instead of holding a second block-sized count
    row, item = torch.eq(scores, best).nonzero(as_tuple=True)
    if ties == "index":
        return rank.index_add_(0, row, (item < first_best[row]).long())
    # pessimistic: every incorrect item tied with the best correct one ranks above it
    return rank.index_add_(0, row, torch.ones_like(row)) - num_best


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
    ties: str = DEFAULT_RETRIEVAL_TIES,
) -> dict[str, float]:
    """Text→image and image→text recall@k and median rank, on cosine similarity.

    ``text_to_image`` (num_texts,) long: the index of each caption's image (several captions per
    image allowed; every image must have at least one caption, else ValueError).

    - Text query: its one correct image. Image query: any of its captions; the rank of an image
      query is the rank of its best-scoring caption (the first correct item in the ranking).
    - Items rank by decreasing score. ``ties`` decides where a correct item goes among incorrect
      items with exactly its score (bit-for-bit: every score of a query comes from the same block):

      * ``"index"`` (default): tied items rank by their index, lower first, as a stable descending
        sort orders them. This is CLIP_benchmark's rule: it keeps exactly k items per query with
        ``torch.topk``, which on CUDA fills the places left to tied scores with the lowest indices.
        rank = 1 + #(scores > s) + #(items before the first correct item scoring s, with score s).
      * ``"optimistic"``: ties favour the query; rank = 1 + #(scores > s).
      * ``"pessimistic"``: ties count against the query; rank = 1 + #(incorrect items scoring ≥ s).

      Without ties the three agree. Ties arise from duplicates: a caption shared by several
      images, or the same image listed twice.
    - ``t2i_R@k`` / ``i2t_R@k``: fraction of queries with rank ≤ k (for every k in ``ks``);
      ``t2i_median_rank`` / ``i2t_median_rank``: the median of the 1-based ranks (``np.median``,
      so the mean of the two middle ranks when the number of queries is even).

    Blockwise over queries: at most block_size × num_items similarities exist at a time. Query
    rows are normalised per block; the items are normalised once.
    """
    image_features = _as_features(image_features, "image_features")
    text_features = _as_features(text_features, "text_features")
    _check_same_dim(image_features, text_features, "image_features", "text_features")
    if ties not in RETRIEVAL_TIES:
        raise ValueError(f"ties must be one of {', '.join(RETRIEVAL_TIES)}; got {ties!r}")
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    text_to_image = torch.as_tensor(text_to_image, device=image_features.device)
    if text_to_image.ndim != 1 or text_to_image.shape[0] != num_texts:
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(text_to_image.shape)}")
    if text_to_image.is_floating_point() or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got {text_to_image.dtype}")
    text_to_image = text_to_image.long()
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(
            f"text_to_image must lie in [0, {num_images}) for {num_images} images, got range "
            f"[{int(text_to_image.min())}, {int(text_to_image.max())}]"
        )
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    num_uncaptioned = int((captions_per_image == 0).sum())
    if num_uncaptioned:
        raise ValueError(
            f"{num_uncaptioned} of {num_images} images have no caption in text_to_image; "
            "every image needs at least one caption for image→text retrieval"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    dtype = _common_dtype(image_features, text_features)
    device = image_features.device

    # text → image: queries are texts, items are images; one correct image per text
    images_unit = _normalized_copy(image_features, dtype)
    t2i_ranks = torch.empty(num_texts, dtype=torch.long, device=device)
    for start in range(0, num_texts, block_size):
        stop = min(start + block_size, num_texts)
        scores = normalize(text_features[start:stop].to(dtype)) @ images_unit.T
        target = text_to_image[start:stop]
        correct = scores.gather(1, target[:, None])
        t2i_ranks[start:stop] = _ranks(scores, correct, target, torch.ones_like(target), ties)
        del scores, correct  # free this block before the next one is allocated
    del images_unit

    # image → text: queries are images, items are texts; the captions of images [a, b) are
    # texts_by_image[first_caption[a]:first_caption[b]]
    texts_unit = _normalized_copy(text_features, dtype)
    texts_by_image = torch.argsort(text_to_image, stable=True)
    first_caption = torch.zeros(num_images + 1, dtype=torch.long, device=device)
    first_caption[1:] = torch.cumsum(captions_per_image, dim=0)
    i2t_ranks = torch.empty(num_images, dtype=torch.long, device=device)
    for start in range(0, num_images, block_size):
        stop = min(start + block_size, num_images)
        rows = stop - start
        scores = normalize(image_features[start:stop].to(dtype)) @ texts_unit.T
        caption_ids = texts_by_image[first_caption[start] : first_caption[stop]]
        caption_rows = text_to_image[caption_ids] - start
        caption_scores = scores[caption_rows, caption_ids]
        best = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        best.scatter_reduce_(0, caption_rows, caption_scores, reduce="amax")
        at_best = caption_scores == best[caption_rows]
        first_best = torch.full((rows,), num_texts, dtype=torch.long, device=device)
        first_best.scatter_reduce_(0, caption_rows[at_best], caption_ids[at_best], reduce="amin")
        num_best = torch.zeros(rows, dtype=torch.long, device=device).index_add_(0, caption_rows, at_best.long())
        i2t_ranks[start:stop] = _ranks(scores, best[:, None], first_best, num_best, ties)
        del scores, best
    del texts_unit

    results: dict[str, float] = {}
    for k in ks:
        results[f"t2i_R@{k}"] = float((t2i_ranks <= k).double().mean())
    for k in ks:
        results[f"i2t_R@{k}"] = float((i2t_ranks <= k).double().mean())
    results["t2i_median_rank"] = float(np.median(t2i_ranks.cpu().numpy()))
    results["i2t_median_rank"] = float(np.median(i2t_ranks.cpu().numpy()))
    return results


# ----------------------------------------------------------------------------------------------
# gap shift (Liang et al., 2022)
# ----------------------------------------------------------------------------------------------


def shift_along_gap(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    lam: float,
    direction: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift both modalities along the gap direction (Liang et al., NeurIPS 2022, Sec. 4.2).

    With u = Δ / ‖Δ‖, Δ = mean(F̂_I) − mean(F̂_T) of these features (or ``direction`` when given,
    e.g. the gap measured on another set):

        image' = normalize(F̂_I − (λ/2)·u),    text' = normalize(F̂_T + (λ/2)·u).

    Before renormalisation this moves the centroids λ closer along u: λ > 0 closes the gap
    (λ ≈ ‖Δ‖ removes its component along u), λ < 0 widens it. Returns the shifted, normalised
    (image, text) features in the inputs' common dtype.
    """
    image_features = _as_features(image_features, "image_features")
    text_features = _as_features(text_features, "text_features")
    _check_same_dim(image_features, text_features, "image_features", "text_features")
    dtype = _common_dtype(image_features, text_features)
    if direction is None:
        direction = gap_vector(image_features, text_features)
    else:
        direction = torch.as_tensor(direction, device=image_features.device)
        if direction.shape != (image_features.shape[1],):
            raise ValueError(
                f"direction must have shape ({image_features.shape[1]},), got {tuple(direction.shape)}"
            )
    direction = direction.to(torch.float64)
    norm = float(direction.norm())
    if not norm > 0:
        raise ValueError("the gap direction has zero norm; cannot shift along it")
    half_step = ((lam / 2.0) * (direction / norm)).to(dtype)
    image_shifted = normalize(normalize(image_features.to(dtype)) - half_step)
    text_shifted = normalize(normalize(text_features.to(dtype)) + half_step)
    return image_shifted, text_shifted


# ----------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    C: float | None = None,
    max_iter: int = 1000,
    seed: int = 0,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
) -> dict[str, float]:
    """Linear-probe top-1 accuracy on frozen, normalised features (as in CLIP-Refine's Table 7).

    A scikit-learn ``LogisticRegression`` (L-BFGS, multinomial, inverse regularisation C) is fit on
    normalize(train_features). When ``C`` is None it is chosen from ``C_grid`` (a log grid) by
    accuracy on a held-out 20% of the training set (a split seeded by ``seed``, stratified when
    every class has at least 2 samples; ties go to the smaller C), and the model is then refit on
    the whole training set with that C. Deterministic for a given seed.

    Returns ``{"top1": test accuracy in [0, 1], "C": the C used}``, plus ``"val_top1_by_C"``
    ({C: held-out accuracy}) when C was searched.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    def to_numpy_features(x, name: str) -> np.ndarray:
        x = _as_features(x, name)
        return normalize(x.to(torch.float64)).cpu().numpy()

    def to_numpy_labels(y, n: int, name: str) -> np.ndarray:
        y = np.asarray(torch.as_tensor(y).cpu().numpy())
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
        return y

    x_train = to_numpy_features(train_features, "train_features")
    x_test = to_numpy_features(test_features, "test_features")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"train_features and test_features have different feature dimensions: "
            f"{x_train.shape[1]} vs {x_test.shape[1]}"
        )
    y_train = to_numpy_labels(train_labels, x_train.shape[0], "train_labels")
    y_test = to_numpy_labels(test_labels, x_test.shape[0], "test_labels")
    if np.unique(y_train).size < 2:
        raise ValueError("linear_probe needs at least 2 classes in train_labels")

    def fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
        return model.fit(x, y)

    results: dict = {}
    if C is None:
        _, counts = np.unique(y_train, return_counts=True)
        x_fit, x_val, y_fit, y_val = train_test_split(
            x_train,
            y_train,
            test_size=0.2,
            random_state=seed,
            stratify=y_train if counts.min() >= 2 else None,
        )
        if np.unique(y_fit).size < 2:
            raise ValueError("the 80% fitting split of train_labels has fewer than 2 classes; pass C explicitly")
        val_top1 = {float(c): float((fit(x_fit, y_fit, c).predict(x_val) == y_val).mean()) for c in C_grid}
        best = max(val_top1.values())
        C = min(c for c, acc in val_top1.items() if acc == best)
        results["val_top1_by_C"] = val_top1
    model = fit(x_train, y_train, float(C))
    results["top1"] = float((model.predict(x_test) == y_test).mean())
    results["C"] = float(C)
    return results
