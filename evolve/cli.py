"""`evolve`: the command line.

    evolve run                      the main job (shapes world by default)
    evolve eval --checkpoint DIR [--config FILE]   score a student on the held-out set
    evolve eval --images DIR --prompts FILE
    evolve generate --checkpoint DIR --prompts FILE --out DIR
    evolve heldout --out FILE.jsonl the held-out prompt set
    evolve teachers serve           embedded teachers on 127.0.0.1
    evolve vlm serve                the embedded VLM on 127.0.0.1
    evolve judge-eval [--base-url URL --model M]   how far to trust a judge
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="EvolveDirector on Ray.")
teachers_app = typer.Typer(no_args_is_help=True, help="Embedded teacher servers.")
app.add_typer(teachers_app, name="teachers")
vlm_app = typer.Typer(no_args_is_help=True, help="The embedded VLM.")
app.add_typer(vlm_app, name="vlm")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load_config(config: Optional[Path], **overrides):
    from pydantic import ValidationError

    from evolve.config import RunConfig

    try:
        cfg = RunConfig.load(config) if config else RunConfig()
        data = cfg.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return RunConfig.model_validate(data)
    except (ValidationError, ValueError, FileNotFoundError) as e:
        _fail(f"bad configuration: {e}")


def _resumed_config(run_dir: str) -> Path:
    """The config.json of the run in `run_dir` (on an object store: this node's copy of it)."""
    from evolve.run_folder import RunFolder

    try:
        folder = RunFolder(run_dir)
        folder.pull_state()
    except (ValueError, OSError) as e:
        _fail(f"--resume {run_dir}: {e}")
    if not folder.config.exists():
        _fail(f"--resume {run_dir}: no run there (no config.json)")
    return folder.config


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, help="YAML or JSON RunConfig; defaults otherwise"),
    # str, not Path: a run folder may be s3://bucket/prefix (Path would fold the "//").
    run_dir: Optional[str] = typer.Option(None, help="run folder, a path or s3://bucket/prefix (resumes if it "
                                          "holds this run)"),
    resume: Optional[str] = typer.Option(None, help="continue the run in this folder (a path or s3://...) "
                                         "with its own config.json (give --rounds to run more rounds)"),
    rounds: Optional[int] = typer.Option(None, min=1),
    max_wall_s: Optional[float] = typer.Option(None, help="stop after the round that ends past this many seconds"),
    target_heldout: Optional[float] = typer.Option(None, help="stop once held-out accuracy reaches this (0-1)"),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="start from random weights, not the shipped base"),
    init_checkpoint: Optional[str] = typer.Option(None, help="student checkpoint to start from (a folder or s3://...)"),
    serve_port: Optional[int] = typer.Option(None, help="Serve HTTP port on 127.0.0.1"),
    serve_edgen: bool = typer.Option(False, "--serve-edgen",
                                     help="serve the student at http://127.0.0.1:PORT/edgen/v1 during the run"),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="show Ray's output here too (otherwise it goes to RUN/logs/ray.log)"),
):
    """Run EvolveDirector: rounds of train, judge, evolve.

    Stops after `rounds`, or earlier on max_wall_s, target_heldout, a spent
    budget, Ctrl-C or SIGTERM, writing the report every time; run it again on
    the same folder (or --resume it) to continue where it stopped."""
    import signal
    import traceback

    from evolve.cluster import cluster_parts
    from evolve.logs import RunLogs
    from evolve.loop import prepare, run as run_loop
    from evolve.progress import Progress
    from evolve.ray_env import connect, dashboard_url, session_logs

    if resume is not None:
        if config is not None or run_dir is not None:
            _fail("--resume takes the run's own config.json and folder: drop --config and --run-dir")
        config, run_dir = _resumed_config(resume), resume
    cfg = _load_config(config, run_dir=run_dir, rounds=rounds, init_checkpoint=init_checkpoint,
                       serve_port=serve_port, from_scratch=from_scratch or None,
                       serve_edgen=serve_edgen or None, max_wall_s=max_wall_s, target_heldout=target_heldout)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # everything wrong with the input is found here, before anything is bought
        ready = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))

    def _interrupt(signum, frame):  # `ray job stop` sends SIGTERM: stop like Ctrl-C, with a report
        raise KeyboardInterrupt

    import ray

    cfg, folder = ready.cfg, ready.folder
    logs = RunLogs(folder.logs, verbose=verbose)
    try:
        with logs:
            # Verbose: Ray's lines would cut through a live line, so plain lines only.
            with Progress(cfg.rounds, cfg.max_wall_s, stream=logs.err, live=False if verbose else None) as progress:
                said = progress.log_handler()
                if not verbose:  # the run's own warnings stay on the terminal (and in the log)
                    logging.getLogger("evolve").addHandler(said)
                progress.say(f"run folder: {folder}" + (f"  (Ray's output: {logs.path})" if logs.path else ""))
                try:
                    with progress.phase("starting Ray"):
                        connect()
                    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own (a bare exit)
                    print(f"Ray's own logs, per process: {session_logs()}")  # into ray.log, unless verbose
                    if dashboard_url():
                        progress.say(f"Ray dashboard: {dashboard_url()}")
                    with contextlib.ExitStack() as stack:
                        with progress.phase("starting the teachers, judge and trainer"):
                            parts = stack.enter_context(cluster_parts(cfg, folder, ready.init, ready.world))
                        report = run_loop(cfg, parts, folder, ready.init, ready.heldout, progress)
                finally:
                    # Inside `logs`: shutdown prints the forwarded lines Ray held back.
                    ray.shutdown()
                    logging.getLogger("evolve").removeHandler(said)
    except Exception:
        traceback.print_exc()  # to the terminal: the streams are back
        if logs.path:
            typer.secho(f"the run stopped on an error; Ray's side of it is in {logs.path}", fg=typer.colors.RED,
                        err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps({"final_heldout": report["student"]["final"]["overall"],
                           "wall_s": report["wall_s"], "stopped": report.get("stopped")}))
    if report.get("stopped") == "interrupted":
        raise typer.Exit(130)


def _world(config: Optional[Path]):
    """The world of a run config (the shapes world without one)."""
    from evolve.worlds import make_world

    return make_world(_load_config(config).world)


def _read_prompts(path: Path):
    """(id, prompt) pairs of a prompt file in any of the formats the prompts world reads."""
    from evolve.config import PromptSource
    from evolve.prompts import load_prompts

    try:
        return [(p.id, p.text) for p in load_prompts(PromptSource(path=path), max_chars=100_000)]
    except ValueError as e:
        _fail(str(e))


@app.command("eval")
def eval_(
    checkpoint: Optional[Path] = typer.Option(None, help="student checkpoint folder"),
    images: Optional[Path] = typer.Option(None, help="folder of <id>.png"),
    prompts: Optional[Path] = typer.Option(None, help="prompt file with ids (JSONL, CSV, TSV, TXT or Parquet; "
                                           "default: the world's held-out set)"),
    config: Optional[Path] = typer.Option(None, help="RunConfig: its world, judge and evaluation (default: shapes)"),
    out: Optional[Path] = typer.Option(None, help="write the score report here as JSON"),
    guidance: Optional[float] = typer.Option(None),
    steps: Optional[int] = typer.Option(None),
):
    """Score a checkpoint or a folder of images on held-out prompts, overall and per
    category: by the world's exact scorer (shapes), else by the config's VLM judge
    (alignment: VQAScore or decomposed questions)."""
    import tempfile

    from evolve.evaluation import Evaluator
    from evolve.parts import Parts
    from evolve.run_folder import RunFolder
    from evolve.world import HeldoutPrompt

    if (checkpoint is None) == (images is None):
        _fail("give exactly one of --checkpoint or --images")
    if checkpoint is not None and not (checkpoint / "config.json").exists():
        _fail(f"{checkpoint} is not a student checkpoint (no config.json)")
    cfg = _load_config(config)
    world = _world(config)
    if prompts is None:
        items = world.heldout()
    else:
        items = [HeldoutPrompt(i, t, world.category(t), _seed("generate", i)) for i, t in _read_prompts(prompts)]
    with tempfile.TemporaryDirectory() as tmp, _judge(cfg) as judge:
        pngs = _draw(checkpoint, items, guidance, steps) if checkpoint else _load_pngs(images, items)
        parts = Parts(world=world, teachers=None, judge=judge, trainer=None, sample=None)
        ev = Evaluator(cfg.evaluation.model_copy(update={"win_rate": False}), parts, RunFolder(tmp), items,
                       say=typer.echo)
        d, _ = ev.score(items, pngs)
    typer.echo(f"overall {d['overall']:.1%}  (n={d['n']}, {d['metric']})" if d["metric"] == "scene" else
               f"alignment {d['overall']:.3f}  (n={d['n']}, {d['alignment']['method']})")
    for c, a in d["per_category"].items():
        typer.echo(f"  {c:14s} {a:.1%}" if d["metric"] == "scene" else f"  {c:14s} {a:.3f}")
    if out:
        out.write_text(json.dumps(d, indent=2))


def _seed(*parts) -> int:
    from evolve.seeds import stable_seed

    return stable_seed(*parts)


@contextlib.contextmanager
def _judge(cfg):
    """The config's judge, in this process (the embedded VLM on a thread of its own)."""
    from evolve.parts import InProcessJudge
    from serve.judge_backends import make_backend

    jc = cfg.judge
    if jc.grammar_check is None:
        jc = jc.model_copy(update={"grammar_check": cfg.world.kind == "shapes"})
    if jc.backend == "embedded_vlm":
        from serve.embedded_vlm import EmbeddedVLMThread

        with EmbeddedVLMThread(jc.templates, jc.embedded_vlm) as url:
            yield InProcessJudge(make_backend(jc.model_copy(update={
                "backend": "openai", "base_url": url, "model": "embedded-vlm"})))
        return
    if jc.backend == "vllm":
        _fail("judge backend 'vllm' runs in the cluster; point --config at its endpoint with backend openai")
    yield InProcessJudge(make_backend(jc))


def _draw(checkpoint: Path, items, guidance, steps, size: tuple[int, int] | None = None) -> list[bytes]:
    import torch

    from evolve.config import SampleConfig
    from evolve.images import to_png
    from evolve.student.generate import generate_images

    torch.set_num_threads(max(1, torch.get_num_threads()))
    sc = SampleConfig(**{k: v for k, v in {"guidance": guidance, "steps": steps}.items() if v is not None})
    try:
        imgs = generate_images(str(checkpoint), [h.prompt for h in items], [h.seed for h in items], sc, size=size)
    except ValueError as e:  # a size the student cannot draw
        _fail(str(e))
    return [to_png(i) for i in imgs]


def _load_pngs(folder: Path, items) -> list[bytes]:
    missing = [h.id for h in items if not (folder / f"{h.id}.png").is_file()]
    if missing:
        _fail(f"{folder}: no image for {len(missing)} prompt ids, e.g. {missing[:5]}")
    return [(folder / f"{h.id}.png").read_bytes() for h in items]


@app.command()
def generate(
    checkpoint: Path = typer.Option(..., help="student checkpoint folder (EMA weights are used)"),
    prompts: Path = typer.Option(..., help="prompt file with ids (JSONL, CSV, TSV, TXT or Parquet)"),
    out: Path = typer.Option(..., help="writes OUT/<id>.png"),
    guidance: Optional[float] = typer.Option(None),
    steps: Optional[int] = typer.Option(None),
    height: Optional[int] = typer.Option(None, min=1, help="with --width: another shape than the student's "
                                         "square (PixArt students; e.g. an aspect bucket, 768 x 1344)"),
    width: Optional[int] = typer.Option(None, min=1),
):
    """Draw the student's images for a prompt file (image seed: a hash of the prompt's id)."""
    from evolve.world import HeldoutPrompt

    if (height is None) != (width is None):
        _fail("--height and --width go together")
    if not (checkpoint / "config.json").exists():
        _fail(f"{checkpoint} is not a student checkpoint (no config.json)")
    items = [HeldoutPrompt(i, t, None, _seed("generate", i)) for i, t in _read_prompts(prompts)]
    pngs = _draw(checkpoint, items, guidance, steps, None if height is None else (height, width))
    out.mkdir(parents=True, exist_ok=True)
    for h, png in zip(items, pngs):
        (out / f"{h.id}.png").write_bytes(png)
    typer.echo(f"wrote {len(items)} images to {out}")


@app.command()
def heldout(out: Path = typer.Option(..., help="JSON lines file to write"),
            config: Optional[Path] = typer.Option(None, help="RunConfig whose world to use (default: shapes)")):
    """Write the world's held-out set: one JSON line per image (id, prompt, category, seed)."""
    try:
        items = _world(config).heldout()
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    out.write_text("".join(json.dumps(h.__dict__) + "\n" for h in items))
    typer.echo(f"wrote {len(items)} prompts to {out}")


@app.command("pretrain-base")
def pretrain_base_cmd(
    work_dir: Path = typer.Option(Path("runs/base"), help="training folder; run again to resume"),
    steps: int = typer.Option(4000, min=1, help="total optimizer steps"),
    per_prompt: int = typer.Option(160, min=1, help="renders per curriculum prompt"),
    export: Optional[Path] = typer.Option(None, help="also write the shippable checkpoint here "
                                          "(e.g. evolve/assets/base_student)"),
    config: Optional[Path] = typer.Option(None, help="RunConfig whose student/train sections to use"),
    lr: float = typer.Option(1e-3, help="pretraining rate (the loop fine-tunes at the config's lower rate)"),
    checkpoint_every: int = typer.Option(200, min=1),
):
    """Train a base student on the world's base curriculum (Ray Train), resumable."""
    from evolve.pretrain import export_base, pretrain_base, sample_check
    from evolve.ray_env import connect

    cfg = _load_config(config)
    world = _world(config)
    train = cfg.train.model_copy(update={"checkpoint_every": checkpoint_every, "lr": lr})
    connect()
    final = pretrain_base(work_dir, world, student_cfg=cfg.student, train_cfg=train, steps=steps,
                          per_prompt=per_prompt, seed=cfg.seed)
    typer.echo(f"base checkpoint: {final}")
    target = Path(final)
    if export is not None:
        digest = export_base(Path(final), export)
        typer.echo(f"exported to {export} (model.safetensors sha256 {digest})")
        target = export
    acc = sample_check(target, world)
    (Path(work_dir) / "heldout.json").write_text(json.dumps(acc, indent=2))
    typer.echo(f"held-out overall {acc['overall']:.1%}: " +
               ", ".join(f"{c} {a:.0%}" for c, a in acc["per_category"].items()))


@app.command("import-pixart")
def import_pixart(
    transformer: str = typer.Argument(..., help="diffusers PixArt pipeline folder or Hub id"),
    out: Path = typer.Argument(..., help="student checkpoint folder to write (init_checkpoint of a run)"),
    resolution: int = typer.Option(512, help="256, 512 or 1024: which PixArt-alpha XL/2"),
    subfolder: Optional[str] = typer.Option("transformer", help="the transformer's folder in the pipeline"),
    qk_norm: bool = typer.Option(False, "--qk-norm", help="add the Edgen per-head LayerNorms (start as identities)"),
    config: Optional[Path] = typer.Option(None, help="RunConfig whose `student` to fill instead of the preset"),
):
    """Write a LatentStudent checkpoint holding pretrained PixArt-alpha weights."""
    from evolve.config import StudentConfig
    from evolve.student.convert import latent_student_from_diffusers

    try:
        student_cfg = (_load_config(config).student if config else
                       StudentConfig.pixart_alpha_xl2(resolution, qk_norm=qk_norm))
        student = latent_student_from_diffusers(transformer, student_cfg, subfolder=subfolder or None)
    except (ValueError, OSError) as e:
        _fail(f"import-pixart: {e}")
    student.save_pretrained(out)
    typer.echo(f"wrote {out} ({student.num_parameters() / 1e6:.1f}M parameters)")


@app.command("serve")
def serve_edgen(
    checkpoint: Optional[str] = typer.Option(None, help="student checkpoint folder, a path or the s3:// URI of a "
                                             "run's checkpoint (default: shipped base)"),
    port: int = typer.Option(8000, help="HTTP port on 127.0.0.1"),
    config: Optional[Path] = typer.Option(None, help="YAML or JSON EdgenServeConfig"),
    api_key_env: Optional[str] = typer.Option(None, help="env var with the bearer token clients must send"),
):
    """Serve a student (Edgen) with the OpenAI Images API on Ray Serve until Ctrl-C.

    POST /v1/images/generations, GET /v1/models, GET /generate?prompt=..."""
    import time

    import yaml
    from ray import serve

    from evolve.config import EdgenServeConfig
    from evolve.ray_env import connect
    from serve.edgen import build_edgen_app

    try:
        data = (EdgenServeConfig.load(config) if config else EdgenServeConfig()).model_dump()
        data.update({k: v for k, v in {"checkpoint": checkpoint, "api_key_env": api_key_env}.items() if v})
        cfg = EdgenServeConfig.model_validate(data)
        app_ = build_edgen_app(cfg)
    except (ValueError, OSError, yaml.YAMLError) as e:  # ValidationError and bad JSON are ValueErrors
        _fail(f"bad serve configuration: {e}")
    connect()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_, name="edgen", route_prefix="/")
    typer.echo(f"Edgen ({cfg.model_name}) at http://127.0.0.1:{port}/v1 ; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


@app.command("judge-eval")
def judge_eval_cmd(
    config: Optional[Path] = typer.Option(None, help="RunConfig whose `judge` to evaluate (default: scene)"),
    base_url: Optional[str] = typer.Option(None, help="an OpenAI-compatible VLM endpoint (sets backend openai)"),
    model: Optional[str] = typer.Option(None, help="the VLM's model name at base_url"),
    api_key_env: Optional[str] = typer.Option(None, help="env var holding the endpoint's key"),
    order: Optional[str] = typer.Option(None, help="random | both (see JudgeConfig.order)"),
    structured: Optional[str] = typer.Option(None, help="json_schema | vllm | none"),
    pairs: int = typer.Option(120, min=1, help="image pairs; each is asked both ways round"),
    size: int = typer.Option(32, min=16, help="image side in pixels"),
    seed: int = typer.Option(0),
    concurrency: int = typer.Option(8, min=1, help="pairs asked at once"),
    throughput_requests: int = typer.Option(64, min=0, help="discriminate requests timed (0: skip)"),
    out: Optional[Path] = typer.Option(None, help="write the report here as JSON"),
):
    """Ask a judge about image pairs whose right answer is known; report accuracy,
    position bias and verdicts/s. Runs in this process: no Ray needed."""
    from pydantic import ValidationError

    from evolve.config import JudgeConfig
    from evolve.judge_eval import judge_eval
    from serve.judge_backends import make_backend

    jc = _load_config(config).judge if config else JudgeConfig()
    pair_list = _world(config).judge_pairs(pairs, size, seed)
    if pair_list is None:
        _fail("judge-eval needs image pairs whose right answer is known, and this world makes none "
              "(the shapes world does: leave out --config, or give a shapes-world config)")
    over = {"base_url": base_url, "model": model, "api_key_env": api_key_env, "order": order,
            "structured": structured}
    data = jc.model_dump()
    data.update({k: v for k, v in over.items() if v is not None})
    if base_url:
        data["backend"] = "openai"
    if data["grammar_check"] is None:
        data["grammar_check"] = True  # the pairs are shapes-world prompts
    try:
        backend = make_backend(JudgeConfig.model_validate(data))
    except (ValidationError, ValueError) as e:
        _fail(f"bad judge configuration: {e}")
    report = judge_eval(backend, pair_list, concurrency=concurrency,
                        throughput_requests=throughput_requests)
    report = {"backend": data["backend"], "model": data.get("model"), "order": data["order"], **report}
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text)
    typer.echo(text)


@teachers_app.command("serve")
def teachers_serve(
    config: Optional[Path] = typer.Option(None, help="RunConfig whose teachers to serve"),
    size: Optional[int] = typer.Option(None, help="image side in pixels (default: the config's)"),
    port_base: int = typer.Option(0, help="first port (0: any free ports)"),
):
    """Serve the embedded teachers (OpenAI Images API) on 127.0.0.1 until Ctrl-C."""
    from serve.teachers import api_keys_from_env, serve_forever

    cfg = _load_config(config)
    embedded = [t for t in cfg.teachers if t.kind == "embedded"]
    if not embedded:
        _fail("the configuration has no embedded teachers")
    serve_forever(embedded, size or cfg.student.image_size, port_base=port_base,
                  api_keys=api_keys_from_env(embedded))


@vlm_app.command("serve")
def vlm_serve(
    config: Optional[Path] = typer.Option(None, help="RunConfig whose judge templates and embedded_vlm to use"),
    port: int = typer.Option(8100, help="HTTP port on 127.0.0.1 (0: any free port)"),
):
    """Serve the embedded VLM (OpenAI chat completions; its eyes are the shapes
    world's scene parser) on 127.0.0.1 until Ctrl-C."""
    from serve.embedded_vlm import serve_forever

    jc = _load_config(config).judge
    serve_forever(jc.templates, jc.embedded_vlm, port=port)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
