"""The one place that picks a world by name (the interface: evolve/world.py).

A world's package is imported here and nowhere else in `evolve/`, and only
when the configuration names it."""

from __future__ import annotations

from evolve.config import ShapesWorldConfig, WorldConfig
from evolve.world import World


def make_world(cfg: WorldConfig) -> World:
    """The world `cfg.kind` names (its package is imported here, and only here)."""
    if cfg.kind == "shapes":
        from evolve.shapes.world import ShapesWorld

        return ShapesWorld(cfg)
    if cfg.kind == "prompts":
        from evolve.prompts.world import PromptsWorld

        return PromptsWorld(cfg)
    raise ValueError(f"unknown world kind {cfg.kind!r}; expected 'shapes' or 'prompts'")


def shapes_canonical(text: str) -> str:
    """The shapes grammar's form of `text` (ValueError outside it): for the
    judge's and Edgen's `grammar_check`, which screen with the shapes world
    whatever world the caller is in."""
    return make_world(ShapesWorldConfig()).canonical(text)
