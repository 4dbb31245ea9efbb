"""What a local run listens on, sampled while it runs (tests/test_end_to_end.py).

`ListeningSockets` is a thread that, every 0.5 s, reads the LISTEN sockets of
this process, its children and the processes of this driver's Ray session
(Ray's own processes of a local instance, the workers, Serve's proxy and
replicas, the training workers), with each socket's owner. `check()` then
asserts that each is on 127.0.0.1 / ::1 (or ::ffff:127.x), with one named
exception, below, and that the training workers' and the judge replica's own
sockets were seen, so that it cannot pass with nothing up.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from evolve.ray_env import is_loopback, loopback_interface


def owner_name(proc) -> str:
    """`ray::RayTrainWorker`, `raylet`, `gcs_server`, `dashboard.py`, ... (its cmdline, shortened).
    A Ray worker is `ray::IDLE` until it runs an actor: ask again later."""
    import psutil

    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    parts = cmd if len(cmd) > 1 else " ".join(cmd).split()  # a set proctitle is one string
    if not parts:
        return "?"
    if parts[0].startswith("ray::"):
        return parts[0]
    script = next((c for c in parts[1:] if c.endswith(".py")), None)
    return Path(script or parts[0]).name


def is_replica(owner: str, app: str = "") -> bool:
    """A Serve replica's process: titled `ray::ServeReplica:<app>:<deployment>` (while its
    constructor runs, `ray::SERVE_REPLICA::<app>#...:ServeReplica:<app>:...__init__`)."""
    return owner.startswith("ray::") and f"ServeReplica:{app}" in owner


def replica_grpc_ports() -> dict[int, int]:
    """Each live Serve replica's inter-deployment gRPC port by its pid, read in the
    replica itself (__ray_call__ runs a function on an actor's instance):
    Replica._internal_grpc_port, set at ray/serve/_private/replica.py:1835. A
    replica still starting does not answer within the timeout: asked again later."""
    import ray

    ports = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::"):
            with contextlib.suppress(Exception):  # starting, or gone meanwhile
                replica = ray.get_actor(a["name"], namespace=a["namespace"])
                pid, port = ray.get(replica.__ray_call__.remote(
                    lambda r: (os.getpid(), r._replica_impl._internal_grpc_port)), timeout=2)
                ports[int(pid)] = int(port)
    return ports


class ListeningSockets(threading.Thread):
    """`with ListeningSockets() as sockets: <run>`, then `sockets.check()`."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(name="listening-sockets", daemon=True)
        self.every_s, self.stopped = every_s, threading.Event()
        self.seen: dict[tuple[str, int, int], str] = {}  # (ip, port, pid) -> owner
        self.most: dict[int, int] = {}  # pid -> most sockets seen at once
        self.gloo_if: dict[int, str | None] = {}  # each training worker's GLOO_SOCKET_IFNAME, as it started
        self.grpc_ports: dict[int, int] = {}  # a Serve replica's pid -> its gRPC port

    def __enter__(self) -> "ListeningSockets":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.join(30)

    def run(self) -> None:
        import psutil
        import ray

        session = ray._private.worker.global_worker.node.session_name  # this driver's local instance
        me = psutil.Process(os.getpid())
        names: dict[int, str] = {}
        while not self.stopped.wait(self.every_s):
            tree = {p.pid: p for p in [me, *me.children(recursive=True)]}
            for p in psutil.process_iter(["cmdline"]):  # the session's processes that left the tree
                if p.pid not in tree and session in " ".join(p.info["cmdline"] or ()):
                    tree[p.pid] = p
            count: dict[int, int] = {}
            for c in psutil.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.pid in tree:
                    count[c.pid] = count.get(c.pid, 0) + 1
                    name = owner_name(tree[c.pid])  # its latest title (`ray::IDLE` until an actor runs)
                    if name != "?" or c.pid not in names:
                        names[c.pid] = name
                    self.seen[(c.laddr.ip, c.laddr.port, c.pid)] = names[c.pid]
            for pid, n in count.items():
                self.most[pid] = max(self.most.get(pid, 0), n)
                if names[pid].startswith("ray::RayTrainWorker") and pid not in self.gloo_if:
                    with contextlib.suppress(psutil.Error):
                        self.gloo_if[pid] = tree[pid].environ().get("GLOO_SOCKET_IFNAME")
            if {pid for pid, name in names.items() if is_replica(name)} - self.grpc_ports.keys():
                self.grpc_ports |= replica_grpc_ports()  # a new replica: its port, asked while it is up

    def table(self) -> str:
        return "\n".join(f"  {ip}:{port} pid={pid} {owner}" for (ip, port, pid), owner in sorted(self.seen.items()))

    def check(self) -> None:
        def tolerated(ip: str, port: int, pid: int, owner: str) -> bool:
            # Ray 2.60 Serve: every replica starts its inter-deployment gRPC server on
            # all interfaces, hard-coded, with no setting to change it:
            #   ray/serve/_private/replica.py:1835 (ReplicaActor._on_initialized)
            #   self._internal_grpc_port = add_port_to_grpc_server(self._server, "[::]:0")
            # (ray-project/ray#64544). Allowed only as exactly that: a Serve replica,
            # on "::", on the port it reports.
            return is_replica(owner) and ip == "::" and self.grpc_ports.get(pid) == port

        table = self.table()
        exposed = [(ip, port, pid, owner) for (ip, port, pid), owner in self.seen.items()
                   if not is_loopback(ip) and not tolerated(ip, port, pid, owner)]
        assert not exposed, f"sockets not on loopback: {exposed}\nall:\n{table}"
        # Not vacuous: the judge's replica and both DDP workers were up while sampled.
        owners = {pid: owner for (_, _, pid), owner in self.seen.items()}
        assert any(is_replica(o, "judge") for o in owners.values()), table
        workers = {pid: self.most[pid] for pid, o in owners.items() if o.startswith("ray::RayTrainWorker")}
        # each: its core worker's gRPC server and gloo's listener; rank 0 also the rendezvous store
        assert len([n for n in workers.values() if n >= 2]) >= 2 and max(workers.values(), default=0) >= 3, (
            workers, table)
        # gloo listens where GLOO_SOCKET_IFNAME says, else on the address the hostname resolves
        # to: loopback here (/etc/hosts), a LAN address on many laptops. So check the setting too.
        assert self.gloo_if and set(self.gloo_if.values()) == {loopback_interface()}, self.gloo_if
