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


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_example_configs_load_and_fit_the_cluster(name):
    """Every shipped run config is a valid RunConfig, and a trainer placed by
    custom resources lands on a cluster.yaml node type that has them (and GPUs
    when it asks for GPUs)."""
    from evolve.config import RunConfig

    train = RunConfig.load(ROOT / "configs" / name).train
    if not train.worker_resources:
        return
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"].values()
    fits = [t["resources"] for t in types
            if all(t["resources"].get(k, 0) >= v for k, v in train.worker_resources.items())
            and t["resources"].get("CPU", 0) >= train.cpus_per_worker
            and (not train.use_gpu or t["resources"].get("GPU", 0) >= 1)]
    assert fits, f"{name}: no node type in cluster.yaml offers {train.worker_resources}"
