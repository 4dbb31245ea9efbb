"""The `evolve` commands outside evaluation relies on: generate, eval, heldout, teachers serve."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request

import pytest
from typer.testing import CliRunner

from evolve.cli import app
from evolve.config import StudentConfig
from evolve.shapes import vocabulary
from evolve.shapes.grammar import heldout_prompts
from evolve.shapes.render import from_png, render, to_png
from evolve.shapes.scorer import heldout_set, write_prompts_jsonl

runner = CliRunner()
TINY = StudentConfig(block_channels=(16, 32), text_dim=32, text_layers=1, vocabulary=tuple(vocabulary()))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from evolve.student.model import Student

    d = tmp_path_factory.mktemp("ckpt")
    Student.from_config(TINY).save_pretrained(d)
    return d


def test_generate_writes_one_png_per_id(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a1", "prompt": "a red circle"}\n{"id": "b2", "prompt": "two squares"}\n')
    res = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                              "--out", str(tmp_path / "out"), "--steps", "2"])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["a1.png", "b2.png"]
    assert from_png((tmp_path / "out" / "a1.png").read_bytes()).shape == (32, 32, 3)


def test_generate_rejects_bad_prompt_file_and_bad_checkpoint(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a1", "text2": "a purple circle"}\n')
    res = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "p.jsonl" in res.output and "no prompt" in res.output
    prompts.write_text('{"id": "a1", "prompt": "a purple circle"}\n')  # any text: the student draws it
    res = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                              "--out", str(tmp_path / "out"), "--steps", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path), "--prompts", str(prompts),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not a student checkpoint" in res.output
    prompts.write_text('{"id": "a1", "prompt": "a red circle"}\n')
    res = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                              "--out", str(tmp_path / "out"), "--height", "32"])
    assert res.exit_code == 2 and "--height and --width go together" in res.output
    res = runner.invoke(app, ["generate", "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                              "--out", str(tmp_path / "out"), "--height", "32", "--width", "64"])
    assert res.exit_code == 2 and "unet student draws 32x32 images only" in res.output


def test_eval_scores_a_folder(tmp_path):
    prompts = heldout_prompts(2)
    ids = write_prompts_jsonl(prompts, tmp_path / "p.jsonl")
    (tmp_path / "imgs").mkdir()
    for i, p in zip(ids, prompts):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(to_png(render(p, seed=3)))
    out = tmp_path / "score.json"
    res = runner.invoke(app, ["eval", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.jsonl"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["overall"] == 1.0
    assert "overall 100.0%" in res.output


def test_eval_of_a_checkpoint(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    write_prompts_jsonl(heldout_prompts(1), prompts)
    res = runner.invoke(app, ["eval", "--checkpoint", str(tiny_checkpoint), "--prompts", str(prompts),
                              "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert "overall" in res.output and "counting" in res.output


def test_eval_needs_one_source():
    res = runner.invoke(app, ["eval"])
    assert res.exit_code == 2 and "exactly one of" in res.output


def test_bad_config_names_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("roundz: 3\n")
    res = runner.invoke(app, ["run", "--config", str(cfg)])
    assert res.exit_code == 2 and "roundz" in res.output


def test_heldout(tmp_path):
    res = runner.invoke(app, ["heldout", "--out", str(tmp_path / "h.jsonl")])
    assert res.exit_code == 0
    rows = [json.loads(l) for l in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert len(rows) == len(heldout_set()) == 96 and {"id", "prompt"} <= set(rows[0])


def test_teachers_serve_prints_urls_that_answer():
    proc = subprocess.Popen([sys.executable, "-m", "evolve.cli", "teachers", "serve"],
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline().split() for _ in range(3)]
        urls = dict(lines)
        assert set(urls) == {"aurora", "brush", "canvas"}
        assert all(u.startswith("http://127.0.0.1:") for u in urls.values())
        body = json.dumps({"model": "brush", "prompt": "a red circle", "n": 1, "size": "32x32",
                           "response_format": "b64_json"}).encode()
        req = urllib.request.Request(urls["brush"] + "/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
        data = json.loads(urllib.request.urlopen(req, timeout=30).read())
        img = from_png(base64.b64decode(data["data"][0]["b64_json"]))
        assert img.shape == (32, 32, 3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_missing_checkpoint_or_a_bad_config(tmp_path):
    r = runner.invoke(app, ["serve", "--checkpoint", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "no student checkpoint" in r.output
    bad = tmp_path / "edgen.yaml"
    bad.write_text("max_n: 0\n")
    r = runner.invoke(app, ["serve", "--config", str(bad)])
    assert r.exit_code != 0 and "max_n" in r.output
