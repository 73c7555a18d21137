"""Readers of real data formats, on tiny fixtures built in tmp_path."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_refine_lab.data.images import load_image, read_image_bytes
from clip_refine_lab.data.manifest import CaptionRecord, ClassificationRecord, ManifestError, load_manifest
from clip_refine_lab.data.webdataset import WebDatasetPairs, assign_shards, expand_braces, write_tar_shards
from conftest_data import (
    image_bytes,
    make_coco,
    make_csv,
    make_flickr8k,
    make_image,
    make_imagefolder,
    make_jsonl,
    make_karpathy,
    make_webdataset,
    write_manifest_yaml,
    write_tar,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -------------------------------------------------------------------------------------------- coco
def test_coco_reader(tmp_path):
    man = make_coco(tmp_path, (139, 285, 632), captions_per_image=2)
    recs = load_manifest(man).records()
    assert [r.id for r in recs] == ["139", "285", "632"]
    assert all(isinstance(r, CaptionRecord) for r in recs)
    assert recs[0].image == str(tmp_path / "images" / "000000000139.jpg")
    assert recs[1].captions == ("image 285 caption 0", "image 285 caption 1")
    assert recs[2].meta["coco_id"] == 632
    assert recs[0].source.endswith("captions.json: images[0]")
    assert recs[0].meta["caption_sources"][1].endswith("annotations[1]")


def test_coco_unknown_image_id_names_annotation(tmp_path):
    man = make_coco(tmp_path, (1, 2))
    ann = tmp_path / "annotations" / "captions.json"
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 99, "image_id": 12345, "caption": "orphan"})
    ann.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"captions\.json: annotations\[4\]: field 'image_id': 12345"):
        load_manifest(man).records()


def test_coco_bad_json_and_missing_key(tmp_path):
    man = make_coco(tmp_path, (1,))
    ann = tmp_path / "annotations" / "captions.json"
    ann.write_text('{"images": [\n{"id": 1, "file_name": "a.jpg"},\n oops]}')
    with pytest.raises(ManifestError, match=r"captions\.json:3: not valid JSON"):
        load_manifest(man).records()
    ann.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ManifestError, match=r"images\[0\]: missing field 'file_name'"):
        load_manifest(man).records()


def test_data_root_override_and_env(tmp_path, monkeypatch):
    make_coco(tmp_path / "data" / "coco", (5,))
    man = write_manifest_yaml(tmp_path / "m" / "coco.yaml", name="c", kind="captions", format="coco",
                              root="${CLIP_REFINE_LAB_DATA}/coco/images",
                              records="${CLIP_REFINE_LAB_DATA}/coco/annotations/captions.json")
    recs = load_manifest(man, data_root=tmp_path / "data").records()
    assert recs[0].image == str(tmp_path / "data" / "coco" / "images" / "000000000005.jpg")
    monkeypatch.setenv("CLIP_REFINE_LAB_DATA", str(tmp_path / "data"))
    assert load_manifest(man).records()[0].image == recs[0].image


# ---------------------------------------------------------------------------------------- karpathy
def test_karpathy_reader_splits(tmp_path):
    items = [("100.jpg", "train", ["a", "b"]), ("200.jpg", "test", ["c", "d", "e"]), ("300.jpg", "val", ["f"]),
             ("400.jpg", "test", ["g"])]
    man = make_karpathy(tmp_path, items)
    recs = load_manifest(man).records()
    assert [r.id for r in recs] == ["200", "400"]
    assert recs[0].captions == ("c", "d", "e")
    assert recs[0].image == str(tmp_path / "flickr30k-images" / "200.jpg")
    assert recs[0].source.endswith("dataset_flickr30k.json: images[1]")
    m = load_manifest(man)
    m.fields["split"] = ["train", "val"]
    assert [r.id for r in m.records()] == ["100", "300"]
    m.fields["split"] = "bogus"
    with pytest.raises(ManifestError, match="unknown split 'bogus'"):
        m.records()


def test_karpathy_coco_filepath(tmp_path):
    data = {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                        "cocoid": 391895, "sentences": [{"raw": "a man on a bike"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    man = write_manifest_yaml(tmp_path / "k.yaml", name="coco-karpathy-test", kind="captions", format="karpathy",
                              root="coco", records="dataset_coco.json", split="test")
    rec = load_manifest(man).records()[0]
    assert rec.image == str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg")
    assert rec.meta["coco_id"] == 391895


# ---------------------------------------------------------------------------------------- flickr8k
def test_flickr8k_reader(tmp_path):
    caps = {"1000268201_693b08cb0e.jpg": ["a child", "a girl"], "1001773457_577c3a7d70.jpg": ["two dogs"],
            "1002674143_1b742ab4b8.jpg": ["a painted girl"]}
    man = make_flickr8k(tmp_path, caps, test=["1002674143_1b742ab4b8.jpg", "1000268201_693b08cb0e.jpg"])
    recs = load_manifest(man).records()
    assert [r.id for r in recs] == ["1002674143_1b742ab4b8", "1000268201_693b08cb0e"]
    assert recs[1].captions == ("a child", "a girl")
    assert recs[1].source.endswith("Flickr8k.token.txt:1")
    assert recs[1].meta["caption_sources"][1].endswith("Flickr8k.token.txt:2")


def test_flickr8k_errors_name_line(tmp_path):
    man = make_flickr8k(tmp_path, {"1.jpg": ["x"]}, test=["1.jpg", "2.jpg"])
    with pytest.raises(ManifestError, match=r"Flickr_8k\.testImages\.txt:2: image '2\.jpg' has no captions"):
        load_manifest(man).records()
    (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").write_text("1.jpg#0\tok\n1.jpg#1 no tab here\n")
    with pytest.raises(ManifestError, match=r"Flickr8k\.token\.txt:2: expected 'IMAGE#N<TAB>caption'"):
        load_manifest(man).records()


# ------------------------------------------------------------------------------------- csv / jsonl
def test_csv_captions_columns_and_grouping(tmp_path):
    rows = [{"filepath": "a.jpg", "title": "first"}, {"filepath": "b.jpg", "title": "second"},
            {"filepath": "a.jpg", "title": "third"}]
    man = make_csv(tmp_path, rows, columns={"image": "filepath", "caption": "title"})
    recs = load_manifest(man).records()
    assert [(r.id, r.captions) for r in recs] == [("a.jpg", ("first", "third")), ("b.jpg", ("second",))]
    assert recs[0].image == str(tmp_path / "images" / "a.jpg")
    assert recs[1].source.endswith("pairs.csv:3")
    assert recs[0].meta["caption_sources"][1].endswith("pairs.csv:4")


def test_csv_missing_column_is_clear(tmp_path):
    man = make_csv(tmp_path, [{"path": "a.jpg", "text": "x"}], columns={"image": "filepath"})
    with pytest.raises(ManifestError, match=r"pairs\.csv:2: column 'filepath' \(manifest field columns\.image\)"):
        load_manifest(man).records()


def test_tsv_and_jsonl_tables(tmp_path):
    man = make_csv(tmp_path / "t", [{"image": "a.jpg", "caption": "x"}], filename="pairs.tsv", delimiter="\t")
    assert load_manifest(man).records()[0].captions == ("x",)
    man = make_jsonl(tmp_path / "j", [{"file": "a.jpg", "texts": ["x", "y"]}], fmt="csv",
                     columns={"image": "file", "caption": "texts"})
    assert load_manifest(man).records()[0].captions == ("x", "y")


def test_csv_classification_labels(tmp_path):
    rows = [{"path": "0.jpg", "label": "cat"}, {"path": "1.jpg", "label": "1"}, {"path": "2.jpg", "label": "dog"}]
    man = make_csv(tmp_path, rows, kind="classification", classnames=["cat", "dog"], templates=["a {c}."])
    recs = load_manifest(man).records()
    assert [(r.id, r.label) for r in recs] == [("0.jpg", 0), ("1.jpg", 1), ("2.jpg", 1)]
    assert all(isinstance(r, ClassificationRecord) for r in recs)
    bad = make_csv(tmp_path / "b", [{"path": "0.jpg", "label": "cow"}], kind="classification",
                   classnames=["cat", "dog"])
    with pytest.raises(ManifestError, match=r"pairs\.csv:2: label 'cow' is not one of the manifest's classnames"):
        load_manifest(bad).records()


# -------------------------------------------------------------------------------------- labels_txt
def test_labels_txt_aircraft_and_pets_styles(tmp_path):
    (tmp_path / "variant_test.txt").write_text("1514522 Cessna 172\n0034309 707-320\n")
    man = write_manifest_yaml(tmp_path / "air.yaml", name="air", kind="classification", format="labels_txt",
                              root="images", records="variant_test.txt", image_pattern="{}.jpg",
                              label_by="name", maxsplit=1, classnames=["707-320", "Cessna 172"], templates=["{c}"])
    recs = load_manifest(man).records()
    assert [(r.id, r.label, Path(r.image).name) for r in recs] == [("1514522", 1, "1514522.jpg"), ("0034309", 0, "0034309.jpg")]
    (tmp_path / "test.txt").write_text("#Image CLASS-ID SPECIES BREED\nAbyssinian_100 1 1 1\nbeagle_12 2 2 1\n")
    man = write_manifest_yaml(tmp_path / "pets.yaml", name="pets", kind="classification", format="labels_txt",
                              root="images", records="test.txt", image_pattern="{}.jpg", label_column=1,
                              index_base=1, classnames=["Abyssinian", "Beagle"], templates=["{c}"])
    recs = load_manifest(man).records()
    assert [(r.id, r.label) for r in recs] == [("Abyssinian_100", 0), ("beagle_12", 1)]
    assert recs[1].source.endswith("test.txt:3")


# ------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_class_order_from_classnames(tmp_path):
    make_imagefolder(tmp_path, {"dog": 2, "cat": 1, "apple_pie": 1})
    man = write_manifest_yaml(tmp_path / "f.yaml", name="f", kind="classification", format="imagefolder",
                              root="images", classnames=["apple pie", "cat", "dog"], templates=["a photo of a {c}."])
    recs = load_manifest(man).records()
    assert sorted((r.id, r.label) for r in recs) == [("apple_pie/000.jpg", 0), ("cat/000.jpg", 1), ("dog/000.jpg", 2),
                                                      ("dog/001.jpg", 2)]


def test_imagefolder_class_folders_split_file_and_unknown(tmp_path):
    make_imagefolder(tmp_path, {"n01": 2, "n02": 2, "extra": 1})
    (tmp_path / "test.txt").write_text("n02/000\n/n01/001\n")
    man = write_manifest_yaml(tmp_path / "f.yaml", name="f", kind="classification", format="imagefolder",
                              root="images", classnames=["tench", "goldfish"], class_folders=["n01", "n02"],
                              split_file="test.txt", split_ext=".jpg", templates=["{c}"])
    recs = load_manifest(man).records()
    assert [(r.id, r.label) for r in recs] == [("n02/000.jpg", 1), ("n01/001.jpg", 0)]
    assert recs[0].source.endswith("test.txt:1")
    m = load_manifest(man)
    del m.fields["split_file"]
    with pytest.raises(ManifestError, match=r"match no class of 'classnames': 'extra' \(1 images"):
        m.records()
    m.fields["ignore_folders"] = ["extra"]
    assert len(m.records()) == 4


def test_imagefolder_sun397_letters_and_index_folders(tmp_path):
    make_image(tmp_path / "SUN397" / "a" / "apartment_building" / "outdoor" / "sun_1.jpg")
    make_image(tmp_path / "SUN397" / "a" / "abbey" / "sun_2.jpg")
    man = write_manifest_yaml(tmp_path / "s.yaml", name="s", kind="classification", format="imagefolder",
                              root="SUN397", classnames=["abbey", "apartment building outdoor"], templates=["{c}"])
    assert sorted(r.label for r in load_manifest(man).records()) == [0, 1]
    make_image(tmp_path / "v2" / "0" / "x.jpeg")
    make_image(tmp_path / "v2" / "1" / "y.jpeg")
    man = write_manifest_yaml(tmp_path / "v2.yaml", name="v2", kind="classification", format="imagefolder",
                              root="v2", classnames=["tench", "goldfish"], class_folders="index", templates=["{c}"])
    assert sorted((r.id, r.label) for r in load_manifest(man).records()) == [("0/x.jpeg", 0), ("1/y.jpeg", 1)]


# ------------------------------------------------------------------------------- cub, cars, flowers
def test_cub200_reader(tmp_path):
    cub = tmp_path / "CUB_200_2011"
    rel = ["001.Black_footed_Albatross/a_1.jpg", "001.Black_footed_Albatross/a_2.jpg", "002.Laysan_Albatross/b_1.jpg"]
    for i, r in enumerate(rel):
        make_image(cub / "images" / r, seed=i)
    (cub / "images.txt").write_text("".join(f"{i + 1} {r}\n" for i, r in enumerate(rel)))
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 0\n")
    man = write_manifest_yaml(tmp_path / "cub.yaml", name="cub200", kind="classification", format="cub200",
                              root="CUB_200_2011", classnames=["Black footed Albatross", "Laysan Albatross"],
                              templates=["a photo of a {c}, a type of bird."])
    recs = load_manifest(man).records()
    assert [(r.id, r.label) for r in recs] == [("2", 0), ("3", 1)]
    assert recs[0].image == str(cub / "images" / rel[1])


def test_stanford_cars_and_flowers_mat(tmp_path):
    sio = pytest.importorskip("scipy.io")
    ann = np.zeros(2, dtype=[("fname", object), ("class", np.int32)])
    ann[0] = ("00001.jpg", 3)
    ann[1] = ("00002.jpg", 1)
    (tmp_path / "cars").mkdir()
    sio.savemat(str(tmp_path / "cars" / "cars_test_annos_withlabels.mat"), {"annotations": ann})
    man = write_manifest_yaml(tmp_path / "cars.yaml", name="cars", kind="classification", format="stanford_cars",
                              root="cars/cars_test", records="cars/cars_test_annos_withlabels.mat",
                              classnames=["a", "b", "c"], templates=["{c}"])
    recs = load_manifest(man).records()
    assert [(r.id, r.label) for r in recs] == [("00001.jpg", 2), ("00002.jpg", 0)]
    fl = tmp_path / "flowers-102"
    fl.mkdir()
    sio.savemat(str(fl / "imagelabels.mat"), {"labels": np.array([[1, 2, 2, 1]])})
    sio.savemat(str(fl / "setid.mat"), {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[4, 3]])})
    man = write_manifest_yaml(tmp_path / "fl.yaml", name="flowers", kind="classification", format="flowers102",
                              root="flowers-102", classnames=["rose", "tulip"], templates=["{c}"])
    recs = load_manifest(man).records()
    assert [(r.id, r.label) for r in recs] == [("image_00004.jpg", 0), ("image_00003.jpg", 1)]
    assert recs[0].image == str(fl / "jpg" / "image_00004.jpg")


# -------------------------------------------------------------------------------------- webdataset
def test_expand_braces():
    assert expand_braces("cc3m/{00000..00002}.tar") == ["cc3m/00000.tar", "cc3m/00001.tar", "cc3m/00002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert len(expand_braces("{00000..00331}.tar")) == 332


def test_webdataset_reader_and_locators(tmp_path):
    man, keys = make_webdataset(tmp_path, num_shards=2, per_shard=3)
    recs = load_manifest(man).records()
    assert [r.id for r in recs] == keys
    assert recs[4].captions == (f"caption of sample {keys[4]}",)
    assert recs[4].image == f"{tmp_path / 'shards' / '00001.tar'}::{keys[4]}.jpg"
    assert read_image_bytes(recs[4].image) == image_bytes(1001)
    assert load_image(recs[4].image).size == (32, 32)
    with pytest.raises(ManifestError, match="not found in tar shard"):
        read_image_bytes(f"{tmp_path / 'shards' / '00001.tar'}::nope.jpg")


def test_write_tar_shards_roundtrip(tmp_path):
    samples = [{"__key__": f"k{i}", "jpg": image_bytes(i), "txt": b"t"} for i in range(5)]
    paths = write_tar_shards(samples, tmp_path / "out", samples_per_shard=2)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert read_image_bytes(f"{paths[2]}::k4.jpg") == image_bytes(4)


def _tiny_preprocess(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255.0


def _tiny_tokenizer(texts):
    return torch.tensor([[len(t)] for t in texts])


def test_assign_shards_partition():
    for epoch in range(3):
        seen = Counter()
        for rank in range(2):
            for worker in range(2):
                seen.update(assign_shards(8, rank, 2, worker, 2, seed=5, epoch=epoch))
        assert seen == Counter(range(8))
    assert assign_shards(8, 0, 2, 0, 2, seed=5, epoch=0) == assign_shards(8, 0, 2, 0, 2, seed=5, epoch=0)
    orders = {tuple(assign_shards(8, 0, 1, 0, 1, seed=5, epoch=e)) for e in range(4)}
    assert len(orders) > 1


def test_webdataset_pairs_each_sample_once_per_epoch(tmp_path):
    _, keys = make_webdataset(tmp_path, num_shards=8, per_shard=3, with_json=False)
    shards = str(tmp_path / "shards" / "{00000..00007}.tar")
    for epoch in (0, 1):
        seen: list[str] = []
        per_rank = []
        for rank in range(2):
            ds = WebDatasetPairs(shards, _tiny_preprocess, _tiny_tokenizer, rank=rank, world_size=2, seed=3)
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
            got = []
            for images, tokens, batch_keys in loader:
                assert images.shape[1:] == (3, 8, 8) and tokens.shape[0] == images.shape[0]
                got.extend(batch_keys)
            per_rank.append(got)
            seen.extend(got)
        assert sorted(seen) == sorted(keys), f"epoch {epoch}: every sample exactly once"
        assert all(per_rank)
    # deterministic given seed and epoch
    ds = WebDatasetPairs(shards, _tiny_preprocess, _tiny_tokenizer, seed=3)
    ds.set_epoch(1)
    a = [k for _, _, k in ds]
    assert a == [k for _, _, k in ds]
    ds.set_epoch(2)
    assert sorted(a) == sorted(k for _, _, k in ds)


def test_webdataset_pairs_bad_samples(tmp_path):
    write_tar(tmp_path / "s.tar", [("a.jpg", image_bytes(1)), ("a.txt", b"ok"), ("b.jpg", b"not an image"),
                                    ("b.txt", b"bad image"), ("c.txt", b"no image"), ("d.jpg", image_bytes(2)),
                                    ("d.txt", b"   ")])
    ds = WebDatasetPairs([tmp_path / "s.tar"], _tiny_preprocess, _tiny_tokenizer)
    assert [k for _, _, k in ds] == ["a"]
    assert ds.skipped == 3
    ds = WebDatasetPairs([tmp_path / "s.tar"], _tiny_preprocess, _tiny_tokenizer, on_bad_sample="raise")
    with pytest.raises(ManifestError, match=r"s\.tar: sample 'b'"):
        list(ds)
