"""The real path end to end on small real-format files: a user's checkpoint, COCO-format training
pairs, a Karpathy-format retrieval set, an image-folder classification set and a suite file, through
exactly the code the embedded default uses (refine, evaluate_run, the leakage check)."""

import json

import torch

from clip_refine_lab.config import RunConfig
from clip_refine_lab.evaluation.compare import format_tables
from clip_refine_lab.evaluation.evaluate import evaluate_run
from clip_refine_lab.models.loading import load_model
from clip_refine_lab.training.loop import refine
from clip_refine_lab.rundir import read_log
from conftest_data import coco_name, make_coco, make_imagefolder, make_karpathy, write_manifest_yaml


def test_user_checkpoint_coco_training_and_real_format_evaluation(tmp_path):
    data = tmp_path / "data"
    coco = make_coco(data / "coco", image_ids=range(1, 41), captions_per_image=3, name="coco-train")
    # a "Karpathy test" whose images carry 2014-style names of COCO ids 5..9: inside the training set
    karpathy = make_karpathy(data / "karpathy", [(coco_name(i, "val2014"), "test", [f"caption {i} a", f"caption {i} b"])
                                                  for i in range(5, 10)] + [("extra.jpg", "test", ["x", "y"])],
                             name="karpathy-test", images_dir="images", json_name="dataset_coco.json")
    make_imagefolder(data / "cls", {"cat": 3, "dog": 3, "fox": 2})
    cls = write_manifest_yaml(data / "cls" / "animals.yaml", name="animals", kind="classification",
                              format="imagefolder", root="images", classnames=["cat", "dog", "fox"],
                              templates=["a photo of a {c}.", "a {c}."])
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"zero_shot: [{cls}]\nretrieval: [{karpathy}]\ngeometry: [{karpathy}]\n")

    # the user's own starting weights: an open_clip state dict saved as a plain .pt file
    torch.manual_seed(0)
    start = load_model("micro-vit-32")
    torch.save(start.model.state_dict(), tmp_path / "start.pt")
    cfg = RunConfig(model="micro-vit-32", pretrained=str(tmp_path / "start.pt"), data=str(coco), batch_size=8,
                    epochs=2, val_fraction=0.05, lr=1e-4, output_dir=str(tmp_path / "runs"), run_name="coco")
    run_dir = refine(cfg, progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_pairs"] == 38 and summary["val_pairs"] == 2
    assert len(read_log(run_dir)) == 2 * (38 // 8)

    result = evaluate_run(run_dir, suite=suite, progress=False, device="cpu")
    refined = result["models"]["coco"]
    assert set(refined["zero_shot"]) == {"animals"}
    assert set(refined["retrieval"]) == {"karpathy-test"}
    leaks = {e["name"]: e for e in result["leakage"]["overlap"]["evals"]}
    assert (leaks["karpathy-test"]["overlap"], leaks["karpathy-test"]["num_images"]) == (5, 6)  # 2014 names, same ids
    assert leaks["animals"]["overlap"] == 0
    assert "LEAKAGE: karpathy-test overlaps coco-train" in result["leakage"]["text"]
    assert "Table 2" in format_tables(result)

    # the refined weights load in plain open_clip and through our loader with the same features
    import open_clip

    plain, _, _ = open_clip.create_model_and_transforms("micro-vit-32", pretrained=str(run_dir / "model_best.safetensors"))
    ours = load_model(str(run_dir / "model_best.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval().encode_image(x), ours.model.encode_image(x))
