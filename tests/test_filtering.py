"""CLIP-score filtering mechanics with a tiny random model (micro-vit-24): fraction kept, ranking equal
to manual scoring, threshold, resumption after an interruption, WebDataset output shards."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clip_refine_lab.data import filtering as filtering
from clip_refine_lab.data.filtering import clip_score_filter, scores_path
from clip_refine_lab.data.images import load_image
from clip_refine_lab.data.manifest import load_manifest
from clip_refine_lab.models.loading import load_model
from conftest_data import make_corrupt_image, make_image, make_jsonl, make_webdataset


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return load_model("micro-vit-24")


@pytest.fixture
def pairs(tmp_path):
    rows = []
    for i in range(9):
        image = f"{i}.png"
        make_image(tmp_path / "images" / image, seed=i)
        caps = [f"photo number {i}", f"a picture of thing {i * 7}"] if i % 3 == 0 else [f"caption {i}"]
        rows.append({"id": f"r{i}", "image": image, "captions": caps})
    make_corrupt_image(tmp_path / "images" / "bad.jpg")
    rows.append({"id": "bad", "image": "bad.jpg", "captions": ["corrupt"]})
    return make_jsonl(tmp_path, rows, name="pairs")


def manual_scores(micro, manifest):
    out = {}
    for rec in load_manifest(manifest).records():
        if rec.id == "bad":
            continue
        with torch.no_grad():
            fi = micro.model.encode_image(micro.preprocess(load_image(rec.image))[None])
            ft = micro.model.encode_text(micro.tokenizer(list(rec.captions)))
        fi = fi / fi.norm(dim=-1, keepdim=True)
        ft = ft / ft.norm(dim=-1, keepdim=True)
        out[rec.id] = float((ft @ fi.T).max())
    return out


def kept_ids(out_yaml):
    return [r.id for r in load_manifest(out_yaml).records()]


def test_keep_fraction_matches_manual_ranking(tmp_path, micro, pairs):
    out = clip_score_filter(pairs, tmp_path / "out" / "kept.yaml", model=micro, keep_fraction=0.5, batch_size=4,
                            progress=False)
    manual = manual_scores(micro, pairs)
    top = sorted(manual, key=lambda k: -manual[k])[:5]
    ids = kept_ids(out)
    assert len(ids) == 5  # 0.5 * 9 scored pairs (the corrupt image gets no score), rounded half up
    assert set(ids) == set(top)
    assert ids == [i for i in manual if i in set(top)]  # input order kept
    recs = load_manifest(out).records()
    assert all(os.path.isabs(r.image) and os.path.isfile(r.image) for r in recs)
    for r in recs:
        assert r.meta["clip_score"] == pytest.approx(manual[r.id], abs=1e-5)
    r0 = [r for r in recs if r.id == "r0"]
    if r0:  # multi-caption record keeps all captions, scored by its best caption
        assert len(r0[0].captions) == 2 and len(r0[0].meta["clip_scores"]) == 2
    lines = scores_path(out).read_text().splitlines()
    assert json.loads(lines[0])["_header"]["model"] == "micro-vit-24"
    bad = [json.loads(line) for line in lines[1:] if json.loads(line)["id"] == "bad"][0]
    assert bad["score"] is None and "cannot read image" in bad["error"]
    fields = load_manifest(out).fields
    assert fields["filter"]["kept"] == 5 and fields["filter"]["scored"] == 9


def test_threshold(tmp_path, micro, pairs):
    manual = manual_scores(micro, pairs)
    # halfway between two scores: batched and one-by-one scoring differ in the last float digits, so a cut
    # placed exactly on a score could fall on either side of it
    ranked = sorted(manual.values())
    cut = (ranked[4] + ranked[5]) / 2
    out = clip_score_filter(pairs, tmp_path / "t.yaml", model=micro, threshold=cut, batch_size=3, progress=False)
    assert set(kept_ids(out)) == {k for k, v in manual.items() if v >= cut}
    with pytest.raises(ValueError, match="keep_fraction"):
        clip_score_filter(pairs, tmp_path / "x.yaml", model=micro, progress=False)


def test_resume_after_interruption_gives_same_result(tmp_path, micro, pairs, monkeypatch):
    ref = clip_score_filter(pairs, tmp_path / "ref" / "kept.yaml", model=micro, keep_fraction=0.4, batch_size=2,
                            progress=False)
    real = filtering.score_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(filtering, "score_batch", flaky)
    target = tmp_path / "res" / "kept.yaml"
    with pytest.raises(KeyboardInterrupt):
        clip_score_filter(pairs, target, model=micro, keep_fraction=0.4, batch_size=2, flush_every=1, progress=False)
    assert not target.exists()
    partial = scores_path(target).read_text().splitlines()
    assert len(partial) == 1 + 4  # header + two flushed batches of 2
    with open(scores_path(target), "a") as f:
        f.write('{"id": "r9", "sco')  # a torn line from a crash mid-write
    monkeypatch.setattr(filtering, "score_batch", real)
    calls_before = []
    monkeypatch.setattr(filtering, "score_batch", lambda *a, **k: calls_before.append(len(a[3])) or real(*a, **k))
    out = clip_score_filter(pairs, target, model=micro, keep_fraction=0.4, batch_size=2, flush_every=1, progress=False)
    assert sum(calls_before) == 5  # only r4..r8 are scored again (r0..r3 were flushed; "bad" has no image)
    assert kept_ids(out) == kept_ids(ref)
    entries = [json.loads(line) for line in scores_path(target).read_text().splitlines()[1:]]
    assert sorted(e["id"] for e in entries) == sorted([f"r{i}" for i in range(9)] + ["bad"])
    ref_scores = {json.loads(l)["id"]: json.loads(l)["score"] for l in scores_path(ref).read_text().splitlines()[1:]}
    for e in entries:
        assert e["score"] == pytest.approx(ref_scores[e["id"]], abs=1e-6) if e["score"] is not None else True


def test_scores_from_another_model_refused(tmp_path, micro, pairs):
    out = tmp_path / "k.yaml"
    clip_score_filter(pairs, out, model=micro, keep_fraction=0.5, progress=False)
    lines = scores_path(out).read_text().splitlines()
    header = json.loads(lines[0])
    header["_header"]["model"] = "ViT-B-32"
    scores_path(out).write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(Exception, match="holds scores from another run"):
        clip_score_filter(pairs, out, model=micro, keep_fraction=0.5, progress=False)


def test_webdataset_filter_writes_shards(tmp_path, micro):
    man, keys = make_webdataset(tmp_path, num_shards=3, per_shard=4)
    out = clip_score_filter(man, tmp_path / "filtered" / "cc-mini.yaml", model=micro, keep_fraction=0.25,
                            batch_size=5, progress=False, samples_per_shard=2)
    m = load_manifest(out)
    assert m.format == "webdataset"
    recs = m.records()
    assert len(recs) == 3
    scores = {json.loads(l)["id"]: json.loads(l)["score"] for l in scores_path(out).read_text().splitlines()[1:]}
    top = sorted(scores, key=lambda k: -scores[k])[:3]
    assert sorted(r.id for r in recs) == sorted(top)
    assert all(r.captions == (f"caption of sample {r.id}",) for r in recs)
    assert sorted(p.name for p in (tmp_path / "filtered" / "cc-mini-shards").iterdir()) == ["00000.tar", "00001.tar"]
    assert load_image(recs[0].image).size == (32, 32)
