"""Data check (problems with locations, exit code), is_readable, and the leakage check."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from clip_refine_lab.data.check import check_manifest, clean_captions, is_readable, run_data_check, validate_manifest_fields
from clip_refine_lab.data.leakage import image_identity, leakage_report
from clip_refine_lab.data.manifest import load_manifest
from conftest_data import (
    coco_name,
    make_coco,
    make_corrupt_image,
    make_csv,
    make_flickr8k,
    make_image,
    make_imagefolder,
    make_jsonl,
    make_karpathy,
    make_webdataset,
    write_manifest_yaml,
    write_tar,
    image_bytes,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_REFINE_LAB_CACHE", str(tmp_path / "cache"))


def _where(report, kind):
    return [o.where for o in report.problems[kind].offenders]


def test_clean_coco_passes(tmp_path):
    man = make_coco(tmp_path, (1, 2, 3))
    report = check_manifest(man, progress=False)
    assert report.ok, report.format()
    assert report.num_records == 3 and report.num_images_checked == 3
    assert run_data_check(man, progress=False) == 0


def test_coco_problems_are_located(tmp_path, capsys):
    man = make_coco(tmp_path, (1, 2, 3, 4))
    (tmp_path / "images" / coco_name(2)).unlink()  # missing
    make_corrupt_image(tmp_path / "images" / coco_name(3))  # truncated JPEG
    ann = tmp_path / "annotations" / "captions.json"
    data = json.loads(ann.read_text())
    data["annotations"][6]["caption"] = "   "  # image 4, caption 0
    data["annotations"][7]["caption"] = 17  # image 4, caption 1
    data["images"].append({"id": 5, "file_name": coco_name(5)})  # no annotations
    make_image(tmp_path / "images" / coco_name(5), seed=5)
    ann.write_text(json.dumps(data))
    report = check_manifest(man, progress=False)
    assert not report.ok
    counts = report.counts()
    assert counts["missing_file"] == 1 and counts["unreadable_image"] == 1
    assert counts["empty_caption"] == 1 and counts["non_text_caption"] == 1 and counts["no_captions"] == 1
    assert _where(report, "missing_file")[0].endswith("captions.json: images[1]")
    assert _where(report, "unreadable_image")[0].endswith("captions.json: images[2]")
    assert _where(report, "empty_caption")[0].endswith("captions.json: annotations[6]")
    assert _where(report, "non_text_caption")[0].endswith("captions.json: annotations[7]")
    assert _where(report, "no_captions")[0].endswith("captions.json: images[4]")
    text = report.format()
    assert "missing_file: 1" in text and "FAILED" in text
    assert run_data_check(man, progress=False) == 1
    assert "unreadable_image" in capsys.readouterr().out


def test_jsonl_duplicates_and_bad_json_line(tmp_path):
    rows = [{"id": "a", "image": "a.jpg", "captions": ["x"]}, {"id": "b", "image": "b.jpg", "captions": [""]},
            {"id": "a", "image": "c.jpg", "captions": ["y"]}]
    for i, r in enumerate(rows):
        make_image(tmp_path / "images" / r["image"], seed=i)
    man = make_jsonl(tmp_path, rows)
    report = check_manifest(man, progress=False)
    assert report.counts() == {"duplicate_id": 1, "empty_caption": 1}
    assert _where(report, "duplicate_id")[0].endswith("pairs.jsonl:3")
    assert "already used at" in report.problems["duplicate_id"].offenders[0].detail
    assert _where(report, "empty_caption")[0].endswith("pairs.jsonl:2")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(rows[0]) + "\n{broken\n" + json.dumps(rows[2]) + "\n")
    report = check_manifest(man, progress=False)
    assert not report.ok
    assert "pairs.jsonl:2: not valid JSON" in report.problems["bad_record"].offenders[0].detail
    assert report.num_records == 2  # the records before and after the broken line are still checked


def test_flickr8k_and_karpathy_problems(tmp_path):
    man = make_flickr8k(tmp_path / "f8", {"1.jpg": ["a", ""], "2.jpg": ["b"]}, test=["1.jpg", "2.jpg"])
    (tmp_path / "f8" / "Flicker8k_Dataset" / "2.jpg").unlink()
    report = check_manifest(man, progress=False)
    assert _where(report, "empty_caption")[0].endswith("Flickr8k.token.txt:2")
    assert _where(report, "missing_file")[0].endswith("Flickr8k.token.txt:3")
    man = make_karpathy(tmp_path / "k", [("10.jpg", "test", ["ok"]), ("11.jpg", "test", [])])
    report = check_manifest(man, progress=False)
    assert _where(report, "no_captions")[0].endswith("images[1]")


def test_classification_label_and_class_problems(tmp_path):
    rows = [{"path": "0.jpg", "label": "0"}, {"path": "1.jpg", "label": "5"}, {"path": "2.jpg", "label": "0"}]
    for i in range(3):
        make_image(tmp_path / "images" / f"{i}.jpg", seed=i)
    man = make_csv(tmp_path, rows, kind="classification", classnames=["cat", "dog", "cow"], templates=["a {c}."])
    report = check_manifest(man, progress=False)
    assert report.counts()["label_out_of_range"] == 1
    assert _where(report, "label_out_of_range")[0].endswith("pairs.csv:3")
    assert "outside 0..2" in report.problems["label_out_of_range"].offenders[0].detail
    assert report.counts()["class_without_images"] == 2  # dog and cow
    assert report.problems["class_without_images"].severity == "warning"


def test_imagefolder_unknown_folder_and_empty_class(tmp_path):
    make_imagefolder(tmp_path, {"cat": 2, "dog": 1, "zebra": 1})
    make_corrupt_image(tmp_path / "images" / "dog" / "bad.jpg")
    man = write_manifest_yaml(tmp_path / "f.yaml", name="f", kind="classification", format="imagefolder",
                              root="images", classnames=["cat", "dog", "bird"], templates=["a photo of a {c}."])
    report = check_manifest(man, progress=False)
    counts = report.counts()
    assert counts["unknown_class_folder"] == 1
    assert "'zebra'" in report.problems["unknown_class_folder"].offenders[0].detail
    assert counts["class_without_images"] == 1
    assert "'bird'" in report.problems["class_without_images"].offenders[0].detail
    assert counts["unreadable_image"] == 1
    assert _where(report, "unreadable_image")[0].endswith("images/dog/bad.jpg")
    assert run_data_check(man, progress=False) == 1


def test_webdataset_check_finds_corrupt_member(tmp_path):
    man, keys = make_webdataset(tmp_path, num_shards=1, per_shard=2)
    write_tar(tmp_path / "shards" / "00001.tar", [("x1.jpg", b"garbage"), ("x1.txt", b"cap"),
                                                  ("x2.jpg", image_bytes(3)), ("x2.txt", b"")])
    m = write_manifest_yaml(tmp_path / "w.yaml", name="w", kind="captions", format="webdataset", root="shards",
                            shards="{00000..00001}.tar")
    report = check_manifest(m, progress=False)
    assert report.counts() == {"unreadable_image": 1, "empty_caption": 1}
    assert "00001.tar: sample 0 (key x1)" in _where(report, "unreadable_image")[0]


def test_schema_errors_reported(tmp_path):
    man = write_manifest_yaml(tmp_path / "bad.yaml", name="x", kind="captions", format="coco", root=".",
                              records="a.json", colums={"image": "x"})
    report = check_manifest(man, progress=False)
    assert "unknown field 'colums' for format 'coco'" in report.problems["unknown_field"].offenders[0].detail
    assert report.problems["unknown_field"].severity == "error"
    assert "structure" in report.problems  # records file missing
    missing = check_manifest(tmp_path / "nope.yaml", progress=False)
    assert not missing.ok and "manifest not found" in missing.problems["structure"].offenders[0].detail


def test_unknown_fields_are_errors_with_the_closest_known_field(tmp_path):
    # a misspelt field would be ignored by the reader: refine and eval refuse it, so data check does too
    make_image(tmp_path / "images" / "0.png")
    man = make_jsonl(tmp_path, [{"id": "0", "image": "0.png", "label": 0}], kind="classification",
                     classnames=["circle"], templates=["a {c}."], task="shape", color="red", clasnames=["x"])
    report = check_manifest(man, progress=False)
    assert not report.ok and report.counts() == {"unknown_field": 2}  # task: a field of the synthetic world
    details = [o.detail for o in report.problems["unknown_field"].offenders]
    assert "unknown field 'clasnames' for format 'jsonl' (did you mean 'classnames'?)" in details
    assert any("'color'" in d and "'description' or 'notes'" in d for d in details)
    assert run_data_check(man, progress=False) == 1


def test_the_fields_our_own_writers_add_are_known(tmp_path):
    # the synthetic world (task, style), CLIP-score filtering (filtered_from, filter), a sweep's subsets (subset_of)
    from clip_refine_lab.data.manifest import write_manifest

    make_image(tmp_path / "0.png")
    man = write_manifest(tmp_path / "m.yaml", name="m", kind="captions",
                         records=[{"id": "0", "image": "0.png", "captions": ["c"]}], description="d", source="s",
                         layout="l", subset_of="x.yaml", filtered_from="y.yaml", filter={"kept": 1})
    assert check_manifest(man, progress=False).problems == {}


def test_misspelt_records_field_is_named_with_its_fix(tmp_path):
    make_image(tmp_path / "images" / "a.jpg")
    man = make_jsonl(tmp_path, [{"id": "a", "image": "a.jpg", "captions": ["x"]}])
    fields = yaml.safe_load(man.read_text())
    fields["recods"] = fields.pop("records")
    man.write_text(yaml.safe_dump(fields))
    report = check_manifest(man, progress=False)
    assert "did you mean 'records'?" in report.problems["unknown_field"].offenders[0].detail
    assert "missing field 'records'" in report.format()
    assert list(report.problems)[0] == "unknown_field"  # the suggestion comes first


def test_every_bad_line_of_a_file_is_reported_in_one_pass(tmp_path):
    rows = [{"id": str(i), "image": f"{i}.jpg", "captions": [f"c{i}"]} for i in range(6)]
    for i in range(6):
        make_image(tmp_path / "images" / f"{i}.jpg", seed=i)
    man = make_jsonl(tmp_path, rows)
    lines = [json.dumps(r) for r in rows]
    lines[1], lines[3], lines[4] = "{broken", "[1, 2]", json.dumps({"id": "4", "captions": ["no image"]})
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    report = check_manifest(man, progress=False)
    bad = report.problems["bad_record"]
    assert bad.count == 3 and report.num_records == 3
    assert [o.detail.split(": ")[0].rsplit(":", 1)[1] for o in bad.offenders] == ["2", "4", "5"]
    assert "missing field 'image'" in bad.offenders[2].detail


def test_every_bad_csv_row_and_coco_entry_is_reported(tmp_path):
    rows = [{"filepath": f"{i}.jpg", "title": f"t{i}"} for i in range(4)]
    for i in range(4):
        make_image(tmp_path / "csv" / "images" / f"{i}.jpg", seed=i)
    man = make_csv(tmp_path / "csv", rows)
    text = (tmp_path / "csv" / "pairs.csv").read_text().splitlines()
    text[1] += ",extra"
    text[3] += ",extra"
    (tmp_path / "csv" / "pairs.csv").write_text("\n".join(text) + "\n")
    report = check_manifest(man, progress=False)
    assert report.problems["bad_record"].count == 2 and report.num_records == 2
    assert [o.detail.split(": ")[0][-1] for o in report.problems["bad_record"].offenders] == ["2", "4"]

    man = make_coco(tmp_path / "coco", (1, 2, 3))
    ann = tmp_path / "coco" / "annotations" / "captions.json"
    data = json.loads(ann.read_text())
    data["images"].append({"id": 1, "file_name": "dup.jpg"})
    data["annotations"] += [{"image_id": 77, "caption": "x"}, {"caption": "no image id"}]
    ann.write_text(json.dumps(data))
    report = check_manifest(man, progress=False)
    details = [o.detail for o in report.problems["bad_record"].offenders]
    assert len(details) == 3 and report.num_records == 3
    assert "images[3]: duplicate image id 1" in details[0]
    assert "annotations[6]: field 'image_id': 77" in details[1]
    assert "annotations[7]: missing field 'image_id'" in details[2]


def test_outside_data_check_the_first_bad_line_raises(tmp_path):
    from clip_refine_lab.data.manifest import ManifestError

    man = make_jsonl(tmp_path, [{"id": "a", "image": "a.jpg", "captions": ["x"]}])
    (tmp_path / "pairs.jsonl").write_text("{broken\n")
    with pytest.raises(ManifestError, match=r"pairs.jsonl:1: not valid JSON"):
        load_manifest(man).records()


def test_validate_manifest_fields():
    ok = {"name": "x", "kind": "classification", "format": "imagefolder", "root": "r", "classnames": ["a", "b"],
          "templates": ["a photo of a {c}."], "class_folders": ["n1", "n2"], "source": "s", "layout": "l"}
    assert validate_manifest_fields(ok) == []
    problems = validate_manifest_fields({**ok, "templates": ["no placeholder"], "class_folders": ["n1"],
                                         "bogus": 1, "kind": "classification", "format": "imagefolder"})
    text = "\n".join(problems)
    assert "must be a string containing '{c}'" in text and "class_folders' has 1 entries" in text
    assert "unknown field 'bogus'" in text
    assert any("missing field 'records'" in p for p in validate_manifest_fields({"name": "x", "kind": "captions",
                                                                                  "format": "coco"}))
    assert any("unknown format" in p for p in validate_manifest_fields({"name": "x", "kind": "captions", "format": "zip"}))
    assert validate_manifest_fields({**ok, "probe": True}) == []
    assert "field 'probe' must be true or false, got 'yes'" in validate_manifest_fields({**ok, "probe": "yes"})
    assert "field 'probe' applies to classification manifests only" in validate_manifest_fields(
        {"name": "x", "kind": "captions", "format": "coco", "records": "c.json", "probe": True})
    assert any("holds classification data" in p for p in validate_manifest_fields(
        {"name": "x", "kind": "captions", "format": "imagefolder"}))


def test_is_readable(tmp_path):
    man = make_coco(tmp_path, (1, 2, 3))
    recs = load_manifest(man).records()
    (tmp_path / "images" / coco_name(2)).unlink()
    make_corrupt_image(tmp_path / "images" / coco_name(3))
    assert is_readable(recs[0]) is None
    assert is_readable(recs[1]).startswith("missing file")
    assert is_readable(recs[2]).startswith("unreadable image")
    assert is_readable(recs[0].__class__("x", recs[0].image, ("", " "))) == "no non-empty text caption"
    mixed = recs[0].__class__("x", recs[0].image, ("", "good", None))
    assert is_readable(mixed) is None and clean_captions(mixed).captions == ("good",)
    assert clean_captions(recs[0]) is recs[0]
    assert clean_captions(recs[0].__class__("x", recs[0].image, (" ",))) is None


# ----------------------------------------------------------------------------------------- leakage
def test_image_identity_coco_naming():
    from clip_refine_lab.data.manifest import CaptionRecord

    a = CaptionRecord("1", "/d/train2017/000000123456.jpg", ("x",))
    b = CaptionRecord("2", "/d/val2014/COCO_val2014_000000123456.jpg", ("x",))
    assert image_identity(a) == image_identity(b) == "coco:123456"
    c = CaptionRecord("3", "/d/flickr/1000268201_693b08cb0e.jpg", ("x",))
    assert image_identity(c) is None and image_identity(c, flickr=True) == "flickr:1000268201"


def test_leakage_coco_2014_vs_2017_and_hash(tmp_path):
    train = make_coco(tmp_path / "train", (1, 2, 3, 4), name="coco-train2017", images_dir="train2017", seed=0)
    # Karpathy-style test split from val2014: ids 2 and 3 are in train (other bytes), 9 is not
    evalm = make_coco(tmp_path / "ev", (2, 3, 9), style="val2014", name="coco-karpathy-test", images_dir="val2014",
                      seed=100)
    # a copy of a train image under another name (content hash overlap)
    make_coco(tmp_path / "other", (77,), name="other", images_dir="imgs", write_images=False)
    (tmp_path / "other" / "imgs").mkdir()
    shutil.copy(tmp_path / "train" / "train2017" / coco_name(4), tmp_path / "other" / "imgs" / coco_name(77))
    clean = make_coco(tmp_path / "val", (50, 51), name="coco-val2017", images_dir="val2017", seed=500)
    report = leakage_report(train, [evalm, tmp_path / "other" / "other.yaml", clean])
    k, other, val = report.evals
    assert (k.num_images, k.overlap, k.overlap_by_id, k.overlap_by_hash) == (3, 2, 2, 0)
    assert abs(k.fraction - 2 / 3) < 1e-9
    assert k.examples[0][0].endswith("COCO_val2014_000000000002.jpg") and k.examples[0][1].endswith("000000000002.jpg")
    assert (other.overlap, other.overlap_by_id, other.overlap_by_hash) == (1, 0, 1)
    assert "COCO 2017 val" not in other.warning("t") and "identical file content" in other.warning("t")
    assert val.overlap == 0 and val.warning(report.train_name) is None
    assert report.leaks
    w = report.warnings[0]
    assert w.startswith("LEAKAGE: coco-karpathy-test overlaps coco-train2017: 2 of 3 images (66.7%)")
    assert "COCO 2017 val" in w
    assert "[LEAK] coco-karpathy-test" in report.format() and "[ok] coco-val2017" in report.format()
    # hashes are cached per manifest, keyed by path + size + mtime
    cache_files = list((tmp_path / "cache" / "hashes").glob("*.json"))
    assert len(cache_files) == 4
    entries = json.loads(cache_files[0].read_text())["entries"]
    assert all(len(v) == 3 for v in entries.values())
    again = leakage_report(train, evalm, hash_images=False)
    assert again.evals[0].overlap == 2 and not again.hash_images


def test_leakage_flickr8k_inside_flickr30k(tmp_path):
    f8 = make_flickr8k(tmp_path / "f8", {"1000268201_693b08cb0e.jpg": ["a"], "1001773457_577c3a7d70.jpg": ["b"]},
                       test=["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"])
    f30 = make_karpathy(tmp_path / "f30", [("1000268201.jpg", "test", ["a"]), ("55.jpg", "test", ["b"])],
                        seed=300)
    report = leakage_report(f8, f30, hash_images=False)
    assert report.evals[0].overlap_by_id == 1


def test_probe_field_must_be_a_boolean(tmp_path):
    from clip_refine_lab.data.manifest import ManifestError

    make_image(tmp_path / "images" / "0.png")
    row = [{"id": "0", "image": "0.png", "label": 0}]
    man = make_jsonl(tmp_path, row, kind="classification", classnames=["left", "right"], probe=True)
    assert load_manifest(man).is_probe and check_manifest(man, progress=False).ok
    man = make_jsonl(tmp_path, row, name="bad", kind="classification", classnames=["left", "right"], probe="yes")
    with pytest.raises(ManifestError, match=r"bad\.yaml: field 'probe' must be true or false, got 'yes'"):
        load_manifest(man)
