"""Frozen VAE/T5 encoders and the precomputed-feature store (tiny random models, offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pydantic import ValidationError

# Nothing here may reach a hub; the tiny encoders are built from config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evolve.shapes import vocabulary  # noqa: E402
from evolve.shapes.render import render, to_png  # noqa: E402
from evolve.store import ImageStore  # noqa: E402
from evolve.student.encoders import (  # noqa: E402
    EncoderConfig, FeatureStore, FrozenEncoders, precompute_local)

PROMPTS = ["a red circle", "two squares", "a yellow circle and a green triangle"]
WORDS = tuple(vocabulary())  # a shapes-world run fills the tiny T5's words from its world


@pytest.fixture(scope="module")
def encoders() -> FrozenEncoders:
    # batch_size 2: every multi-image call below crosses a batch boundary.
    return FrozenEncoders.load(EncoderConfig(batch_size=2, tiny_vocabulary=WORDS))


def _images(n: int, size: int) -> np.ndarray:
    return np.stack([render(PROMPTS[i % len(PROMPTS)], seed=i, size=size) for i in range(n)])


def _put_images(images_root, prompts, size=32) -> list[dict]:
    store = ImageStore(images_root)
    return [{"prompt": p, "image_ref": store.put(to_png(render(p, seed=i, size=size)))}
            for i, p in enumerate(prompts)]


def test_tiny_encoders_load_frozen(encoders):
    assert encoders.latent_channels == 4
    assert encoders.vae_scale_factor == 8  # like SD-VAE
    assert encoders.text_dim == 32
    assert encoders.scaling_factor == pytest.approx(0.18215)
    for model in (encoders.vae, encoders.text_encoder):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("size", [32, 64])
def test_latent_shape(encoders, size):
    z = encoders.encode_images(_images(3, size))
    assert z.shape == (3, 4, size // 8, size // 8)
    assert z.dtype == np.float16
    assert np.isfinite(z).all()


def test_rejects_sizes_the_vae_cannot_halve(encoders):
    with pytest.raises(ValueError, match="scale factor 8"):
        encoders.encode_images(np.zeros((1, 36, 36, 3), np.uint8))


def test_round_trip_runs(encoders):
    images = _images(3, 32)
    back = encoders.decode_latents(encoders.encode_images(images))
    # Random weights: only the contract (shape, dtype), not the quality.
    assert back.shape == images.shape and back.dtype == np.uint8


def test_deterministic_across_calls_and_loads(encoders):
    images = _images(2, 32)
    a = encoders.encode_images(images)
    np.testing.assert_array_equal(a, encoders.encode_images(images))
    # Each Ray actor loads its own tiny encoders: they must be the same weights.
    again = FrozenEncoders.load(EncoderConfig(batch_size=2, tiny_vocabulary=WORDS))
    np.testing.assert_array_equal(a, again.encode_images(images))
    e1, _ = encoders.encode_prompts(PROMPTS)
    e2, _ = again.encode_prompts(PROMPTS)
    np.testing.assert_array_equal(e1, e2)


def test_prompt_embeddings(encoders):
    long = " ".join(["red"] * 200)
    emb, mask = encoders.encode_prompts(PROMPTS + [long])
    assert emb.shape == (4, 120, 32) and emb.dtype == np.float16
    assert mask.shape == (4, 120) and mask.dtype == bool
    # Words plus T5's closing </s>; the long prompt is cut at max_tokens.
    assert mask.sum(1).tolist() == [len(p.split()) + 1 for p in PROMPTS] + [120]
    assert (emb[~mask] == 0).all()
    assert (np.abs(emb[mask]).sum(-1) > 0).all()
    assert mask[:, 0].all() and not mask[0, 4:].any()  # padded on the right


def test_tiny_encoders_without_words_read_bytes():
    """No vocabulary (a world without one): ByT5's byte-level tokenizer, any text."""
    enc = FrozenEncoders.load(EncoderConfig(batch_size=2, max_tokens=16))
    emb, mask = enc.encode_prompts(["a cat", "A red circle."])
    assert mask.sum(1).tolist() == [6, 14]  # bytes plus </s>
    assert not np.array_equal(emb[0], emb[1])


def test_unknown_config_key_rejected():
    with pytest.raises(ValidationError):
        EncoderConfig(vae_folder="x")


def test_feature_store_atomic_idempotent_and_safe(tmp_path):
    store = FeatureStore(tmp_path)
    ref = "ab" * 32
    z = np.arange(16, dtype=np.float16).reshape(1, 4, 2, 2)
    path = store.put_latent(ref, z)
    assert path == tmp_path / "latents" / f"{ref}.npy" and store.has_latent(ref)
    np.testing.assert_array_equal(store.get_latent(ref), z)
    # Idempotent: the same ref names the same image, so the file stays as it is.
    stat = path.stat()
    store.put_latent(ref, z + 1)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    np.testing.assert_array_equal(store.get_latent(ref), z)

    emb, mask = np.ones((120, 8), np.float16), np.arange(120) < 3
    store.put_text("one red circle", emb, mask)
    assert store.has_text("one red circle") and not store.has_text("two red circles")
    e, m = store.get_text("one red circle")
    np.testing.assert_array_equal(e, emb)
    np.testing.assert_array_equal(m, mask)

    # A failed write leaves neither the file nor a temp file behind.
    bad = "cd" * 32
    with pytest.raises(ValueError):
        store.put_latent(bad, np.array([object()], dtype=object))  # refuses to pickle
    assert not store.has_latent(bad)
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == [f"{ref}.npy"]

    for evil in ("../" + "ab" * 31, "ab/" + "cd" * 30, "..", "ABCD"):
        with pytest.raises(ValueError) as err:
            store.latent_path(evil)
        assert repr(evil) in str(err.value)  # the error names the ref
    with pytest.raises(KeyError):
        store.get_latent("ef" * 32)
    with pytest.raises(KeyError):
        store.get_text("three cyan squares")


def test_precompute_local_encodes_only_new_rows(tmp_path, encoders):
    rows = _put_images(tmp_path / "images", PROMPTS)
    feats = tmp_path / "features"
    first = precompute_local(rows, feats, tmp_path / "images", encoders)
    assert [r["encoded"] for r in first] == [True] * 3
    for r in first:
        assert os.path.isfile(r["latent_path"]) and os.path.isfile(r["text_path"])
        assert np.load(r["latent_path"]).dtype == np.float16  # store_dtype on disk
        assert np.load(r["latent_path"]).shape == (4, 4, 4)
        with np.load(r["text_path"]) as z:
            assert z["emb"].dtype == np.float16 and z["emb"].shape == (120, 32)
            assert z["mask"].dtype == bool

    again = precompute_local(rows, feats, tmp_path / "images", encoders)
    assert [r["encoded"] for r in again] == [False] * 3
    assert [r["latent_path"] for r in again] == [r["latent_path"] for r in first]

    new = _put_images(tmp_path / "images", ["a circle left of a triangle"], size=32)
    # Another prompt's picture: a ref the first rows do not have.
    assert new[0]["image_ref"] not in {r["image_ref"] for r in rows}
    third = precompute_local(rows + new, feats, tmp_path / "images", encoders)
    assert [r["encoded"] for r in third] == [False, False, False, True]
    # What is stored is what the encoders give for that image.
    img = render("a circle left of a triangle", seed=0, size=32)[None]
    np.testing.assert_array_equal(np.load(third[3]["latent_path"]), encoders.encode_images(img)[0])


def test_load_features_reads_the_training_arrays(tmp_path, encoders):
    from evolve.student.encoders import load_features

    rows = _put_images(tmp_path / "images", PROMPTS)
    precompute_local(rows, tmp_path / "features", tmp_path / "images", encoders)
    batch = {"prompt": np.array([r["prompt"] for r in rows], dtype=object),
             "image_ref": np.array([r["image_ref"] for r in rows], dtype=object)}
    out = load_features(batch, str(tmp_path / "features"))
    assert out["latent"].shape == (3, 4, 4, 4) and out["caption"].shape == (3, 120, 32)
    assert out["caption_mask"].shape == (3, 120) and out["caption_mask"].dtype == bool
    emb, mask = encoders.encode_prompts([PROMPTS[1]])
    np.testing.assert_array_equal(out["caption"][1], emb[0])
    np.testing.assert_array_equal(out["caption_mask"][1], mask[0])
    # A row whose features were never computed is named, not read as garbage.
    batch["prompt"][2] = "three cyan squares"
    with pytest.raises(KeyError, match="three cyan squares"):
        load_features(batch, str(tmp_path / "features"))


def test_store_refuses_features_of_other_encoders(tmp_path, encoders):
    rows = _put_images(tmp_path / "images", PROMPTS[:1])
    precompute_local(rows, tmp_path / "features", tmp_path / "images", encoders)
    other = FrozenEncoders.load(EncoderConfig(batch_size=2, tiny_seed=1))
    with pytest.raises(ValueError, match="tiny_seed"):
        precompute_local(rows, tmp_path / "features", tmp_path / "images", other)


@pytest.mark.integration
def test_precompute_features_on_ray(ray_local, tmp_path):
    from evolve.student.encoders import precompute_features

    rows = _put_images(tmp_path / "images", PROMPTS + ["three circles", "a red circle"])
    cfg = EncoderConfig(batch_size=2)
    ds = ray_local.data.from_items(rows)
    out = precompute_features(ds, str(tmp_path / "features"), str(tmp_path / "images"), cfg).take_all()
    assert sorted(r["image_ref"] for r in out) == sorted(r["image_ref"] for r in rows)
    for r in out:
        assert os.path.isfile(r["latent_path"]) and os.path.isfile(r["text_path"])
    assert all(r["encoded"] for r in out)
    # A rerun finds everything already there.
    again = precompute_features(ds, str(tmp_path / "features"), str(tmp_path / "images"), cfg).take_all()
    assert not any(r["encoded"] for r in again)


def test_encode_batch_class_without_ray(tmp_path):
    # The Ray actor's code path, called directly: config arrives as a dict,
    # columns as numpy arrays.
    from evolve.student.encoders import EncodeBatch

    rows = _put_images(tmp_path / "images", PROMPTS[:2])
    fn = EncodeBatch(str(tmp_path / "features"), str(tmp_path / "images"),
                     EncoderConfig(batch_size=2).model_dump(mode="json"))
    batch = {"prompt": np.array([r["prompt"] for r in rows]),
             "image_ref": np.array([r["image_ref"] for r in rows])}
    out = fn(batch)
    assert out["encoded"].tolist() == [True, True]
    assert all(os.path.isfile(p) for p in out["latent_path"]) and all(os.path.isfile(p) for p in out["text_path"])
    assert fn(batch)["encoded"].tolist() == [False, False]


def test_loads_saved_encoders_from_a_pipeline_folder(tmp_path, encoders):
    # The from_pretrained path, offline: the tiny encoders saved the way a
    # PixArt pipeline repo lays them out (vae/, text_encoder/, tokenizer/).
    encoders.vae.save_pretrained(tmp_path / "vae")
    encoders.text_encoder.save_pretrained(tmp_path / "text_encoder")
    encoders.tokenizer.save_pretrained(tmp_path / "tokenizer")
    cfg = EncoderConfig(vae=str(tmp_path), vae_subfolder="vae", text_encoder=str(tmp_path),
                        text_subfolder="text_encoder", tokenizer_subfolder="tokenizer", batch_size=2)
    loaded = FrozenEncoders.load(cfg)
    images = _images(2, 32)
    np.testing.assert_array_equal(loaded.encode_images(images), encoders.encode_images(images))
    e1, m1 = loaded.encode_prompts(PROMPTS)
    e0, m0 = encoders.encode_prompts(PROMPTS)
    np.testing.assert_array_equal(m1, m0)
    np.testing.assert_array_equal(e1, e0)


def test_streamed_batches_equal_batches_held_in_memory(tmp_path, encoders):
    """TrainConfig.features_in_memory off: the trainer reads each batch's
    features from the store (one batch ahead, in a thread) and trains on
    exactly the batches it would have held in memory."""
    import random

    import torch

    from evolve.config import StudentConfig
    from evolve.student.encoders import load_features
    from evolve.student.model import build_student
    from evolve.student.train import Batches

    prompts = PROMPTS + ["three circles", "a square left of a circle"]
    rows = _put_images(tmp_path / "images", prompts)
    feats = str(tmp_path / "features")
    precompute_local(rows, feats, tmp_path / "images", encoders)
    cols = {"prompt": np.array(prompts, dtype=object),
            "image_ref": np.array([r["image_ref"] for r in rows], dtype=object)}
    arrays = {k: torch.from_numpy(v) for k, v in load_features(cols, feats).items() if k != "prompt"}
    held = {"n": 5, **arrays}
    streamed = {"n": 5, "prompts": prompts, "image_refs": [r["image_ref"] for r in rows]}

    cfg = StudentConfig(arch="pixart", image_size=32, latent_channels=4, vae_scale=8, caption_channels=32,
                        max_tokens=120, hidden_size=32, num_layers=1, num_heads=2, patch_size=2,
                        encoders=encoders.cfg)
    student = build_student(cfg)
    emb, mask = FeatureStore(feats).get_text("")  # put there by the precompute
    null = torch.from_numpy(emb).float(), torch.from_numpy(mask)

    def draw(shard: dict, n: int) -> list[tuple[torch.Tensor, ...]]:
        feeder = Batches(student, cfg, 0.5, 2, torch.device("cpu"), torch.Generator().manual_seed(3),
                         random.Random(3), features=feats)
        feeder.null = null
        feeder.use(shard)
        out = [feeder.next() for _ in range(n)]
        feeder.use(shard)  # a new version mid-epoch: the batch loading ahead is dropped
        return out + [feeder.next() for _ in range(n)]

    a, b = draw(held, 6), draw(streamed, 6)  # 12 batches of 2: several epochs of 5 rows
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert any(m[:, 1:].any() for _, _, m in a) and any(not m[:, 1:].any() for _, _, m in a)  # some dropped

    feeder = Batches(student, cfg, 0.0, 2, torch.device("cpu"), torch.Generator(), random.Random(0))
    feeder.null = null
    with pytest.raises(ValueError, match="FeatureStore root"):
        feeder.use(streamed)


def test_aspect_buckets_are_pixart_alphas():
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as pp

    from evolve.student.encoders import aspect_buckets, target_size

    for size, bins in ((1024, pp.ASPECT_RATIO_1024_BIN), (512, pp.ASPECT_RATIO_512_BIN),
                       (256, pp.ASPECT_RATIO_256_BIN)):
        assert set(aspect_buckets(size)) == {(int(h), int(w)) for h, w in bins.values()}
    bucketed = EncoderConfig(image_size=1024, aspect_buckets=True)
    assert target_size(1024, 1792, bucketed) == (768, 1344)  # DALL-E 3's landscape: PixArt's 0.57 bucket
    assert target_size(1792, 1024, bucketed) == (1344, 768)
    assert target_size(1024, 1024, bucketed) == (1024, 1024)
    assert target_size(1024, 1792, EncoderConfig(image_size=512)) == (512, 512)
    assert target_size(40, 24, EncoderConfig()) == (40, 24)  # no image_size: as it comes


def test_fit_image_covers_then_crops_the_centre():
    from evolve.student.encoders import fit_image

    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # outer quarters red: cropped away
    img[:, 60:] = (255, 0, 0)
    img[:, 20:60] = (0, 0, 255)  # the centre half blue
    out = fit_image(img, 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:, 2:-2, 2] > 200).all() and (out[:, 2:-2, 0] < 50).all()
    assert fit_image(img, 40, 80) is img


def test_bucketed_images_encode_at_their_bucket(tmp_path):
    """aspect_buckets: a landscape and a square teacher image are encoded at
    their buckets' shapes, and the rows say which bucket each latent is in."""
    from evolve.shapes.render import to_png
    from evolve.student.encoders import encode_missing

    enc = FrozenEncoders.load(EncoderConfig(batch_size=2, image_size=32, aspect_buckets=True))
    images = ImageStore(tmp_path / "images")
    wide, square = np.full((48, 96, 3), 90, np.uint8), np.full((64, 64, 3), 200, np.uint8)
    refs = [images.put(to_png(wide)), images.put(to_png(square))]
    store = FeatureStore(tmp_path / "features")
    out = encode_missing({"prompt": ["a wide one", "a square"], "image_ref": refs}, store, images, enc)
    # 2:1 is nearest the 32x48 bucket of the seven at 32 px (16x64 ... 64x16).
    assert store.get_latent(refs[0]).shape == (4, 4, 6) and store.get_latent(refs[1]).shape == (4, 4, 4)
    assert out["bucket"].tolist() == ["4x6", "4x4"]
    # Already there: the bucket is read from the stored latent's header.
    again = encode_missing({"prompt": ["a wide one"], "image_ref": refs[:1]}, store, images, enc)
    assert again["bucket"].tolist() == ["4x6"] and not again["encoded"].any()

    # The trainer's batches (streamed features) hold one latent shape each.
    import random

    import torch

    from evolve.config import StudentConfig
    from evolve.student.model import build_student
    from evolve.student.train import Batches

    refs += [images.put(to_png(wide[:, ::-1].copy() + 1)), images.put(to_png(square + 1))]
    prompts = ["a wide one", "a square", "another wide one", "another square"]
    out = encode_missing({"prompt": prompts, "image_ref": refs}, store, images, enc)
    cfg = StudentConfig(arch="pixart", image_size=32, latent_channels=4, vae_scale=8, caption_channels=32,
                        max_tokens=120, hidden_size=32, num_layers=1, num_heads=2, patch_size=2, encoders=enc.cfg)
    feeder = Batches(build_student(cfg), cfg, 0.0, 2, torch.device("cpu"), torch.Generator().manual_seed(0),
                     random.Random(0), features=str(tmp_path / "features"))
    emb, mask = enc.encode_prompts([""])
    feeder.null = torch.from_numpy(emb[0]).float(), torch.from_numpy(mask[0])
    feeder.use({"n": 4, "prompts": prompts, "image_refs": refs, "buckets": out["bucket"].tolist()})
    shapes = [tuple(feeder.next()[0].shape) for _ in range(8)]
    assert set(shapes) == {(2, 4, 4, 6), (2, 4, 4, 4)}


def test_bucketed_batches_hold_one_shape_each():
    import torch

    from evolve.student.train import bucketed_batches

    buckets = ["4x4"] * 7 + ["2x8"] * 5 + ["8x2"] * 2
    order = bucketed_batches(buckets, 3, torch.Generator().manual_seed(0))
    drawn = [next(order) for _ in range(40)]  # 120 rows: over eight epochs of 14
    for b in drawn:
        assert len(b) == 3 and len({buckets[i] for i in b}) == 1
    counts = np.bincount(torch.cat(drawn).numpy(), minlength=len(buckets))
    assert counts.min() >= 6 and counts.max() <= 9  # every row, about as often as the others
