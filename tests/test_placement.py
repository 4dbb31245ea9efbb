"""Placement fails fast: a part asking for what no node type offers is named before anything starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from evolve.config import RunConfig
from evolve.placement import Ask, PlacementError, check_placement

ROOT = Path(__file__).resolve().parents[1]
LAPTOP = {"node 127.0.0.1 ab12cd34": {"CPU": 2.0, "memory": 1e10, "object_store_memory": 1e9,
                                      "node:127.0.0.1": 1.0, "node:__internal_head__": 1.0}}


def test_a_missing_resource_is_named_with_the_part_that_asked():
    with pytest.raises(PlacementError) as e:
        check_placement([Ask("train (the training workers)", {"CPU": 0.5, "train": 1}, 2),
                         Ask("judge (its Serve replica)", {"CPU": 0.1})], LAPTOP)
    msg = str(e.value)
    assert "train (the training workers) asks for {CPU: 0.5, train: 1} x2 on one node" in msg
    assert "'train' 1: no node type offers it" in msg
    assert "judge" not in msg.split("(its node types")[0]  # what fits is not reported
    assert "node 127.0.0.1 ab12cd34: {CPU: 2}" in msg  # Ray's bookkeeping resources left out


def test_too_little_of_a_resource_and_resources_split_across_node_types():
    types = {"gpu": {"CPU": 8, "GPU": 1}, "judge": {"CPU": 8, "judge": 1}}
    with pytest.raises(PlacementError, match=r"'GPU' 2: the most a node type offers is 1"):
        check_placement([Ask("judge's vLLM engine", {"GPU": 2})], types)
    with pytest.raises(PlacementError, match="each resource is on some node type, but none has them all"):
        check_placement([Ask("judge", {"GPU": 1, "judge": 1})], types)
    check_placement([Ask("judge", {"CPU": 0.1, "judge": 1}), Ask("sample", {"GPU": 0.5, "CPU": 0})], types)


def cluster_yaml_types() -> dict[str, dict[str, float]]:
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    return {f"node type {k}": {r: float(v) for r, v in t["resources"].items()} for k, t in types.items()}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_can_be_placed_on_cluster_yaml(name):
    """What each part of every example config asks for (evolve.cluster.asks)
    lands on some node type of cluster.yaml."""
    from evolve.cluster import asks

    check_placement(asks(RunConfig.load(ROOT / "configs" / name)), cluster_yaml_types())


def test_the_parts_ask_for_what_their_configs_name():
    from evolve.cluster import asks

    cfg = RunConfig.load(ROOT / "configs" / "real.yaml")
    cfg = cfg.model_copy(update={
        "judge": cfg.judge.model_copy(update={"resources": {"judge": 1}}),
        "sample": cfg.sample.model_copy(update={"num_gpus": 0.25, "resources": {"sampling": 1}})})
    by_part = {a.part.split(" ")[0]: a for a in asks(cfg)}
    assert by_part["train"].bundle == {"CPU": cfg.train.cpus_per_worker, "GPU": 1.0, "train": 1}
    assert by_part["train"].count == cfg.train.num_workers
    assert by_part["judge"].bundle["judge"] == 1 and by_part["sample"].bundle == {"CPU": 0.5, "GPU": 0.25,
                                                                                  "sampling": 1}


@pytest.mark.integration
def test_a_run_asking_for_a_resource_no_node_has_fails_at_start(ray_local, tmp_path):
    """On this machine's one-node instance, a config that places its trainer
    on `train` nodes fails before Serve, a gateway or a purchase starts."""
    from evolve.cluster import cluster_parts
    from evolve.loop import main

    cfg = RunConfig.load(ROOT / "configs" / "tiny.yaml")
    cfg = cfg.model_copy(update={"run_dir": str(tmp_path / "run"), "from_scratch": True,
                                 "train": cfg.train.model_copy(update={"worker_resources": {"train": 1}})})
    t = time.time()
    with pytest.raises(PlacementError, match=r"train \(the training workers.*'train' 1: no node type offers it"):
        main(cfg, cluster_parts, lambda *_: None)
    assert time.time() - t < 30
    assert not (tmp_path / "run" / "ledger.sqlite").exists() and not list((tmp_path / "run" / "images").iterdir())
