"""Connecting to Ray the way this project needs: loopback only, no usage stats."""

from __future__ import annotations

import functools
import ipaddress
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


def loopback_interface() -> str | None:
    """The loopback interface's name: "lo" (Linux), "lo0" (macOS), else None."""
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def local_worker_env() -> dict[str, str]:
    """Env vars that keep torch's collective libraries on loopback: for a run
    whose workers are all on this machine, never for a cluster (its NIC differs).

    gloo's device listens on the address this machine's hostname resolves to
    (a LAN address on many laptops) unless GLOO_SOCKET_IFNAME names an interface
    (torch/csrc/distributed/c10d/ProcessGroupGloo.cpp, createDefaultDevice;
    https://pytorch.org/docs/stable/distributed.html#choosing-the-network-interface-to-use).
    NCCL's bootstrap (a GPU laptop) and TensorPipe take NCCL_/TP_SOCKET_IFNAME."""
    lo = loopback_interface()
    return {k: lo for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")} if lo else {}


def is_loopback(addr: str) -> bool:
    """Whether an address (IPv4, IPv6 with or without %scope, IPv4-mapped IPv6,
    or "localhost") is this machine's loopback."""
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return addr == "localhost"
    return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback


# -- the DDP rendezvous on loopback (Ray Train's TorchTrainer) ------------------------------
# torch's TCPStore server (the env:// rendezvous rank 0 hosts at MASTER_PORT) listens on
# every interface whatever host it is given: TCPStoreLibUvBackend.cpp (UvTcpServer::
# makeWithPort binds "::" or "0.0.0.0"), and the legacy backend likewise; no setting
# changes it. It does listen on a socket handed to it (`master_listen_fd`), and a
# multi-tenant store reuses the server already started in its process on that port
# (TCPStore.cpp, TCPServer::start), which is what init_process_group's store is
# (torch/distributed/rendezvous.py, _create_c10d_store). So rank 0 first starts a
# store on a socket bound to its loopback node address, and Ray's usual process-group
# set-up (ray/train/torch/config.py, _TorchBackend.on_start) then runs on that port.

def train_torch_config():
    """`TorchTrainer(..., torch_config=train_torch_config())`: Ray's TorchConfig,
    except that where rank 0's node address is loopback (a private local
    instance: every worker is on this machine) the rendezvous store and gloo
    listen on loopback only. A cluster's nodes have real addresses and get
    Ray's set-up unchanged."""
    return _torch_classes()["LoopbackTorchConfig"]()


def __getattr__(name: str):
    # The classes subclass Ray Train's torch backend, which imports torch: built
    # on first use, not when the CLI imports this module. Reached through the
    # module, they pickle by reference (the TrainController unpickles the config).
    if name in ("LoopbackTorchConfig", "LoopbackTorchBackend"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _torch_classes() -> dict:
    import ray
    import torch.distributed as dist
    from ray.train._internal.utils import get_address_and_port
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import (
        TorchConfig,
        _set_torch_distributed_env_vars,
        _setup_torch_process_group,
        _TorchBackend,
    )

    class LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            backend = backend_config.backend  # TorchTrainer has set it (gloo on CPUs, nccl on GPUs)
            addr, _ = worker_group.execute_single(0, get_address_and_port)
            if not dist.is_available() or backend in (None, "tpu_dist") or not is_loopback(addr):
                return super().on_start(worker_group, backend_config)
            # As _TorchBackend.on_start does for init_method "env", but on the port
            # of the loopback store that rank 0 hosts first.
            port = worker_group.execute_single(0, _host_loopback_store, addr)
            worker_group.execute(_set_loopback_env, addr, port)
            if not isinstance(worker_group, V1WorkerGroup):
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get([worker_group.execute_single_async(
                i, _setup_torch_process_group, backend=backend, world_rank=i, world_size=len(worker_group),
                init_method="env://", timeout_s=backend_config.timeout_s) for i in range(len(worker_group))])

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    for cls in (LoopbackTorchBackend, LoopbackTorchConfig):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"LoopbackTorchBackend": LoopbackTorchBackend, "LoopbackTorchConfig": LoopbackTorchConfig}


_rendezvous_store = None  # rank 0's: torch caches the server weakly, this keeps it up


def _host_loopback_store(addr: str) -> int:
    """On rank 0: a TCPStore server listening on `addr` (loopback) alone; its port."""
    global _rendezvous_store
    from datetime import timedelta

    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _rendezvous_store = dist.TCPStore(addr, port, None, True, timedelta(seconds=300), wait_for_workers=False,
                                      multi_tenant=True, master_listen_fd=sock.detach(),
                                      use_libuv=os.environ.get("USE_LIBUV", "1") == "1")
    return port


def _set_loopback_env(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    for k, v in local_worker_env().items():  # all ranks are on this machine: gloo on loopback too
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
        # Every worker is on this machine: torch's collectives (the training
        # workers' gloo) listen on the loopback interface, not the hostname's address.
        for k, v in local_worker_env().items():
            os.environ.setdefault(k, v)
        # An explicit port is not retried elsewhere (ray/_private/services.py
        # start_api_server): if it was taken meanwhile, init fails instead of
        # leaving the variable pointing at someone else's dashboard.
        _context = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                            dashboard_host="127.0.0.1", dashboard_port=port, _node_ip_address="127.0.0.1")
    return ray
