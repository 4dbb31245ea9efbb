"""The run's final report: per-round statistics, held-out scores, a plot."""

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
        # Every image the run paid for, across restarts (the gateways' counters
        # start again with each process; their `spent` is restored from the ledger).
        "total_images_bought": len(Ledger(folder.ledger)),
        "total_spend": round(sum(s["spent"] for s in teacher_stats.values()), 4),
    }
    write_json_atomic(folder.report, report)
    (folder.root / "report.md").write_text(_markdown(report))
    _plot(curve, teachers, folder.root / "accuracy.png")
    say(f"report: {folder.report}")
    try:  # a page for people: its failure must not lose the run's end
        say(f"html report: {write_html_report(folder)}")
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).exception("writing report.html")
    say("held-out accuracy by round: " + " -> ".join(f"{a:.1%}" for a in curve))
    for t, s in teachers.items():
        say(f"teacher {t}: held-out {s['overall']:.1%}")
    return report


def _markdown(rep: dict) -> str:
    cats = sorted(rep["student"]["final"]["per_category"])
    head = "| model | overall | " + " | ".join(cats) + " |\n|---|---|" + "---|" * len(cats) + "\n"

    def row(name, s):
        return f"| {name} | {s['overall']:.1%} | " + " | ".join(
            f"{s['per_category'].get(c, 0):.1%}" for c in cats) + " |\n"

    out = ["# Run report\n", f"Wall time {rep['wall_s']:.0f} s; images bought {rep['total_images_bought']}; "
           f"spend ${rep['total_spend']:.2f}; stopped: {rep.get('stopped', 'rounds')}.\n\n"
           "## Held-out accuracy\n", head,
           row("student (start)", rep["student"]["start"]), row("student (final)", rep["student"]["final"])]
    for t, s in rep["teachers"].items():
        partial = f" (on {s['n']} images, {s['not_bought']} not bought)" if s.get("not_bought") else ""
        out.append(row(f"teacher {t}{partial}", s))
    out.append("\n## Rounds\n| round | held-out | student win rate | dataset | bought | spend |\n|---|---|---|---|---|---|\n")
    for r in rep["rounds"]:
        out.append(f"| {r['round']} | {r['heldout']['overall']:.1%} | {r['student_win_rate']:.0%} | "
                   f"{r['dataset_size']} | {r['images_bought']} | ${sum(r['spend'].values()):.2f} |\n")
    fa = rep["student"]["final_after"]
    if "version" in fa:
        out.append(f"\nThe final student was trained on the last evolved version v{fa['version']:04d} "
                   f"(snapshot at trainer step {fa['trainer_step']}).\n")
    return "".join(out)


def _plot(curve: list[float], teachers: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(-1, len(curve) - 1), curve, marker="o", label="student")
    for t, s in teachers.items():
        ax.axhline(s["overall"], ls="--", lw=1, label=f"teacher {t}", color=None)
    ax.set_xlabel("round (-1 = start)" + ("; last point: final student" if len(curve) > 1 else ""))
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
