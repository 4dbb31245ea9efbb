"""A base student: what PixArt-alpha is to the paper's Edgen.

`evolve pretrain-base` trains one with the project's own Ray Train path on a
world's base curriculum (`World.replay_rows`; the shapes world's renders every
prompt of the categories that teach drawing, and leaves the compositional
skills for the teachers and the loop). It is seeded and resumable: run it
again with the same --work-dir and it continues from its last checkpoint.
`export_base` writes a shippable checkpoint: EMA weights only, in float16.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


from evolve.config import StudentConfig, TrainConfig
from evolve.dataset import atomic_dir
from evolve.world import World


def pretrain_base(work_dir: Path, world: World, *, student_cfg: StudentConfig, train_cfg: TrainConfig,
                  steps: int, per_prompt: int, seed: int = 0) -> str:
    """Train (or resume) the base run under work_dir; returns the final checkpoint folder."""
    import ray

    from evolve.student.train import fit_student

    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    # The curriculum is the whole dataset here: nothing to replay it against.
    train_cfg = train_cfg.model_copy(update={"replay_fraction": 0.0})
    spec = {"student": student_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json"),
            "steps": steps, "per_prompt": per_prompt, "seed": seed}
    spec_path = work_dir / "pretrain.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != json.loads(json.dumps(spec)):
        # Same folder, other settings: resuming would mix two runs.
        raise ValueError(f"{work_dir} holds a base run with other settings; use another --work-dir")
    spec_path.write_text(json.dumps(spec, indent=2))
    rows = world.replay_rows(per_prompt, student_cfg.image_size, seed)
    if not rows:
        raise ValueError(f"the {world.name} world has no base curriculum to pretrain on")
    if student_cfg.vocabulary is None and not student_cfg.is_latent:
        student_cfg = student_cfg.model_copy(update={"vocabulary": tuple(world.vocabulary() or ())})
    ds = ray.data.from_items(rows)
    return fit_student(ds, student_cfg=student_cfg, train_cfg=train_cfg, steps=steps,
                       storage_path=str(work_dir / "ray_train"), name="base",
                       init_checkpoint=None, out_dir=str(work_dir / "final"))


def export_base(checkpoint: Path, out: Path) -> str:
    """Ship a checkpoint: config, tokenizer, EMA weights as float16 model weights.
    Returns the sha256 of the weights file (recorded in the model card and tests)."""
    import torch
    from safetensors.torch import load_file, save_file

    from evolve.student.model import EMA_NAME, WEIGHTS_NAME

    checkpoint, out = Path(checkpoint), Path(out)
    src = checkpoint / EMA_NAME if (checkpoint / EMA_NAME).exists() else checkpoint / WEIGHTS_NAME
    sd = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v
          for k, v in load_file(str(src)).items()}
    with atomic_dir(out) as tmp:
        tmp.mkdir(parents=True)
        for name in ("config.json", "tokenizer.json"):
            if (checkpoint / name).exists():
                shutil.copy(checkpoint / name, tmp / name)
        save_file(sd, str(tmp / WEIGHTS_NAME))
        digest = hashlib.sha256((tmp / WEIGHTS_NAME).read_bytes()).hexdigest()
    return digest


def sample_check(checkpoint: Path, world: World) -> dict:
    """Held-out score of a checkpoint by the world's exact scorer (the model card's figures)."""
    from evolve.config import SampleConfig
    from evolve.images import to_png
    from evolve.student.generate import generate_images

    items = world.heldout()
    imgs = generate_images(str(checkpoint), [h.prompt for h in items], [h.seed for h in items], SampleConfig())
    return world.score([h.prompt for h in items], [to_png(i) for i in imgs])
