"""A run folder on an object store (moto's S3 server on 127.0.0.1): what each
node reads and writes there, what the driver keeps on its node and copies
there, and what a driver on a new node gets back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evolve.config import EncoderConfig, RunConfig
from evolve.run_folder import RunFolder
from evolve.storage import Storage, copy_folder, local_folder

pytest_plugins = ["s3_server"]


def checkpoint_dir(path: Path, tag: str) -> Path:
    """A folder shaped like a student checkpoint (config.json and weights)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"tag": tag}))
    (path / "model.safetensors").write_bytes(tag.encode() * 100)
    return path


def test_shared_parts_are_uris_and_the_drivers_files_stay_on_its_node(s3_uri, tmp_path):
    folder = RunFolder(s3_uri, work=tmp_path / "head")
    assert folder.shared and folder.root == (tmp_path / "head").resolve()
    for part, rel in [(folder.images, "images"), (folder.features, "features"), (folder.datasets, "datasets"),
                      (folder.train_storage, "ray_train"), (folder.snapshots, "checkpoints/live"),
                      (folder.shared_checkpoints, "checkpoints"), (folder.ledger_mirror, "ledger")]:
        assert part == f"{s3_uri}/{rel}"
    assert folder.ledger == folder.root / "ledger.sqlite" and folder.rounds == folder.root / "rounds"
    assert str(folder) == s3_uri
    local = RunFolder(tmp_path / "run")
    assert not local.shared and local.images == local.root / "images" and local.ledger_mirror is None
    assert local.save_state() == 0 and local.pull_state() == 0


def test_a_uri_survives_the_config_and_a_bad_one_is_refused_before_anything(s3_uri, tmp_path):
    cfg = RunConfig(run_dir=s3_uri + "?scheme=http")
    assert cfg.run_dir == s3_uri + "?scheme=http"  # not folded into s3:/...
    assert RunConfig(run_dir=tmp_path).run_dir == str(tmp_path)
    with pytest.raises(ValueError, match="credentials"):
        RunFolder("s3://key:secret@bucket/run")
    with pytest.raises(ValueError, match="not gs://"):
        RunFolder("gs://bucket/run")


def test_the_drivers_files_go_up_changed_only_and_come_back_on_a_new_node(s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOLVE_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(run_dir=s3_uri)
    head = RunFolder(s3_uri, work=tmp_path / "head")
    head.check_config(cfg)
    head.attach_ledger()
    with head.open_ledger() as ledger:
        ledger.record({"teacher": "aurora", "prompt": "a red circle", "seed": 1, "size": 32, "ref": "ab" * 32,
                       "price": 0.04})
    (head.verdicts).mkdir(parents=True)
    (head.verdicts / "judge_000.json").write_text("[]")
    (head.round_stats(0)).write_text(json.dumps({"round": 0}))
    checkpoint_dir(head.checkpoint(0), "r0")
    assert head.share(head.checkpoint(0)) == head.checkpoint_ref(0) == f"{s3_uri}/checkpoints/round_000"

    sent = head.save_state()
    assert sent == 3  # config.json, the verdicts, the round's statistics
    assert head.save_state() == 0  # nothing changed since
    (head.verdicts / "judge_000.json").write_text("[1]")
    assert head.save_state() == 1
    store = Storage.at(s3_uri)
    assert not store.exists("ledger.sqlite")  # the ledger travels through its mirror
    assert store.committed("checkpoints/round_000")

    new = RunFolder(s3_uri, work=tmp_path / "new-head")
    new.check_config(cfg)  # pulls what the old head saved, then checks the config against it
    assert new.first_unfinished_round() == 1
    assert json.loads((new.verdicts / "judge_000.json").read_text()) == [1]
    assert json.loads((local_folder(new.checkpoint_ref(0)) / "config.json").read_text()) == {"tag": "r0"}
    new.attach_ledger()  # the file is missing here: restored from the mirror
    with new.open_ledger() as ledger:
        assert len(ledger) == 1 and ledger.lookup("aurora", "a red circle", 1, 32) is not None
    with pytest.raises(ValueError, match="another config"):
        RunFolder(s3_uri, work=tmp_path / "third").check_config(RunConfig(run_dir=s3_uri, seed=7))
    # `evolve run --resume s3://...` on a node with an empty cache: the run's own config.
    from evolve.cli import _resumed_config

    monkeypatch.setenv("EVOLVE_CACHE", str(tmp_path / "fourth"))
    resumed = _resumed_config(s3_uri)
    assert resumed.is_relative_to(tmp_path / "fourth") and RunConfig.load(resumed) == cfg


def test_a_shared_folder_is_fetched_once_per_commit(s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOLVE_CACHE", str(tmp_path / "cache"))
    store = Storage.at(s3_uri)
    store.upload_dir(checkpoint_dir(tmp_path / "a", "one"), "ckpt")
    first = local_folder(f"{s3_uri}/ckpt")
    assert first.is_relative_to(tmp_path / "cache") and (first / "config.json").exists()
    assert local_folder(f"{s3_uri}/ckpt") == first  # cached: not fetched again
    store.upload_dir(checkpoint_dir(tmp_path / "b", "two"), "ckpt")  # replaced: another commit
    second = local_folder(f"{s3_uri}/ckpt")
    assert second != first and json.loads((second / "config.json").read_text()) == {"tag": "two"}
    assert local_folder(tmp_path / "a") == tmp_path / "a"  # a path is a path
    store.write_atomic("half/model.safetensors", b"x")  # an upload that never committed
    with pytest.raises(FileNotFoundError, match="not a committed folder"):
        local_folder(f"{s3_uri}/half")
    copy_folder(f"{s3_uri}/ckpt", tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == {"tag": "two"}


def test_edgen_follows_the_newest_committed_checkpoint_on_the_store(s3_uri, tmp_path):
    from serve.edgen import newest_checkpoint

    store = Storage.at(s3_uri)
    assert newest_checkpoint(s3_uri) is None
    store.upload_dir(checkpoint_dir(tmp_path / "r0", "r0"), "round_000")
    store.upload_dir(checkpoint_dir(tmp_path / "r1", "r1"), "round_001")
    store.write_atomic("round_002/config.json", b"{}")  # being uploaded: no marker yet
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "notes.txt").write_text("not a checkpoint")
    store.upload_dir(tmp_path / "live", "live")  # committed, but holds no student
    assert newest_checkpoint(s3_uri) == f"{s3_uri}/round_001"


def test_features_on_the_store(s3_uri):
    from evolve.student.encoders import FeatureStore

    store = FeatureStore(f"{s3_uri}/features")
    ref = "cd" * 32
    latent = np.arange(2 * 3 * 5, dtype=np.float16).reshape(2, 3, 5)
    assert not store.has_latent(ref)
    assert store.put_latent(ref, latent) == f"{s3_uri}/features/latents/{ref}.npy"
    np.testing.assert_array_equal(store.get_latent(ref), latent)
    assert store.latent_shape(ref) == (2, 3, 5)
    store.put_text("a red circle", np.ones((4, 8), np.float16), np.ones(4, bool))
    emb, mask = store.get_text("a red circle")
    assert emb.shape == (4, 8) and mask.all()
    with pytest.raises(KeyError, match="no latent"):
        store.get_latent("ef" * 32)
    cfg = EncoderConfig()
    store.claim(cfg)
    store.claim(cfg)  # the same encoders: fine
    with pytest.raises(ValueError, match="other encoders"):
        FeatureStore(f"{s3_uri}/features").claim(cfg.model_copy(update={"tiny_latent_channels": 8}))


def test_the_start_checkpoint_is_shared_once(s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOLVE_CACHE", str(tmp_path / "cache"))
    folder = RunFolder(s3_uri, work=tmp_path / "head")
    start = checkpoint_dir(tmp_path / "pixart", "start")
    uri = folder.share_start(str(start))
    assert uri == f"{s3_uri}/checkpoints/start"
    (start / "config.json").write_text('{"tag": "changed"}')
    assert folder.share_start(str(start)) == uri  # a resume: not uploaded again
    assert json.loads((local_folder(uri) / "config.json").read_text()) == {"tag": "start"}
    assert folder.share_start(uri) == uri  # a URI already is where every node finds it
    assert RunFolder(tmp_path / "run").share_start(str(start)) == str(start)  # a local run: as it is
    cfg = RunConfig(run_dir=s3_uri, init_checkpoint=uri)
    assert cfg.init_checkpoint == uri


def test_a_run_starts_from_a_checkpoint_on_the_store(s3_uri, tmp_path, monkeypatch):
    from evolve.loop import resolve
    from evolve.student.generate import BASE_CHECKPOINT

    monkeypatch.setenv("EVOLVE_CACHE", str(tmp_path / "cache"))
    Storage.at(s3_uri).upload_dir(BASE_CHECKPOINT, "models/base")
    cfg, init, _ = resolve(RunConfig(run_dir=str(tmp_path / "run"), init_checkpoint=f"{s3_uri}/models/base"))
    assert init == f"{s3_uri}/models/base"
    assert cfg.student == resolve(RunConfig(run_dir=str(tmp_path / "run")))[0].student  # the same student
    with pytest.raises(FileNotFoundError, match="not a committed folder"):
        resolve(RunConfig(init_checkpoint=f"{s3_uri}/models/none"))
    # `evolve serve --checkpoint s3://...`: checked before a replica starts, fetched by each replica.
    from serve.edgen import resolve_checkpoint

    assert resolve_checkpoint(f"{s3_uri}/models/base") == f"{s3_uri}/models/base"
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(f"{s3_uri}/models/none")


def test_the_ledgers_journal_is_compacted_once_long(s3_uri, tmp_path, monkeypatch):
    folder = RunFolder(s3_uri, work=tmp_path / "head")
    folder.check_config(RunConfig(run_dir=s3_uri))
    folder.attach_ledger()
    monkeypatch.setattr(RunFolder, "COMPACT_AFTER", 3)
    with folder.open_ledger() as ledger:
        for i in range(2):
            ledger.record({"teacher": "aurora", "prompt": f"p{i}", "seed": i, "size": 32, "ref": f"{i:064x}",
                           "price": 0.04})
        folder.save_state()
        assert ledger.journal_length == 2  # short: left as it is
        ledger.record({"teacher": "aurora", "prompt": "p2", "seed": 2, "size": 32, "ref": f"{2:064x}", "price": 0.04})
        folder.save_state()
        assert ledger.journal_length == 0 and Storage.at(s3_uri).exists("ledger/snapshot.sqlite")
