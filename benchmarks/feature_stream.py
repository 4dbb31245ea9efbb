"""Streamed features at PixArt-alpha's size: can the trainer read each batch's
latents and captions from the FeatureStore as fast as a GPU steps?

    python benchmarks/feature_stream.py [--rows 512] [--batch 32] [--step-s 0.32 0.1]

Writes `--rows` synthetic features of the real shapes (512 px: latent
4 x 64 x 64, caption 120 x 4096, float16, ~1 MB a row) into a FeatureStore
in a temporary folder (`--dir` to put it on another disk), then:
1. reads batches with `load_features` alone: s per batch, MB/s;
2. runs `Batches` (train.features_in_memory off: the next batch loads in a
   thread) against a stand-in step of `--step-s` seconds (sleep, so the CPU is
   free for the reader, as while a GPU computes): the stall fraction is
   the time the step waited for data over the loop's time.
The page cache is warm (the files were just written): this is the reader's
own cost, not a cold disk's.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evolve.config import StudentConfig
from evolve.student.encoders import FeatureStore, load_features
from evolve.student.train import Batches


def write_features(root: Path, rows: int, scfg: StudentConfig) -> list[tuple[str, str]]:
    store, rng = FeatureStore(root), np.random.default_rng(0)
    h = scfg.sample_size
    out = []
    for i in range(rows):
        ref, prompt = hashlib.sha256(str(i).encode()).hexdigest(), f"prompt number {i}"
        store.put_latent(ref, rng.standard_normal((scfg.latent_channels, h, h), np.float32).astype(np.float16))
        store.put_text(prompt, rng.standard_normal((scfg.max_tokens, scfg.caption_channels), np.float32)
                       .astype(np.float16), np.ones(scfg.max_tokens, bool))
        out.append((prompt, ref))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--step-s", type=float, nargs="+", default=[0.32, 0.1],
                    help="stand-in step times (0.32: PixArt-alpha XL/2 512 px, batch 32, compiled, one H100)")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    scfg = StudentConfig.pixart_alpha_xl2(512)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "features"
        t0 = time.perf_counter()
        rows = write_features(root, args.rows, scfg)
        mb_row = sum(f.stat().st_size for f in root.rglob("*.np*")) / args.rows / 1e6
        print(f"{args.rows} rows of PixArt-alpha 512 px features, {mb_row:.2f} MB a row, "
              f"written in {time.perf_counter() - t0:.1f} s")

        rng = random.Random(0)
        times = []
        for _ in range(args.batches):
            pick = rng.sample(rows, args.batch)
            batch = {"prompt": np.array([p for p, _ in pick], dtype=object),
                     "image_ref": np.array([r for _, r in pick], dtype=object)}
            t = time.perf_counter()
            load_features(batch, str(root))
            times.append(time.perf_counter() - t)
        read = float(np.median(times))
        print(f"load_features, batch {args.batch}: {read:.3f} s a batch (median of {args.batches}), "
              f"{mb_row * args.batch / read:.0f} MB/s")

        shard = {"n": len(rows), "prompts": [p for p, _ in rows], "image_refs": [r for _, r in rows]}
        for step_s in args.step_s:
            feeder = Batches(None, scfg, 0.1, args.batch, torch.device("cpu"), torch.Generator().manual_seed(0),
                             random.Random(0), features=str(root))
            feeder.null = (torch.zeros(scfg.max_tokens, scfg.caption_channels),
                           torch.zeros(scfg.max_tokens, dtype=torch.bool))
            feeder.use(shard)
            t = time.perf_counter()
            for _ in range(args.batches):
                feeder.next()
                time.sleep(step_s)  # the GPU's step: the reader thread has the CPU meanwhile
            total = time.perf_counter() - t
            print(f"streamed Batches, step {step_s:.2f} s: stall {feeder.seconds / total:.1%} of the loop "
                  f"({feeder.seconds / args.batches:.3f} s a batch waiting or assembling)")


if __name__ == "__main__":
    main()
