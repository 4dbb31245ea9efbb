"""The student: tokenizer, model round-trip, loss, sampling, EMA, Ray Train fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evolve.config import SampleConfig, StudentConfig, TrainConfig
from evolve.shapes import vocabulary
from evolve.student.diffusion import EMA, make_noise_scheduler, sample, training_loss
from evolve.student.model import Student
from evolve.student.text import build_tokenizer, tokenize

WORDS = tuple(vocabulary())  # the shapes grammar's: what a shapes-world run gives its student
TINY = {
    "unet": dict(arch="unet", block_channels=(16, 32), attn_levels=1, norm_groups=8, attention_head_dim=8,
                 text_dim=32, text_layers=1, text_heads=2, vocabulary=WORDS),
    "pixart": dict(arch="pixart", hidden_size=32, num_layers=2, num_heads=2, patch_size=4,
                   text_dim=32, text_layers=1, text_heads=2, vocabulary=WORDS),
}
TINY["pixart-qk"] = {**TINY["pixart"], "qk_norm": True}
PROMPTS = ["a red circle", "two squares", "a triangle left of a circle", "a blue square and a green circle"]


def tiny(arch: str = "unet", **kw) -> Student:
    torch.manual_seed(0)
    return Student.from_config(StudentConfig(**{**TINY[arch], **kw}))


def test_tokenizer_word_level():
    tok = build_tokenizer(WORDS)
    ids, mask = tokenize(tok, ["a red circle", "", "a purple circle"], 12)
    assert ids.shape == (3, 12) and mask.shape == (3, 12)
    bos, pad, unk = tok.bos_token_id, tok.pad_token_id, tok.unk_token_id
    assert ids[0, 0] == bos and mask[0].tolist() == [1] * 4 + [0] * 8
    assert ids[0, 1] == tok.convert_tokens_to_ids("a") and ids[0, 3] == tok.convert_tokens_to_ids("circle")
    assert ids[1, 0] == bos and (ids[1, 1:] == pad).all() and mask[1].sum() == 1  # the CFG null prompt
    assert ids[2, 2] == unk
    assert build_tokenizer(reversed(WORDS)).get_vocab() == tok.get_vocab()  # stable ids
    # Free text is read as its words: case and punctuation do not count.
    assert tokenize(tok, ["A Red circle."], 12)[0].tolist() == ids[:1].tolist()


@pytest.mark.parametrize("arch", ["unet", "pixart", "pixart-qk"])
def test_forward_loss_backward(arch):
    s = tiny(arch)
    ids, mask = s.encode_prompts(PROMPTS)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    out = s(x, torch.tensor([0, 10, 500, 999]), ids, mask)
    assert out.shape == x.shape
    for pt in ("sample", "v_prediction", "epsilon"):
        s.zero_grad()
        loss = training_loss(s, make_noise_scheduler(s.config), x, ids, mask, pt,
                             t_shift=2.0, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss)
        loss.backward()
    # DDP needs every parameter in the graph
    missing = [n for n, p in s.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("arch", ["unet", "pixart", "pixart-qk"])
def test_save_load_roundtrip(arch, tmp_path):
    s = tiny(arch, prediction_type="sample", image_size=32)
    ema = EMA(s, 0.99)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.01)
    ema.update(s)
    s.save_pretrained(tmp_path, ema=ema)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "tokenizer.json", "model.safetensors",
                                                  "ema.safetensors"}
    assert StudentConfig.model_validate(json.loads((tmp_path / "config.json").read_text())) == s.config
    raw = Student.from_pretrained(tmp_path, ema=False)
    assert raw.config == s.config
    for k, v in s.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v), k
    ema_loaded = Student.from_pretrained(tmp_path)  # EMA by default
    for k, v in ema.state_dict().items():
        assert torch.equal(ema_loaded.state_dict()[k], v), k
    assert raw.tokenizer.get_vocab() == s.tokenizer.get_vocab()


def test_config_rejects_small_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        Student.from_config(StudentConfig(**{**TINY["unet"], "vocab_size": 8}))


def test_ema_warmup():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    ema = EMA(lin, max_decay=0.9)
    assert ema.decay() == pytest.approx(0.1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # decay 0.1: mostly the new weights
    assert ema.state_dict()["weight"][0, 0].item() == pytest.approx(0.9)
    assert ema.decay() == pytest.approx(2 / 11)
    for _ in range(200):
        ema.update(lin)
    assert ema.decay() == 0.9  # capped
    assert ema.state_dict()["weight"][0, 0].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("arch", ["unet", "pixart"])
def test_sample_shape_determinism(arch):
    s = tiny(arch)
    cfg = SampleConfig(steps=3, guidance=2.0, batch_size=2)
    a = sample(s, PROMPTS[:3], [1, 2, 3], cfg)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    b = sample(s, PROMPTS[:3], [1, 2, 3], cfg)
    assert np.array_equal(a, b)
    # an image depends on its prompt and seed, not on its batch
    c = sample(s, [PROMPTS[1]], [2], SampleConfig(steps=3, guidance=2.0, batch_size=1))
    assert np.abs(c[0].astype(int) - a[1].astype(int)).max() <= 1
    assert not np.array_equal(a[0], sample(s, PROMPTS[:1], [9], cfg)[0])


@pytest.mark.parametrize("pred", ["sample", "v_prediction", "epsilon"])
def test_sampler_keeps_black_background(pred):
    """A model that always predicts an all-black image yields exactly black
    images, whatever the prediction target (x0 clipping included)."""
    s = tiny("unet", prediction_type=pred)
    ac = make_noise_scheduler(s.config).alphas_cumprod

    def black(x, t, ids, mask):
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        sig = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        x0 = -torch.ones_like(x)
        eps = (x - a * x0) / sig
        return {"sample": x0, "epsilon": eps, "v_prediction": a * eps - sig * x0}[pred]

    s.forward = black
    out = sample(s, PROMPTS[:2], [0, 1], SampleConfig(steps=5, guidance=3.0))
    assert out.max() == 0


def test_mixed_precision_choice():
    from evolve.student.train import autocast_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("auto", gpu) is torch.bfloat16 and autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp16", gpu) is torch.float16 and autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("no", gpu) is None
    with pytest.raises(ValueError, match="fp16 needs a GPU worker"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="fp16 needs use_gpu"):
        TrainConfig(mixed_precision="fp16")
    assert TrainConfig(mixed_precision="fp16", use_gpu=True).use_gpu


def test_batches_replay_and_caption_drop():
    """The loop's batches: shuffled epochs of the shard, replay rows appended,
    every caption dropped to "" at cond_drop=1."""
    import random

    from evolve.student.train import Batches

    s = tiny()
    # Row i is a flat image of grey level 40 * (i + 1): a batch says which rows it holds.
    images = (torch.arange(1, 6, dtype=torch.uint8) * 40).view(5, 1, 1, 1).expand(5, 3, 32, 32).contiguous()
    replay = (["a green triangle"] * 3, torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    feeder = Batches(s, s.config, 0.0, 4, torch.device("cpu"), torch.Generator().manual_seed(0),
                     random.Random(0), replay, n_replay=1)
    feeder.use({"n": 5, "prompts": PROMPTS + ["three circles"], "images": images})
    seen = []
    for _ in range(5):  # 3 shard rows + 1 replay row a batch: 15 shard rows, three epochs of 5
        x, ids, mask = feeder.next()
        assert x.shape == (4, 3, 32, 32) and ids.shape[0] == 4 and mask.shape[0] == 4
        assert (x[3] == -1).all()  # the replayed (black) render comes last
        seen += [round((float(v) + 1) * 127.5 / 40) - 1 for v in x[:3, 0, 0, 0]]
    assert sorted(seen) == sorted(list(range(5)) * 3)
    assert feeder.seconds > 0

    drop_all = Batches(s, s.config, 1.0, 2, torch.device("cpu"), torch.Generator(), random.Random(0))
    drop_all.use({"n": 5, "prompts": PROMPTS + ["three circles"], "images": images})
    _, ids, mask = drop_all.next()
    null_ids, null_mask = s.encode_prompts(["", ""])
    assert torch.equal(ids, null_ids) and torch.equal(mask, null_mask)


def test_train_step_learns_a_batch():
    """TrainStep (the body shared by the Ray loop and the plain benchmark loop):
    lr set, EMA updated, and the loss on one fixed batch goes down."""
    from evolve.student.train import TrainStep

    s = tiny()
    ema = EMA(s)
    opt = torch.optim.AdamW(s.parameters(), lr=1.0)
    step = TrainStep(s, s, ema, opt, s.config, TrainConfig(grad_clip=1.0), torch.device("cpu"),
                     torch.Generator().manual_seed(0))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ids, mask = s.encode_prompts(PROMPTS)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(training_loss(s, step.noise_sched, x, ids, mask, s.config.prediction_type,
                                       generator=torch.Generator().manual_seed(1)))

    before = eval_loss()
    for _ in range(30):
        loss = step(x, ids, mask, lr=3e-3)
        assert not loss.requires_grad
    assert opt.param_groups[0]["lr"] == 3e-3 and ema.num_updates == 30
    assert eval_loss() < 0.7 * before


def test_checkpoint_files_resume_state(tmp_path):
    from evolve.student.train import load_checkpoint, save_checkpoint

    s = tiny()
    ema = EMA(s)
    opt = torch.optim.AdamW(s.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids, mask = s.encode_prompts(PROMPTS[:2])
    training_loss(s, make_noise_scheduler(s.config), x, ids, mask, "sample").backward()
    opt.step()
    ema.update(s)
    save_checkpoint(tmp_path, s, ema, opt, {"step": 1, "total_steps": 5, "ema_updates": 5})
    s2 = tiny()
    ema2 = EMA(s2)
    opt2 = torch.optim.AdamW(s2.parameters(), lr=1e-3)
    state = load_checkpoint(tmp_path, s2, ema2, opt2)
    assert state["total_steps"] == 5 and ema2.num_updates == 5
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), s2.state_dict().values()))
    assert opt2.state_dict()["state"][0]["step"] == 1
    assert Student.from_pretrained(tmp_path).config == s.config


@pytest.mark.integration
def test_fit_student_two_workers_and_resume(ray_local, tmp_path):
    """The "rounds" schedule's fit (cluster.RoundsTrainer: a run folder's dataset
    version through Ray Data, one fit() of steps_per_round), on two workers;
    then the same Ray Train run resumed from its checkpoint."""
    from evolve.cluster import RoundsTrainer
    from evolve.config import RunConfig
    from evolve.dataset import DatasetVersions, Record
    from evolve.run_folder import RunFolder
    from evolve.shapes.render import render, to_png
    from evolve.student.data import version_dataset
    from evolve.store import ImageStore
    from evolve.student.generate import generate_images
    from evolve.student.train import fit_student

    folder = RunFolder(tmp_path / "run")
    folder.make()
    images = ImageStore(folder.images)
    records = [Record(id=f"r{i}", prompt=p, category="c", teacher="t", seed=i, round_added=0, parent_id=None,
                      op="seed", image_ref=images.put(to_png(render(p, i, 32))))
               for i, p in enumerate(PROMPTS * 4)]
    DatasetVersions(folder.datasets).write(0, records)  # the trainer reads the version from the run folder
    scfg = StudentConfig(**TINY["unet"], prediction_type="sample")
    tcfg = TrainConfig(num_workers=2, cpus_per_worker=0.5, batch_size=8, report_every=1, steps_per_round=2)
    cfg = RunConfig(run_dir=folder.root, student=scfg, train=tcfg)
    trainer = RoundsTrainer(cfg, folder, None)
    trainer.publish(0, records)
    out = folder.checkpoint(0)
    assert trainer.weights_after(0, tcfg.steps_per_round, out) == {"step": 2}
    kw = dict(student_cfg=scfg, train_cfg=tcfg, storage_path=folder.train_storage, name="round_000")
    ds = version_dataset(cfg, folder, 0, len(records))
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 2 and state["total_steps"] == 2
    assert Student.from_pretrained(out).config == scfg
    imgs = generate_images(out, PROMPTS[:2], [0, 1], SampleConfig(steps=2))
    assert imgs.shape == (2, 32, 32, 3)
    # same storage_path and name: resumes from the run's checkpoint at step 2, here
    # under bf16 autocast (the GPU default; on a CPU only to run that code path)
    kw["train_cfg"] = tcfg.model_copy(update={"mixed_precision": "bf16"})
    fit_student(ds, steps=3, out_dir=tmp_path / "ckpt2", **kw)
    state = json.loads((tmp_path / "ckpt2" / "state.json").read_text())
    assert state["step"] == 3 and state["total_steps"] == 3 and state["run_start_total"] == 0


@pytest.mark.parametrize("arch", ["unet", "pixart"])
def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(arch):
    """TrainConfig.gradient_checkpointing: each block runs forward again in
    the backward pass (activations not kept), and the gradients are the same."""
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    t = torch.tensor([10, 700])

    def grads(checkpointing: bool) -> tuple[dict, int]:
        s = tiny(arch)
        if checkpointing:
            s.denoiser.enable_gradient_checkpointing()
        block = s.denoiser.transformer_blocks[0] if arch == "pixart" else s.denoiser.down_blocks[0].resnets[0]
        calls, forward = [], block.forward

        def counted(*args, **kwargs):  # (forward hooks do not fire on the recompute)
            calls.append(1)
            return forward(*args, **kwargs)

        block.forward = counted
        ids, mask = s.encode_prompts(PROMPTS[:2])
        s(x, t, ids, mask).square().mean().backward()
        return {n: p.grad.clone() for n, p in s.named_parameters()}, len(calls)

    plain, n_plain = grads(False)
    ckpt, n_ckpt = grads(True)
    assert (n_plain, n_ckpt) == (1, 2)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, msg=name)
