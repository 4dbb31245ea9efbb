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


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's own check does (start_api_server)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


_context = None  # what ray.init returned: dashboard URL, session folder


def session_logs() -> str | None:
    """The folder of every Ray process's own log files (this session's)."""
    info = getattr(_context, "address_info", None) or {}
    return os.path.join(info["session_dir"], "logs") if info.get("session_dir") else None


def dashboard_url() -> str | None:
    return f"http://{_context.dashboard_url}" if getattr(_context, "dashboard_url", None) else None


def set_ray_env() -> None:
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


def connect(num_cpus: int | None = None):
    """Join the cluster this process was submitted to (RAY_ADDRESS, set by
    `ray job submit`), else start a private local instance on 127.0.0.1."""
    global _context
    set_ray_env()
    import ray

    if ray.is_initialized():
        return ray
    if os.environ.get("RAY_ADDRESS"):
        _context = ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # The dashboard (127.0.0.1:8265, or a free port if that is taken) shows the
        # teacher actors, the judge and training; Train's state API needs it too.
        port = 8265 if _port_free(8265) else free_port()
        # Ray Train's PlacementGroupCleaner (a detached actor) asks the state API
        # every second whether the controller lives, without an address: the API
        # then guesses one (RAY_ADDRESS, /tmp/ray/ray_current_cluster, running GCS
        # processes; ray/_private/services.py). A private instance is none of them:
        # a stale file (`ray start` killed without `ray stop`) ends its thread with
        # "Timed out while waiting for GCS" after 40 s, two live instances with
        # "Found multiple active Ray instances", and another live head's file makes
        # it think the controller is dead and remove the run's placement group.
        # Workers of a local instance inherit this environment.
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # An explicit port is not retried elsewhere (ray/_private/services.py
        # start_api_server): if it was taken meanwhile, init fails instead of
        # leaving the variable pointing at someone else's dashboard.
        _context = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                            dashboard_host="127.0.0.1", dashboard_port=port, _node_ip_address="127.0.0.1")
    return ray
