"""Every manifest in data_manifests/ parses, passes the schema, and reads its documented layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clip_refine_lab.data.check import check_manifest, validate_manifest_fields
from clip_refine_lab.data.manifest import load_manifest
from clip_refine_lab.data.readers import zero_shot_metadata
from clip_refine_lab.data.webdataset import manifest_shards
from conftest_data import make_image, write_tar, image_bytes

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "data_manifests"
MANIFESTS = sorted(MANIFEST_DIR.glob("*.yaml"))

ZERO_SHOT_12 = {"fgvc_aircraft", "cub200", "caltech101", "cars", "dtd", "eurosat", "flowers", "food101", "imagenet1k",
                "pets", "sun397", "ucf101"}
IMAGENET_VARIANTS = {"imagenetv2", "imagenet-a", "imagenet-r", "imagenet_sketch"}
CAPTION_SETS = {"mscoco_captions-train2017", "mscoco_captions-val2017", "flickr8k-test", "flickr30k-test", "cc3m", "cc12m"}
EXPECTED_CLASSES = {"fgvc_aircraft": 100, "cub200": 200, "caltech101": 102, "cars": 196, "dtd": 47, "eurosat": 10,
                    "flowers": 102, "food101": 101, "imagenet1k": 1000, "pets": 37, "sun397": 397, "ucf101": 101,
                    "imagenetv2": 1000, "imagenet-a": 200, "imagenet-r": 200, "imagenet_sketch": 1000}


@pytest.fixture(autouse=True)
def _no_env_data_root(monkeypatch):
    monkeypatch.delenv("CLIP_REFINE_LAB_DATA", raising=False)


def by_name() -> dict[str, Path]:
    return {load_manifest(p, data_root="/data").name: p for p in MANIFESTS}


def test_expected_manifests_exist():
    names = set(by_name())
    assert ZERO_SHOT_12 | IMAGENET_VARIANTS | CAPTION_SETS <= names
    assert (MANIFEST_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_parses_and_validates(path, tmp_path):
    m = load_manifest(path, data_root=tmp_path)
    assert validate_manifest_fields(m.fields) == []
    assert str(m.root).startswith(str(tmp_path)), "image roots live under ${CLIP_REFINE_LAB_DATA}"
    assert isinstance(m.fields.get("source"), str) and m.fields["source"].strip()
    assert isinstance(m.fields.get("layout"), str) and m.fields["layout"].strip()
    if m.kind == "classification":
        assert m.classnames and all(isinstance(c, str) and c.strip() for c in m.classnames)
        assert m.templates and all("{c}" in t for t in m.templates)
        assert len(m.classnames) == EXPECTED_CLASSES[m.name]
        folders = m.fields.get("class_folders")
        if isinstance(folders, list):
            assert len(folders) == len(m.classnames) and len(set(folders)) == len(folders)


def test_packaged_zero_shot_metadata_matches_manifests():
    for path in MANIFESTS:
        m = load_manifest(path, data_root="/data")
        if m.kind == "classification":
            assert zero_shot_metadata(m.name) == (m.classnames, m.templates), m.name
    with pytest.raises(KeyError, match="known: caltech101"):
        zero_shot_metadata("nope")


def test_webdataset_manifests_expand_shards(tmp_path):
    names = by_name()
    cc3m = manifest_shards(load_manifest(names["cc3m"], data_root=tmp_path))
    assert len(cc3m) == 332 and cc3m[0] == tmp_path / "cc3m" / "00000.tar" and cc3m[-1].name == "00331.tar"
    assert len(manifest_shards(load_manifest(names["cc12m"], data_root=tmp_path))) == 1243


# ------------------------------------------------------------------- documented layouts actually read
def _lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _coco(d: Path):
    make_image(d / "coco" / "val2017" / "000000000139.jpg")
    _lines(d / "coco" / "annotations" / "captions_val2017.json",
           [json.dumps({"images": [{"id": 139, "file_name": "000000000139.jpg"}],
                        "annotations": [{"image_id": 139, "id": 1, "caption": "a room"}]})])
    return "mscoco_captions-val2017", 1


def _flickr8k(d: Path):
    make_image(d / "flickr8k" / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg")
    _lines(d / "flickr8k" / "Flickr8k_text" / "Flickr8k.token.txt", ["1000268201_693b08cb0e.jpg#0\ta child"])
    _lines(d / "flickr8k" / "Flickr8k_text" / "Flickr_8k.testImages.txt", ["1000268201_693b08cb0e.jpg"])
    return "flickr8k-test", 1


def _flickr30k(d: Path):
    make_image(d / "flickr30k" / "flickr30k-images" / "1000092795.jpg")
    _lines(d / "flickr30k" / "dataset_flickr30k.json",
           [json.dumps({"images": [{"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "men"}]}]})])
    return "flickr30k-test", 1


def _aircraft(d: Path):
    base = d / "fgvc-aircraft-2013b" / "data"
    make_image(base / "images" / "1514522.jpg")
    _lines(base / "images_variant_test.txt", ["1514522 Cessna 172"])
    return "fgvc_aircraft", 1


def _cub(d: Path):
    cub = d / "CUB_200_2011"
    make_image(cub / "images" / "001.Black_footed_Albatross" / "x.jpg")
    _lines(cub / "images.txt", ["1 001.Black_footed_Albatross/x.jpg"])
    _lines(cub / "image_class_labels.txt", ["1 1"])
    _lines(cub / "train_test_split.txt", ["1 0"])
    return "cub200", 1


def _caltech(d: Path):
    for folder in ("BACKGROUND_Google", "Faces_easy", "yin_yang"):
        make_image(d / "caltech101" / "101_ObjectCategories" / folder / "image_0001.jpg")
    return "caltech101", 3


def _cars(d: Path):
    sio = pytest.importorskip("scipy.io")
    ann = np.zeros(1, dtype=[("fname", object), ("class", np.int32)])
    ann[0] = ("00001.jpg", 196)
    (d / "stanford_cars").mkdir(parents=True)
    sio.savemat(str(d / "stanford_cars" / "cars_test_annos_withlabels.mat"), {"annotations": ann})
    make_image(d / "stanford_cars" / "cars_test" / "00001.jpg")
    return "cars", 1


def _dtd(d: Path):
    make_image(d / "dtd" / "images" / "banded" / "banded_0004.jpg")
    make_image(d / "dtd" / "images" / "zigzagged" / "zigzagged_0001.jpg")
    _lines(d / "dtd" / "labels" / "test1.txt", ["banded/banded_0004.jpg", "zigzagged/zigzagged_0001.jpg"])
    return "dtd", 2


def _eurosat(d: Path):
    make_image(d / "eurosat" / "2750" / "SeaLake" / "SeaLake_1.jpg")
    make_image(d / "eurosat" / "2750" / "AnnualCrop" / "AnnualCrop_1.jpg")
    return "eurosat", 2


def _flowers(d: Path):
    sio = pytest.importorskip("scipy.io")
    fl = d / "flowers-102"
    fl.mkdir(parents=True)
    sio.savemat(str(fl / "imagelabels.mat"), {"labels": np.array([[77, 102]])})
    sio.savemat(str(fl / "setid.mat"), {"trnid": np.array([[1]]), "valid": np.array([[1]]), "tstid": np.array([[2]])})
    make_image(fl / "jpg" / "image_00002.jpg")
    return "flowers", 1


def _food(d: Path):
    make_image(d / "food-101" / "images" / "apple_pie" / "1011328.jpg")
    make_image(d / "food-101" / "images" / "cheese_plate" / "12.jpg")
    _lines(d / "food-101" / "meta" / "test.txt", ["apple_pie/1011328", "cheese_plate/12"])
    return "food101", 2


def _imagenet(d: Path):
    make_image(d / "imagenet" / "val" / "n01440764" / "ILSVRC2012_val_00000293.JPEG")
    make_image(d / "imagenet" / "val" / "n15075141" / "ILSVRC2012_val_00000001.JPEG")
    return "imagenet1k", 2


def _pets(d: Path):
    make_image(d / "oxford-iiit-pet" / "images" / "Abyssinian_100.jpg")
    _lines(d / "oxford-iiit-pet" / "annotations" / "test.txt", ["Abyssinian_100 1 1 1"])
    return "pets", 1


def _sun(d: Path):
    make_image(d / "SUN397" / "a" / "apartment_building" / "outdoor" / "sun_x.jpg")
    make_image(d / "SUN397" / "y" / "youth_hostel" / "sun_y.jpg")
    _lines(d / "SUN397" / "Partitions" / "Testing_01.txt",
           ["/a/apartment_building/outdoor/sun_x.jpg", "/y/youth_hostel/sun_y.jpg"])
    return "sun397", 2


def _ucf(d: Path):
    make_image(d / "ucf101" / "UCF-101-midframes" / "Apply_Eye_Makeup" / "v_ApplyEyeMakeup_g01_c01.jpg")
    make_image(d / "ucf101" / "UCF-101-midframes" / "Handstand_Pushups" / "v_HandStandPushups_g01_c01.jpg")
    _lines(d / "ucf101" / "ucfTrainTestlist" / "testlist01.txt",
           ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "HandstandPushups/v_HandStandPushups_g01_c01.avi"])
    return "ucf101", 2


def _imagenet_v2(d: Path):
    make_image(d / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "999" / "a.jpeg")
    return "imagenetv2", 1


def _imagenet_a(d: Path):
    make_image(d / "imagenet-a" / "n01498041" / "0.000116_digital clock _ digital clock_0.865662.jpg")
    (d / "imagenet-a" / "README.txt").write_text("not an image")
    return "imagenet-a", 1


def _imagenet_r(d: Path):
    make_image(d / "imagenet-r" / "n01443537" / "art_0.jpg")
    return "imagenet-r", 1


def _sketch(d: Path):
    make_image(d / "imagenet-sketch" / "sketch" / "n01440764" / "n01440764_10007.JPEG")
    return "imagenet_sketch", 1


def _cc3m_two_shards(d: Path):
    for s in range(2):
        write_tar(d / "cc3m" / f"{s:05d}.tar", [(f"{s:05d}0000.jpg", image_bytes(s)), (f"{s:05d}0000.txt", b"cap")])
    return "cc3m", 2


LAYOUTS = [_coco, _flickr8k, _flickr30k, _aircraft, _cub, _caltech, _cars, _dtd, _eurosat, _flowers, _food, _imagenet,
           _pets, _sun, _ucf, _imagenet_v2, _imagenet_a, _imagenet_r, _sketch, _cc3m_two_shards]


@pytest.mark.parametrize("build", LAYOUTS, ids=lambda f: f.__name__.strip("_"))
def test_manifest_reads_documented_layout(build, tmp_path):
    name, n = build(tmp_path / "data")
    m = load_manifest(by_name()[name], data_root=tmp_path / "data")
    if m.format == "webdataset":
        m.fields["shards"] = "{00000..00001}.tar"
    records = m.records()
    assert len(records) == n
    assert all(Path(r.image.split("::")[0]).is_file() for r in records)
    if m.kind == "classification":
        assert all(0 <= r.label < m.num_classes for r in records)


def test_layout_labels_are_the_documented_classes(tmp_path):
    d = tmp_path / "data"
    names = by_name()
    checks = [(_ucf, {"Apply Eye Makeup", "Hand Stand Pushups"}), (_sun, {"apartment building outdoor", "youth hostel"}),
              (_food, {"apple pie", "cheese plate"}), (_imagenet, {"tench", "toilet paper"}),
              (_caltech, {"background", "centered face", "yin and yang symbol"}),
              (_eurosat, {"lake or sea", "annual crop land"}), (_aircraft, {"Cessna 172"}),
              (_pets, {"Abyssinian"}), (_cub, {"Black footed Albatross"}), (_imagenet_a, {"stingray"}),
              (_imagenet_v2, {"toilet paper"}), (_dtd, {"banded", "zigzagged"})]
    for build, expected in checks:
        name, _ = build(d)
        m = load_manifest(names[name], data_root=d)
        got = {m.classnames[r.label] for r in m.records()}
        assert got == expected, name
    # a full data check of one documented layout passes (classes without images are only warnings)
    report = check_manifest(names["dtd"], data_root=d, progress=False)
    assert report.ok, report.format()
    assert report.problems["class_without_images"].count == 45
