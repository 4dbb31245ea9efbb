"""A dataset version as the trainer reads it: a Ray Dataset of its rows.

A pixel student's rows are {"prompt", "image" (PNG bytes, read from the image
store by Ray Data tasks)}; a latent student's are its precomputed features
(`latent_dataset`: encoded on the way where missing)."""

from __future__ import annotations

import numpy as np

from evolve.dataset import Record
from evolve.store import ImageStore


def version_dataset(cfg, folder, records: list[Record]):
    """`cfg`: the RunConfig; `folder`: its RunFolder."""
    import ray

    store_root = str(folder.images)
    rows = [{"prompt": r.prompt, "image_ref": r.image_ref} for r in records]
    if cfg.student.is_latent:
        from evolve.student.encoders import latent_dataset

        ds = latent_dataset(rows, str(folder.features), store_root, cfg.student.encoders,
                            min_blocks=cfg.train.num_workers, in_memory=cfg.train.features_in_memory)
        ds.context.enable_progress_bars = False
        return ds

    def load(batch: dict) -> dict:
        store = ImageStore(store_root)
        return {"prompt": batch["prompt"], "image": np.array([store.get(r) for r in batch["image_ref"]], dtype=object)}

    # A sliver of CPU per Data task: with 2 CPUs the train workers' share plus
    # the actors leave less than one whole CPU, and a 1-CPU Data task would wait forever.
    ds = ray.data.from_items(rows).map_batches(load, batch_format="numpy", num_cpus=0.25)
    # Workers read a shard in one go; an open progress bar there would only
    # repeat itself in the logs for as long as the shard is in use.
    ds.context.enable_progress_bars = False
    return ds
