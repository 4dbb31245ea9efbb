"""report.html: one self-contained page about one run folder, for people.

Every image (the plots, the judge's and the held-out grids) is embedded as a
base64 PNG data URI: no other file, no script, no network. All text that
comes from the run (prompts are written by a VLM) is HTML-escaped.
Works on a run in progress too: whatever optional piece is missing (the final
student, report.json, judge grids, dataset versions) is left out."""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path

from evolve.run_folder import load_rounds
from evolve.store import write_atomic

MAX_LINEAGE_ROWS = 300
OPS = ("expand", "reseed", "mutate")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#222}
body{max-width:1200px;margin:1.5em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.4em 0 1em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}tr.sep th{background:#e8eef6}
.facts span{display:inline-block;margin-right:1.6em}.muted{color:#777}.nav a{margin-right:.8em}
img{max-width:100%;image-rendering:pixelated;display:block}img.plot{image-rendering:auto}
.win{color:#1a7f37}.lose{color:#b3261e}.none{color:#777}
"""


def write_html_report(folder) -> Path:
    """Write `folder.root/report.html` (atomically) and return its path. `folder`
    needs `root`; `rounds`, `grids`, `datasets`, `report` default to the
    RunFolder layout under it."""
    root = Path(folder.root)
    rounds_dir = Path(getattr(folder, "rounds", root / "rounds"))
    grids = Path(getattr(folder, "grids", root / "grids"))
    datasets = Path(getattr(folder, "datasets", root / "datasets"))
    rep = _json(Path(getattr(folder, "report", root / "report.json"))) or {}
    rounds = load_rounds(rounds_dir) if rounds_dir.is_dir() else []
    baseline = (_json(rounds_dir / "baseline.json") or {}).get("heldout")
    finals = sorted(rounds_dir.glob("final_v*.json")) if rounds_dir.is_dir() else []
    final = _json(finals[-1]) if finals else None
    trainer = _json(rounds_dir / "trainer.json")
    teachers = rep.get("teachers") or {}

    body = [f"<h1>Run {escape(root.name)}</h1>", _header(rep, rounds, baseline, final, trainer, teachers)]
    plots = _plots(rounds, baseline, final, teachers)
    if plots:
        body += ["<h2 id='plots'>Plots</h2>", _img(plots, "plots", "plot")]
    start = _grid_section("start", "Start (before round 0)", grids / "round_init.png", baseline)
    body.append(start)
    for r in rounds:
        body.append(_round_section(r, grids))
    if final is not None:
        title = f"Final student (dataset v{final.get('version', 0):04d}, trainer step {final.get('trainer_step')})"
        body.append(_grid_section("final", title, grids / "round_final.png", final.get("heldout")))
    body.append(_lineage(datasets))
    nav = ["<a href='#plots'>plots</a>"] * bool(plots) + ["<a href='#start'>start</a>"] * bool(start) + [
        f"<a href='#round-{int(r['round'])}'>round {int(r['round'])}</a>" for r in rounds] + [
        "<a href='#final'>final</a>"] * (final is not None) + ["<a href='#lineage'>evolved prompts</a>"]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>EvolveDirector run {escape(root.name)}</title><style>{CSS}</style></head><body>\n"
            f"<p class='nav'>{''.join(nav)}</p>\n" + "\n".join(body) + "\n</body></html>\n")
    return write_atomic(root / "report.html", page.encode("utf-8"))


# -- pieces ---------------------------------------------------------------------
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img class='{cls}' alt='{escape(alt)}' src=\"data:image/png;base64,{data}\">"


def _header(rep, rounds, baseline, final, trainer, teachers) -> str:
    last = rounds[-1] if rounds else {}
    wall = rep.get("wall_s", sum(r.get("round_s") or 0 for r in rounds))
    bought = rep.get("total_images_bought", last.get("images_bought", 0))
    spend = rep.get("total_spend", sum((last.get("spend") or {}).values()))
    facts = [f"wall time {wall:.0f} s", f"rounds finished {len(rounds)}", f"images bought {bought}",
             f"total spend ${spend:.2f}" + (f" (${rep['spend_uncertain']:.2f} uncertain: calls that may have "
                                             "been billed)" if rep.get("spend_uncertain") else "")]
    if rep.get("stopped"):
        facts.append(f"stopped: {rep['stopped']}")
    if trainer:
        facts.append(f"trainer steps {trainer.get('steps')}, waited on the loop "
                     f"{_pct(trainer.get('wait_fraction'))} of its time")
    student = rep.get("student") or {}
    start = student.get("start") or baseline
    fin = student.get("final") or (final or {}).get("heldout") or last.get("heldout")
    if final is not None:
        after = f"student (final, v{final.get('version', 0):04d})"
    else:
        after = f"student (after round {last['round']})" if rounds else "student (final)"
    rows = [("student (start)", start)] + [(after, fin)] * (fin is not None and fin is not start)
    rows += [(f"teacher {t}", s) for t, s in teachers.items()]
    note = "" if rep else "<span class='muted'>no report.json yet: numbers from the rounds so far</span>"
    vlm = (start or {}).get("metric") == "vlm"
    what = "alignment (VLM: mean P(yes), categories averaged)" if vlm else "accuracy"
    return ("<p class='facts'>" + "".join(f"<span>{escape(f)}</span>" for f in facts) + note
            + f"</p>\n<h3>Held-out {what}</h3>\n" + _acc_table(rows)
            + (_win_table(start, rounds, final) if vlm else ""))


def _win_table(start: dict | None, rounds: list[dict], final: dict | None) -> str:
    """The student's held-out win rate against each teacher, by round (VLM scores)."""
    cols = [("start", start)] + [(f"round {r['round']}", r.get("heldout")) for r in rounds]
    if final is not None:
        cols.append(("final", final.get("heldout")))
    teachers = sorted({t for _, s in cols for t in (s or {}).get("win_rate") or {}})
    if not teachers:
        return ""

    def cell(w):
        if not w or w.get("rate") is None:
            return "–"
        lo, hi = w["ci95"]
        return f"{w['rate']:.0%} <span class='muted'>[{lo:.0%}, {hi:.0%}], {w['no_verdict']} nv</span>"

    head = "<tr><th>vs teacher</th>" + "".join(f"<th>{escape(c)}</th>" for c, _ in cols) + "</tr>"
    body = "".join(f"<tr><td>{escape(t)}</td>" + "".join(
        f"<td class='n'>{cell(((s or {}).get('win_rate') or {}).get(t))}</td>" for _, s in cols) + "</tr>"
        for t in teachers)
    return ("<h3>The student's win rate against each teacher</h3><p class='muted'>held-out pairs asked in both "
            "orders; wins / (wins + losses), 95% Wilson interval; nv: no verdict (the orders disagreed)</p>"
            f"<table>{head}{body}</table>")


def _acc_table(rows: list[tuple[str, dict | None]]) -> str:
    rows = [(n, s) for n, s in rows if s]
    if not rows:
        return "<p class='muted'>no held-out scores yet</p>"
    cats = sorted({c for _, s in rows for c in s.get("per_category", {})})
    head = "<tr><th>model</th><th>overall</th>" + "".join(f"<th>{escape(c)}</th>" for c in cats) + "</tr>"
    body = "".join(
        f"<tr><td>{escape(n)}</td><td class='n'><b>{_pct(s.get('overall'))}</b></td>"
        + "".join(f"<td class='n'>{_pct(s.get('per_category', {}).get(c))}</td>" for c in cats) + "</tr>"
        for n, s in rows)
    return f"<table>{head}{body}</table>"


def _plots(rounds, baseline, final, teachers) -> bytes | None:
    if not rounds and not baseline:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(r["round"]) for r in rounds]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4))
    ax = axes[0][0]
    px = ([-1] if baseline else []) + xs
    py = ([baseline["overall"]] if baseline else []) + [r["heldout"]["overall"] for r in rounds]
    ax.plot(px, py, marker="o", label="student")
    if final is not None:
        fx, fy = (px[-1] if px else -1) + 1, final["heldout"]["overall"]
        ax.plot(px[-1:] + [fx], py[-1:] + [fy], marker="*", ms=10, ls=":", color="C0", label="final student")
        px = px + [fx]
    for i, (t, s) in enumerate(teachers.items()):
        ax.axhline(s["overall"], ls="--", lw=1, color=f"C{i + 1}", label=f"teacher {t}")
    ax.set(title="held-out alignment (VLM)" if (baseline or {}).get("metric") == "vlm" else "held-out accuracy",
           xlabel="round", ylim=(0, 1))
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.bar(xs, [r.get("student_win_rate") or 0 for r in rounds], color="C2", alpha=.5, label="judged training prompts")
    teachers_vs = sorted({t for r in rounds for t in (r["heldout"].get("win_rate") or {})})
    for i, t in enumerate(teachers_vs):  # VLM scores: the held-out win rate against each teacher
        ys = [((r["heldout"].get("win_rate") or {}).get(t) or {}).get("rate") for r in rounds]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", color=f"C{i + 3}",
                label=f"held-out vs {t}")
    ax.set(title="student win rate (judge)", xlabel="round", ylim=(0, 1))
    ax.legend(fontsize=7)
    ax = axes[1][0]
    ax.plot(xs, [r.get("dataset_size", 0) for r in rounds], marker="o", label="dataset size")
    ax.bar(xs, [sum((r.get("added") or {}).values()) for r in rounds], alpha=.4, color="C2", label="added")
    ax.bar(xs, [-(r.get("deleted") or 0) for r in rounds], alpha=.4, color="C3", label="deleted")
    ax.set(title="dataset size at round start", xlabel="round")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    names = sorted({t for r in rounds for t in r.get("spend") or {}})
    for t in names:
        ax.plot(xs, [(r.get("spend") or {}).get(t, 0) for r in rounds], marker="o", label=t)
    ax.set(title="spend per teacher (cumulative, $)", xlabel="round")
    if names:
        ax.legend(fontsize=7)
    last = xs[-1] if xs else -1
    axes[0][0].set_xticks(px, ["start" if t == -1 else "final" if final is not None and t == last + 1
                               else str(t) for t in px])
    for a in list(axes.flat)[1:]:
        a.set_xticks(xs)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _grid_section(anchor: str, title: str, grid: Path, heldout: dict | None) -> str:
    out = [f"<h2 id='{anchor}'>{escape(title)}</h2>"]
    if heldout:
        out.append(f"<p>held-out accuracy <b>{_pct(heldout.get('overall'))}</b></p>")
    if grid.is_file():
        out += ["<h3>Held-out samples</h3>", _img(grid.read_bytes(), grid.name)]
    return "\n".join(out) if len(out) > 1 else ""


def _round_section(r: dict, grids: Path) -> str:
    n = int(r["round"])
    added = r.get("added") or {}
    wins = r.get("teacher_wins") or {}
    facts = [
        ("held-out accuracy", _pct((r.get("heldout") or {}).get("overall"))),
        ("student win rate", _pct(r.get("student_win_rate"))),
        ("judged", f"{r.get('judged', '–')} (no verdict {r.get('no_verdict', 0)})"),
        ("teacher wins", ", ".join(f"{t} {c}" for t, c in wins.items()) or "–"),
        ("dataset size", r.get("dataset_size", "–")),
        ("deleted", r.get("deleted", 0)),
        ("expanded from", r.get("expanded_from", 0)),
        ("added", ", ".join(f"{op} {added.get(op, 0)}" for op in OPS)
         + (" (mutated)" if r.get("mutated") else "")),
        ("images bought (cumulative)", r.get("images_bought", "–")),
        ("spend (cumulative)", ", ".join(f"{t} ${s:.2f}" for t, s in (r.get("spend") or {}).items()) or "–"),
    ]
    for k, label in (("trainer_step", "trainer step"), ("waited_for_trainer_s", "waited for trainer (s)"),
                     ("train_s", "training (s)")):
        if k in r:
            facts.append((label, r[k]))
    phases = ", ".join(f"{p.removesuffix('_s')} {s:.1f}" for p, s in (r.get("phases") or {}).items())
    facts.append(("round time (s)", f"{r.get('round_s', 0):.1f}" + (f" — {phases}" if phases else "")))
    out = [f"<h2 id='round-{n}'>Round {n}</h2><table>"
           + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts) + "</table>"]
    out.append(_judge(grids / f"judge_{n:03d}.png", grids / f"judge_{n:03d}.json"))
    grid = grids / f"round_{n}.png"
    if grid.is_file():
        out += [f"<h3>Held-out samples after round {n}</h3>", _img(grid.read_bytes(), grid.name)]
    return "\n".join(o for o in out if o)


def _verdict(row: dict) -> str:
    if not row.get("decided", True):
        return "<span class='none'>no verdict</span>"
    if row.get("student_matches"):
        return "<span class='win'>student matches</span>"
    return f"<span class='lose'>teacher {escape(str(row.get('best_teacher') or '?'))} wins</span>"


def _judge(png: Path, meta_path: Path) -> str:
    """The judge grid, one table row per judged prompt: its images (student,
    then each teacher), the prompt and the verdict."""
    meta = _json(meta_path)
    if not png.is_file() or not meta:
        return ""
    cols, rows = meta.get("columns") or [], meta.get("rows") or []
    strips = _split_rows(png.read_bytes(), len(rows))
    head = ("<h3>What the judge saw</h3><table><tr><th>#</th>"
            f"<th>images: {escape(' | '.join(map(str, cols)))}</th><th>prompt</th><th>verdict</th></tr>")
    body = "".join(
        f"<tr><td class='n'>{i}</td><td>{_img(strips[i], f'judge row {i}') if strips else ''}</td>"
        f"<td>{escape(str(row.get('prompt', '')))}</td><td>{_verdict(row)}</td></tr>"
        for i, row in enumerate(rows))
    whole = "" if strips else _img(png.read_bytes(), png.name)
    return head + body + "</table>" + whole


def _split_rows(png: bytes, n: int) -> list[bytes] | None:
    """Cut the grid into its n image rows; None if it does not divide evenly."""
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    if n <= 0 or im.height % n:
        return None
    h, out = im.height // n, []
    for i in range(n):
        buf = io.BytesIO()
        im.crop((0, i * h, im.width, (i + 1) * h)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _lineage(datasets: Path) -> str:
    """Every record added by expand/reseed/mutate, by round, with its parent."""
    out = "<h2 id='lineage'>Evolved prompts</h2>"
    if not datasets.is_dir():
        return out + "<p class='muted'>no dataset versions</p>"
    from evolve.dataset import DatasetVersions

    dv, recs = DatasetVersions(datasets), {}
    for v in dv.versions():
        for rec in dv.read(v):
            recs.setdefault(rec.id, rec)
    evolved = sorted((r for r in recs.values() if r.op in OPS),
                     key=lambda r: (r.round_added, r.parent_id or "", r.op, r.prompt))
    if not evolved:
        return out + "<p class='muted'>no evolved prompts yet</p>"
    rows, shown_round = [], None
    for r in evolved[:MAX_LINEAGE_ROWS]:
        if r.round_added != shown_round:
            shown_round = r.round_added
            k = sum(1 for e in evolved if e.round_added == shown_round)
            rows.append(f"<tr class='sep'><th colspan='5'>added for round {shown_round} "
                        f"(after judging round {shown_round - 1}): {k}</th></tr>")
        p = recs.get(r.parent_id) if r.parent_id else None
        if p is not None:
            where = escape(p.op) + (f", round {p.round_added}" if p.op != "seed" else "")
            parent = f"{escape(p.prompt)} <span class='muted'>({where})</span>"
        else:  # a mutation has no parent; a parent id not found in any version is shown as is
            parent = f"<span class='muted'>{escape(r.parent_id or '–')}</span>"
        rows.append(f"<tr><td>{escape(r.op)}</td><td>{parent}</td><td>→</td>"
                    f"<td>{escape(r.prompt)}</td><td>{escape(r.teacher)}</td></tr>")
    more = len(evolved) - MAX_LINEAGE_ROWS
    note = f"<p class='muted'>… and {more} more not shown.</p>" if more > 0 else ""
    return (out + f"<p>{len(evolved)} prompts added by the loop (parent prompt → new prompt; "
            "the teacher whose image was chosen).</p><table><tr><th>op</th><th>parent prompt</th><th></th>"
            "<th>new prompt</th><th>teacher</th></tr>" + "".join(rows) + "</table>" + note)
