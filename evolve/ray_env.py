"""Connecting to Ray the way this project needs: loopback only, no usage stats."""

from __future__ import annotations

import os
import socket

# Without these Ray binds the eth0 address, phones home, and switches to token
# auth that later CLI calls trip over (see the project's notes on Ray 2.60).
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a Serve or teacher server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_ray_env() -> None:
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


def connect(num_cpus: int | None = None):
    """Join the cluster this process was submitted to (RAY_ADDRESS, set by
    `ray job submit`), else start a private local instance on 127.0.0.1."""
    set_ray_env()
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # The dashboard (127.0.0.1:8265) shows the teacher actors, the judge and
        # training; Train's state API needs it too.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")
    return ray
