"""cluster.yaml is a real cluster-launcher file: Ray's own validation accepts it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_validates():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpus = [t["resources"].get("GPU", 0) for t in cfg["available_node_types"].values()]
    assert max(gpus) >= 1, "the cluster must offer GPUs"


def test_validation_catches_mistakes():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "nope"
    with pytest.raises(Exception):
        _validate(bad)
    bad = copy.deepcopy(cfg)
    bad["max_workerz"] = 3
    with pytest.raises(Exception):
        _validate(bad)
