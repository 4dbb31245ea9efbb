"""The full-scale student path: PixArt-alpha XL/2 configs share the tiny
student's builder, loss and EMA (evolve.student.model.build_denoiser / denoise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from evolve.config import StudentConfig
from evolve.student.diffusion import EMA, make_noise_scheduler, training_loss
from evolve.student.model import Student, build_denoiser, denoise

ROOT = Path(__file__).resolve().parents[1]


def n_params(cfg: StudentConfig) -> int:
    with torch.device("meta"):  # no memory, no init time
        return sum(p.numel() for p in build_denoiser(cfg).parameters())


def test_pixart_alpha_xl2_preset_is_the_papers_student():
    cfg = StudentConfig.pixart_alpha_xl2(512)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (28, 1152, 16, 2)
    assert (cfg.in_channels, cfg.sample_size, cfg.caption_channels, cfg.max_tokens) == (4, 64, 4096, 120)
    assert 605e6 < n_params(cfg) < 615e6  # PixArt-alpha XL/2: 0.6B
    big = StudentConfig.pixart_alpha_xl2(1024)
    assert big.sample_size == 128 and n_params(big) > n_params(cfg)  # + resolution/aspect embedders
    qk = StudentConfig.pixart_alpha_xl2(512, qk_norm=True)
    assert n_params(qk) - n_params(cfg) == 28 * 2 * 2 * 2 * 72  # q,k LayerNorm (w+b) in self+cross attn
    assert StudentConfig.model_validate_json(qk.model_dump_json()) == qk


@pytest.mark.parametrize("bad, words", [
    (dict(arch="unet", latent_channels=4), "latent_channels needs arch 'pixart'"),
    (dict(arch="unet", qk_norm=True), "qk_norm"),
    (dict(arch="pixart", hidden_size=100, num_heads=16), "does not divide by num_heads"),
    (dict(arch="pixart", image_size=36, patch_size=8), "does not divide by patch_size"),
    (dict(arch="pixart", image_size=1024, latent_channels=4, hidden_size=32, num_heads=2), "divide by 3"),
])
def test_config_errors_name_the_problem(bad, words):
    with pytest.raises(ValidationError, match=words):
        StudentConfig(**bad)
    with pytest.raises(ValueError, match="256, 512 or 1024"):
        StudentConfig.pixart_alpha_xl2(768)


def test_student_refuses_latent_configs_with_a_pointer():
    with pytest.raises(ValueError, match="LatentStudent"):
        Student.from_config(StudentConfig.pixart_alpha_xl2(256, num_layers=1, hidden_size=32, num_heads=2))


@pytest.mark.parametrize("resolution", [256, 1024])
def test_latent_student_trains_on_precomputed_captions(resolution):
    """Latents in, caption embeddings in (T5-shaped, padded), learned sigma
    dropped from the prediction; every parameter gets a gradient (DDP); 1024 px
    takes PixArt's resolution / aspect-ratio conditioning."""
    cfg = StudentConfig.pixart_alpha_xl2(resolution, hidden_size=48, num_layers=2, num_heads=2,
                                         patch_size=8, caption_channels=24, max_tokens=10, qk_norm=True)
    torch.manual_seed(0)
    net = build_denoiser(cfg)
    b, s = 3, cfg.sample_size
    x = torch.randn(b, 4, s, s)
    captions = torch.randn(b, 10, 24)
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [1] * 7 + [0] * 3])
    out = denoise(net, cfg, x, torch.tensor([0, 500, 999]), captions, mask)
    assert out.shape == x.shape
    ema = EMA(net, 0.9)

    def call(x, t, c, m):
        return denoise(net, cfg, x, t, c, m)
    loss = training_loss(call, make_noise_scheduler(cfg), x, captions, mask, cfg.prediction_type,
                         generator=torch.Generator().manual_seed(0))
    loss.backward()
    # The learned-variance half of the output is not in the loss (no VB term),
    # so proj_out's rows for it are the only parameters without a gradient.
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert all(n.startswith("proj_out") for n in missing), missing
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    assert torch.isfinite(loss)


def test_gpu_benchmark_runs_small_on_cpu(tmp_path):
    """benchmarks/pixart_gpu.py is the GPU measurement; its --tiny CPU mode runs
    the same code so that CI keeps it working."""
    out = tmp_path / "r.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pixart_gpu.py"), "--tiny", "--device", "cpu",
                    "--steps", "2", "--warmup", "1", "--modes", "eager", "--qk-norm", "--fuse-qkv",
                    "--out", str(out)], check=True, cwd=tmp_path, timeout=300)
    r = json.loads(out.read_text().splitlines()[0])
    assert r["mode"] == "eager" and r["qk_norm"] and r["fuse_qkv"]
    assert r["tflop_per_step"] >= 0 and r["s_per_step"] > 0 and all(map(torch.isfinite, map(torch.tensor, r["loss_first_last"])))
