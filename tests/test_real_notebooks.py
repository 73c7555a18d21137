"""Notebooks 03-07 on a run trained and evaluated on real-format data, given only the run's name.

The data is laid out as the official archives unpack (COCO 2017 train/val with their caption JSONs,
Flickr30K with the Karpathy split file, DTD and EuroSAT image folders) under a data root, and read
through the shipped manifests of data_manifests/. A random-init micro model is refined for 2 steps
and evaluated on a suite of those manifests; then each notebook runs under papermill, as a user
would run it, with ``run``/``runs`` and ``output_dir`` as its only parameters: everything else
(which data sets, their manifests, the data root) comes from the run's metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clip_refine_lab.config import RunConfig
from clip_refine_lab.evaluation.evaluate import evaluate_run
from clip_refine_lab.models.loading import load_model
from clip_refine_lab.training.loop import refine
from conftest_data import make_coco, make_image, make_karpathy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "data_manifests"
NOTEBOOKS = ROOT / "notebooks"
RUN_NAME = "coco-real"
DTD_CLASSES = ("banded", "blotchy", "braided", "bubbly")
EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "Highway", "SeaLake")


def lay_out_archives(d: Path) -> None:
    """COCO 2017, Flickr30K, DTD and EuroSAT as their archives unpack under a data root (small)."""
    make_coco(d / "coco", image_ids=range(1, 41), captions_per_image=2, images_dir="train2017",
              annotation="annotations/captions_train2017.json", name="layout-train")
    make_coco(d / "coco", image_ids=range(1001, 1009), captions_per_image=2, images_dir="val2017",
              annotation="annotations/captions_val2017.json", name="layout-val")
    make_karpathy(d / "flickr30k", [(f"{1000092795 + i}.jpg", "test" if i < 8 else "train",
                                     [f"flickr photo {i}", f"another view {i}"]) for i in range(10)],
                  images_dir="flickr30k-images", json_name="dataset_flickr30k.json", seed=500)
    lines = []
    for c, name in enumerate(DTD_CLASSES):
        for i in range(3):
            make_image(d / "dtd" / "images" / name / f"{name}_{i:04d}.jpg", seed=700 + 10 * c + i)
            lines.append(f"{name}/{name}_{i:04d}.jpg")
    (d / "dtd" / "labels").mkdir(parents=True)
    (d / "dtd" / "labels" / "test1.txt").write_text("\n".join(lines) + "\n")
    for c, folder in enumerate(EUROSAT_FOLDERS):
        for i in range(3):
            make_image(d / "eurosat" / "2750" / folder / f"{folder}_{i + 1}.jpg", seed=800 + 10 * c + i)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real-notebooks")
    data_root = tmp / "data"
    lay_out_archives(data_root)
    suite = tmp / "suite.yaml"
    suite.write_text(f"zero_shot: [{MANIFESTS / 'dtd.yaml'}, {MANIFESTS / 'eurosat.yaml'}]\n"
                     f"retrieval: [{MANIFESTS / 'coco2017_val.yaml'}, {MANIFESTS / 'flickr30k_test.yaml'}]\n"
                     f"geometry: [{MANIFESTS / 'coco2017_val.yaml'}]\n")
    torch.manual_seed(0)
    torch.save(load_model("micro-vit-32").model.state_dict(), tmp / "start.pt")
    out = tmp / "runs"
    cfg = RunConfig(model="micro-vit-32", pretrained=str(tmp / "start.pt"), data=str(MANIFESTS / "coco2017_train.yaml"),
                    data_root=str(data_root), batch_size=8, max_steps=2, lr=1e-4, output_dir=str(out), run_name=RUN_NAME)
    run_dir = refine(cfg, progress=False)
    evaluate_run(run_dir, suite=suite, device="cpu", progress=False)
    return run_dir


def test_metrics_record_each_sets_manifest_suite_and_data_root(real_run):
    metrics = json.loads((real_run / "metrics.json").read_text())
    assert metrics["suite"].endswith("suite.yaml") and metrics["data_root"].endswith("data")
    assert [d["name"] for d in metrics["datasets"]["zero_shot"]] == ["dtd", "eurosat"]
    assert metrics["datasets"]["retrieval"] == [
        {"name": "mscoco_captions-val2017", "manifest": str(MANIFESTS / "coco2017_val.yaml")},
        {"name": "flickr30k-test", "manifest": str(MANIFESTS / "flickr30k_test.yaml")}]
    assert set(metrics["models"][RUN_NAME]["retrieval"]) == {"mscoco_captions-val2017", "flickr30k-test"}
    assert metrics["incomplete"] is False


def run_notebook(stem: str, parameters: dict, tmp_path: Path) -> dict:
    import papermill

    out = tmp_path / f"{stem}.out.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(out), parameters=parameters,
                               cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
    return json.loads(out.read_text())


def printed(nb: dict) -> str:
    return "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def shown(nb: dict) -> str:
    """Everything the notebook displayed (figures' JSON included), as one string."""
    return json.dumps([c.get("outputs", []) for c in nb["cells"] if c["cell_type"] == "code"], ensure_ascii=False)


@pytest.mark.parametrize("stem", ["03_zero_shot", "04_retrieval", "05_geometry", "06_projections",
                                  "07_failure_gallery"])
def test_notebook_runs_on_the_real_run_given_only_its_name(stem, real_run, tmp_path):
    key = "runs" if stem < "06" else "run"
    nb = run_notebook(stem, {key: RUN_NAME, "output_dir": str(real_run.parent)}, tmp_path)
    text = printed(nb)
    assert "making a short one" not in text and "skipping" not in text
    if stem == "04_retrieval":
        assert "LEAKAGE" not in text  # val2017 and the Flickr test split are disjoint from train2017
        assert "text → image on mscoco_captions-val2017" in shown(nb)
    if stem == "05_geometry":
        assert "Shifting along the gap (mscoco_captions-val2017; zero-shot on dtd)" in shown(nb)
    if stem == "06_projections":
        assert f"run {RUN_NAME}; data set dtd" in text
    if stem == "07_failure_gallery":
        assert "Zero-shot sets of the run's evaluation: dtd, eurosat" in text
