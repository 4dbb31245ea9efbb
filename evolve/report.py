"""The run's final report: per-round statistics, held-out scores, plots.

Held-out scores are the world's exact scorer's (accuracy, shapes world) or the
VLM's (alignment and the student's win rate against each teacher, with 95%
intervals); `metric` in each score says which. Every figure reads the same
way by round: start, after each round, final."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from evolve.dataset import write_json_atomic
from evolve.html_report import write_html_report
from evolve.ledger import Ledger
from evolve.run_folder import load_rounds


def write_report(folder, teachers: dict[str, dict], teacher_stats: dict[str, dict], wall_s: float,
                 say=print, final: dict | None = None, stopped: str = "rounds") -> dict:
    """Write report.json, report.md, accuracy.png and report.html into the run folder.

    `final`: the student trained on the last evolved version (continuous
    schedule); else the final student is the last round's."""
    rounds = load_rounds(folder.rounds)
    baseline = json.loads((folder.rounds / "baseline.json").read_text())["heldout"]
    curve = [baseline["overall"]] + [r["heldout"]["overall"] for r in rounds]
    if final is not None:
        curve.append(final["heldout"]["overall"])
    ledger = Ledger(folder.ledger)
    totals = ledger.totals()  # every call the run paid (or may have paid) for, across restarts
    ledger.close()
    report = {
        "wall_s": round(wall_s, 1),
        "stopped": stopped,  # why the run ended: rounds | target | wall_clock | budget | interrupted
        "student": {
            "start": baseline,
            "final": final["heldout"] if final else rounds[-1]["heldout"] if rounds else baseline,
            "heldout_by_round": curve,
            "final_after": ({"version": final["version"], "trainer_step": final["trainer_step"]} if final
                            else {"round": rounds[-1]["round"] if rounds else None}),
        },
        "teachers": teachers,
        "teacher_stats": teacher_stats,
        "rounds": rounds,
        # Every image the run paid for, across restarts (the ledger, not the
        # gateways' counters, which start again with each process).
        "total_images_bought": totals.images,
        # certain + uncertain: a paid call whose outcome is unknown counts as spent.
        "total_spend": round(totals.spent, 4),
        "spend_uncertain": round(totals.uncertain, 4),
        "uncertain_calls": totals.uncertain_calls,
    }
    if baseline.get("reference") is not None:
        report["agreement"] = agreement(report)
    write_json_atomic(folder.report, report)
    (folder.root / "report.md").write_text(_markdown(report))
    _plot(curve, teachers, folder.root / "accuracy.png", win_rates(report), baseline.get("metric") == "vlm")
    say(f"report: {folder.report}")
    try:  # a page for people: its failure must not lose the run's end
        say(f"html report: {write_html_report(folder)}")
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).exception("writing report.html")
    vlm = baseline.get("metric") == "vlm"
    say(f"held-out {'alignment' if vlm else 'accuracy'} by round: "
        + " -> ".join(f"{a:.3f}" if vlm else f"{a:.1%}" for a in curve))
    for t, w in win_rates(report).items():
        say(f"student vs teacher {t}, win rate by round: "
            + " -> ".join("-" if r is None else f"{r:.0%}" for r in w))
    for t, sc in teachers.items():
        say(f"teacher {t}: held-out " + (f"alignment {sc['overall']:.3f}" if vlm else f"{sc['overall']:.1%}"))
    if "agreement" in report:
        ag = report["agreement"]
        say(f"the VLM ranks the models {'in the same order as' if ag['same_order'] else 'unlike'} the scene "
            f"parser (Kendall's tau {ag['kendall_tau']})")
    return report


def agreement(rep: dict) -> dict:
    """Does the VLM rank the models as the reference scorer does? The student at
    start and final and every teacher, by their overall held-out scores:
    Kendall's tau between the two orders, and whether they are the same."""
    from scipy.stats import kendalltau

    models = [("student (start)", rep["student"]["start"]), ("student (final)", rep["student"]["final"]),
              *((f"teacher {t}", s) for t, s in rep["teachers"].items())]
    models = [(n, s) for n, s in models if s.get("reference")]
    vlm = [round(s["overall"], 4) for _, s in models]
    ref = [round(s["reference"]["overall"], 4) for _, s in models]
    order = lambda xs: sorted(range(len(xs)), key=lambda i: -xs[i])  # noqa: E731
    tau = kendalltau(vlm, ref).statistic if len(models) > 1 else None
    return {"models": [n for n, _ in models], "vlm": vlm, "reference": ref,
            "same_order": order(vlm) == order(ref), "kendall_tau": None if tau is None else round(float(tau), 4)}


def scores_by_round(rep: dict) -> list[tuple[str, dict]]:
    """(label, held-out score) of the student: start, each round, final."""
    out = [("start", rep["student"]["start"])] + [(f"round {r['round']}", r["heldout"]) for r in rep["rounds"]]
    if "version" in rep["student"]["final_after"]:
        out.append(("final", rep["student"]["final"]))
    return out


def win_rates(rep: dict) -> dict[str, list[float | None]]:
    """Per teacher, the student's win rate at each of `scores_by_round` (VLM scores only)."""
    out: dict[str, list[float | None]] = {}
    scores = scores_by_round(rep)
    for t in sorted({t for _, s in scores for t in s.get("win_rate") or {}}):
        out[t] = [((s.get("win_rate") or {}).get(t) or {}).get("rate") for _, s in scores]
    return out


def _markdown(rep: dict) -> str:
    vlm = rep["student"]["start"].get("metric") == "vlm"
    fmt = (lambda x: "-" if x is None else f"{x:.3f}") if vlm else (lambda x: "-" if x is None else f"{x:.1%}")
    cats = sorted(rep["student"]["final"]["per_category"])
    head = "| model | overall | " + " | ".join(cats) + " |\n|---|---|" + "---|" * len(cats) + "\n"

    def row(name, s):
        return f"| {name} | {fmt(s['overall'])} | " + " | ".join(
            fmt(s["per_category"].get(c)) for c in cats) + " |\n"

    what = ("alignment (VLM, " + rep["student"]["start"]["alignment"]["method"] + ", mean P(yes); "
            "categories averaged)" if vlm and "alignment" in rep["student"]["start"] else "accuracy")
    out = ["# Run report\n", f"Wall time {rep['wall_s']:.0f} s; images bought {rep['total_images_bought']}; "
           f"spend ${rep['total_spend']:.2f}{_uncertain(rep)}; stopped: {rep.get('stopped', 'rounds')}.\n\n",
           f"## Held-out {what}\n", head,
           row("student (start)", rep["student"]["start"]), row("student (final)", rep["student"]["final"])]
    for t, s in rep["teachers"].items():
        partial = f" (on {s['n']} images, {s['not_bought']} not bought)" if s.get("not_bought") else ""
        out.append(row(f"teacher {t}{partial}", s))
    rates = win_rates(rep)
    if rates:
        labels = [label for label, _ in scores_by_round(rep)]
        out.append("\n## The student's win rate against each teacher\nHeld-out images, each pair asked in "
                   "both orders; a win or a loss needs both answers to agree (no-verdicts counted apart). "
                   "Rate = wins / (wins + losses), [95% Wilson interval].\n\n"
                   "| teacher | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n")
        for t in rates:
            cells = []
            for _, s in scores_by_round(rep):
                w = (s.get("win_rate") or {}).get(t)
                cells.append("-" if not w or w["rate"] is None else
                             f"{w['rate']:.0%} [{w['ci95'][0]:.0%}, {w['ci95'][1]:.0%}] ({w['no_verdict']} nv)")
            out.append(f"| {t} | " + " | ".join(cells) + " |\n")
    ag = rep.get("agreement")
    if ag is not None:
        out.append("\n## Reference: the shapes world's scene parser on the same images\n"
                   f"Same order as the VLM's: **{'yes' if ag['same_order'] else 'no'}** (Kendall's tau "
                   f"{ag['kendall_tau']}).\n\n| model | VLM | scene parser (accuracy) |\n|---|---|---|\n")
        for name, v, r in zip(ag["models"], ag["vlm"], ag["reference"]):
            out.append(f"| {name} | {fmt(v)} | {r:.1%} |\n")
    out.append("\n## Rounds\n| round | held-out | student win rate (judged prompts) | dataset | bought | spend |\n"
               "|---|---|---|---|---|---|\n")
    for r in rep["rounds"]:
        out.append(f"| {r['round']} | {fmt(r['heldout']['overall'])} | {r['student_win_rate']:.0%} | "
                   f"{r['dataset_size']} | {r['images_bought']} | ${sum(r['spend'].values()):.2f} |\n")
    fa = rep["student"]["final_after"]
    if "version" in fa:
        out.append(f"\nThe final student was trained on the last evolved version v{fa['version']:04d} "
                   f"(snapshot at trainer step {fa['trainer_step']}).\n")
    return "".join(out)


def _plot(curve: list[float], teachers: dict[str, dict], path: Path, rates: dict | None = None,
          vlm: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if rates else 1, figsize=(10 if rates else 5, 3.2), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(-1, len(curve) - 1), curve, marker="o", label="student")
    for t, s in teachers.items():
        ax.axhline(s["overall"], ls="--", lw=1, label=f"teacher {t}", color=None)
    ax.set_xlabel("round (-1 = start)" + ("; last point: final student" if len(curve) > 1 else ""))
    ax.set_ylabel("held-out alignment (VLM)" if vlm else "held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    if rates:
        ax = axes[0][1]
        for t, r in rates.items():
            ax.plot(range(-1, len(r) - 1), [float("nan") if x is None else x for x in r], marker="o",
                    label=f"vs {t}")
        ax.axhline(0.5, ls=":", lw=1, color="grey")
        ax.set(xlabel="round (-1 = start)", ylabel="student's win rate", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _uncertain(rep: dict) -> str:
    """How much of the spend is calls whose outcome is unknown (counted as spent)."""
    if not rep.get("spend_uncertain"):
        return ""
    n = rep["uncertain_calls"]
    return f" (of which ${rep['spend_uncertain']:.2f} uncertain: {n} call{'s' * (n != 1)} that may have been billed)"
