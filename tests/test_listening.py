"""Nothing listens beyond what it must.

A local run listens on loopback only: checked while the end-to-end run is up
(tests/test_end_to_end.py, with tests/listening.py's sampler: Serve's proxy
and the judge's replica, the embedded teachers' HTTP host, Edgen, the 2-worker
Ray Train run over DDP/gloo). Here: on a cluster nothing is forced onto loopback.
"""

from __future__ import annotations

import os

from evolve.ray_env import is_loopback


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.3.2.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "fe80::1%eth0"])) and is_loopback("localhost")


# --------------------------------------------------------------------------- on a cluster: nothing forced


def test_connect_to_a_cluster_sets_no_loopback_interface(monkeypatch):
    """With RAY_ADDRESS (a job on a cluster) connect() joins it and leaves the
    collectives' interfaces alone: a cluster's NIC is not lo."""
    import ray

    from evolve import ray_env

    inits = []
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    for k in ray_env.local_worker_env():
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw))
    monkeypatch.setattr(ray_env, "_context", None)
    ray_env.connect()
    assert inits == [{"address": "10.1.2.3:6379", "log_to_driver": True}]
    assert not set(ray_env.local_worker_env()) & set(os.environ)


def test_on_a_cluster_the_torch_backend_is_rays_own(monkeypatch):
    """train_torch_config()'s backend hosts the rendezvous itself only where rank 0's
    node address is loopback; with a real node address it is Ray's _TorchBackend."""
    from ray.train.torch.config import _TorchBackend

    from evolve.ray_env import train_torch_config

    calls = []
    monkeypatch.setattr(_TorchBackend, "on_start", lambda self, group, cfg: calls.append("ray's"))

    class Group:  # rank 0 on a cluster node
        def execute_single(self, rank, fn, *args, **kwargs):
            assert rank == 0 and fn.__name__ == "get_address_and_port"
            return "10.1.2.3", 29500

    cfg = train_torch_config()
    cfg.backend = "gloo"  # as TorchTrainer sets it
    cfg.backend_cls().on_start(Group(), cfg)
    assert calls == ["ray's"]

