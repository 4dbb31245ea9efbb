"""The student: a small text-to-image diffusion model trained with Ray Train.

    from evolve.student import Student, sample, generate_images, fit_student

- `model.Student`: text encoder + pixel-space denoiser (diffusers UNet2DConditionModel
  by default, PixArtTransformer2DModel with arch="pixart"); save_pretrained /
  from_pretrained (EMA weights by default).
- `model.LatentStudent`: PixArt-alpha's set-up, a denoiser over VAE latents
  attending to frozen T5 captions (`encoders`: VAE + T5, features precomputed).
- `diffusion`: training loss, classifier-free guidance, DPM-Solver++ sampling, EMA.
- `train`: the Ray Train V2 worker loop and `fit_student`.
- `generate.generate_images(checkpoint_dir, prompts, seeds, sample_cfg)`.
"""

from evolve.student.diffusion import EMA, sample, training_loss
from evolve.student.generate import generate_images, load_student
from evolve.student.model import LatentStudent, Student, build_student, load_pretrained
from evolve.student.train import fit_student, train_loop_per_worker

__all__ = ["EMA", "LatentStudent", "Student", "build_student", "load_pretrained", "fit_student", "generate_images", "load_student", "sample",
           "train_loop_per_worker", "training_loss"]
