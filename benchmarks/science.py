"""The paper's claims, measured: data efficiency, beating the teachers, ablations.

    python benchmarks/science.py --suite efficiency|teachers|ablations|all [--seeds 3] [--quick]

Every arm is one `evolve run` (the same driver a cluster runs, so the harness
reruns unchanged with real teachers and a real judge: pass `--config` with
their section), with the same student start, training steps, teachers and
held-out set; arms differ only in what this file sets:

efficiency  budgets of training images bought (every image counts, including
            the teacher images the judge passed over); arms `random` (the
            paper's "more data" baseline: prompts sampled uniformly from the
            grammar, one teacher image each, no judge) and `evolve`.
teachers    at one budget: learn from each teacher alone, or from all three
            with the judge picking the best image.
ablations   at one budget: deletion, expansion, mutation, multi-teacher choice
            switched off in turn.

A finished arm is kept in `<out>/arms/<name>.json` and skipped on a rerun, so
the suite runs in parts; run folders live under `<out>/runs/`. `--quick` is a
few-minute smoke test (tiny config, one small budget, one seed) run by CI.
`<out>/summary-<suite>.json` has every arm's mean and spread and, per budget,
how many images random sampling needs to match EvolveDirector;
`<out>/efficiency.png` plots the two curves, `<out>/teachers.png` and
`<out>/ablations.png` compare the arms of those suites side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolve.config import RunConfig  # noqa: E402

BUDGETS = (300, 900)
ONE_BUDGET = 900


def base_config(quick: bool, config: Path | None) -> RunConfig:
    """Sized for this 2-core machine: the shipped base student, a short run."""
    if config is not None:
        return RunConfig.load(config)
    if quick:
        tiny = RunConfig.load(ROOT / "configs" / "tiny.yaml")
        return tiny.model_copy(update={"rounds": 1, "stop_when_spent": False, "train": tiny.train.model_copy(
            update={"lockstep": True, "steps_per_round": 3, "poll_every": 1})})
    # Lockstep: every dataset version gets exactly steps_per_round steps, so arms
    # differ only in their data, never in how long they trained.
    # 4 versions x 150 steps: the main job's defaults reach +10 points in ~700 steps;
    # 240 steps left every arm within the held-out set's noise of the base.
    # Arms that spend their images early keep training on them (stop_when_spent off).
    return RunConfig.model_validate({
        "rounds": 3, "world": {"heldout_per_category": 12}, "stop_when_spent": False,
        "train": {"steps_per_round": 150, "lockstep": True},
        "sample": {"steps": 12},
        "evolution": {"max_eval": 32},
    })


def arm_config(base: RunConfig, arm: str, budget: int, seed: int) -> RunConfig:
    """`arm` is one of: random, evolve, only-<teacher>, no-delete, no-expand,
    no-mutate, no-select."""
    data = base.model_dump()
    data.update(seed=seed, max_images=budget)
    evo, world = data["evolution"], data["world"]
    teachers = len(data["teachers"])
    if arm == "random":
        evo["strategy"] = "random"
        world["seed_prompts"] = budget            # every image a training image
    else:
        # A quarter of the budget seeds the set; the judge spends the rest.
        world["seed_prompts"] = max(4, budget // (4 * teachers))
    if arm.startswith("only-"):
        name = arm.removeprefix("only-")
        data["teachers"] = [t for t in data["teachers"] if t["name"] == name]
        if not data["teachers"]:
            raise ValueError(f"arm {arm}: no teacher named {name!r}")
        world["seed_prompts"] = max(4, budget // 4)
    elif arm == "no-delete":
        evo["delete"] = False
    elif arm == "no-expand":
        evo["expand_k"] = 0
    elif arm == "no-mutate":
        evo["mutate_prob"] = 0.0
    elif arm == "no-select":
        evo["select"] = "random"
    elif arm not in ("random", "evolve"):
        raise ValueError(f"unknown arm {arm!r}")
    return RunConfig.model_validate(data)


def run_arm(out: Path, base: RunConfig, arm: str, budget: int, seed: int, port: int,
            keep_checkpoints: bool = False, build_parts=None) -> dict:
    """One arm, or its stored result. A finished arm's student checkpoints
    (~330 MB an arm) are deleted unless `keep_checkpoints`; its report, rounds,
    verdicts, datasets and images stay. `build_parts`: the loop's parts (the
    cluster's unless given: tests hand in stand-ins)."""
    from evolve.cluster import cluster_parts
    from evolve.loop import main
    from evolve.run_folder import RunFolder

    name = f"{arm}-b{budget}-s{seed}"
    path = out / "arms" / f"{name}.json"
    if path.exists():
        result = json.loads(path.read_text())
        report = out / "runs" / name / "report.json"
        if "per_category" not in result and report.exists():  # arms stored before it was recorded
            result["per_category"] = json.loads(report.read_text())["student"]["final"]["per_category"]
            path.write_text(json.dumps(result, indent=2))
        return result
    cfg = arm_config(base, arm, budget, seed).model_copy(
        update={"run_dir": str(out / "runs" / name), "serve_port": port})
    t0 = time.time()
    report = main(cfg, build_parts or cluster_parts, progress=lambda msg: print(f"[{name}] {msg}", flush=True))
    student = report["student"]
    # Training images: the held-out images bought to score the teachers do not count.
    training = report["rounds"][-1]["images_bought"] if report["rounds"] else 0
    final = student.get("final") or {}
    result = {"arm": arm, "budget": budget, "seed": seed,
              "heldout": final.get("overall", student["heldout_by_round"][-1]),
              "per_category": final.get("per_category", {}),
              "heldout_by_round": student["heldout_by_round"],
              "images_bought": training,
              "teachers": {t: r["overall"] for t, r in report["teachers"].items()},
              "wall_s": round(time.time() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if not keep_checkpoints:
        folder = RunFolder(cfg.run_dir)
        for d in (folder.checkpoints, folder.train_storage):
            shutil.rmtree(d, ignore_errors=True)
    return result


def suite_arms(suite: str, base: RunConfig, quick: bool,
               budgets: tuple[int, ...] = BUDGETS) -> list[tuple[str, int]]:
    budgets = (24,) if quick else budgets
    one = budgets[-1] if quick else ONE_BUDGET
    teachers = [t.name for t in base.teachers]
    arms: list[tuple[str, int]] = []
    if suite in ("efficiency", "all"):
        arms += [(a, b) for b in budgets for a in ("random", "evolve")]
    if suite in ("teachers", "all"):
        arms += [(f"only-{t}", one) for t in teachers] + [("evolve", one)]
    if suite in ("ablations", "all"):
        arms += [(a, one) for a in ("evolve", "no-delete", "no-expand", "no-mutate", "no-select")]
    return list(dict.fromkeys(arms))


def summarize(results: list[dict]) -> dict:
    """Mean and spread of held-out accuracy, and mean images bought, per (arm, budget)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["arm"], r["budget"]), []).append(r)
    out = {}
    for (a, b), rs in sorted(groups.items()):
        acc = [r["heldout"] for r in rs]
        out[f"{a}@{b}"] = {"arm": a, "budget": b, "n": len(rs), "mean": statistics.fmean(acc),
                           "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0, "seeds": acc,
                           "start": rs[0].get("heldout_by_round", [None])[0],
                           "images": statistics.fmean(r["images_bought"] for r in rs),
                           "per_category": {c: statistics.fmean(r["per_category"][c] for r in rs)
                                            for c in rs[0].get("per_category", {})},
                           "teachers": {t: statistics.fmean(r["teachers"][t] for r in rs)
                                        for t in rs[0]["teachers"]}}
    return out


def random_images_needed(summary: dict, acc: float) -> float | None:
    """Images the random arm needs for held-out accuracy `acc`, by linear
    interpolation of its mean curve (accuracy against images bought); None
    when it never gets there within the budgets run."""
    curve = sorted((r["images"], r["mean"]) for r in summary.values() if r["arm"] == "random")
    if curve and acc <= curve[0][1]:
        return float(curve[0][0])  # at most this many: the smallest budget run already does it
    for (b0, a0), (b1, a1) in zip(curve, curve[1:]):
        if a0 < acc <= a1:
            return b0 + (b1 - b0) * (acc - a0) / (a1 - a0)
    return None


def efficiency_table(summary: dict) -> list[dict]:
    """Per budget: the images EvolveDirector bought, its accuracy, and what random
    sampling pays for that accuracy. `ratio` None: random never gets there;
    `ratio_at_most`: random's smallest budget already matches, so the ratio is a ceiling."""
    rows = []
    curve = sorted((r["images"], r["mean"]) for r in summary.values() if r["arm"] == "random")
    if not curve:  # a suite without random sampling (teachers, ablations) has nothing to compare
        return rows
    for r in sorted((r for r in summary.values() if r["arm"] == "evolve"), key=lambda r: r["budget"]):
        need = random_images_needed(summary, r["mean"])
        rows.append({"budget": r["budget"], "evolve_images": r["images"], "evolve": r["mean"],
                     "random_needs": need, "ratio": None if need is None else need / r["images"],
                     "ratio_at_most": bool(curve) and r["mean"] <= curve[0][1]})
    return rows


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for arm, style, color in (("random", "o--", "tab:blue"), ("evolve", "s-", "tab:orange")):
        rows = sorted((r for r in summary.values() if r["arm"] == arm), key=lambda r: r["images"])
        if rows:
            ax.errorbar([r["images"] for r in rows], [100 * r["mean"] for r in rows],
                        yerr=[100 * r["sd"] for r in rows], fmt=style, capsize=3, color=color,
                        label=("EvolveDirector" if arm == "evolve" else "random sampling") + " (mean, sd)")
            for r in rows:  # every seed, so the spread is seen, not only summarized
                ax.scatter([r["images"]] * len(r.get("seeds", [])), [100 * a for a in r.get("seeds", [])],
                           s=12, color=color, alpha=0.45)
    start = next((r["start"] for r in summary.values() if r.get("start") is not None), None)
    if start is not None:
        ax.axhline(100 * start, color="gray", lw=1, ls=":", label="student at start")
    budgets = sorted({r["budget"] for r in summary.values()})
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("teacher images bought")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_arms(rows: list[dict], path: Path) -> None:
    """One bar per arm (mean over seeds, sd, every seed as a dot), with the
    teachers' own held-out accuracy and the student's start as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2.5, 3.8))
    xs = range(len(rows))
    ax.bar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["sd"] for r in rows], capsize=3,
           color=["tab:orange" if r["arm"] == "evolve" else "tab:gray" for r in rows], alpha=0.8)
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r["seeds"]), [100 * a for a in r["seeds"]], s=12, color="black", zorder=3)
    # The arm that bought from every teacher scored them all (a one-teacher arm may
    # have spent its teacher's budget before the held-out images).
    teachers = max((r["teachers"] for r in rows), key=len, default={})
    for (name, acc), ls in zip(sorted(teachers.items(), key=lambda t: -t[1]), ("-", "--", "-.", ":")):
        ax.axhline(100 * acc, color="tab:green", lw=1, ls=ls, label=f"teacher {name}")
    start = next((r["start"] for r in rows if r.get("start") is not None), None)
    if start is not None:
        ax.axhline(100 * start, color="gray", lw=1, ls=":", label="student at start")
    ax.set_xticks(list(xs), [f"{r['arm']}\n{r['images']:.0f} img" for r in rows])
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_suite(suite: str, seeds: int, quick: bool, config: Path | None, out: Path,
              budgets: tuple[int, ...] = BUDGETS, keep_checkpoints: bool = False, build_parts=None) -> dict:
    """Run (or read back) every arm of `suite`; write and return the summary.
    Uses the Ray instance already started in this process, if any (none is
    started when `build_parts` hands in other parts)."""
    import ray

    from evolve.ray_env import free_port

    base = base_config(quick, config)
    todo = [(arm, budget, seed) for seed in range(1 if quick else seeds)
            for arm, budget in suite_arms(suite, base, quick, budgets)]
    # Ray only when an arm is left to run: a finished suite re-summarizes in a second.
    started = build_parts is None and not ray.is_initialized() and not all(
        (out / "arms" / f"{a}-b{b}-s{s}.json").exists() for a, b, s in todo)
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        # Seed by seed: a suite stopped part-way has every arm at the same seeds.
        for arm, budget, seed in todo:
            results.append(run_arm(out, base, arm, budget, seed, free_port(), keep_checkpoints, build_parts))
    finally:
        if started:
            ray.shutdown()
    summary = summarize(results)
    table = efficiency_table(summary)
    (out / f"summary-{suite}.json").write_text(json.dumps({"arms": summary, "efficiency": table}, indent=2))
    if any(r["arm"] == "random" for r in summary.values()):
        plot(summary, out / "efficiency.png")
    for name in ("teachers", "ablations"):
        if suite in (name, "all"):
            arms = [f"{a}@{b}" for a, b in suite_arms(name, base, quick, budgets)]
            plot_arms([summary[k] for k in arms if k in summary], out / f"{name}.png")
    return {"arms": summary, "efficiency": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="efficiency", choices=["efficiency", "teachers", "ablations", "all"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny config, one budget, one seed")
    ap.add_argument("--config", type=Path, default=None, help="base RunConfig (e.g. real teachers and judge)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "science")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                    help="efficiency suite: image budgets, comma-separated")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each finished arm's student checkpoints (~330 MB an arm here)")
    args = ap.parse_args()
    budgets = tuple(int(b) for b in args.budgets.split(","))
    out = run_suite(args.suite, args.seeds, args.quick, args.config, args.out, budgets, args.keep_checkpoints)
    for key, row in out["arms"].items():
        print(f"{key:28s} n={row['n']}  held-out {row['mean']:.1%} +- {row['sd']:.1%}  "
              f"({row['images']:.0f} images bought)")
    most = max((r["images"] for r in out["arms"].values() if r["arm"] == "random"), default=0)
    for row in out["efficiency"]:
        need = (f"does not reach it with up to {most:.0f} images" if row["random_needs"] is None else
                f"needs {'at most ' if row['ratio_at_most'] else ''}{row['random_needs']:.0f} images")
        print(f"budget {row['budget']}: EvolveDirector {row['evolve']:.1%} with {row['evolve_images']:.0f} "
              f"images; random sampling {need}")


if __name__ == "__main__":
    main()
