"""Bad inputs through the command line: each is refused with exit code 2 and one line that names the thing
and the remedy, before any work, leaving earlier runs and the caches as they were.

:data:`CASES` is the matrix: one row per kind of bad input. A row is the command line (``{...}`` fields are
filled from the values its ``setup`` returns, and from ``out``: the output folder holding an earlier,
finished run, ``earlier``: that run's directory, ``tmp``: the test's own folder, ``name``: a run name of
its own), the substrings the error line must contain, and optionally ones it must not. Add a kind by
adding a row. The behaviours around the matrix (a record skipped and listed, a run stopped by a bad image
continued with ``--on-bad-sample skip``, the cached image scan) have tests of their own below.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from clip_refine_lab.cli import main
from clip_refine_lab.utils import cache_dir
from conftest_data import image_bytes, make_corrupt_image, make_image, make_jsonl, make_webdataset, write_manifest_yaml

REFINE = ("--quiet", "refine", "--output-dir", "{out}", "--run-name", "{name}", "--max-steps", "1",
          "--batch-size", "4")


# ----------------------------------------------------------------------------------- bad inputs
def pairs(tmp: Path, n: int = 10, edit: Callable[[list], None] | None = None, **fields) -> Path:
    """A caption manifest of ``n`` records with real images; ``edit(rows)`` spoils it first."""
    rows = [{"id": f"{i:03d}", "image": f"{i:03d}.png", "captions": [f"a photo number {i}"]} for i in range(n)]
    for i, r in enumerate(rows):
        make_image(tmp / "data" / "images" / r["image"], seed=i)
    if edit is not None:
        edit(rows)
    return make_jsonl(tmp / "data", rows, **fields)


def edited_yaml(path: Path, edit: Callable[[dict], None]) -> Path:
    fields = yaml.safe_load(path.read_text())
    edit(fields)
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def caption(i: int, text) -> Callable[[list], None]:
    def edit(rows):
        rows[i]["captions"] = text
    return edit


def bad_json_line(tmp: Path) -> dict:
    man = pairs(tmp)
    records = tmp / "data" / "pairs.jsonl"
    lines = records.read_text().splitlines()
    lines[1] = '{"id": "001", "image": '
    records.write_text("\n".join(lines) + "\n")
    return {"manifest": man}


def missing_image(tmp: Path) -> dict:
    man = pairs(tmp)
    (tmp / "data" / "images" / "004.png").unlink()
    return {"manifest": man}


def truncated_image(tmp: Path) -> dict:
    man = pairs(tmp)
    make_corrupt_image(tmp / "data" / "images" / "005.png")
    return {"manifest": man}


def shards(tmp: Path, **fields) -> dict:
    man, _ = make_webdataset(tmp / "wds", num_shards=2, per_shard=4)
    return {"manifest": edited_yaml(man, lambda f: f.update(fields))}


def classification_set(tmp: Path, labels=(0, 1, 2), **fields) -> Path:
    rows = [{"id": str(i), "image": f"c{i}.png", "label": lab} for i, lab in enumerate(labels)]
    for i in range(len(rows)):
        make_image(tmp / "cls" / "images" / f"c{i}.png", seed=100 + i)
    return make_jsonl(tmp / "cls", rows, kind="classification", classnames=["circle", "square", "star"],
                      templates=["a {c}."], **fields)


def suite(tmp: Path, **sections) -> dict:
    return {"suite": write_manifest_yaml(tmp / "suite.yaml", **{k: [str(p) for p in v] for k, v in sections.items()})}


def sweep_spec(tmp: Path) -> dict:
    spec = {"name": "bad", "preset": "micro", "seeds": [0], "base": {"max_steps": 1, "batch_size": 4},
            "blocks": {"ok": {"table": "main", "runs": [{"method": "contrastive"}]},
                       "bad": {"table": "prior", "runs": [{"prior": "fixed", "prior_vector": [1.0, 2.0]}]}}}
    return {"spec": write_manifest_yaml(tmp / "spec.yaml", **spec), "sweep": tmp / "sweep"}


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    setup: Callable[[Path], dict] = lambda tmp: {}
    expect: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


DATA = ("--data", "{manifest}")
CHECK = "clip-refine-lab data check"
SKIP = "--on-bad-sample skip"

CASES: dict[str, Case] = {
    # ---- training data: the data check's findings stop refine before any work
    "empty caption": Case(REFINE + DATA, lambda t: {"manifest": pairs(t, edit=caption(1, [""]))},
                          ("pairs.jsonl:2", "[id 001]", "caption 0 is empty", "empty_caption 1", CHECK, SKIP)),
    "whitespace-only caption": Case(REFINE + DATA, lambda t: {"manifest": pairs(t, edit=caption(2, ["  \t "]))},
                                    ("pairs.jsonl:3", "caption 0 is blank", CHECK, SKIP)),
    "captions: []": Case(REFINE + DATA, lambda t: {"manifest": pairs(t, edit=caption(3, []))},
                         ("pairs.jsonl:4", "no_captions", "has no caption", SKIP)),
    "misspelt recods:": Case(REFINE + DATA, lambda t: {"manifest": edited_yaml(
        pairs(t), lambda f: f.update(recods=f.pop("records")))}, ("unknown field 'recods'", "did you mean 'records'?", CHECK),
        absent=(SKIP,)),
    "root: 5": Case(REFINE + DATA, lambda t: {"manifest": edited_yaml(pairs(t), lambda f: f.update(root=5))},
                    ("field 'root' must be a string, got int", CHECK), absent=(SKIP,)),
    "unknown field": Case(REFINE + DATA, lambda t: {"manifest": pairs(t, colour="red")},
                          ("unknown field 'colour' for format 'jsonl'", "'description' or 'notes'"), absent=(SKIP,)),
    "duplicate ids": Case(REFINE + DATA, lambda t: {"manifest": pairs(t, edit=lambda rows: rows[2].update(id="000"))},
                          ("duplicate_id", "pairs.jsonl:3", "already used at", CHECK), absent=(SKIP,)),
    "records file missing": Case(REFINE + DATA, lambda t: {"manifest": edited_yaml(
        pairs(t), lambda f: f.update(records="nope.jsonl"))}, ("field 'records': file not found", "nope.jsonl")),
    "misspelt field of a streamed manifest": Case(REFINE + DATA, lambda t: shards(t, num_sample=8),
                                                  ("unknown field 'num_sample'", "did you mean 'num_samples'?")),
    "bad JSON line": Case(REFINE + DATA, bad_json_line, ("pairs.jsonl:2: not valid JSON", "bad_record", CHECK),
                          absent=(SKIP,)),
    "bad JSON line under skip": Case(REFINE + DATA + ("--on-bad-sample", "skip"), bad_json_line,
                                     ("pairs.jsonl:2: not valid JSON",), absent=(SKIP,)),
    "missing image": Case(REFINE + DATA, missing_image, ("pairs.jsonl:5", "004.png", "missing_file", CHECK, SKIP)),
    "truncated image (found by the header scan)": Case(REFINE + DATA, truncated_image,
                                                       ("pairs.jsonl:6", "005.png", "unreadable_image", CHECK, SKIP)),
    "classification manifest for training": Case(REFINE + DATA, lambda t: {"manifest": classification_set(t)},
                                                 ("training needs a captions manifest", "kind 'classification'")),
    "manifest not found": Case(REFINE + ("--data", "{tmp}/nope.yaml"), expect=("manifest file not found", "nope.yaml")),
    "unknown world split": Case(REFINE + ("--data", "coco-train"), expect=("neither a manifest file nor a split",)),
    # ---- options checked against the model and the world before config.yaml
    "--prior-vector of the wrong length": Case(REFINE + ("--prior", "fixed", "--prior-vector", "1", "2", "3"),
                                               expect=("prior_vector has 3 numbers", "micro-vit-32", "give 32 numbers")),
    "image size vs architecture": Case(REFINE + ("--model", "tiny-vit-48"),
                                       expect=("tiny-vit-48 takes 48x48 images", "32x32", "--model micro-vit-32")),
    "embedded base of a sigmoid-loss architecture": Case(REFINE + ("--model", "micro-sigmoid-32"),
                                                         expect=("sigmoid-loss", "--pretrained FILE")),
    "unknown architecture": Case(REFINE + ("--model", "ViT-B-23"),
                                 expect=("unknown architecture 'ViT-B-23'", "did you mean 'ViT-B-32'?")),
    "leakage suite not found": Case(REFINE + ("--leakage-suite", "{tmp}/no-suite.yaml"),
                                    expect=("leakage_suite: suite file not found",)),
    # ---- evaluation suites
    "label out of range in eval": Case(
        ("--quiet", "eval", "{earlier}", "--suite", "{suite}", "--device", "cpu"),
        lambda t: suite(t, zero_shot=[classification_set(t, labels=(0, 7, 1))]),
        ("pairs.jsonl:2", "(id 1)", "label 7, outside the valid range 0..2", CHECK), absent=(SKIP,)),
    "empty caption in a retrieval set": Case(
        ("--quiet", "eval", "{earlier}", "--suite", "{suite}", "--device", "cpu"),
        lambda t: suite(t, retrieval=[pairs(t, edit=caption(0, ["fine", ""]))]),
        ("empty_caption", "pairs.jsonl:1", "caption 1 is empty", "suite section 'retrieval'"), absent=(SKIP,)),
    "classification set as retrieval set": Case(
        ("--quiet", "eval", "{earlier}", "--suite", "{suite}", "--device", "cpu"),
        lambda t: suite(t, retrieval=[classification_set(t)]), ("needs a captions manifest",)),
    # ---- sweeps: every run checked before the first
    "sweep with one bad run": Case(("--quiet", "sweep", "{spec}", "--output-dir", "{sweep}", "--no-eval"), sweep_spec,
                                   ("sweep run bad/", "prior_vector has 2 numbers", "nothing was run")),
}


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def earlier(tmp_path_factory, micro_base) -> Path:
    """A finished run in the output folder every case writes to: it must come out untouched."""
    out = tmp_path_factory.mktemp("out")
    assert main(["--quiet", "refine", "--output-dir", str(out), "--run-name", "earlier", "--max-steps", "1"]) == 0
    return out / "earlier"


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def fill(args: tuple[str, ...], values: dict) -> list[str]:
    return [a.format(**values) for a in args]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_clear_line_before_any_work(case, tmp_path, earlier, capsys):
    name = f"bad-{tmp_path.name}"
    values = {"out": earlier.parent, "earlier": earlier, "tmp": tmp_path, "name": name}
    values.update({k: str(v) for k, v in case.setup(tmp_path).items()})
    before = snapshot(earlier.parent, cache_dir())
    capsys.readouterr()
    code = main(fill(case.args, values))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("clip-refine-lab: error: "), err
    assert "Traceback" not in err
    for text in case.expect:
        assert text in lines[0], f"{text!r} not in: {lines[0]}"
    for text in case.absent:
        assert text not in lines[0], f"{text!r} in: {lines[0]}"
    assert snapshot(earlier.parent, cache_dir()) == before  # nothing written: earlier runs and caches as they were
    assert not (earlier.parent / name).exists()


# --------------------------------------------------------------------------------- around the matrix
def _refine(tmp: Path, *extra: str) -> int:
    return main(["--quiet", "refine", "--output-dir", str(tmp / "out"), "--run-name", "run", "--max-steps", "2",
                 "--batch-size", "4", *extra])


def test_skip_counts_and_lists_every_record_it_leaves_out(tmp_path, micro_base, capsys):
    def spoil(rows):
        rows[1]["captions"] = [""]
        rows[3]["captions"] = []
        rows[5]["captions"] = ["kept", "   "]  # the blank caption is dropped, the record kept

    man = pairs(tmp_path, n=12, edit=spoil)
    make_corrupt_image(tmp_path / "data" / "images" / "007.png")
    assert _refine(tmp_path, "--data", str(man), "--val-fraction", "0.1", "--on-bad-sample", "skip") == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "out" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_samples"] == 3 and summary["dropped_empty_captions"] == 1
    assert summary["skipped_samples_file"] == "skipped_samples.jsonl"
    listed = [json.loads(line) for line in (run_dir / "skipped_samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in listed] == ["001", "003", "007"]
    assert [r["where"].rsplit(":", 1)[1] for r in listed] == ["2", "4", "8"]
    assert listed[2]["reason"].startswith("unreadable image") and listed[2]["image"].endswith("007.png")
    assert "left out 3 record(s)" in out and "skipped_samples.jsonl" in out


def test_a_run_stopped_by_a_bad_image_continues_with_skip(tmp_path, micro_base, capsys, monkeypatch):
    """An image damaged where the header scan does not look stops the run at that image, naming its manifest
    line and the remedy; the same command with --on-bad-sample skip continues the run."""
    from clip_refine_lab.data import preflight

    # 8 pairs, no validation, batches of 4: the first epoch's two steps read every image
    man = pairs(tmp_path, n=8)
    make_corrupt_image(tmp_path / "data" / "images" / "006.png")
    monkeypatch.setattr(preflight, "image_header_problem", lambda locator: None)  # a scan that misses it
    assert _refine(tmp_path, "--data", str(man), "--val-fraction", "0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "pairs.jsonl:7 [id 006]" in err and "006.png" in err
    assert f"{CHECK} {man}" in err and SKIP in err
    assert (tmp_path / "out" / "run" / "config.yaml").is_file()  # stopped after the run had started
    assert _refine(tmp_path, "--data", str(man), "--val-fraction", "0", "--on-bad-sample", "skip") == 0
    run_dir = tmp_path / "out" / "run"
    assert json.loads((run_dir / "summary.json").read_text())["skipped_samples"] == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["on_bad_sample"] == "skip"


def test_a_worker_process_error_reaches_the_user_as_its_one_line(tmp_path):
    import torch

    from clip_refine_lab.data.datasets import Images
    from clip_refine_lab.data.manifest import ManifestError, load_manifest

    man = pairs(tmp_path, n=2)
    make_corrupt_image(tmp_path / "data" / "images" / "001.png")
    loader = torch.utils.data.DataLoader(Images(load_manifest(man).records(), lambda im: torch.zeros(1),
                                                manifest=man), batch_size=1, num_workers=1)
    with pytest.raises(ManifestError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{tmp_path / 'data' / 'pairs.jsonl'}:2 [id 001]: cannot read image")
    assert f"{CHECK} {man}" in message


def test_a_streamed_manifest_gets_the_field_checks_without_listing_its_shards(tmp_path, monkeypatch):
    from clip_refine_lab.data import manifest as manifest_module
    from clip_refine_lab.data.manifest import ManifestError
    from clip_refine_lab.data.preflight import preflight_manifest

    def no_listing(self):
        raise AssertionError("a streamed manifest's records were listed")

    monkeypatch.setattr(manifest_module.Manifest, "records", no_listing)
    good = shards(tmp_path / "a", num_samples=8)["manifest"]
    assert preflight_manifest(good, kind="captions").ok
    with pytest.raises(ManifestError, match="unknown field 'shard'"):
        preflight_manifest(shards(tmp_path / "b", shard="x.tar")["manifest"])


# ---------------------------------------------------------------------------------- the image scan
def test_header_scan_finds_truncated_images_and_passes_complete_ones(tmp_path):
    from clip_refine_lab.data.preflight import image_header_problem

    good_png, good_jpg = make_image(tmp_path / "a.png", 1), make_image(tmp_path / "b.jpg", 2)
    assert image_header_problem(str(good_png)) is None and image_header_problem(str(good_jpg)) is None
    padded = tmp_path / "padded.jpg"  # bytes after the end marker: some encoders write them; still decodes
    padded.write_bytes(image_bytes(3) + b"\0" * 200)
    assert image_header_problem(str(padded)) is None
    half_png = tmp_path / "half.png"
    data = image_bytes(4, "PNG", size=64)
    half_png.write_bytes(data[: len(data) // 2])
    assert image_header_problem(str(half_png))[0] == "unreadable_image"
    assert image_header_problem(str(make_corrupt_image(tmp_path / "half.jpg")))[0] == "unreadable_image"
    (tmp_path / "text.png").write_text("not an image")
    assert image_header_problem(str(tmp_path / "text.png"))[0] == "unreadable_image"
    assert image_header_problem(str(tmp_path / "gone.png")) == ("missing_file", "no such file")


def test_a_clean_scan_is_cached_until_an_image_changes(tmp_path, monkeypatch):
    from clip_refine_lab.data import preflight
    from clip_refine_lab.data.manifest import load_manifest

    monkeypatch.setenv("CLIP_REFINE_LAB_CACHE", str(tmp_path / "cache"))
    records = load_manifest(pairs(tmp_path, n=4)).records()
    opened: list[str] = []
    real = preflight.image_header_problem
    monkeypatch.setattr(preflight, "image_header_problem", lambda loc: opened.append(loc) or real(loc))
    assert preflight.scan_images(records) == {} and len(opened) == 4
    assert preflight.scan_images(records) == {} and len(opened) == 4  # cached: no image opened
    make_corrupt_image(Path(records[2].image))
    problems = preflight.scan_images(records)
    assert list(problems) == [records[2].image] and problems[records[2].image][0] == "unreadable_image"
    assert len(opened) == 8
    os.utime(records[0].image)  # a touched file is a changed data set: scanned again, not trusted
    preflight.scan_images(records)
    assert len(opened) == 12
