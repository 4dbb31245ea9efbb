"""A run on a Ray cluster of several nodes on this machine, one of which dies mid-round.

Each node is started with its own resources (cluster.yaml's node types in
miniature). The run's config places its parts by those resources; the
teachers' servers run here, outside the cluster, so their counts outlive
every node. The run folder is on an object store (moto's S3 server, here on
127.0.0.1), as on a cluster whose nodes share no disk: the nodes exchange
images, features, dataset versions and checkpoints through it alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from evolve.ray_env import free_port

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["s3_server"]
BIN = Path(sys.executable).parent


class LocalCluster:
    """Ray nodes on this machine (`ray.cluster_utils.Cluster`, Ray's own
    multi-node test cluster: `ray start --address` refuses to join while
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on loopback, and with it
    on rewrites 127.0.0.1 to the eth0 address). Each node has its raylet,
    agents and worker processes; `kill` ends them all at once, as a machine
    lost would."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.nodes, self.cluster = tmp, {}, None
        self.dashboard = free_port()

    def start(self, name: str, cpus: float, resources: dict | None = None) -> None:
        from ray.cluster_utils import Cluster

        args = {"num_cpus": cpus, "resources": resources or {}, "node_ip_address": "127.0.0.1"}
        if self.cluster is None:
            self.cluster = Cluster(initialize_head=True, head_node_args={
                **args, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard,
                # A lost node is declared dead after ~3 s, not Ray's default ~15 s.
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
            self.nodes[name] = self.cluster.head_node
        else:
            self.nodes[name] = self.cluster.add_node(**args)
        want = len(self.nodes)
        deadline = time.time() + 90
        while len(self.alive_nodes()) < want:
            assert time.time() < deadline, f"node {name} did not join"
            time.sleep(0.5)

    @property
    def address(self) -> str:
        return self.cluster.address

    def state(self, what: str) -> list[dict]:
        """The state API (`ray list nodes/actors`), over the head's dashboard."""
        url = f"http://127.0.0.1:{self.dashboard}/api/v0/{what}?limit=10000&detail=1"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())["data"]["result"]["result"]
        except OSError:
            return []

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def kill(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()


@pytest.mark.integration
def test_a_worker_node_lost_mid_round_is_survived(tmp_path, s3_uri, monkeypatch):
    """Head (driver, gateways, trainer feed, Serve's proxy), a training node
    (`train`: both DDP workers) and a judge node (`judge`, `sampling`). The
    training node is killed whole in the middle of round 0 (the one round;
    the final student still trains after it) and a new one
    joins (as the autoscaler would start one). The run finishes; its dataset
    versions are contiguous, every record's image is there and valid, and
    the ledger holds exactly what the teachers' servers billed. A driver on
    a new head then finds the whole run on the store."""
    from run_checks import assert_consistent

    from evolve.ledger import Ledger
    from evolve.run_folder import RunFolder
    from evolve.storage import Storage
    from serve.teachers import TeacherServersThread

    # The nodes' caches of fetched checkpoints, and the driver's own folder,
    # apart: what one writes locally the others would not see on a real cluster.
    monkeypatch.setenv("EVOLVE_CACHE", str(tmp_path / "node-cache"))
    folder = RunFolder(s3_uri, work=tmp_path / "head-cache" / "runs" / Storage.at(s3_uri).root)

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg.update(rounds=1, from_scratch=True)
    cfg["train"].update(num_workers=2, worker_resources={"train": 1}, max_failures=3)
    cfg["judge"] = {"resources": {"judge": 1}}
    cfg["sample"].update(resources={"sampling": 1})
    cluster = LocalCluster(tmp_path)
    servers = TeacherServersThread(cfg["teachers"], 32)
    try:
        cluster.start("head", 2)
        cluster.start("train", 1, {"train": 2})
        cluster.start("judge", 1, {"judge": 1, "sampling": 1})
        with servers as urls:
            cfg["teachers"] = [{**t, "kind": "openai", "base_url": urls[t["name"]], "model": t["name"]}
                               for t in cfg["teachers"]]
            (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
            run = folder.root  # the driver's files, on its node
            env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": cluster.address,
                   "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{cluster.dashboard}",
                   "EVOLVE_CACHE": str(tmp_path / "head-cache")}
            with open(tmp_path / "driver.log", "wb") as log:
                driver = subprocess.Popen([str(BIN / "evolve"), "run", "--config", str(tmp_path / "run.yaml"),
                                           "--run-dir", s3_uri, "--serve-port", str(free_port())],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                # The middle of round 0: its weights trained, the student being judged.
                until(lambda: (run / "verdicts" / "judge_000.json").exists() or driver.poll() is not None, 300)
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
                cluster.kill("train")
                cluster.start("train-2", 1, {"train": 2})
                assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-4000:]
            placed = where_parts_ran(cluster)
            billed = sum(s["images"] for s in servers.stats().values())
    finally:
        cluster.stop()

    # By resource: the workers on the training node and, after it died, on its
    # replacement (Ray Train's new worker group); the judge on the judge node;
    # the gateways and the feed beside the driver.
    assert [p.split(":")[0] for p in placed["train"]] == ["train", "train"], placed
    assert [p.split(":")[0] for p in placed["judge"]] == ["judge"], placed
    assert placed["gateways"] == placed["feed"] == ["head"], placed
    report = json.loads((run / "report.json").read_text())
    assert report["stopped"] == "rounds" and [r["round"] for r in report["rounds"]] == [0]
    assert json.loads((run / "rounds" / "final_v0001.json").read_text())["version"] == 1
    assert_consistent(folder)
    assert len(Ledger(folder.ledger)) == billed > 0
    # What the nodes shared went through the store, not the driver's disk.
    assert not any((run / p).exists() for p in ("images", "features", "datasets", "ray_train")), list(run.iterdir())
    store = Storage.at(s3_uri)
    assert all(store.committed(f"checkpoints/{c}") for c in ("round_000", "final"))
    assert any(p.endswith(".safetensors") for p in store.walk("ray_train"))  # Ray Train's checkpoints
    # A driver on a new head (its disk empty) gets the run back from the store.
    new = RunFolder(s3_uri, work=tmp_path / "new-head")
    assert new.pull_state() > 0 and new.first_unfinished_round() == 1
    assert json.loads(new.report.read_text())["stopped"] == "rounds"
    new.attach_ledger()  # restored from its mirror
    assert len(Ledger(new.ledger)) == billed


def until(cond, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.3)


def where_parts_ran(cluster: LocalCluster) -> dict[str, list[str]]:
    """Per part, the nodes its actors ran on (dead or alive; each node named by
    the resource its type has), from the state API: the training workers, the
    judge's replica, the teacher gateways and the trainer feed."""
    kind = {n["node_id"]: "head" if n.get("is_head_node") else next(
        (r for r in ("train", "judge") if r in n.get("resources_total", {})), "other") + ":" + n["node_id"][:6]
        for n in cluster.state("nodes")}
    seen: dict[str, set[str]] = {"train": set(), "judge": set(), "gateways": set(), "feed": set()}
    for a in cluster.state("actors"):
        name = a.get("name") or ""
        part = ("train" if a["class_name"] == "RayTrainWorker" else
                "judge" if a["class_name"].startswith("ServeReplica:judge") else
                "gateways" if name.startswith("teacher:") else "feed" if name.startswith("trainer-feed:") else None)
        if part:
            seen[part].add(kind.get(a["node_id"], "unknown"))
    return {k: sorted(v) for k, v in seen.items()}
