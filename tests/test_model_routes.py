"""Every way of naming a starting model, refined for one step and reloaded through every route.

The starting model is one random-init micro-vit-32, saved in each form a user may have: a pretrained
tag (registered with open_clip, its weights in an offline Hugging Face cache), ``.pt`` files (bare,
under "state_dict", "module."-prefixed), a ``.bin``, a foreign and one of our ``.safetensors``, an
``hf-hub:`` repository in the hub cache and a ``local-dir:`` folder. Each is refined at a visible
learning rate; then load_model, reload_spec, load_run_models, evaluate_run + compare, the notebooks'
run helpers and plain open_clip (through an exported folder) must all give the refined weights, and
the starting-model routes the original ones. Also: strict loading, damaged files, folders without the
expected files, byte-identical saves.
"""

import hashlib
import json
import struct

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clip_refine_lab.cli import main
from clip_refine_lab.config import RunConfig
from clip_refine_lab.evaluation.compare import compare
from clip_refine_lab.evaluation.evaluate import PRETRAINED_LABEL, evaluate_run, load_run_models
from clip_refine_lab.models.checkpoints import ModelSpec, read_checkpoint_meta, read_state_dict, save_checkpoint
from clip_refine_lab.models.loading import ModelLoadError, export_open_clip_dir, load_model, reload_spec
from clip_refine_lab.rundir import load_run_spec
from clip_refine_lab.training.loop import refine
from clip_refine_lab.ui.runs import ensure_evaluated, select_runs
from conftest_data import make_coco, make_imagefolder, make_karpathy, write_manifest_yaml

ARCH = "micro-vit-32"
TAG = "crltest"  # open_clip cleans tags (lower case, "-" to "_"): keep it plain
HUB_REPO, TAG_REPO = "crl-test/micro-clip", "crl-test/micro-tag"
FORMS = ["tag", "pt-bare", "pt-wrapped", "pt-module", "bin", "safetensors-foreign", "safetensors-ours", "hf-hub",
         "local-dir"]


# ------------------------------------------------------------------------------------- fixtures
def write_hub_repo(cache, repo: str, files: dict) -> None:
    """A repository in the Hugging Face cache layout (refs/main -> snapshots/<commit>/<files>), as a
    download leaves it; HF_HUB_OFFLINE makes huggingface_hub read it without the network."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, write in files.items():
        write(snapshot / name)


def folder_config(path) -> None:
    config = {"model_cfg": open_clip.get_model_config(ARCH),
              "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def original():
    """The starting weights of every form: one seeded random-init micro-vit-32."""
    torch.manual_seed(0)
    loaded = load_model(ARCH)
    return loaded, {k: v.clone() for k, v in loaded.model.state_dict().items()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, original):
    """An offline hub cache with an hf-hub: repository and the weights of a pretrained tag registered
    with open_clip (a stand-in for 'openai' and the like, which cannot be downloaded here)."""
    import huggingface_hub.constants as hc
    from open_clip import pretrained

    _, state = original
    cache = tmp_path_factory.mktemp("hf-cache")
    weights = lambda p: save_file(state, str(p))  # noqa: E731
    write_hub_repo(cache, HUB_REPO, {"open_clip_config.json": folder_config, "open_clip_model.safetensors": weights})
    write_hub_repo(cache, TAG_REPO, {"open_clip_model.safetensors": weights})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hc, "HF_HUB_CACHE", str(cache))
        mp.setitem(pretrained._PRETRAINED, ARCH, {TAG: pretrained._pcfg(hf_hub=f"{TAG_REPO}/")})
        yield cache


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    coco = make_coco(root / "coco", image_ids=range(1, 17), captions_per_image=2, name="coco-train")
    karpathy = make_karpathy(root / "karpathy", [(f"{i}.jpg", "test", [f"caption {i} a", f"caption {i} b"])
                                                 for i in range(6)], name="karpathy-test")
    make_imagefolder(root / "cls", {"cat": 3, "dog": 3, "fox": 3})
    cls = write_manifest_yaml(root / "cls" / "animals.yaml", name="animals", kind="classification",
                              format="imagefolder", root="images", classnames=["cat", "dog", "fox"],
                              templates=["a photo of a {c}."])
    suite = root / "suite.yaml"
    suite.write_text(f"zero_shot: [{cls}]\nretrieval: [{karpathy}]\ngeometry: [{karpathy}]\n")
    return {"coco": coco, "suite": suite}


def starting_model(form: str, folder, loaded, state) -> tuple[str, str | None]:
    """(model, pretrained) of a RunConfig for the original weights saved as ``form`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if form == "tag":
        return ARCH, TAG
    if form in ("hf-hub", "local-dir"):
        if form == "hf-hub":
            return f"hf-hub:{HUB_REPO}", None
        folder_config(folder / "open_clip_config.json")
        save_file(state, str(folder / "open_clip_model.safetensors"))
        return f"local-dir:{folder}", None
    path = folder / {"bin": "open_clip_pytorch_model.bin", "safetensors-foreign": "w.safetensors",
                     "safetensors-ours": "ours.safetensors"}.get(form, "w.pt")
    if form == "safetensors-foreign":
        save_file(state, str(path))
    elif form == "safetensors-ours":
        save_checkpoint(loaded.model, path, loaded.spec)
    else:
        saved = {"pt-wrapped": {"state_dict": state, "epoch": 3},
                 "pt-module": {f"module.{k}": v for k, v in state.items()}}.get(form, state)
        torch.save(saved, path)
    return ARCH, str(path)


@pytest.fixture(scope="module")
def run_of(tmp_path_factory, hub, data, original):
    """form -> its run directory, refined once per module: 1 contrastive step at lr 1e-2, no validation."""
    loaded, state = original
    out = tmp_path_factory.mktemp("runs")
    runs = {}

    def get(form: str):
        if form not in runs:
            model, pretrained = starting_model(form, out / "start" / form, loaded, state)
            cfg = RunConfig(preset="micro", model=model, pretrained=pretrained, data=str(data["coco"]),
                            method="contrastive", max_steps=1, lr=1e-2, batch_size=8, epochs=1, val_fraction=0.0,
                            output_dir=str(out), run_name=form)
            runs[form] = refine(cfg, progress=False)
        return runs[form]

    return get


def assert_weights(model: torch.nn.Module, expected: dict, what: str) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys(), what
    different = [k for k in expected if not torch.equal(got[k].cpu(), expected[k])]
    assert not different, f"{what}: {different[:3]} differ"


# ---------------------------------------------------------------------------------------- routes
@pytest.mark.parametrize("form", FORMS)
def test_a_refined_model_reloads_as_itself_through_every_route(form, run_of, original, data, tmp_path):
    _, start = original
    run = run_of(form)
    best = run / "model_best.safetensors"
    refined = load_file(str(best))
    assert any(not torch.equal(refined[k], start[k]) for k in start), "one step at lr 1e-2 must change the model"

    # the starting model: recorded in base.json, it reloads as the original weights
    spec = load_run_spec(run)
    assert spec.model_cfg["vision_cfg"] == open_clip.get_model_config(ARCH)["vision_cfg"]
    assert_weights(load_model(spec.arch, spec.pretrained).model, start, "load_model(base spec)")

    # the refined checkpoint: by its path alone, through the base spec, and as a run
    assert_weights(load_model(str(best)).model, refined, "load_model(path)")
    assert_weights(reload_spec(spec, best).model, refined, "reload_spec")
    base, again = load_run_models(run)
    assert_weights(base.model, start, "load_run_models base")
    assert_weights(again.model, refined, "load_run_models refined")
    assert again.spec.arch == spec.arch and again.spec.preprocess["size"] == [32, 32]

    # evaluation and comparison: the refined model's numbers are not the starting model's
    result = evaluate_run(run, suite=data["suite"], device="cpu", progress=False)
    geometry = {m: result["models"][m]["geometry"]["karpathy-test"]["gap_l2"] for m in (PRETRAINED_LABEL, form)}
    assert geometry[PRETRAINED_LABEL] != geometry[form]

    # what the notebooks do: select the run, make sure it is evaluated, compare, load its models
    selected = ensure_evaluated(select_runs(str(run)), progress=False)
    assert selected == [run]
    tables = compare(selected)
    assert (tables["geometry"].loc[form] != tables["geometry"].loc[PRETRAINED_LABEL]).any()
    assert_weights(load_run_models(selected[0])[1].model, refined, "notebook route")

    # plain open_clip: through an exported local-dir: folder for every form, and by name + file when open_clip
    # knows the architecture's name (ours after add_model_config, done by load_model)
    folder = export_open_clip_dir(best, tmp_path / "exported")
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert_weights(plain, refined, "plain open_clip local-dir:")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a red circle"])
    assert torch.equal(tokens, again.tokenizer(["a red circle"]))
    name = read_checkpoint_meta(best)["open_clip_name"]
    assert name == ("" if form in ("hf-hub", "local-dir") else ARCH)
    if name:
        plain, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(best))
        assert_weights(plain, refined, "plain open_clip name + file")


def test_every_form_of_the_same_weights_refines_to_the_same_weights(run_of):
    """The same starting weights in any form give the same run: no form loads differently."""
    reference = load_file(str(run_of("pt-bare") / "model_final.safetensors"))
    for form in FORMS:
        weights = load_file(str(run_of(form) / "model_final.safetensors"))
        assert all(torch.equal(weights[k], reference[k]) for k in reference), form


def test_compiled_and_openai_style_state_dicts_load_with_open_clips_lossless_conversions(tmp_path, original):
    _, state = original
    odd = {k.replace("visual.", "visual._orig_mod.", 1): v for k, v in state.items()}  # torch.compile'd tower
    odd["logit_scale"] = state["logit_scale"].reshape(1)  # a 1-element parameter where the model has a scalar
    odd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(32), vocab_size=torch.tensor(49408))
    torch.save(odd, tmp_path / "odd.pt")
    assert_weights(load_model(ARCH, str(tmp_path / "odd.pt")).model, state, "converted")


# ----------------------------------------------------------------------------------- strict loading
@pytest.fixture(scope="module")
def other_arch_file(tmp_path_factory, original):
    """A header-less state dict of micro-vit-32 (its position embeddings are 17 x 32; micro-vit-24's 10 x 32)."""
    path = tmp_path_factory.mktemp("other") / "micro32.pt"
    torch.save(original[1], path)
    return path


def test_a_state_dict_of_another_architecture_is_refused_naming_the_tensor(other_arch_file):
    with pytest.raises(ModelLoadError) as err:
        load_model("micro-vit-24", str(other_arch_file))
    text = str(err.value)
    assert str(other_arch_file) in text and "'visual.positional_embedding'" in text
    assert "(17, 32) in the file but (10, 32) in the model" in text and "--model" in text


def test_the_cli_refuses_another_architecture_in_one_line(other_arch_file, data, tmp_path, capsys):
    code = main(["refine", "--model", "micro-vit-24", "--pretrained", str(other_arch_file), "--data",
                 str(data["coco"]), "--output-dir", str(tmp_path), "--run-name", "wrong", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("clip-refine-lab: error:") and "\n" not in err and "visual.positional_embedding" in err


def test_our_header_names_the_architecture_to_use(tmp_path, original):
    loaded, _ = original
    path = save_checkpoint(loaded.model, tmp_path / "m.safetensors", loaded.spec)
    with pytest.raises(ModelLoadError, match=f"holds a '{ARCH}' model.*pass '{ARCH}'"):
        load_model("micro-vit-24", str(path))


def test_missing_and_unexpected_tensors_are_refused(tmp_path, original):
    _, state = original
    missing = {k: v for k, v in state.items() if k != "text_projection"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="lacks tensor 'text_projection'"):
        load_model(ARCH, str(tmp_path / "missing.pt"))
    torch.save({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match="has tensor 'extra.weight', which the model lacks"):
        load_model(ARCH, str(tmp_path / "extra.pt"))


# ---------------------------------------------------------------------------------- damaged files
def _damaged(kind: str, path, state) -> None:
    if kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
                         .numpy().tobytes())
    elif kind == "truncated":
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled-module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "not-a-state-dict":
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize("name,kind", [("w.safetensors", "random"), ("w.safetensors", "truncated"),
                                       ("w.safetensors", "empty"), ("w.pt", "random"), ("w.pt", "truncated"),
                                       ("w.pt", "empty"), ("w.bin", "pickled-module"), ("w.pt", "not-a-state-dict")])
def test_a_damaged_or_foreign_file_is_one_clear_line(name, kind, tmp_path, original):
    path = tmp_path / name
    _damaged(kind, path, original[1])
    with pytest.raises(ModelLoadError) as err:
        load_model(ARCH, str(path))
    text = str(err.value)
    assert str(path) in text and "\n" not in text and "weights_only" not in text
    assert ("damaged" in text or "not a " in text), text
    # no torch traceback (with its weights_only=False advice) chained to it
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def test_the_cli_reports_a_damaged_file_in_one_line(tmp_path, data, capsys):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    code = main(["refine", "--model", ARCH, "--pretrained", str(path), "--data", str(data["coco"]),
                 "--output-dir", str(tmp_path / "runs"), "--run-name", "broken", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(path) in err and "weights_only" not in err


def test_folders_without_the_expected_files_are_refused(tmp_path, original):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="not an open_clip model folder.*open_clip_config.json"):
        load_model(str(empty))
    with pytest.raises(ModelLoadError, match="not an open_clip model folder"):
        load_model(f"local-dir:{empty}")
    folder_config(empty / "open_clip_config.json")
    with pytest.raises(ModelLoadError, match="no weights file"):
        load_model(f"local-dir:{empty}")
    with pytest.raises(ModelLoadError, match="is a folder, not a checkpoint file"):
        load_model(ARCH, str(empty))
    (empty / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(f"local-dir:{empty}")


def test_a_run_directory_passed_as_a_model_points_at_its_weights(run_of):
    run = run_of("pt-bare")
    with pytest.raises(ModelLoadError, match="model_best.safetensors"):
        load_model(str(run))


# ------------------------------------------------------------------------------- byte-identical files
def test_two_saves_of_equal_tensors_are_byte_identical_and_still_safetensors(tmp_path, original):
    loaded, state = original
    spec = ModelSpec(ARCH, "/some/start.pt", False, loaded.spec.preprocess)
    digests = set()
    for i in range(4):  # safetensors' own writer orders the metadata differently from one save to the next
        path = save_checkpoint(loaded.model, tmp_path / f"m{i}.safetensors", spec, method="contrastive", note=str(i % 1))
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    again = load_file(str(path))
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == ARCH and meta["method"] == "contrastive" and json.loads(meta["model_cfg"])["embed_dim"] == 32
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = path.read_bytes()[8:8 + length]
    assert length % 8 == 0 and list(json.loads(header)) == sorted(json.loads(header))


def test_read_state_dict_unwraps_training_checkpoints(tmp_path, original):
    _, state = original
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "step": 5}, tmp_path / "last.pt")
    got = read_state_dict(tmp_path / "last.pt")
    assert got.keys() == state.keys()
