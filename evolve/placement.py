"""What each part of a run asks the cluster for, and whether any node can give it.

Ray queues a task, actor or Serve replica that no node can hold and waits
for a node that never comes: a run whose config asks for a `train` resource on
a cluster without one would hang at its first fit(). `check_placement` is
asked before anything starts, with the node types the cluster has or can
launch, and names the part and the resource that cannot be placed.

Ray-free: what the parts ask for and the cluster's node types come from
evolve/cluster.py, which builds the parts.
"""

from __future__ import annotations

from dataclasses import dataclass

class PlacementError(ValueError):
    """A part of the run asks for resources no node type offers."""


@dataclass(frozen=True)
class Ask:
    part: str                  # who asks, as the error names it
    bundle: dict[str, float]   # what one of them needs on one node
    count: int = 1


def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def check_placement(wanted: list[Ask], node_types: dict[str, dict[str, float]]) -> None:
    """Raise PlacementError unless each bundle fits whole on some node type.
    `node_types`: name -> resources of the nodes the cluster has or can launch."""
    problems = []
    for ask in wanted:
        if any(fits(ask.bundle, node) for node in node_types.values()):
            continue
        missing = {k: v for k, v in ask.bundle.items()
                   if v > 0 and not any(node.get(k, 0.0) >= v for node in node_types.values())}
        if missing:
            why = "; ".join(f"{k!r} {v:g}: " + (f"the most a node type offers is {top:g}" if (top := max(
                (node.get(k, 0.0) for node in node_types.values()), default=0.0)) else "no node type offers it")
                for k, v in missing.items())
        else:
            why = "each resource is on some node type, but none has them all"
        problems.append(f"{ask.part} asks for {_fmt(ask.bundle)}" + (f" x{ask.count}" if ask.count > 1 else "")
                        + f" on one node: {why}")
    if problems:
        types = "; ".join(f"{name}: {_fmt(_plain(r))}" for name, r in node_types.items())
        raise PlacementError("this cluster cannot place the run:\n  - " + "\n  - ".join(problems)
                             + f"\n(its node types: {types})")


def _plain(resources: dict[str, float]) -> dict[str, float]:
    """Resources without Ray's per-node bookkeeping (node:<ip>, memory...)."""
    return {k: v for k, v in resources.items()
            if not k.startswith(("node:", "accelerator_type:")) and k not in ("memory", "object_store_memory")}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
