"""A dataset version as the trainer reads it: a lazy Ray Dataset over the
version's Parquet file in the run folder, streamed to the training workers.

Nothing is read in the driver: a Ray task reads the version's records, and
Ray Data's tasks load each record's image from the image store (a pixel student's rows
are {"prompt", "image": PNG bytes}) or, for a latent student, its
precomputed features (`latent_rows`, encoded on the way where missing), on
whichever nodes have room. `streaming_shards` deals one version out to the
training workers with `Dataset.streaming_split`: a SplitCoordinator actor on
the driver's node runs the pipeline and hands each worker its rows as they
are produced."""

from __future__ import annotations

import numpy as np

from evolve.dataset import DatasetVersions
from evolve.store import ImageStore

# A sliver of CPU per Data task: with 2 CPUs the train workers' share plus
# the actors leave less than one whole CPU, and a 1-CPU Data task would wait forever.
DATA_TASK_CPUS = 0.25


ROWS_PER_BLOCK = 1024  # records per Ray Data block: the unit a task loads images for


class VersionRecords:
    """A Ray Data datasource: a version's records (prompt, image_ref), its
    first `pad` rows once more at the end, in blocks of ROWS_PER_BLOCK. The
    read tasks read the Parquet file (each its own slice); the driver plans
    them from the manifest's record count without reading anything."""

    def __new__(cls, filesystem, path: str, num_records: int, pad: int):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        class _VersionRecords(Datasource):
            def estimate_inmemory_data_size(self):
                return (num_records + pad) * 100  # a prompt and a 64-digit hash

            def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
                n = num_records + pad
                blocks = max(1, -(-n // ROWS_PER_BLOCK))
                step = -(-n // blocks)
                spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
                return [ReadTask(lambda lo=lo, hi=hi: [_read_rows(filesystem, path, num_records, lo, hi)],
                                 BlockMetadata(num_rows=hi - lo, size_bytes=None, input_files=[path],
                                               exec_stats=None)) for lo, hi in spans]

        return _VersionRecords()


def _read_rows(filesystem, path: str, num_records: int, lo: int, hi: int):
    """Rows lo..hi of the version's records (`path` in the pyarrow `filesystem`:
    local, or the run folder's object store), past its end wrapping to its start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["prompt", "image_ref"], filesystem=filesystem)
    parts = [t.slice(lo, max(0, min(hi, num_records) - lo))]
    if hi > num_records:
        parts.append(t.slice(max(lo, num_records) - num_records, hi - max(lo, num_records)))
    return pa.concat_tables(parts)


def version_dataset(cfg, folder, version: int, num_records: int, pad: int = 0):
    """Version `version` of the run in `folder` (a RunFolder; `cfg` its
    RunConfig; `num_records` rows, from its manifest) as the rows a worker
    trains on; `pad`: its first rows that many times again at the end. Lazy:
    iterating it reads the records and loads their images (or features)."""
    import ray

    filesystem, path = DatasetVersions(folder.datasets).parquet_source(version)
    # Our own datasource, not read_parquet: Ray 2.60's Parquet readers list or
    # inspect the files in tasks of a whole CPU, which on 2 CPUs beside the
    # trainers wait forever; these read tasks take the CPU share asked for.
    ds = ray.data.read_datasource(VersionRecords(filesystem, path, num_records, pad), num_cpus=DATA_TASK_CPUS)
    # Workers read their rows in one go; an open progress bar would only repeat
    # itself in the logs for as long as the version is trained on.
    ds.context.enable_progress_bars = False
    store_root = str(folder.images)
    if cfg.student.is_latent:
        from evolve.student.encoders import latent_rows

        return latent_rows(ds, str(folder.features), store_root, cfg.student.encoders,
                           num_cpus=DATA_TASK_CPUS, in_memory=cfg.train.features_in_memory)

    def load(batch: dict) -> dict:
        store = ImageStore(store_root)
        return {"prompt": batch["prompt"], "image": np.array([store.get(r) for r in batch["image_ref"]], dtype=object)}

    return ds.map_batches(load, batch_format="numpy", num_cpus=DATA_TASK_CPUS)


def streaming_shards(cfg, folder, version: int, num_records: int) -> list:
    """One DataIterator per training worker over version `version`
    (`num_records` rows, from its manifest), every row dealt to some worker.

    `streaming_split(equal=True)` gives each worker the same number of rows
    (DDP steps in lockstep) and leaves out the remainder: the first
    `-num_records % n` rows are appended once more so that nothing is left
    out. Each worker reads its iterator once per version (all together, at
    the same step boundary: the split's epochs are collective); a worker
    group that Ray Train restarts reads it again, together, as a new epoch."""
    n = cfg.train.num_workers
    if num_records < n:
        raise ValueError(f"dataset version {version} has {num_records} records for {n} training workers")
    # Padded before the images and features are read: the pipeline runs once.
    return version_dataset(cfg, folder, version, num_records, pad=-num_records % n).streaming_split(n, equal=True)
