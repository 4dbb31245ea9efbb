"""The SQLite ledger at the paper's scale: open time, memory, lookups, counts, appends.

    python benchmarks/ledger_scale.py [--sizes 1000000 10000000] [--out benchmarks/results/ledger_scale.jsonl]
    python benchmarks/ledger_scale.py --quick          # 100k purchases, a CI-sized run

For each N, builds a synthetic ledger of N `bought` purchases across 3
teachers (prompts of 60-120 characters), plus 300 calls in flight (100 each
sending, open, uncertain), fast: one executemany transaction with journal and
sync off, the key index made after the rows. That is set-up, not measured.
Then, in a fresh Python process (so its memory is its own), opened as a
gateway opens it (`Ledger(path)`): time to the first lookup, RSS after opening,
lookups/s of 20k random existing keys and 20k missing ones, `len()` and
`totals()` times, `calls_in` (sending/open: the partial index; uncertain: a
table scan), durable appends/s (500 `record()`s of new purchases; 500
`begin` + `mark(open)` pairs, each a commit), RSS at the end, file size.

At 1M (or the smallest N if under 1M) it also writes the same purchases as
the JSON-lines file of the previous version and loads it, in a fresh process,
with a copy of that version's loader (every line parsed into a list of dicts
and a dict by key), for comparison; and times the one-time import of that file
into a new ledger. Page cache is warm (the files were just written). Every
file lives in a temp folder under --tmp and is deleted at the end.

One JSON line per measurement goes to --out (with the command); a markdown
table is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolve.ledger import Ledger, khash  # noqa: E402

TEACHERS = ("aurora", "brush", "cinder")
PRICES = {"aurora": 0.04, "brush": 0.02, "cinder": 0.003}
SIZE = 512
ADJ = ("red", "weathered", "tiny", "glowing", "ancient", "striped", "velvet", "rusty", "crystal", "sleepy",
       "enormous", "paper", "golden", "mossy", "neon", "wooden", "frozen", "painted", "hollow", "silver")
NOUN = ("lighthouse", "teapot", "fox", "bicycle", "cathedral", "octopus", "violin", "lantern", "tortoise",
        "windmill", "robot", "umbrella", "owl", "sailboat", "cactus", "piano", "dragon", "kettle", "giraffe",
        "telescope")
PLACE = ("on a rocky coast", "in a busy market", "under a bridge", "on a kitchen table", "in deep snow",
         "beside a quiet lake", "in a neon-lit alley", "on the moon", "in a sunflower field", "in a library")
STYLE = ("at dawn, watercolour", "at night, 35mm film photo", "studio lighting, product shot",
         "in the style of a woodcut", "soft focus, pastel colours", "isometric 3d render",
         "oil painting, thick brushstrokes", "overcast, documentary photo")
OLD_LABEL = "old JSONL ledger (as before this change)"


def key_of(i: int) -> tuple[str, str, int, int]:
    """The i-th synthetic purchase's key (any i >= N is a key that was never bought)."""
    prompt = (f"a photo of a {ADJ[i % 20]} {NOUN[(i // 20) % 20]} number {i} {PLACE[(i // 7) % 10]}, "
              f"{STYLE[(i // 11) % 8]}")
    return TEACHERS[i % 3], prompt, i % 1000, SIZE


def entry_of(i: int) -> dict:
    teacher, prompt, seed, size = key_of(i)
    e = {"teacher": teacher, "prompt": prompt, "seed": seed, "size": size,
         "ref": hashlib.sha256(i.to_bytes(8, "little")).hexdigest(), "price": PRICES[teacher],
         "ts": 1.7e9 + i * 0.01}
    if i % 10 == 0:
        e["native_size"] = 1024
    if i % 50 == 0:
        e["flaws"] = ["blurry"]
    return e


def _row(i: int, state: str = "bought") -> tuple:
    e = entry_of(i)
    extra = {k: v for k, v in e.items() if k not in ("teacher", "prompt", "seed", "size", "ref", "price", "ts")}
    return (khash(e["teacher"], e["prompt"], e["seed"], e["size"]), e["teacher"], e["prompt"], e["seed"],
            e["size"], state, e["price"], e["ref"] if state == "bought" else None, e["ts"],
            json.dumps(extra, separators=(",", ":")) if extra else None)


def build(path: Path, n: int) -> float:
    """N bought rows + 300 in flight, with no journal and no sync (set-up only), then WAL again."""
    t0 = time.perf_counter()
    Ledger(path).close()  # the schema, as the ledger makes it
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = OFF")
    con.execute("PRAGMA synchronous = OFF")
    con.execute("PRAGMA cache_size = -1000000")  # 1 GB while building
    index_sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'calls_khash'").fetchone()[0]
    con.execute("DROP INDEX calls_khash")
    insert = ("INSERT INTO calls (khash, teacher, prompt, seed, size, state, price, ref, ts, extra) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    con.execute("BEGIN")
    step = 200_000
    for start in range(0, n, step):
        con.executemany(insert, (_row(i) for i in range(start, min(n, start + step))))
    for j in range(300):  # keys N..N+299 (never bought): 100 each sending, open, uncertain, every teacher
        con.execute(insert, _row(n + j, ("sending", "open", "uncertain")[j // 3 % 3]))
    con.execute("COMMIT")
    con.execute(index_sql)
    con.execute("""INSERT INTO totals (teacher, images, certain, uncertain, uncertain_calls)
                   SELECT teacher, SUM(state = 'bought'),
                          round(SUM(CASE WHEN state IN ('open', 'bought', 'failed', 'refused') THEN price ELSE 0 END), 9),
                          round(SUM(CASE WHEN state IN ('sending', 'uncertain') THEN price ELSE 0 END), 9),
                          SUM(state IN ('sending', 'uncertain'))
                   FROM calls GROUP BY teacher""")
    con.execute("PRAGMA journal_mode = WAL")
    con.close()
    return time.perf_counter() - t0


def _mem() -> dict[str, float]:
    """This process's resident memory now and at its peak, MiB (from /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss": round(out["VmRSS"], 1), "hwm": round(out["VmHWM"], 1)}


def _files_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20, 1)


def measure(path: Path, n: int, lookups: int, appends: int) -> dict:
    """Runs in a fresh process: a gateway's view of a ledger of N purchases."""
    mem0 = _mem()
    t0 = time.perf_counter()
    led = Ledger(path)
    assert led.lookup(*key_of(0)) is not None
    open_s = time.perf_counter() - t0
    mem_open = _mem()
    rng = random.Random(n)
    hits = [key_of(rng.randrange(n)) for _ in range(lookups)]
    misses = [key_of(n + 1000 + rng.randrange(n)) for _ in range(lookups)]

    t0 = time.perf_counter()
    for k in hits:
        if led.lookup(*k) is None:
            raise AssertionError(f"missing {k}")
    hit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in misses:
        if led.lookup(*k) is not None:
            raise AssertionError(f"found {k}")
    miss_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    count = len(led)
    len_first_s = time.perf_counter() - t0
    assert count == n, (count, n)
    t0 = time.perf_counter()
    for _ in range(1000):
        len(led)
    len_s = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    for _ in range(1000):
        totals = led.totals()
    totals_s = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    for _ in range(100):
        pending = led.calls_in("aurora", ("sending", "open"))
    pending_s = (time.perf_counter() - t0) / 100
    t0 = time.perf_counter()
    scanned = led.calls_in("aurora", ("uncertain",))
    scan_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for j in range(appends):
        led.record(entry_of(3 * n + j))
    record_s = (time.perf_counter() - t0) / appends
    t0 = time.perf_counter()
    for j in range(appends):
        teacher, prompt, seed, size = key_of(4 * n + j)
        call = led.begin(teacher, prompt, seed, size, PRICES[teacher])
        led.mark(call, "open", job={"id": f"job-{j}", "urls": [f"https://example.invalid/{j}.png"]})
    pair_s = (time.perf_counter() - t0) / appends
    assert len(led) == n + appends
    mem_end = _mem()
    led.close()
    return {
        "open_s": round(open_s, 4), "rss_start_mb": mem0["rss"], "rss_after_open_mb": mem_open["rss"],
        "lookup_hit_per_s": round(lookups / hit_s), "lookup_miss_per_s": round(lookups / miss_s),
        "len_first_ms": round(len_first_s * 1e3, 3), "len_us": round(len_s * 1e6, 1),
        "totals_us": round(totals_s * 1e6, 1), "totals_images": totals.images,
        "calls_in_pending_ms": round(pending_s * 1e3, 3), "calls_in_pending_rows": len(pending),
        "calls_in_uncertain_scan_ms": round(scan_s * 1e3, 1), "calls_in_uncertain_rows": len(scanned),
        "record_per_s": round(1 / record_s), "begin_mark_pairs_per_s": round(1 / pair_s),
        "rss_end_mb": mem_end["rss"], "hwm_mb": mem_end["hwm"],
    }


def write_jsonl(path: Path, n: int) -> float:
    t0 = time.perf_counter()
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            f.write("".join(json.dumps(entry_of(i), ensure_ascii=False, separators=(",", ":")) + "\n"
                            for i in range(start, min(n, start + 100_000))))
    return time.perf_counter() - t0


def measure_old(path: Path, n: int, lookups: int) -> dict:
    """Runs in a fresh process: the previous version's loader (read the file, json.loads
    every line, check it, keep a list of dicts, a dict by key and the spend per teacher)."""
    from collections import defaultdict

    required = ("teacher", "prompt", "seed", "size", "ref", "price", "ts")
    mem0 = _mem()
    t0 = time.perf_counter()
    entries, latest, spent = [], {}, defaultdict(float)
    with open(path, "rb") as f:
        data = f.read()
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            entry = json.loads(raw)
            if not isinstance(entry, dict) or any(k not in entry for k in required):
                raise ValueError("bad entry")
            entries.append(entry)
            latest[(entry["teacher"], entry["prompt"], int(entry["seed"]), int(entry["size"]))] = entry
            spent[entry["teacher"]] += float(entry["price"])
    del data
    load_s = time.perf_counter() - t0
    mem = _mem()
    rng = random.Random(n)
    hits = [key_of(rng.randrange(n)) for _ in range(lookups)]
    t0 = time.perf_counter()
    for k in hits:
        if dict(latest[k]) is None:
            raise AssertionError
    hit_s = time.perf_counter() - t0
    assert len(entries) == n
    return {"open_s": round(load_s, 3), "rss_start_mb": mem0["rss"], "rss_after_open_mb": mem["rss"],
            "hwm_mb": mem["hwm"], "lookup_hit_per_s": round(lookups / hit_s)}


def measure_import(folder: Path, n: int) -> dict:
    """Runs in a fresh process: a new ledger beside ledger.jsonl imports it (once)."""
    mem0 = _mem()
    t0 = time.perf_counter()
    led = Ledger(folder / "ledger.sqlite")
    import_s = time.perf_counter() - t0
    assert len(led) == n
    mem = _mem()
    led.close()
    return {"open_s": round(import_s, 3), "rss_start_mb": mem0["rss"], "rss_after_open_mb": mem["rss"],
            "hwm_mb": mem["hwm"]}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    cols = [("what", "impl"), ("N", "n"), ("build s", "build_s"), ("open s", "open_s"),
            ("RSS start MiB", "rss_start_mb"), ("RSS open MiB", "rss_after_open_mb"), ("RSS end MiB", "rss_end_mb"),
            ("peak MiB", "hwm_mb"), ("hits/s", "lookup_hit_per_s"), ("misses/s", "lookup_miss_per_s"),
            ("len() µs", "len_us"), ("totals() µs", "totals_us"), ("calls_in open ms", "calls_in_pending_ms"),
            ("calls_in uncertain (scan) ms", "calls_in_uncertain_scan_ms"), ("record()/s", "record_per_s"),
            ("begin+mark/s", "begin_mark_pairs_per_s"), ("file MiB", "file_mb")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else f"{r[k]:,}" if isinstance(r[k], int)
                                       else str(r[k]) for _, k in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--quick", action="store_true", help="sizes 100000 (a CI-sized run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ledger_scale.jsonl")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the big synthetic files go")
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--appends", type=int, default=500)
    ap.add_argument("--no-old", action="store_true", help="skip the JSON-lines comparison")
    args = ap.parse_args(argv)
    sizes = [100_000] if args.quick else args.sizes
    command = "python benchmarks/ledger_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common = {"bench": "ledger_scale", "command": command.strip(), "date": time.strftime("%Y-%m-%d"),
              "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count()}
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still deletes the big files
    work = Path(tempfile.mkdtemp(prefix="ledger_scale.", dir=args.tmp))
    try:
        for n in sizes:
            path = work / f"n{n}" / "ledger.sqlite"
            path.parent.mkdir()
            build_s = build(path, n)
            print(f"built {n:,} purchases in {build_s:.1f}s ({_files_mb(path)} MiB)", file=sys.stderr, flush=True)
            row = {**common, "impl": "sqlite ledger", "n": n, "build_s": round(build_s, 1),
                   **_child("--_measure", str(path), str(n), str(args.lookups), str(args.appends)),
                   "file_mb": _files_mb(path)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            shutil.rmtree(path.parent)
        if not args.no_old:
            n = 1_000_000 if max(sizes) >= 1_000_000 else min(sizes)
            folder = work / "old"
            folder.mkdir()
            jsonl = folder / "ledger.jsonl"
            write_s = write_jsonl(jsonl, n)
            old = {**common, "impl": OLD_LABEL, "n": n, "build_s": round(write_s, 1),
                   **_child("--_old", str(jsonl), str(n), str(args.lookups)), "file_mb": _files_mb(jsonl)}
            rows.append(old)
            print(json.dumps(old), file=sys.stderr, flush=True)
            imported = {**common, "impl": "one-time import of that JSONL into a new sqlite ledger", "n": n,
                        **_child("--_import", str(folder), str(n)), "file_mb": _files_mb(folder / "ledger.sqlite")}
            rows.append(imported)
            print(json.dumps(imported), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(_table(rows))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_measure":
        print(json.dumps(measure(Path(sys.argv[2]), *map(int, sys.argv[3:6]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_old":
        print(json.dumps(measure_old(Path(sys.argv[2]), *map(int, sys.argv[3:5]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_import":
        print(json.dumps(measure_import(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
