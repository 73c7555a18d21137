"""Examples the notebooks show: sampled training pairs, retrieval queries with their top results, and the
zero-shot cases a refinement fixed or broke.

Every pick is drawn with a seed (:func:`pick`), so a notebook shows the same examples on every run.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence


def as_manifest(manifest, data_root: str | None = None):
    """A Manifest from a path (loaded with ``data_root``) or a Manifest as it is."""
    from ..data.manifest import Manifest, load_manifest

    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest, data_root=data_root)


def pick(n_total: int, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct indices of ``range(n_total)`` drawn with ``seed``, sorted (all when n >= n_total)."""
    import numpy as np

    if n >= n_total:
        return list(range(n_total))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n_total, n, replace=False))


def caption_samples(manifest: str | os.PathLike, n: int = 12, seed: int = 0, data_root: str | None = None) -> list[dict]:
    """``n`` records of a manifest as grid items: {"image": path, "caption": first caption or class name}."""
    from ..data.manifest import CaptionRecord, load_manifest

    m = load_manifest(manifest, data_root=data_root)
    records = m.records()
    items = []
    for i in pick(len(records), n, seed):
        r = records[i]
        if isinstance(r, CaptionRecord):
            extra = f" (+{len(r.captions) - 1} more)" if len(r.captions) > 1 else ""
            items.append({"image": r.image, "caption": r.captions[0] + extra, "id": r.id})
        else:
            items.append({"image": r.image, "caption": (m.classnames or [str(r.label)])[r.label], "id": r.id})
    return items


# ------------------------------------------------------------------------------------ zero-shot flips
def predictions(fs) -> Any:
    """Top-1 zero-shot predictions (N,) of a classification FeatureSet."""
    from ..metrics import class_embeddings, zero_shot_logits

    return zero_shot_logits(fs.image, class_embeddings(fs.text)).argmax(dim=1)


def flips(base_pred, refined_pred, labels) -> tuple[list[int], list[int]]:
    """Indices the refinement fixed (base wrong, refined right) and broke (base right, refined wrong)."""
    import torch

    base_pred, refined_pred, labels = (torch.as_tensor(x).long() for x in (base_pred, refined_pred, labels))
    if not (base_pred.shape == refined_pred.shape == labels.shape):
        raise ValueError(f"shapes differ: {tuple(base_pred.shape)}, {tuple(refined_pred.shape)}, {tuple(labels.shape)}")
    fixed = ((base_pred != labels) & (refined_pred == labels)).nonzero().flatten().tolist()
    broken = ((base_pred == labels) & (refined_pred != labels)).nonzero().flatten().tolist()
    return fixed, broken


def failure_cases(base, refined, manifests: Iterable, *, n: int = 8, seed: int = 0, data_root: str | None = None,
                  progress: bool = False) -> dict:
    """Zero-shot cases the refined model fixed and broke over classification ``manifests`` (paths or Manifests).

    Returns {"fixed": [...], "broken": [...], "counts": [per-task dict]}, each case a dict
    (task, image, true, base_pred, refined_pred); ``n`` cases of each kind, drawn with ``seed``
    across all tasks.
    """
    import numpy as np

    from ..features import dataset_features

    cases: dict[str, list] = {"fixed": [], "broken": []}
    counts = []
    for mpath in manifests:
        m = as_manifest(mpath, data_root)
        if m.kind != "classification":
            raise ValueError(f"{m.path} is a {m.kind} manifest; the failure gallery needs classification sets")
        fb = dataset_features(base, m, data_root=data_root, progress=progress)
        fr = dataset_features(refined, m, data_root=data_root, progress=progress)
        pb, pr = predictions(fb), predictions(fr)
        fixed, broken = flips(pb, pr, fb.labels)
        counts.append({"task": m.name, "images": int(fb.labels.shape[0]), "fixed": len(fixed), "broken": len(broken),
                       "net": len(fixed) - len(broken)})
        if not fixed and not broken:
            continue
        records = m.records()
        names = m.classnames or []
        for kind, idx in (("fixed", fixed), ("broken", broken)):
            for i in idx:
                y = int(fb.labels[i])
                cases[kind].append({"task": m.name, "image": records[i].image, "true": names[y],
                                    "base_pred": names[int(pb[i])], "refined_pred": names[int(pr[i])]})
    rng = np.random.default_rng(seed)
    for kind in cases:
        if len(cases[kind]) > n:
            keep = sorted(rng.choice(len(cases[kind]), n, replace=False))
            cases[kind] = [cases[kind][i] for i in keep]
    return {**cases, "counts": counts}


# ------------------------------------------------------------------------------------------ retrieval
def text_to_image_topk(fs, queries: Sequence[int], k: int = 5):
    """(len(queries), k) indices of the top-k images for caption ``queries`` of a caption FeatureSet."""
    import torch

    from ..metrics import normalize

    q = normalize(fs.text[torch.as_tensor(list(queries), dtype=torch.long)].float())
    sims = q @ normalize(fs.image.float()).T
    return sims.topk(min(k, sims.shape[1]), dim=1).indices


def image_to_text_topk(fs, queries: Sequence[int], k: int = 5):
    """(len(queries), k) indices of the top-k captions for image ``queries`` of a caption FeatureSet."""
    import torch

    from ..metrics import normalize

    q = normalize(fs.image[torch.as_tensor(list(queries), dtype=torch.long)].float())
    sims = q @ normalize(fs.text.float()).T
    return sims.topk(min(k, sims.shape[1]), dim=1).indices


def retrieval_examples(models: dict, manifest, *, n_queries: int = 3, k: int = 5, seed: int = 0,
                       data_root: str | None = None, progress: bool = False) -> dict:
    """Top-k retrieval results of a few random queries of a caption ``manifest`` (a path or a Manifest) under
    each model ({label: LoadedModel}).

    Returns {"t2i": [...], "i2t": [...]}: each text query {"query", "target", "results": {label:
    [{"image", "hit"}]}}, each image query {"image", "results": {label: [{"caption", "hit"}]}}.
    """
    from ..data.manifest import flatten_captions
    from ..features import dataset_features

    m = as_manifest(manifest, data_root)
    if m.kind != "captions":
        raise ValueError(f"{m.path} is a {m.kind} manifest; retrieval examples need captions")
    records = m.records()
    texts, owner = flatten_captions(records)  # type: ignore[arg-type]
    feats = {label: dataset_features(lm, m, data_root=data_root, progress=progress) for label, lm in models.items()}
    tq = pick(len(texts), n_queries, seed)
    iq = pick(len(records), n_queries, seed + 1)
    t2i = [{"query": texts[q], "target": records[int(owner[q])].image, "results": {}} for q in tq]
    i2t = [{"image": records[q].image, "captions": list(records[q].captions), "results": {}} for q in iq]
    for label, fs in feats.items():
        for item, q, row in zip(t2i, tq, text_to_image_topk(fs, tq, k).tolist()):
            item["results"][label] = [{"image": records[j].image, "hit": j == int(owner[q])} for j in row]
        for item, q, row in zip(i2t, iq, image_to_text_topk(fs, iq, k).tolist()):
            item["results"][label] = [{"caption": texts[j], "hit": int(owner[j]) == q} for j in row]
    return {"t2i": t2i, "i2t": i2t}


def i2t_html(examples: Sequence[Mapping], thumb: int = 96):
    """Image queries of :func:`retrieval_examples` as one HTML table: the query image, then each
    model's top captions (a correct caption in green with ✓)."""
    import html

    from IPython.display import HTML

    from ..plots import HIT_COLOUR, thumbnail_uri

    if not examples:
        return HTML("<i>(no image queries)</i>")
    labels = list(examples[0]["results"])
    head = "".join(f"<th style='text-align:left'>{html.escape(lab)}</th>" for lab in labels)
    rows = []
    for ex in examples:
        cells = [f"<td><img src='{thumbnail_uri(ex['image'], thumb)}' width='{thumb}' height='{thumb}'></td>"]
        for lab in labels:
            items = "".join(
                f"<li style='color:{HIT_COLOUR if r['hit'] else 'inherit'}'>{'✓ ' if r['hit'] else ''}"
                f"{html.escape(r['caption'])}</li>" for r in ex["results"][lab])
            cells.append(f"<td style='text-align:left;vertical-align:top'><ol style='margin:0'>{items}</ol></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return HTML(f"<table class='crl-i2t'><tr><th>image query</th>{head}</tr>{''.join(rows)}</table>")
