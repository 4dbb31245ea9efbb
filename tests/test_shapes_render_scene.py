"""Renderer, teachers' flaws, scene parser and scorer of the shapes world (pure, no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evolve.config import FlawProfile
from evolve.shapes import (CATEGORIES, DrawSpec, check, detect, draw, from_png, layout, parse,
                           render, sample_prompt, satisfies, score, score_folder, teacher_render, to_png,
                           write_prompts_jsonl)
from evolve.shapes.render import OPPOSITE, apply_flaws, drawn_centroid, side_range


@pytest.mark.parametrize("size", [32, 64])
def test_renderer_and_scene_parser_agree(size):
    rng = np.random.default_rng(size)
    results = []
    for seed in range(100):
        for cat in CATEGORIES:
            p = sample_prompt(rng, cat)
            r = check(p, render(p, seed, size))
            results.append(r.satisfied)
            assert r.satisfied == (r.score == 1.0)
    assert np.mean(results) >= 0.99


@pytest.mark.parametrize("drawn, asked, failed", [
    ("three circles", "two circles", "objects"),
    ("one square", "four squares", "objects"),
    ("a red circle", "a blue circle", "colors"),
    ("a red square and a blue triangle", "a blue square and a red triangle", "colors"),
    ("a circle left of a square", "a circle right of a square", "position"),
    ("a triangle above a circle", "a triangle below a circle", "position"),
    ("a circle", "a square", "shapes"),
    ("a circle and a square", "a circle and a triangle", "shapes"),
])
def test_a_wrong_prompt_fails_the_right_check(drawn, asked, failed):
    for seed in range(5):
        for size in (32, 64):
            r = check(asked, render(drawn, seed, size))
            assert not r.satisfied and failed in r.failed and r.score < 1
            extra = {"colors": {"colors"}, "color_attr": {"colors"}, "position": {"position"}}
            assert set(r.checks) == {"objects", "shapes"} | extra.get(parse(asked).category, set())


def test_partial_credit_ranks_near_misses_higher():
    img = render("four circles", 0)
    off_by_one, off_by_three = check("three circles", img), check("one circle", img)
    assert off_by_one.score > off_by_three.score
    assert check("four circles", img).score == 1.0


def test_render_is_deterministic_across_processes():
    a = render("a red square and a blue triangle", 7)
    assert np.array_equal(a, render(parse("a red square and a blue triangle"), 7))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, render("a red square and a blue triangle", 8))
    # Python's hash() is salted per process; the renderer must not depend on it
    code = ("import sys, numpy as np; from evolve.shapes import render; "
            "sys.stdout.write(render('a red square and a blue triangle', 7).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, cwd=Path(__file__).parents[1])
    assert bytes.fromhex(out.stdout) == a.tobytes()


def _gap(a, b):
    """Background pixels between two (x0, y0, side) boxes along the better axis."""
    (ax, ay, an), (bx, by, bn) = a, b
    return max(bx - (ax + an), ax - (bx + bn), by - (ay + an), ay - (by + bn))


@pytest.mark.parametrize("size", [32, 64])
def test_layout_geometry(size):
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = sample_prompt(rng)
        objs = layout(p, rng, size)
        assert [o.shape for o in objs] == list(p.shapes)
        assert all(c is None or o.color == c for o, c in zip(objs, p.colors))
        lo, hi = (0.13, 0.19) if p.n_objects <= 2 else (0.09, 0.12)
        boxes = [o.box() for o in objs]
        for o, (x0, y0, side) in zip(objs, boxes):
            assert lo * size <= o.r <= hi * size
            assert 0 <= x0 and x0 + side <= size and 0 <= y0 and y0 + side <= size
        for i in range(len(boxes)):
            for j in range(i):
                assert _gap(boxes[i], boxes[j]) >= 1
        if p.relation:
            (ax, ay), (bx, by) = drawn_centroid(objs[0]), drawn_centroid(objs[1])
            d = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[p.relation]
            assert d > 0.05 * size
        # what gets drawn has exactly these boxes
        img = draw(objs, size)
        seen = sorted(d.bbox for d in detect(img))
        assert seen == sorted((x, y, x + s, y + s) for x, y, s in boxes)
    assert side_range(4, 32) == (6, 7) and side_range(2, 32) == (9, 12)


FLAWS = [
    ("count", "three triangles", "objects"),
    ("color", "a cyan circle", "colors"),
    ("color", "a red square and a blue triangle", "colors"),
    ("relation", "a square left of a circle", "position"),
    ("shape", "a circle and a square", "shapes"),
    ("shape", "two circles", "shapes"),
]


@pytest.mark.parametrize("flaw, text, failed", FLAWS)
def test_flaws_change_exactly_what_they_say(flaw, text, failed):
    p = parse(text)
    rng = np.random.default_rng(0)
    assert apply_flaws(p, FlawProfile(), rng) == (DrawSpec.of(p), [])
    for _ in range(20):
        spec, fired = apply_flaws(p, FlawProfile(**{flaw: 1.0}), rng)
        assert fired == [flaw]
        if flaw == "count":
            assert abs(len(spec.shapes) - p.n_objects) == 1 and set(spec.shapes) == set(p.shapes)
        if flaw == "color":
            assert spec.shapes == p.shapes and spec.colors != p.colors
        if flaw == "relation":
            assert spec.relation == OPPOSITE[p.relation] and spec.shapes == p.shapes
        if flaw == "shape":
            assert len(spec.shapes) == p.n_objects and spec.colors == p.colors
            assert sum(a != b for a, b in zip(spec.shapes, p.shapes)) == 1
    # and the teacher's image fails the prompt on that skill, deterministically
    for seed in range(5):
        img, fired = teacher_render(p, seed, 32, FlawProfile(**{flaw: 1.0}), teacher_seed=3)
        assert fired == [flaw] and failed in check(p, img).failed
        again, _ = teacher_render(p, seed, 32, FlawProfile(**{flaw: 1.0}), teacher_seed=3)
        assert np.array_equal(img, again)


def test_flaws_only_touch_their_skill():
    everything_but_shape = FlawProfile(count=1.0, color=1.0, relation=1.0)
    for text in ("a triangle", "a circle and a square"):
        img, fired = teacher_render(text, 0, 32, everything_but_shape, teacher_seed=1)
        assert fired == [] and satisfies(text, img)
    assert teacher_render("a cyan circle", 0, 32, FlawProfile(count=1.0), 1)[1] == []


def test_scene_parser_ignores_specks():
    img = render("a red square and a blue triangle", 1).copy()
    black = np.argwhere(img.max(axis=2) == 0)
    for y, x in black[np.random.default_rng(0).choice(len(black), 4, replace=False)]:
        img[y, x] = (255, 255, 255)
    assert satisfies("a red square and a blue triangle", img)


def test_png_round_trip_and_errors():
    a = render("a cyan circle", 3, 64)
    assert np.array_equal(from_png(to_png(a), 64), a)
    with pytest.raises(ValueError, match="not a PNG"):
        from_png(b"GIF89a....")
    with pytest.raises(ValueError, match="32x32"):
        from_png(to_png(a), 32)


def test_score_means_per_category_then_over_categories():
    prompts = ["a circle", "a circle", "two squares", "two squares", "two squares", "two squares"]
    images = [render("a circle", 0), render("a square", 0),  # single_object: 1/2
              render("two squares", 0), render("two squares", 1),
              render("two squares", 2), render("three squares", 0)]  # counting: 3/4
    rep = score(prompts, images)
    assert rep.per_category == {"single_object": 0.5, "counting": 0.75}
    assert rep.overall == pytest.approx(0.625)  # not 4/6: categories weigh equally
    assert rep.n == 6 and rep.per_check_failures == {"shapes": 2, "objects": 1}
    assert json.loads(json.dumps(rep.to_dict()))["overall"] == rep.overall


def test_score_folder_counts_missing_images(tmp_path):
    prompts = ["a red circle", "a square above a triangle", "three circles"]
    ids = write_prompts_jsonl(prompts, tmp_path / "prompts.jsonl")
    for i, p in zip(ids[:2], prompts[:2]):
        (tmp_path / f"{i}.png").write_bytes(to_png(render(p, 0)))
    rep = score_folder(tmp_path, tmp_path / "prompts.jsonl")
    assert rep.n == 3 and rep.missing == [ids[2]] and rep.per_check_failures == {"missing": 1}
    assert rep.per_category == {"colors": 1.0, "counting": 0.0, "position": 1.0}
