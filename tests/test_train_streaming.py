"""The trainer's streaming path for WebDataset manifests (micro preset, tiny shards in tmp_path),
and the leakage check at the start of a run."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clip_refine_lab.training import loop as train
from clip_refine_lab.training import sources
from clip_refine_lab.config import ConfigError, RunConfig
from clip_refine_lab.data.manifest import Manifest
from clip_refine_lab.training.loop import Refiner, refine
from clip_refine_lab.training.sources import StreamSource
from clip_refine_lab.rundir import read_log
from conftest_data import make_coco, make_webdataset, write_manifest_yaml

SHARDS, PER_SHARD, BATCH = 5, 8, 8  # val_fraction 0.2: shard 4 validates, shards 0-3 train (4 steps/epoch)


def shards_manifest(tmp_path, num_samples: int | None = SHARDS * PER_SHARD) -> tuple:
    man, keys = make_webdataset(tmp_path, num_shards=SHARDS, per_shard=PER_SHARD, with_json=False)
    if num_samples is not None:
        fields = yaml.safe_load(man.read_text())
        write_manifest_yaml(man, **fields, num_samples=num_samples)
    return man, keys


def stream_config(tmp_path, man, **kw) -> RunConfig:
    values = dict(preset="micro", output_dir=str(tmp_path / "runs"), run_name="run", data=str(man), epochs=2,
                  batch_size=BATCH, val_fraction=0.2, val_every=2)
    values.update(kw)
    return RunConfig(**values)


@pytest.fixture
def no_listing(monkeypatch):
    """Listing a manifest's records is what streaming avoids: make it fail."""
    def records(self):
        raise AssertionError(f"manifest.records() called on {self.path}")

    monkeypatch.setattr(Manifest, "records", records)


def weights(run_dir, name="model_final.safetensors"):
    return load_file(str(run_dir / name))


def test_streaming_run_trains_without_listing_records(tmp_path, micro_base, no_listing):
    man, _ = shards_manifest(tmp_path)
    run_dir = refine(stream_config(tmp_path, man, lr=1e-3), progress=False)
    for name in ("config.yaml", "base.json", "log.jsonl", "model_best.safetensors", "model_final.safetensors",
                 "summary.json", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["train_pairs"] == 32 and summary["val_pairs"] == 8
    assert summary["streaming"] == {"train_shards": 4, "val_shards": 1, "steps_per_epoch": 4, "cycled_passes_rank0": 0}
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, 9)) and [r["epoch"] for r in log] == [0] * 4 + [1] * 4
    assert [r["step"] for r in read_log(run_dir, "val")] == [0, 2, 4, 6, 8]
    base = load_file(str(micro_base))
    assert any(not torch.equal(base[k], v) for k, v in weights(run_dir).items())


def test_validation_shards_are_held_out_and_epochs_cover_the_training_shards(tmp_path, micro_base):
    man, keys = shards_manifest(tmp_path)
    r = Refiner(stream_config(tmp_path, man).resolved(), progress=False).source
    assert r.val_shards == [tmp_path / "shards" / "00004.tar"] and len(r.train_shards) == 4
    val_keys = set(r.val_keys)
    streamed_val = []
    for _, images, _, _ in r.val_batches(BATCH, BATCH):
        streamed_val.append(images.shape[0])
    assert sum(streamed_val) == len(val_keys) == PER_SHARD
    epochs = [[], []]
    for step, (_, _, batch_keys) in enumerate(r.train_batches(0)):
        epochs[step // r.steps_per_epoch].extend(batch_keys)
    for epoch_keys in epochs:  # every training pair once per epoch, no validation pair ever
        assert sorted(epoch_keys) == sorted(set(keys) - val_keys)
    assert epochs[0] != epochs[1], "each epoch has its own shard order"


def test_resumed_streaming_run_equals_uninterrupted(tmp_path, micro_base, monkeypatch):
    man, _ = shards_manifest(tmp_path)
    straight = refine(stream_config(tmp_path, man, run_name="straight", checkpoint_every=3), progress=False)

    original = Refiner.compute_loss

    def crash(self, images, tokens, step, *, train, **kw):
        if train and step == 4:  # after the step-3 checkpoint: resuming restarts epoch 0 and discards 3 batches
            raise KeyboardInterrupt
        return original(self, images, tokens, step, train=train, **kw)

    cfg = stream_config(tmp_path, man, run_name="resumed", checkpoint_every=3)
    monkeypatch.setattr(Refiner, "compute_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        refine(cfg, progress=False)
    run_dir = tmp_path / "runs" / "resumed"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(Refiner, "compute_loss", original)
    refine(cfg, progress=False)
    for name in ("model_final.safetensors", "model_best.safetensors"):
        a, b = weights(run_dir, name), weights(straight, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda log: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in log]  # noqa: E731
    assert strip(read_log(run_dir)) == strip(read_log(straight))


def test_a_rank_whose_shards_run_out_reads_them_again(tmp_path, micro_base, capsys):
    # the manifest claims twice the samples it has: every epoch needs two passes over the shards
    man, keys = shards_manifest(tmp_path, num_samples=2 * SHARDS * PER_SHARD)
    r = Refiner(stream_config(tmp_path, man, epochs=1).resolved(), progress=False).source
    assert r.steps_per_epoch == 8
    got = [list(k) for _, _, k in r.train_batches(0)]
    assert len(got) == 8 and r.cycled == 1
    first, second = sum(got[:4], []), sum(got[4:], [])
    assert sorted(first) == sorted(second)
    r.train_set.set_epoch(1)  # the second pass is the next epoch's order
    assert second == [k for _, _, k in r.train_set]
    assert "ran out after 4 of 8 batches of epoch 0" in capsys.readouterr().out


def test_ddp_ranks_stream_disjoint_training_shards(tmp_path, micro_base, monkeypatch):
    man, _ = shards_manifest(tmp_path)
    cfg = stream_config(tmp_path, man).resolved()
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            monkeypatch.setattr(train, "world_info", lambda rank=rank: (rank, 2))
            r = Refiner(cfg, progress=False).source
            assert (r.rank, r.world_size, r.local_batch, r.steps_per_epoch) == (rank, 2, BATCH // 2, 4)
            r.train_set.set_epoch(epoch)
            per_rank.append(set(r.train_set.my_shards()))
        assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
        assert per_rank[0] | per_rank[1] == {str(s) for s in r.train_shards}
        assert str(r.val_shards[0]) not in per_rank[0] | per_rank[1]


def test_streaming_refuses_map_style_options_and_needs_a_sample_count(tmp_path, micro_base, no_listing):
    man, _ = shards_manifest(tmp_path)
    with pytest.raises(ConfigError, match="teacher_cache needs a map-style manifest; with WebDataset shards"):
        Refiner(stream_config(tmp_path, man, teacher_cache=True).resolved(), progress=False)
    with pytest.raises(ConfigError, match="image_cache needs a map-style manifest"):
        Refiner(stream_config(tmp_path, man, image_cache=True).resolved(), progress=False)
    one, _ = make_webdataset(tmp_path / "one", num_shards=1, per_shard=PER_SHARD)
    with pytest.raises(ConfigError, match="has 1 shard\\(s\\), leaving none for training"):
        Refiner(stream_config(tmp_path, one, max_steps=1).resolved(), progress=False)
    bare, _ = shards_manifest(tmp_path / "bare", num_samples=None)
    with pytest.raises(ConfigError, match=r"without 'num_samples'.*add 'num_samples: N'.*or set max_steps"):
        Refiner(stream_config(tmp_path, bare).resolved(), progress=False)
    r = Refiner(stream_config(tmp_path, bare, max_steps=6).resolved(), progress=False)
    assert r.steps_per_epoch == r.total_steps == 6 and r.source.num_train_pairs is None


def test_stats_prior_uses_the_first_streamed_pairs(tmp_path, micro_base, monkeypatch):
    man, _ = shards_manifest(tmp_path)
    monkeypatch.setattr(sources, "STREAM_STATS_SAMPLES", 12)
    seen = []
    original = StreamSource.first_features

    def spy(self, model, limit, **kw):
        image, text = original(self, model, limit, **kw)
        seen.append((limit, image.shape[0], text.shape[0]))
        return image, text

    monkeypatch.setattr(StreamSource, "first_features", spy)
    run_dir = refine(stream_config(tmp_path, man, prior="text-stats", max_steps=1), progress=False)
    assert seen == [(12, 12, 12)]
    assert (run_dir / "prior_stats.safetensors").is_file()


def test_leakage_check_at_the_start_of_a_run(tmp_path, micro_base, capsys):
    train_m = make_coco(tmp_path / "train", (1, 2, 3, 4, 5, 6, 7, 8), name="coco-train2017", seed=0)
    eval_m = make_coco(tmp_path / "ev", (2, 3, 99), style="val2014", name="coco-karpathy-test", seed=100)
    suite = write_manifest_yaml(tmp_path / "suite.yaml", retrieval=[str(eval_m)])
    cfg = RunConfig(preset="micro", output_dir=str(tmp_path / "runs"), run_name="leaky", data=str(train_m),
                    batch_size=4, val_fraction=0, max_steps=1, leakage_suite=str(suite))
    run_dir = refine(cfg, progress=False)
    report = json.loads((run_dir / "leakage.json").read_text())
    assert [(e["name"], e["overlap"]) for e in report["evals"]] == [("coco-karpathy-test", 2)]
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert lines[0] == {"kind": "leakage", "step": 0, "suite": str(suite), "overlap": 2,
                        "evals": {"coco-karpathy-test": 2}}
    assert "WARNING: evaluation images are in the training set" in capsys.readouterr().out
    # streaming manifests are not listed: the check is skipped, and says so in the log
    man, _ = shards_manifest(tmp_path / "wds")
    run_dir = refine(stream_config(tmp_path, man, run_name="wds", max_steps=1, leakage_suite=str(suite)),
                     progress=False)
    first = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "leakage" and "streaming manifest" in first["skipped"]
    assert not (run_dir / "leakage.json").exists()


def test_sample_count_from_img2dataset_stats(tmp_path):
    import json

    from clip_refine_lab.data.manifest import load_manifest
    from clip_refine_lab.data.manifest import ManifestError
    from clip_refine_lab.data.webdataset import manifest_num_samples, manifest_shards

    man, _ = shards_manifest(tmp_path, num_samples=None)
    manifest = load_manifest(man)
    assert manifest_num_samples(manifest) is None  # no count anywhere: the trainer asks for one
    shards = manifest_shards(manifest)
    for i, shard in enumerate(shards):  # img2dataset writes <shard>_stats.json with "successes"
        shard.with_name(shard.stem + "_stats.json").write_text(json.dumps({"successes": PER_SHARD - (i == 0)}))
    assert manifest_num_samples(load_manifest(man)) == SHARDS * PER_SHARD - 1
    shards[1].with_name(shards[1].stem + "_stats.json").write_text('{"successes": "many"}')
    with pytest.raises(ManifestError, match=r"_stats.json: field 'successes'"):
        manifest_num_samples(load_manifest(man))
    shards[1].with_name(shards[1].stem + "_stats.json").unlink()  # one shard without statistics: no count
    assert manifest_num_samples(load_manifest(man)) is None


def test_evaluation_does_not_list_streamed_training_shards(tmp_path, no_listing):
    from clip_refine_lab.evaluation.evaluate import _leakage

    man, _ = shards_manifest(tmp_path)
    out = _leakage(stream_config(tmp_path, man), suite=None, data_root=None)
    assert out["overlap"] is None and "skipped" in out["text"] and "clip-refine-lab data leakage" in out["text"]
