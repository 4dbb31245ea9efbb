"""The latent student (PixArt-alpha's set-up) at tiny size: config checks, the
module, its checkpoints, sampling through the VAE, importing PixArt weights.
A whole latent run is submitted as a Ray job in tests/test_job_submit.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny encoders only: nothing may reach a hub

from evolve.config import EncoderConfig, RunConfig, SampleConfig, StudentConfig, TrainConfig  # noqa: E402
from evolve.student.diffusion import make_noise_scheduler, sample, training_loss  # noqa: E402
from evolve.student.model import LatentStudent, Student, build_student, denoise, load_pretrained  # noqa: E402

# /2 tiny VAE: 32 px images are 16x16x4 latents, 64 patch tokens at patch 2.
ENC = EncoderConfig(max_tokens=12, tiny_vae_channels=(8, 16), batch_size=8)
CFG = StudentConfig(arch="pixart", image_size=32, latent_channels=4, vae_scale=2, caption_channels=32,
                    max_tokens=12, hidden_size=32, num_layers=2, num_heads=2, patch_size=2, encoders=ENC)


def test_config_ties_the_student_to_its_encoders():
    assert CFG.is_latent and (CFG.in_channels, CFG.sample_size) == (4, 16)
    assert StudentConfig.model_validate_json(CFG.model_dump_json()) == CFG  # round-trips
    with pytest.raises(ValidationError, match="needs `encoders`"):
        StudentConfig(**{**CFG.model_dump(), "encoders": None})
    with pytest.raises(ValidationError, match="vae_scale"):
        StudentConfig(**{**CFG.model_dump(), "vae_scale": 8})
    with pytest.raises(ValidationError, match="caption_channels"):
        StudentConfig(**{**CFG.model_dump(), "caption_channels": 64})
    with pytest.raises(ValidationError, match="are for latent students"):
        StudentConfig(encoders=ENC)
    xl = StudentConfig.pixart_alpha_xl2(512)
    assert xl.encoders.vae == "PixArt-alpha/PixArt-XL-2-512x512" and xl.encoders.dtype == "bfloat16"
    with pytest.raises(ValueError, match="LatentStudent"):
        Student.from_config(CFG)
    with pytest.raises(ValueError, match="LatentStudent needs"):
        LatentStudent(StudentConfig())


def test_module_holds_only_the_denoiser_and_round_trips(tmp_path):
    torch.manual_seed(0)
    student = build_student(CFG)
    assert isinstance(student, LatentStudent)
    # The frozen encoders never enter the state dict, the EMA or a checkpoint.
    assert all(k.startswith("denoiser.") for k in student.state_dict())
    x = torch.randn(3, 4, 16, 16)
    cap, mask = student.encode_prompts(["a red circle", "two squares", ""])
    assert cap.shape == (3, 12, 32) and mask.dtype == torch.bool and not mask[2, 1:].any()
    assert student(x, torch.tensor([0, 500, 999]), cap, mask).shape == x.shape
    loss = training_loss(student, make_noise_scheduler(CFG), x, cap, mask, CFG.prediction_type)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters() if p.requires_grad)

    student.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "tokenizer.json").exists()
    back = load_pretrained(tmp_path / "ckpt")
    assert isinstance(back, LatentStudent) and back.config == CFG
    for (k, a), b in zip(student.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_sampling_decodes_through_the_vae():
    student = build_student(CFG).eval()
    cfg = SampleConfig(steps=3, batch_size=2)
    a = sample(student, ["a red circle", "two squares", "a red circle"], [1, 2, 1], cfg)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[0], a[2])  # an image depends on its prompt and seed only
    b = sample(student, ["a red circle"], [1], cfg)
    np.testing.assert_array_equal(a[0], b[0])
    # Another shape than the square (an aspect bucket): any grid of patches.
    wide = sample(student, ["a red circle"], [1], cfg, size=(16, 48))
    assert wide.shape == (1, 16, 48, 3)
    with pytest.raises(ValueError, match="multiples of 4 px"):
        sample(student, ["a red circle"], [1], cfg, size=(16, 30))


def test_fit_needs_the_feature_store():
    """The trainer reads the null caption from the FeatureStore: refused up front.
    (The whole latent path, Ray Data precompute to Ray Train fit to sampling,
    runs as `ray job submit` in tests/test_job_submit.py.)"""
    from evolve.student.train import fit_student

    with pytest.raises(ValueError, match="FeatureStore root"):
        fit_student(object(), student_cfg=CFG, train_cfg=TrainConfig(), steps=1, storage_path="unused",
                    name="latent")


def test_import_pretrained_pixart_weights(tmp_path):
    """A diffusers PixArt transformer folder becomes a student checkpoint with
    the same function; a transformer of another shape is refused, by field."""
    from typer.testing import CliRunner

    from evolve.cli import app
    from evolve.student.convert import latent_student_from_diffusers

    torch.manual_seed(1)
    pretrained = build_student(CFG).denoiser  # a PixArtTransformer2DModel, as a pipeline holds it
    pretrained.save_pretrained(tmp_path / "pipe" / "transformer")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    cap, mask = torch.randn(2, 12, 32), torch.ones(2, 12, dtype=torch.bool)

    student = latent_student_from_diffusers(tmp_path / "pipe", CFG, subfolder="transformer")
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, cap, mask), denoise(pretrained, CFG, x, t, cap, mask))

    qk = latent_student_from_diffusers(tmp_path / "pipe", CFG.model_copy(update={"qk_norm": True}), "transformer")
    assert any(".norm_q." in k for k in qk.state_dict())
    with pytest.raises(ValueError, match="num_layers"):
        latent_student_from_diffusers(tmp_path / "pipe", CFG.model_copy(update={"num_layers": 3}), "transformer")

    # The CLI writes a checkpoint a run can start from (init_checkpoint).
    cfg_file = tmp_path / "run.json"
    RunConfig(student=CFG).save(cfg_file)
    res = CliRunner().invoke(app, ["import-pixart", str(tmp_path / "pipe"), str(tmp_path / "ckpt"),
                                   "--config", str(cfg_file)])
    assert res.exit_code == 0, res.output
    loaded = load_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cap, mask), denoise(pretrained, CFG, x, t, cap, mask))
    bad = CliRunner().invoke(app, ["import-pixart", str(tmp_path / "nowhere"), str(tmp_path / "c2"),
                                   "--config", str(cfg_file)])
    assert bad.exit_code == 2 and "import-pixart" in bad.output


def test_shipped_latent_configs():
    """configs/real.yaml's student is PixArt-alpha XL/2 at 512 px with PixArt's
    own encoders; configs/latent-tiny.yaml's is a latent student too."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    real = RunConfig.load(root / "real.yaml")
    xl = StudentConfig.pixart_alpha_xl2(512)
    assert real.student.model_copy(update={"encoders": xl.encoders}) == xl
    assert real.student.encoders.identity() == xl.encoders.identity()  # the same features
    assert real.init_checkpoint is not None and real.train.use_gpu
    tiny = RunConfig.load(root / "latent-tiny.yaml")
    assert tiny.student.is_latent and tiny.from_scratch
    # real-1024.yaml: real.yaml (extended) with PixArt-alpha XL/2 1024 on aspect buckets.
    big = RunConfig.load(root / "real-1024.yaml")
    xl = StudentConfig.pixart_alpha_xl2(1024)
    assert big.student.model_copy(update={"encoders": xl.encoders}) == xl and big.student.micro_conditions
    assert big.student.encoders.aspect_buckets and big.student.encoders.image_size == 1024
    assert big.train.gradient_checkpointing and not big.train.features_in_memory
    assert big.teachers == real.teachers and big.judge == real.judge and big.train.lr == real.train.lr


def test_config_files_extend_others(tmp_path):
    (tmp_path / "base.yaml").write_text("rounds: 5\nseed: 3\ntrain: {lr: 0.001, batch_size: 16}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nseed: 4\ntrain: {batch_size: 8}\n")
    cfg = RunConfig.load(tmp_path / "child.yaml")
    assert (cfg.rounds, cfg.seed, cfg.train.lr, cfg.train.batch_size) == (5, 4, 0.001, 8)
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(ValueError, match="in a circle"):
        RunConfig.load(tmp_path / "child.yaml")


def test_latent_batches_drop_captions_to_the_null_caption():
    import random

    from evolve.student.train import Batches

    s = build_student(CFG)
    shard = {"n": 3, "latent": torch.randn(3, 4, 16, 16).half(), "caption": torch.randn(3, 12, 32).half(),
             "caption_mask": torch.ones(3, 12, dtype=torch.bool)}
    feeder = Batches(s, CFG, 1.0, 2, torch.device("cpu"), torch.Generator(), random.Random(0))
    with pytest.raises(RuntimeError, match="null caption"):
        feeder.use(shard)
    null = torch.full((12, 32), 0.5), torch.tensor([True] + [False] * 11)
    feeder.null = null
    feeder.use(shard)
    x, cap, mask = feeder.next()
    assert x.dtype == torch.float32 and x.shape == (2, 4, 16, 16)
    assert (cap == 0.5).all() and mask.sum().item() == 2
    assert shard["caption"].abs().sum() > 0 and not (shard["caption"] == 0.5).all()  # the shard is untouched


@pytest.mark.integration
def test_fsdp_trains_as_ddp_and_resumes(ray_local, tmp_path):
    """Two workers on latent_dataset's arrays (features held in memory):
    FSDP (each worker a shard of weights, optimizer state and EMA) gives the
    weights DDP gives, writes the same plain checkpoint files, and resumes
    with its optimizer state. (The streamed-features path is what
    configs/latent-tiny.yaml runs in tests/test_job_submit.py.)"""
    import json

    from safetensors.torch import load_file

    from evolve.shapes.render import render, to_png
    from evolve.store import ImageStore
    from evolve.student.encoders import FeatureStore, latent_dataset
    from evolve.student.train import fit_student

    # Every row the same: Ray Data hands blocks to whichever worker asks first,
    # so only then do both runs give each rank the same batches.
    ref = ImageStore(tmp_path / "images").put(to_png(render("two circles", seed=0, size=32)))
    rows = [{"prompt": "two circles", "image_ref": ref}] * 8
    ds = latent_dataset(rows, str(tmp_path / "features"), str(tmp_path / "images"), ENC, min_blocks=2)

    def fit(parallel: str, steps: int) -> Path:
        tcfg = TrainConfig(batch_size=4, num_workers=2, cond_drop=0.5, worker_nice=0, warmup_steps=0, lr=1e-3,
                           parallel=parallel, checkpoint_every=2)
        return Path(fit_student(ds, student_cfg=CFG, train_cfg=tcfg, steps=steps, storage_path=tmp_path / "rt",
                                name=parallel, features=tmp_path / "features"))

    fsdp, ddp = fit("fsdp", 4), fit("ddp", 4)
    assert FeatureStore(tmp_path / "features").has_latent(ref)
    assert isinstance(load_pretrained(fsdp), LatentStudent)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(fsdp / name)), load_file(str(ddp / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    before = torch.load(fsdp / "optimizer.pt", weights_only=True)
    assert set(before["state"]) == {n for n, _ in build_student(CFG).named_parameters()}  # keyed by name

    resumed = fit("fsdp", 6)  # the same run name: its step-4 checkpoint, optimizer included
    assert json.loads((resumed / "state.json").read_text())["step"] == 6
    after = torch.load(resumed / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in after["state"].values()} == {6}  # 4 loaded + 2, not a fresh AdamW


def test_aspect_bucket_configs():
    """Images are encoded at the student's size (filled in when not given);
    buckets must tile into patches and train from streamed features."""
    assert CFG.encoders.image_size == 32
    with pytest.raises(ValidationError, match="image_size"):
        StudentConfig.model_validate({**CFG.model_dump(), "encoders": {**ENC.model_dump(), "image_size": 64}})
    # 64 px buckets are multiples of 16 px; a /8 VAE with patch 4 needs 32.
    with pytest.raises(ValidationError, match="do not divide by vae_scale x patch_size"):
        StudentConfig(arch="pixart", image_size=64, latent_channels=4, vae_scale=8, caption_channels=32,
                      max_tokens=12, hidden_size=32, num_layers=1, num_heads=2, patch_size=4,
                      encoders=EncoderConfig(max_tokens=12, aspect_buckets=True))
    bucketed = StudentConfig(**{**CFG.model_dump(), "encoders": {**ENC.model_dump(), "aspect_buckets": True}})
    with pytest.raises(ValidationError, match="features_in_memory: false"):
        RunConfig(student=bucketed)
    assert RunConfig(student=bucketed, train=TrainConfig(features_in_memory=False)).student.encoders.aspect_buckets


def test_micro_conditions_follow_the_image_shape():
    """At 1024 px PixArt is conditioned on resolution and aspect ratio: a
    landscape bucket's latents are conditioned on their own, not a square's."""
    cfg = StudentConfig(arch="pixart", image_size=1024, latent_channels=4, vae_scale=8, caption_channels=32,
                        max_tokens=12, hidden_size=24, num_layers=1, num_heads=2, patch_size=8,
                        encoders=EncoderConfig(max_tokens=12, aspect_buckets=True))
    assert cfg.micro_conditions
    den = build_student(cfg).denoiser
    seen = []
    den.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True)
    x = torch.randn(2, 4, 96, 168)  # the 768 x 1344 bucket
    out = denoise(den, cfg, x, torch.tensor([5, 500]), torch.randn(2, 12, 32), torch.ones(2, 12, dtype=torch.bool))
    assert out.shape == x.shape
    assert seen[0]["resolution"].tolist() == [[768.0, 1344.0]] * 2
    torch.testing.assert_close(seen[0]["aspect_ratio"], torch.full((2, 1), 768 / 1344))
