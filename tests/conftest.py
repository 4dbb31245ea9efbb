"""Shared fixtures. Ray starts once per test session, on loopback only."""

from __future__ import annotations

import os

import pytest

# Keep Ray on 127.0.0.1, off the network, and without token auth (see
# ../shared/specs/ray-on-this-machine.md). Set before ray is imported anywhere.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for all integration tests (~5 s to start)."""
    import ray

    from evolve.ray_env import local_worker_env

    if not ray.is_initialized():
        # As evolve.ray_env.connect starts a local instance: torch's collectives on loopback.
        for k, v in local_worker_env().items():
            os.environ.setdefault(k, v)
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
