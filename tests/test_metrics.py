"""Tests for clip_refine_lab.metrics: reference vectors, hand-computed answers, blockwise = direct."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_refine_lab import metrics as M

VECTORS = json.loads((Path(__file__).parent / "data" / "vectors.json").read_text())
CASES = VECTORS["cases"]
REL = 1e-9


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# direct small-N reference implementations (tests only; the library never builds N×N matrices)
# ---------------------------------------------------------------------------------------------


def direct_uniformity_pdist(x: torch.Tensor, t: float = 2.0) -> tuple[float, float]:
    """Mean over distinct pairs i < j, via torch.pdist."""
    mean = torch.pdist(unit(x.double())).pow(2).mul(-t).exp().mean().item()
    return math.log(mean), mean


def direct_uniformity_offdiag(x: torch.Tensor, t: float = 2.0) -> float:
    """Mean over the N(N−1) ordered pairs i ≠ j of the full N×N distance matrix (same value)."""
    u = unit(x.double())
    sq = (u[:, None, :] - u[None, :, :]).pow(2).sum(-1)
    kernel = sq.mul(-t).exp()
    n = u.shape[0]
    return ((kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1))).item()


def direct_retrieval_ranks(images, texts, text_to_image):
    """1-based ranks by full sorting-free counting on the full similarity matrix."""
    sim = unit(texts.double()) @ unit(images.double()).T  # (num_texts, num_images)
    t2i = [1 + int((sim[k] > sim[k, text_to_image[k]]).sum()) for k in range(sim.shape[0])]
    i2t = []
    for i in range(sim.shape[1]):
        captions = (text_to_image == i).nonzero().flatten()
        best = sim[captions, i].max()
        i2t.append(1 + int((sim[:, i] > best).sum()))
    return t2i, i2t


# ---------------------------------------------------------------------------------------------
# reference vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_index", range(len(CASES)))
def test_vectors_reproduced(case_index):
    case = CASES[case_index]
    image, text = f64(case["student_image"]), f64(case["student_text"])
    expected = case["metrics"]

    gap = M.modality_gap(image, text)
    assert gap["gap_l2"] == pytest.approx(expected["gap_l2"], rel=REL)
    assert gap["gap_mse"] == pytest.approx(expected["gap_mse"], rel=REL)
    assert M.alignment(image, text) == pytest.approx(expected["alignment"], rel=REL)
    uni = M.pooled_uniformity(image, text)
    assert uni["uniformity_log"] == pytest.approx(expected["uniformity_log"], rel=REL)
    assert uni["uniformity_rbf"] == pytest.approx(expected["uniformity_rbf"], rel=REL)
    # tiny blocks give the same numbers
    uni_small = M.pooled_uniformity(image, text, block_size=3)
    assert uni_small["uniformity_rbf"] == pytest.approx(expected["uniformity_rbf"], rel=REL)


@pytest.mark.parametrize("case_index", range(len(CASES)))
def test_vectors_float32_inputs_close(case_index):
    case = CASES[case_index]
    image = torch.tensor(case["student_image"], dtype=torch.float32)
    text = torch.tensor(case["student_text"], dtype=torch.float32)
    expected = case["metrics"]
    gap = M.modality_gap(image, text)
    assert gap["gap_l2"] == pytest.approx(expected["gap_l2"], rel=1e-5)
    assert M.alignment(image, text) == pytest.approx(expected["alignment"], rel=1e-5)
    uni = M.pooled_uniformity(image, text)
    assert uni["uniformity_rbf"] == pytest.approx(expected["uniformity_rbf"], rel=1e-5)
    assert isinstance(uni["uniformity_rbf"], float)


def test_uniformity_pair_set_is_distinct_pairs():
    """The vectors use the distinct pairs i < j (torch.pdist), not all N² pairs incl. self-pairs."""
    case = CASES[0]
    pooled = torch.cat([f64(case["student_image"]), f64(case["student_text"])])
    _, rbf_pdist = direct_uniformity_pdist(pooled)
    assert rbf_pdist == pytest.approx(case["metrics"]["uniformity_rbf"], rel=REL)
    u = unit(pooled)
    all_pairs = (u[:, None] - u[None]).pow(2).sum(-1).mul(-2).exp().mean().item()
    assert all_pairs != pytest.approx(case["metrics"]["uniformity_rbf"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# gap, alignment, uniformity: known answers
# ---------------------------------------------------------------------------------------------


def test_known_gap_orthogonal_modalities():
    d, n = 4, 5
    image = torch.zeros(n, d, dtype=torch.float64)
    image[:, 0] = torch.arange(1, n + 1)  # raw norms differ; all normalise to e1
    text = torch.zeros(n, d, dtype=torch.float64)
    text[:, 1] = 3.0  # e2
    gap = M.modality_gap(image, text)
    assert gap["gap_l2"] == pytest.approx(math.sqrt(2), rel=REL)
    assert gap["gap_mse"] == pytest.approx(2 / d, rel=REL)
    assert M.alignment(image, text) == pytest.approx(2.0, rel=REL)
    torch.testing.assert_close(M.gap_vector(image, text), f64([1.0, -1.0, 0.0, 0.0]))
    # pooled uniformity by hand: same-modality pairs have ‖u−v‖² = 0, cross pairs 2
    uni = M.pooled_uniformity(image, text)
    expected = (n * (n - 1) + n * n * math.exp(-4.0)) / (n * (2 * n - 1))
    assert uni["uniformity_rbf"] == pytest.approx(expected, rel=REL)
    assert uni["uniformity_log"] == pytest.approx(math.log(expected), rel=REL)


def test_gap_zero_and_alignment_zero_for_identical_modalities():
    x = torch.randn(20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert M.modality_gap(x, 2 * x)["gap_l2"] == pytest.approx(0.0, abs=1e-15)
    assert M.alignment(x, 5 * x) == pytest.approx(0.0, abs=1e-15)


def test_gap_accepts_unpaired_sets_but_alignment_does_not():
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(7, 6, generator=gen), torch.randn(4, 6, generator=gen)
    expected = (unit(image.double()).mean(0) - unit(text.double()).mean(0)).norm().item()
    assert M.modality_gap(image, text)["gap_l2"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="paired row by row, got 7 images and 4 texts"):
        M.alignment(image, text)


@pytest.mark.parametrize("block_size", [2, 7, 64, 299, 300, 1000])
def test_uniformity_blockwise_equals_direct(block_size):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 16, dtype=torch.float64, generator=gen) * torch.rand(300, 1, dtype=torch.float64, generator=gen)
    x[:, 0] += 1.5  # not centred: uniformity far from its minimum
    log_direct, rbf_direct = direct_uniformity_pdist(x)
    assert direct_uniformity_offdiag(x) == pytest.approx(rbf_direct, rel=1e-12)
    uni = M.uniformity(x, t=2.0, block_size=block_size)
    assert uni["uniformity_rbf"] == pytest.approx(rbf_direct, rel=REL)
    assert uni["uniformity_log"] == pytest.approx(log_direct, rel=REL)


def test_uniformity_other_temperature_and_float32():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(150, 12, dtype=torch.float64, generator=gen)
    log_direct, rbf_direct = direct_uniformity_pdist(x, t=0.5)
    uni = M.uniformity(x, t=0.5, block_size=16)
    assert uni["uniformity_rbf"] == pytest.approx(rbf_direct, rel=REL)
    uni32 = M.uniformity(x.float(), t=0.5, block_size=16)
    assert uni32["uniformity_log"] == pytest.approx(log_direct, rel=1e-5)


def test_pooled_uniformity_is_uniformity_of_concatenation():
    gen = torch.Generator().manual_seed(4)
    image, text = torch.randn(40, 8, generator=gen).double(), torch.randn(25, 8, generator=gen).double()
    pooled = M.pooled_uniformity(image, text, block_size=9)
    direct = M.uniformity(torch.cat([unit(image), unit(text)]), block_size=1000)
    assert pooled["uniformity_rbf"] == pytest.approx(direct["uniformity_rbf"], rel=REL)


def test_uniformity_errors():
    with pytest.raises(ValueError, match="at least 2 feature vectors, got 1"):
        M.uniformity(torch.randn(1, 4))
    with pytest.raises(ValueError, match="t must be > 0"):
        M.uniformity(torch.randn(5, 4), t=0.0)
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        M.uniformity(torch.randn(5))
    with pytest.raises(ValueError, match="floating point"):
        M.uniformity(torch.ones(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="different feature dimensions: 4 vs 3"):
        M.modality_gap(torch.randn(5, 4), torch.randn(5, 3))


# ---------------------------------------------------------------------------------------------
# zero-shot classification
# ---------------------------------------------------------------------------------------------


def test_class_embeddings_prompt_ensemble():
    prompts = f64(
        [
            [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]],  # normalise → e1, e2; mean (.5, .5, 0); normalise
            [[0.0, 0.0, 5.0], [0.0, 0.0, 0.1]],  # both → e3
        ]
    )
    embeds = M.class_embeddings(prompts)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(embeds, f64([[s, s, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="3-D tensor"):
        M.class_embeddings(torch.randn(4, 8))


def test_zero_shot_known_confusion():
    classes = torch.eye(3, dtype=torch.float64) * 7.0  # raw class embeddings, normalise to e1..e3
    images = f64(
        [
            [3.0, 1.0, 0.0],  # label 0, predicted 0
            [2.0, 0.0, 1.0],  # label 0, predicted 0
            [5.0, 1.0, 1.0],  # label 0, predicted 0
            [1.0, 0.2, 0.1],  # label 0, predicted 0
            [0.9, 0.5, 0.1],  # label 1, predicted 0 (class 1 second)
            [0.0, 0.1, 2.0],  # label 2, predicted 2
        ]
    )
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    logits = M.zero_shot_logits(images, classes)
    assert logits.shape == (6, 3)
    torch.testing.assert_close(logits[4], unit(images[4]))  # cosine with e1..e3
    result = M.classification_metrics(logits, labels)
    assert result["top1"] == pytest.approx(5 / 6)
    assert "top5" not in result  # only 3 classes
    # per-class recall: class 0 → 4/4, class 1 → 0/1, class 2 → 1/1; mean 2/3 ≠ top1
    assert result["mean_per_class_recall"] == pytest.approx(2 / 3)
    result2 = M.classification_metrics(logits, labels, ks=(1, 2, 5))
    assert result2["top2"] == pytest.approx(1.0)
    assert set(result2) == {"top1", "top2", "mean_per_class_recall"}


def test_classification_top5_present_and_absent_classes():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 10, generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)  # classes 4..9 never appear
    result = M.classification_metrics(logits, labels)
    top1 = (logits.argmax(1) == labels).double().mean().item()
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item()
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(top5)
    recalls = [((logits.argmax(1) == c) & (labels == c)).sum() / (labels == c).sum() for c in range(4)]
    assert result["mean_per_class_recall"] == pytest.approx(float(np.mean([r.item() for r in recalls])))
    # blockwise over samples gives the same
    assert M.classification_metrics(logits, labels, block_size=3) == result


def test_classification_ties_follow_argmax():
    logits = torch.zeros(3, 4)
    labels = torch.tensor([0, 1, 3])
    result = M.classification_metrics(logits, labels, ks=(1, 2))
    assert result["top1"] == pytest.approx(1 / 3)  # argmax of a constant row is class 0
    assert result["top2"] == pytest.approx(2 / 3)


def test_classification_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        M.classification_metrics(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        M.classification_metrics(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer class indices"):
        M.classification_metrics(torch.randn(2, 3), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------


def test_retrieval_perfect_identity():
    features = torch.eye(12, dtype=torch.float64) * torch.arange(1, 13, dtype=torch.float64)[:, None]
    result = M.retrieval_metrics(features, features, torch.arange(12), block_size=5)
    for direction in ("t2i", "i2t"):
        for k in (1, 5, 10):
            assert result[f"{direction}_R@{k}"] == 1.0
        assert result[f"{direction}_median_rank"] == 1.0


def test_retrieval_known_miss_3x3():
    images = torch.eye(3, dtype=torch.float64) * f64([[2.0], [0.5], [3.0]])  # e1, e2, e3 after normalising
    texts = f64([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]]) * 4.0
    # similarities text×image:   img0  img1  img2
    #   t0 (→ img0)              1.0   0     0     rank 1
    #   t1 (→ img1)              0     0.6   0.8   rank 2 (img2 higher)
    #   t2 (→ img2)              0.8   0     0.6   rank 2 (img0 higher)
    # image queries: img0 → [1, 0, .8] rank 1; img1 → [0, .6, 0] rank 1; img2 → [0, .8, .6] rank 2
    result = M.retrieval_metrics(images, texts, torch.tensor([0, 1, 2]), ks=(1, 2, 5))
    assert result["t2i_R@1"] == pytest.approx(1 / 3)
    assert result["t2i_R@2"] == pytest.approx(1.0)
    assert result["t2i_median_rank"] == 2.0
    assert result["i2t_R@1"] == pytest.approx(2 / 3)
    assert result["i2t_R@2"] == pytest.approx(1.0)
    assert result["i2t_median_rank"] == 1.0
    assert result["t2i_R@5"] == 1.0


def test_retrieval_multiple_captions_any_caption_hits():
    images = torch.eye(3, dtype=torch.float64)
    texts = f64([[0.0, 1.0, 0.1], [1.0, 0.0, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]])
    text_to_image = torch.tensor([0, 0, 1, 2])
    # image 0: captions t0 (score 0, ranked 3rd) and t1 (score 1, ranked 1st) → hit at k = 1
    # image 1: its caption t2 (0.9939) is beaten by t0 (0.9950) → rank 2
    # image 2: caption t3 scores 1 → rank 1
    # texts: t0's image scores 0, below img1 (.995) and img2 (.0995) → rank 3; the rest rank 1
    result = M.retrieval_metrics(images, texts, text_to_image, ks=(1, 5))
    assert result["i2t_R@1"] == pytest.approx(2 / 3)
    assert result["i2t_R@5"] == 1.0
    assert result["t2i_R@1"] == pytest.approx(3 / 4)
    assert result["t2i_median_rank"] == 1.0
    assert set(result) == {"t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5", "t2i_median_rank", "i2t_median_rank"}


def test_retrieval_tie_rules_on_duplicated_images_and_captions():
    images = f64([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 identical
    texts = f64([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # captions 0 and 1 identical after normalising
    # every query of images 0/1 and captions 0/1 ties its correct item with one incorrect item:
    # index rule: the lower index wins (query 0 ranks 1st, query 1 ranks 2nd); optimistic: both 1st;
    # pessimistic: both 2nd. Image 2 / caption 2 rank 1st under every rule.
    expected = {"index": (2 / 3, 1.0), "optimistic": (1.0, 1.0), "pessimistic": (1 / 3, 2.0)}
    for ties, (recall, median) in expected.items():
        result = M.retrieval_metrics(images, texts, torch.tensor([0, 1, 2]), ks=(1, 2), ties=ties)
        for direction in ("t2i", "i2t"):
            assert result[f"{direction}_R@1"] == pytest.approx(recall), (ties, direction)
            assert result[f"{direction}_median_rank"] == median, (ties, direction)
            assert result[f"{direction}_R@2"] == 1.0
    assert M.retrieval_metrics(images, texts, torch.tensor([0, 1, 2])) == \
        M.retrieval_metrics(images, texts, torch.tensor([0, 1, 2]), ties="index")


def test_retrieval_tie_rules_with_several_tied_captions_of_one_image():
    images = f64([[1.0, 0.0], [0.6, 0.8]])
    # caption 0 belongs to image 1 but equals the two captions of image 0: all three tie for both images
    texts = f64([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    text_to_image = torch.tensor([1, 0, 0])
    # image 0: best captions 1 and 2, caption 0 (not its own) tied with them and listed first
    #   index: 2 (caption 0 comes first), optimistic: 1, pessimistic: 1 + one incorrect tied = 2
    # image 1: its caption 0 ties with captions 1 and 2
    #   index: 1 (caption 0 is first), optimistic: 1, pessimistic: 1 + two incorrect tied = 3
    expected = {"index": [2, 1], "optimistic": [1, 1], "pessimistic": [2, 3]}
    for ties, ranks in expected.items():
        result = M.retrieval_metrics(images, texts, text_to_image, ks=(1, 2), ties=ties)
        assert result["i2t_R@1"] == pytest.approx(np.mean(np.array(ranks) <= 1)), ties
        assert result["i2t_R@2"] == pytest.approx(np.mean(np.array(ranks) <= 2)), ties
        assert result["i2t_median_rank"] == float(np.median(ranks)), ties
        # texts → images has no tie: caption 0 ranks image 1 second, the others rank theirs first
        assert result["t2i_R@1"] == pytest.approx(2 / 3) and result["t2i_R@2"] == 1.0


def test_retrieval_tie_rule_is_checked():
    images, texts = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="ties must be one of index, optimistic, pessimistic; got 'random'"):
        M.retrieval_metrics(images, texts, torch.arange(3), ties="random")


def quarter_unit_vectors(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Unit vectors with four entries of ±1/2: every cosine between them is a multiple of 1/4, exact in
    float64, so ties are exact in any order of computation."""
    out = torch.zeros(n, dim, dtype=torch.float64)
    for row in range(n):
        where = torch.randperm(dim, generator=gen)[:4]
        out[row, where] = 0.5 * (1 - 2 * torch.randint(0, 2, (4,), generator=gen)).double()
    return out


def clip_benchmark_recall(scores: torch.Tensor, positive: torch.Tensor, k: int, select) -> float:
    """CLIP_benchmark's recall@k: a query is a hit when one of the k items ``select`` keeps is positive."""
    kept = select(scores, k)
    return float(positive.gather(1, kept).any(dim=1).double().mean())


def torch_topk(scores, k):
    return torch.topk(scores, k, dim=1).indices


def stable_descending(scores, k):
    """torch.topk as CUDA computes it: tied scores at the k-th place keep the lowest indices."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def test_retrieval_default_ties_equal_clip_benchmark_topk():
    gen = torch.Generator().manual_seed(3)
    images = quarter_unit_vectors(128, 12, gen)
    images[112:] = images[:16]  # duplicated images: text→image ties
    text_to_image = torch.cat([torch.arange(128), torch.randint(0, 128, (64,), generator=gen)])
    texts = quarter_unit_vectors(192, 12, gen)
    texts[:128] = torch.where(torch.rand(128, 1, generator=gen) < 0.7, images, texts[:128])  # many exact matches
    texts[160:] = texts[128:160]  # captions shared by two images: image→text ties
    order = torch.randperm(192, generator=gen)
    texts, text_to_image = texts[order], text_to_image[order]

    scores = texts @ images.T  # already unit vectors
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(192), text_to_image] = True
    result = M.retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), block_size=50)
    # k = 1 with at least 64 items per query: CPU torch.topk keeps the first of the tied maxima
    assert result["t2i_R@1"] == clip_benchmark_recall(scores, positive, 1, torch_topk)
    assert result["i2t_R@1"] == clip_benchmark_recall(scores.T, positive.T, 1, torch_topk)
    for k in (1, 5, 10):
        assert result[f"t2i_R@{k}"] == clip_benchmark_recall(scores, positive, k, stable_descending)
        assert result[f"i2t_R@{k}"] == clip_benchmark_recall(scores.T, positive.T, k, stable_descending)
    optimistic = M.retrieval_metrics(images, texts, text_to_image, ties="optimistic")
    pessimistic = M.retrieval_metrics(images, texts, text_to_image, ties="pessimistic")
    for key in ("t2i_R@1", "i2t_R@1"):
        assert optimistic[key] > result[key] > pessimistic[key], key  # the ties matter in this case
    for key in result:
        if "R@" in key:
            assert optimistic[key] >= result[key] >= pessimistic[key], key


@pytest.mark.parametrize("block_size", [1, 4, 1024])
def test_retrieval_blockwise_matches_direct(block_size):
    gen = torch.Generator().manual_seed(6)
    images = torch.randn(30, 8, dtype=torch.float64, generator=gen)
    text_to_image = torch.cat([torch.arange(30), torch.randint(0, 30, (45,), generator=gen)])
    text_to_image = text_to_image[torch.randperm(75, generator=gen)]
    texts = images[text_to_image] + 1.5 * torch.randn(75, 8, dtype=torch.float64, generator=gen)
    t2i, i2t = direct_retrieval_ranks(images, texts, text_to_image)
    result = M.retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), block_size=block_size)
    for k in (1, 5, 10):
        assert result[f"t2i_R@{k}"] == pytest.approx(np.mean(np.array(t2i) <= k))
        assert result[f"i2t_R@{k}"] == pytest.approx(np.mean(np.array(i2t) <= k))
    assert result["t2i_median_rank"] == float(np.median(t2i))
    assert result["i2t_median_rank"] == float(np.median(i2t))
    assert 0 < result["t2i_R@1"] < 1 and 0 < result["i2t_R@1"] < 1  # a non-trivial case


def test_retrieval_errors():
    images, texts = torch.randn(5, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="2 of 5 images have no caption"):
        M.retrieval_metrics(images, texts, torch.tensor([0, 1, 4]))  # images 2 and 3 uncaptioned
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        M.retrieval_metrics(images, texts, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match=r"text_to_image must have shape \(3,\)"):
        M.retrieval_metrics(images, texts, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# gap shift
# ---------------------------------------------------------------------------------------------


def _gapped_features(seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    offset = torch.zeros(16, dtype=torch.float64)
    offset[0] = 2.0
    image = torch.randn(200, 16, dtype=torch.float64, generator=gen) + offset
    text = torch.randn(200, 16, dtype=torch.float64, generator=gen) - offset
    return image, text


def test_shift_along_gap_direction():
    image, text = _gapped_features()
    gap0 = M.modality_gap(image, text)["gap_l2"]
    assert gap0 > 0.5
    shrunk = M.modality_gap(*M.shift_along_gap(image, text, lam=0.2))["gap_l2"]
    grown = M.modality_gap(*M.shift_along_gap(image, text, lam=-0.2))["gap_l2"]
    assert shrunk < gap0 < grown
    # λ = 0 leaves the (normalised) features unchanged
    same_image, same_text = M.shift_along_gap(image, text, lam=0.0)
    torch.testing.assert_close(same_image, unit(image))
    torch.testing.assert_close(same_text, unit(text))
    # outputs are unit vectors; an explicit direction (any scale) gives the same result
    shifted_image, shifted_text = M.shift_along_gap(image, text, lam=0.3)
    torch.testing.assert_close(shifted_image.norm(dim=1), torch.ones(200, dtype=torch.float64))
    explicit = M.shift_along_gap(image, text, lam=0.3, direction=5.0 * M.gap_vector(image, text))
    torch.testing.assert_close(explicit[0], shifted_image)
    torch.testing.assert_close(explicit[1], shifted_text)


def test_shift_along_gap_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="zero norm"):
        M.shift_along_gap(x, x, lam=0.1)
    with pytest.raises(ValueError, match=r"direction must have shape \(3,\)"):
        M.shift_along_gap(x, x, lam=0.1, direction=torch.ones(4))


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------


def _clusters(n_per_class: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3] * 3.0
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = centres[labels] + 0.3 * torch.randn(len(labels), 8, generator=gen)
    return features, labels


def test_linear_probe_separable_clusters():
    train_x, train_y = _clusters(30, seed=8)
    test_x, test_y = _clusters(10, seed=9)
    result = M.linear_probe(train_x, train_y, test_x, test_y, seed=0)
    assert result["top1"] == 1.0
    assert result["C"] in M.DEFAULT_C_GRID
    assert set(result["val_top1_by_C"]) == set(M.DEFAULT_C_GRID)
    assert M.linear_probe(train_x, train_y, test_x, test_y, seed=0) == result  # deterministic
    fixed = M.linear_probe(train_x, train_y, test_x, test_y, C=10.0)
    assert fixed == {"top1": 1.0, "C": 10.0}


def test_linear_probe_errors():
    x, y = _clusters(5, seed=10)
    with pytest.raises(ValueError, match=r"train_labels must have shape \(15,\)"):
        M.linear_probe(x, y[:-1], x, y, C=1.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        M.linear_probe(x, torch.zeros(15, dtype=torch.long), x, y, C=1.0)


def test_zero_shot_average_leaves_the_probes_out():
    from clip_refine_lab.metrics import zero_shot_average

    results = {"shape": {"top1": 0.4}, "relation": {"top1": 0.1, "probe": True}, "colour": {"top1": 0.8, "top5": 1.0}}
    assert zero_shot_average(results) == pytest.approx(0.6)
    assert zero_shot_average({"relation": {"top1": 0.1, "probe": True}}) is None
    assert zero_shot_average({}) is None
