"""Fault campaign for the teacher gateway's spend accounting (simulated paid APIs, real HTTP, real kills).

    python benchmarks/spend_campaign.py [--quick] [--arms openai-skip bfl ...] [--seed 0]
                                        [--out benchmarks/results/spend_campaign.jsonl]

One arm per teacher: openai-skip, openai-rebuy (on_uncertain rebuy), openai-idempotent (the simulator
and the config honour Idempotency-Key, as this project's own servers do), bfl, fal, replicate,
stability, ideogram (skip). Each arm:

1. starts its provider simulator in THIS process (so its billing counters survive every kill) with
   faults drawn from --seed: 5xx (~8%), 429s from a server limit below the client's rpm (half the
   arms without Retry-After), stalls past the client's timeout (billed, answered too late), resets
   after billing, failed jobs, a moderated word that a few prompts contain;
2. runs a DRIVER subprocess (this file, `--driver <json>`) that joins this process's Ray cluster,
   starts the gateway actor on the arm's run folder and buys N prompts in batches via render_many,
   writing each item's final result to <run>/results.jsonl (a restarted driver re-asks everything
   not yet final: what was bought comes back cached, for free);
3. SIGKILLs the gateway's process at random moments from a killer thread (quick: 3 per arm, full:
   20; the driver is paused while a kill is due, so the run cannot end before it lands), and once
   per arm SIGKILLs the driver itself mid-run and starts it again (its gateway dies with it; the
   new one starts on the same ledger);
4. checks: (a) every prompt ended with an image (its ledger entry's ref is in the store) or a typed
   failure; (b) per key, certain <= the server's charges <= certain + uncertain; (c) the idempotent
   arm is never billed twice for a key, the others at most once more per uncertain call the policy
   rebought (none under skip); (d) the ledger's totals equal a recomputation from its call rows.

Prices are 1.0 per image, so dollars are calls. Prints a markdown table, one row per arm, appends one
JSON line per arm to --out, and exits 1 if any check failed (the run folders are then kept, each
with a forensics.json: the charges, ledger rows and kills of every key that broke a bound). Quick
mode (CI): N=24 per arm, 3 gateway kills and 1 driver kill, about 1.5 minutes on 2 cores. Full:
N=200, 20 gateway kills per arm, about 7 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The gateway actors read their key from here; they inherit it from the Ray
# cluster this process starts (so it is set before ray.init).
SIM_KEY = "sk-sim-campaign-0123456789"  # a key of a realistic length: errors show it redacted
os.environ["SIM_KEY"] = SIM_KEY
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from evolve.config import TeacherConfig  # noqa: E402
from evolve.shapes import all_prompts  # noqa: E402

NAMESPACE = "spend-campaign"
SIZE = 32
BATCH = 8
WORD = "forbidden"        # the simulators moderate prompts that contain it
TIMEOUT_S = 0.6           # the client's HTTP timeout; stalls last longer
STALL_S = 1.5
CLIENT_RPM = 600.0        # 10 calls/s from the gateway ...
SERVER_RPM = 300.0        # ... into a server that takes 5 per 1 s window: 429s
SERVER_WINDOW_S = 1.0

CERTAIN = ("open", "bought", "failed", "refused")
UNCERTAIN = ("sending", "uncertain")
CALL_STATES = ("sending", "uncertain", "unbilled", "open", "bought", "failed", "refused")
EPS = 1e-6

# name -> (provider kind, model, on_uncertain, idempotent server and config)
ARMS: dict[str, tuple[str, str, str, bool]] = {
    "openai-skip": ("openai", "sim-teacher", "skip", False),
    "openai-rebuy": ("openai", "sim-teacher", "rebuy", False),
    "openai-idempotent": ("openai", "sim-teacher", "skip", True),  # the policy is moot: asked again under its key
    "bfl": ("bfl", "flux-dev", "skip", False),
    "fal": ("fal", "fal-ai/flux/dev", "skip", False),
    "replicate": ("replicate", "black-forest-labs/flux-schnell", "skip", False),
    "stability": ("stability", "core", "skip", False),
    "ideogram": ("ideogram", "ideogram-v3", "skip", False),
}
# Half the arms get bare 429s (no Retry-After): the gateway must back off on its own.
NO_RETRY_AFTER = {"openai-rebuy", "bfl", "replicate", "ideogram"}


def campaign_items(n: int) -> list[tuple[str, int]]:
    """N (prompt, seed) pairs: the shapes world's prompts, every eighth one carrying the moderated word."""
    texts = [p.text for p in all_prompts()]
    out = []
    for i in range(n):
        text = texts[(i * 7) % len(texts)]  # a stride, so a short run still sees several categories
        if i % 8 == 5:
            text = f"{text}, {WORD}"
        out.append((text, i))
    return out


def teacher_name(arm: str) -> str:
    return "camp-" + arm


# -- the driver (a subprocess of this file) ------------------------------------------------------

def read_results(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The latest final result per key in results.jsonl (a torn last line, from a kill, is skipped)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if not path.exists():
        return out
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        out[(line["prompt"], int(line["seed"]))] = line["result"]
    return out


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _append_raw(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def driver(spec: dict[str, Any]) -> int:
    from actors.teacher_gateway import start_gateway

    ray.init(address=spec["address"], namespace=NAMESPACE, log_to_driver=False)
    cfg = TeacherConfig(**spec["cfg"])
    name = f"teacher:{cfg.name}"
    run = Path(spec["run"])
    results = run / "results.jsonl"
    events = run / "driver_events.jsonl"
    me = os.getpid()

    def event(what: str, **kw: Any) -> None:
        _append(events, {"ts": time.time(), "driver": me, "event": what, **kw})

    def start() -> Any:
        # The gateway of a killed driver dies with it; its name is free once it has.
        deadline = time.monotonic() + 90
        while True:
            try:
                gw = start_gateway(cfg, spec["base_url"], spec["store"], spec["ledger"], spec["size"],
                                   **spec["options"])
                ray.get(gw.pid.remote(), timeout=60)
                return gw
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def again(gw: Any) -> Any:
        """After the gateway died: the same actor (it restarts itself), or a new one where
        a gateway that cannot restart is gone for good."""
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            event("gateway_recreated")
            return start()

    for path in (results, events):  # end a line torn by the kill of the driver before us
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            _append_raw(path, b"\n")
    gw = start()
    event("started", gateway_pid=ray.get(gw.pid.remote(), timeout=60))
    done = read_results(results)
    todo = [(p, s) for p, s in campaign_items(spec["n"]) if (p, s) not in done]
    while todo:
        batch = todo[:spec["batch"]]
        try:
            out = ray.get(gw.render_many.remote(batch), timeout=spec["batch_timeout_s"])
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            event("render_many_failed", error=type(exc).__name__)
            time.sleep(0.5)
            gw = again(gw)
            continue
        for (p, s), r in zip(batch, out):
            _append(results, {"prompt": p, "seed": s, "result": r, "driver": me, "ts": time.time()})
        todo = todo[len(batch):]
    try:
        event("finished", stats=ray.get(gw.stats.remote(), timeout=30))
    except Exception as exc:  # killed at the last moment: the stats are only a report
        event("finished", stats=None, error=type(exc).__name__)
    ray.shutdown()
    return 0


# -- the ledger, read back -------------------------------------------------------------------------

class LedgerView:
    """The arm's ledger (<run>/ledger.sqlite), read back as call rows per key."""

    def __init__(self, run: Path, teacher: str) -> None:
        from evolve.ledger import Ledger

        self.teacher = teacher
        self.ledger = Ledger(run / "ledger.sqlite")

    def rows(self, prompt: str, seed: int) -> list[dict[str, Any]]:
        return self.ledger.calls(self.teacher, prompt, seed, SIZE)

    def all_rows(self) -> list[dict[str, Any]]:
        return self.ledger.calls_in(self.teacher, CALL_STATES)

    def lookup(self, prompt: str, seed: int) -> dict[str, Any] | None:
        return self.ledger.lookup(self.teacher, prompt, seed, SIZE)

    def totals(self) -> dict[str, float]:
        t = self.ledger.totals(self.teacher)
        return {"images": t.images, "certain": t.certain, "uncertain": t.uncertain,
                "uncertain_calls": t.uncertain_calls}

    def close(self) -> None:
        self.ledger.close()


def recompute(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {"images": sum(r["state"] == "bought" for r in rows),
            "certain": sum(float(r["price"]) for r in rows if r["state"] in CERTAIN),
            "uncertain": sum(float(r["price"]) for r in rows if r["state"] in UNCERTAIN),
            "uncertain_calls": sum(r["state"] in UNCERTAIN for r in rows)}


def rebuys(rows: list[dict[str, Any]]) -> int:
    """Uncertain calls of one key that were bought again: each sending/uncertain row
    that a later call row of the same key follows."""
    ordered = sorted(rows, key=lambda r: r.get("id", 0))
    return sum(r["state"] in UNCERTAIN for r in ordered[:-1])


def bought_after_failure(rows: list[dict[str, Any]]) -> int:
    """Billed calls that ended without an image (failed, price > 0) and were bought again."""
    ordered = sorted(rows, key=lambda r: r.get("id", 0))
    return sum(r["state"] == "failed" and float(r["price"]) > 0 for r in ordered[:-1])


# -- the simulator, watched ------------------------------------------------------------------------

def sim_knobs(arm: str, seed: int) -> tuple[dict[str, Any], list[str]]:
    """The arm's faults, drawn from the seed; knobs this simulator version lacks are left out
    (and named, so a result says what was not injected)."""
    from serve.provider_sims import SimKnobs

    kind, _, _, idempotent = ARMS[arm]
    rng = random.Random(f"{seed}:{arm}")
    bare = arm in NO_RETRY_AFTER
    want: dict[str, Any] = {
        "api_key": SIM_KEY, "seed": rng.randrange(2**31),
        "error_rate": round(rng.uniform(0.06, 0.10), 3),
        "rate_limit_rpm": SERVER_RPM, "rate_window_s": SERVER_WINDOW_S,
        "retry_after": not bare, "retry_after_s": None if bare else 0.2,
        "stall_rate": round(rng.uniform(0.03, 0.05), 3), "stall_s": STALL_S,
        "reset_rate": round(rng.uniform(0.03, 0.05), 3),
        "latency_s": round(rng.uniform(0.002, 0.01), 4),
        "job_s": round(rng.uniform(0.03, 0.07), 3),
        "fail_job_rate": round(rng.uniform(0.02, 0.04), 3),
        "moderate": WORD,
        "native_side": 64,  # providers that pick their own resolution: small, so drawing is cheap
    }
    if kind == "openai":
        want["idempotency"] = idempotent
    if kind == "bfl":
        want["max_active_tasks"] = 4  # BFL's 429 is about tasks in flight
    if kind == "replicate":
        want["abort_rate"] = round(rng.uniform(0.02, 0.04), 3)
    have = {f.name for f in dataclasses.fields(SimKnobs)}
    knobs = {k: v for k, v in want.items() if k in have}
    missing = sorted(k for k in want if k not in have)
    return knobs, missing


class _LoggedCounter(Counter):
    def __init__(self, base: Counter, log: list) -> None:
        super().__init__(base)
        self.log = log

    def __setitem__(self, key: Any, value: int) -> None:
        self.log.append((time.time(), key, value))
        super().__setitem__(key, value)


class SimWatch:
    """Counters the simulator keeps no tally of, counted where it decides (this process):
    injected 5xx answers and moderation decisions."""

    def __init__(self, thread: Any) -> None:
        self.thread = thread
        self.state = thread.sim.state
        self.injected: Counter[int] = Counter()
        self.moderations = 0
        # When each charge happened (for the forensics of a failed check).
        self.charge_log: list[tuple[float, tuple[str, int], int]] = []
        self.state.charged = _LoggedCounter(self.state.charged, self.charge_log)
        inject = getattr(self.state, "inject_error", None)
        if inject is not None:
            def counted_inject(*a: Any, **k: Any) -> Any:
                resp = inject(*a, **k)
                if resp is not None:
                    self.injected[int(resp.status)] += 1
                return resp
            self.state.inject_error = counted_inject
        moderated = getattr(self.state, "moderated", None)
        if moderated is not None and thread.sim.kind in ("openai", "stability", "ideogram"):
            def counted_moderated(*a: Any, **k: Any) -> Any:
                yes = moderated(*a, **k)
                self.moderations += bool(yes)
                return yes
            self.state.moderated = counted_moderated

    def requests(self) -> int:
        return self.thread.read(lambda: sum(self.state.requests.values()))

    def charged(self) -> dict[tuple[str, int], int]:
        return self.thread.read(lambda: {k: v for k, v in self.state.charged.items() if v})

    def faults(self, knobs: dict[str, Any]) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            st = self.state.stats()
            statuses = {int(k): v for k, v in st["statuses"].items()}
            outcomes = Counter(j.outcome for j in self.state.jobs.values())
            return {"st": st, "statuses": statuses, "outcomes": outcomes}

        got = self.thread.read(read)
        st, statuses, outcomes = got["st"], got["statuses"], got["outcomes"]
        n429 = statuses.get(429, 0)
        five = sum(v for k, v in statuses.items() if k >= 500)
        jobs = self.thread.sim.kind in ("bfl", "fal", "replicate")
        return {
            "5xx": five, "5xx_injected": sum(self.injected.values()),
            "429_retry_after": n429 if knobs.get("retry_after", True) else 0,
            "429_bare": 0 if knobs.get("retry_after", True) else n429,
            "stalls": st.get("stalled"), "resets": st.get("resets"),
            "moderated": outcomes.get("moderated", 0) if jobs else self.moderations,
            # Job providers: jobs that ended in failure. The others answer a failed draw with a
            # 500 of their own: the 500s beyond the injected ones.
            "failed_jobs": (outcomes.get("failed", 0) if jobs
                            else max(0, statuses.get(500, 0) - self.injected.get(500, 0))),
            "aborted": outcomes.get("aborted", 0) if jobs else 0,
            "replayed": st.get("replayed", 0), "submits_and_polls": st.get("requests"),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
        }


# -- the killer ------------------------------------------------------------------------------------

def gateway_pid(name: str, timeout: float = 3.0) -> int | None:
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
        return int(ray.get(handle.pid.remote(), timeout=timeout))
    except Exception:  # absent, dead, restarting: not now
        return None


class Killer(threading.Thread):
    """Kills at random moments of the run. Progress is simulator requests + final results
    written (results are written one line at a time, so every value below N is passed while
    work remains). Each step waits for its progress threshold (and at least one unit of
    progress since the step before, so an incarnation is not killed twice for nothing), then
    either SIGKILLs the gateway's process, after a random fraction of a second, once per
    incarnation, or at once has the main thread SIGKILL and restart the driver."""

    def __init__(self, name: str, watch: SimWatch, results: Path, steps: list[tuple[str, int]],
                 rng: random.Random, spare: set[int]) -> None:
        super().__init__(name="killer", daemon=True)
        self.gateway, self.watch, self.results, self.steps, self.rng = name, watch, results, steps, rng
        self.spare = spare      # pids never to signal (this process, the drivers)
        self.stop = threading.Event()
        self.kill_driver = threading.Event()    # set here, served (and cleared) by the main thread
        self.driver_done = threading.Event()
        self.kills: list[dict[str, Any]] = []
        self.killed: set[int] = set()
        self.driver: subprocess.Popen | None = None   # the driver running now (set by the main thread)

    def run(self) -> None:
        mark = -1
        for what, threshold in self.steps:
            while not self.stop.is_set() and self.progress() < max(threshold, mark + 1):
                self.stop.wait(0.01)
            if self.stop.is_set():
                return
            if what == "driver":
                self.driver_done.clear()
                self.kill_driver.set()
                while not self.stop.is_set() and not self.driver_done.wait(0.1):
                    pass
            else:
                # The driver waits (SIGSTOP) from the moment a kill is due until it has landed, so
                # the run cannot end while the gateway is still coming back from the last one. The
                # gateway works on meanwhile: the kill still strikes it mid-batch or idle, at random.
                # No gateway to find (a new driver has not started one yet): let the driver go on a bit.
                delay = self.rng.uniform(0.0, 0.1)
                while not self.stop.is_set():
                    driver = self.driver
                    self._signal(driver, signal.SIGSTOP)
                    try:
                        self.stop.wait(delay)
                        delay = 0.0
                        pid = gateway_pid(self.gateway)
                        if pid is not None and pid not in self.killed and pid not in self.spare:
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                continue
                            self.killed.add(pid)
                            self.kills.append({"ts": time.time(), "pid": pid, "progress": self.progress(),
                                               "results": self.done()})
                            break
                    finally:
                        self._signal(driver, signal.SIGCONT)
                    self.stop.wait(0.05)
            mark = self.progress()

    @staticmethod
    def _signal(proc: subprocess.Popen | None, sig: int) -> None:
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def done(self) -> int:
        try:
            return self.results.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def progress(self) -> int:
        return self.watch.requests() + self.done()


def kill_plan(n: int, kills: int, rng: random.Random) -> list[tuple[str, int]]:
    """`kills` gateway kills and one driver kill at random progress thresholds below N - BATCH:
    all are passed mid-run, with a batch or more still to do (a kill near the very end may find
    the run over before the gateway is back up)."""
    top = max(2, n - BATCH)
    steps = [("gateway", t) for t in rng.sample(range(1, top), min(kills, top - 1))]
    steps.append(("driver", rng.randrange(1, top)))
    return sorted(steps, key=lambda st: (st[1], st[0] == "gateway"))


# -- one arm ---------------------------------------------------------------------------------------

def gateway_options(timeout_s: float) -> dict[str, Any]:
    from actors.teacher_gateway import TeacherGateway

    want = {"timeout_s": timeout_s, "max_attempts": 8, "backoff_base_s": 0.05, "backoff_max_s": 0.4}
    params = inspect.signature(TeacherGateway.__init__).parameters
    return {k: v for k, v in want.items() if k in params}


def teacher_config(arm: str, base_url: str) -> tuple[dict[str, Any], list[str]]:
    kind, model, policy, idempotent = ARMS[arm]
    want: dict[str, Any] = {
        "name": teacher_name(arm), "kind": kind, "base_url": base_url, "model": model,
        "api_key_env": "SIM_KEY", "price_per_image": 1.0, "budget": 1e6, "rpm": CLIENT_RPM,
        "max_in_flight": BATCH, "timeout_s": TIMEOUT_S, "poll_interval_s": 0.02, "max_poll_s": 10.0,
        "provider_options": {}, "max_attempts": 8, "on_uncertain": policy, "idempotency": idempotent,
    }
    fields = TeacherConfig.model_fields
    return {k: v for k, v in want.items() if k in fields}, sorted(k for k in want if k not in fields)


def spawn_driver(spec: dict[str, Any], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, __file__, "--driver", json.dumps(spec)], env=env,
                                stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))


def run_arm(arm: str, args: argparse.Namespace, address: str, workdir: Path) -> dict[str, Any]:
    from evolve.store import ImageStore
    from serve.provider_sims import ProviderSimThread

    kind, model, policy, idempotent = ARMS[arm]
    rng = random.Random(f"{args.seed}:{arm}:kills")
    knobs, knobs_missing = sim_knobs(arm, args.seed)
    run = workdir / arm
    run.mkdir(parents=True)
    name = f"teacher:{teacher_name(arm)}"
    n = args.n
    items = campaign_items(n)
    t0, t_wall0 = time.perf_counter(), time.time()
    thread = ProviderSimThread(kind, **knobs)
    with thread as url:
        watch = SimWatch(thread)
        cfg, cfg_missing = teacher_config(arm, url)
        spec = {"address": address, "cfg": cfg, "base_url": url, "run": str(run), "store": str(run / "images"),
                "ledger": str(run / "ledger.sqlite"), "size": SIZE, "n": n, "batch": BATCH,
                "options": gateway_options(TIMEOUT_S), "batch_timeout_s": 120}
        log = run / "driver.log"
        proc = spawn_driver(spec, log)
        killer = Killer(name, watch, run / "results.jsonl", kill_plan(n, args.kills, rng), rng,
                        {os.getpid(), proc.pid})
        killer.driver = proc
        killer.start()
        driver_kills: list[dict[str, Any]] = []
        crashes, timed_out = 0, False
        deadline = time.monotonic() + args.arm_timeout
        while True:
            if killer.kill_driver.is_set():
                killer.kill_driver.clear()
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    driver_kills.append({"ts": time.time(), "pid": proc.pid, "progress": killer.progress(),
                                         "results": killer.done()})
                    proc = killer.driver = spawn_driver(spec, log)
                    killer.spare.add(proc.pid)
                killer.driver_done.set()
            rc = proc.poll()
            if rc is not None:
                if rc == 0:
                    break
                crashes += 1  # not killed by us: restart it, a few times
                if crashes > 3:
                    break
                proc = killer.driver = spawn_driver(spec, log)
                killer.spare.add(proc.pid)
                continue
            if time.monotonic() > deadline:
                timed_out = True
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.01)
        killer.stop.set()
        killer.join(10)
        # The gateway dies with its driver; then let answers in flight land before counting.
        until = time.monotonic() + 30
        while gateway_pid(name, timeout=1.0) is not None and time.monotonic() < until:
            time.sleep(0.2)
        time.sleep(0.5 + knobs.get("job_s", 0) + knobs.get("latency_s", 0))
        charged = watch.charged()
        faults = watch.faults(knobs)
    wall = time.perf_counter() - t0

    # -- checks --------------------------------------------------------------------------------------
    view = LedgerView(run, teacher_name(arm))
    store = ImageStore(run / "images")
    final = read_results(run / "results.jsonl")
    violations: list[str] = []
    images, typed = 0, Counter()
    for p, s in items:
        r = final.get((p, s))
        if r is None:
            violations.append(f"a: no final result for seed {s}")
        elif "ref" in r:
            entry = view.lookup(p, s)
            if entry is not None and store.has(entry["ref"]):
                images += 1
            else:
                violations.append(f"a: seed {s} came back as image {r['ref']} that the ledger/store lacks")
        elif r.get("kind"):
            typed[r["kind"]] += 1
        else:
            violations.append(f"a: seed {s} ended untyped: {str(r)[:200]}")
    check_a = not any(v.startswith("a:") for v in violations) and images + sum(typed.values()) == n

    keys = {(p, s) for p, s in items} | set(charged)
    certain_total = uncertain_total = 0.0
    rebought = after_failed = 0
    suspects: set[tuple[str, int]] = set()
    for p, s in sorted(keys, key=lambda k: k[1]):
        rows = view.rows(p, s)
        cert = sum(float(r["price"]) for r in rows if r["state"] in CERTAIN)
        unc = sum(float(r["price"]) for r in rows if r["state"] in UNCERTAIN)
        certain_total += cert
        uncertain_total += unc
        rebought += rebuys(rows)
        after_failed += bought_after_failure(rows)
        ch = charged.get((p, s), 0)
        if ch > 1 and not idempotent:
            suspects.add((p, s))
        if not (cert - EPS <= ch <= cert + unc + EPS):
            suspects.add((p, s))
            states = ",".join(f"{r['state']}:{float(r['price']):g}" for r in rows)
            violations.append(f"b: seed {s} {p[:40]!r}: server charged {ch}, ledger certain {cert:g} "
                              f"uncertain {unc:g} [{states}]")
    charges = sum(charged.values())
    check_b = not any(v.startswith("b:") for v in violations)

    double = sum(max(0, c - 1) for c in charged.values())
    most = max(charged.values(), default=0)
    if idempotent:
        check_c = most <= 1
        if not check_c:
            violations.append(f"c: idempotent server billed a key {most} times")
    else:
        check_c = double <= rebought and (policy != "skip" or rebought == 0)
        if not check_c:
            twice = sorted(s for (p, s), c in charged.items() if c > 1)
            violations.append(f"c: {double} double charges (seeds {twice[:10]}) vs {rebought} uncertain calls "
                              f"rebought under {policy} ({after_failed} billed failed jobs bought again)")

    totals = view.totals()
    again = recompute(view.all_rows())
    # What happened to each key that broke (or strained) a bound, on one clock: kept in the run folder.
    forensics = {"arm_start": t_wall0, "gateway_kills": killer.kills, "driver_kills": driver_kills, "keys": [
        {"prompt": p, "seed": s, "charged": charged.get((p, s), 0),
         "charges_at": [round(t - t_wall0, 3) for t, k, _ in watch.charge_log if k == (p, s)],
         "rows": [{**r, "ts": round(float(r.get("ts", t_wall0)) - t_wall0, 3)} for r in view.rows(p, s)],
         "result": final.get((p, s))} for p, s in sorted(suspects, key=lambda k: k[1])]}
    (run / "forensics.json").write_text(json.dumps(forensics, indent=1, default=str))
    check_d = all(abs(float(totals[k]) - float(again[k])) <= EPS for k in again)
    if not check_d:
        violations.append(f"d: ledger totals {totals} != recomputed from rows {again}")
    view.close()

    events = []
    ev_path = run / "driver_events.jsonl"
    if ev_path.exists():
        for raw in ev_path.read_text().splitlines():
            try:
                events.append(json.loads(raw))
            except ValueError:
                pass
    last_stats = next((e.get("stats") for e in reversed(events) if e["event"] == "finished"), None)
    if timed_out:
        violations.append(f"driver did not finish within {args.arm_timeout:g}s")
    if crashes:
        violations.append(f"driver exited nonzero {crashes} time(s) (see {log})")
    ok = check_a and check_b and check_c and check_d and not timed_out and crashes == 0
    return {
        "bench": "spend_campaign", "arm": arm, "provider": kind, "model": model, "policy": policy,
        "idempotency": idempotent, "prompts": n, "images": images, "typed_failures": dict(sorted(typed.items())),
        "faults": faults, "gateway_kills": len(killer.kills),
        "kill_moments_progress": [k["progress"] for k in killer.kills],
        "kill_moments_results": [k["results"] for k in killer.kills],
        "driver_kills": len(driver_kills), "driver_kill_moments_results": [k["results"] for k in driver_kills],
        "driver_crashes": crashes,
        "gateway_recreated_by_driver": sum(e["event"] == "gateway_recreated" for e in events),
        "render_many_failures": sum(e["event"] == "render_many_failed" for e in events),
        "server_charges": charges, "certain": round(certain_total, 6),
        "uncertain_calls": int(totals["uncertain_calls"]), "uncertain_usd": round(uncertain_total, 6),
        "uncertain_billed": round(charges - certain_total, 6), "rebought": rebought,
        "bought_again_after_failed_job": after_failed,
        "double_charges": double, "max_charges_per_key": most,
        "ledger_totals": totals,
        "checks": {"a_every_prompt_ended": check_a, "b_spend_bounds": check_b,
                   "c_double_charges": check_c, "d_totals_match_rows": check_d, "all": ok},
        "violations": violations[:20], "violations_total": len(violations),
        "knobs": knobs, "knobs_missing": knobs_missing, "config_fields_missing": cfg_missing,
        "gateway_stats_last": last_stats, "wall_s": round(wall, 2),
    }


# -- the report ------------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]]) -> str:
    head = ("arm", "policy", "prompts", "images", "typed failures", "5xx", "429 RA/bare", "stalls", "resets",
            "moderated", "failed jobs", "gw kills", "drv kills", "charges", "certain", "uncertain (calls/$)",
            "uncertain billed", "rebought", "failed, bought again", "double", "checks a b c d", "wall s")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f, c = r["faults"], r["checks"]
        fails = ", ".join(f"{k} {v}" for k, v in r["typed_failures"].items()) or "-"
        marks = " ".join("ok" if c[k] else "FAIL" for k in ("a_every_prompt_ended", "b_spend_bounds",
                                                           "c_double_charges", "d_totals_match_rows"))
        cells = (r["arm"], r["policy"], r["prompts"], r["images"], fails, f["5xx"],
                 f"{f['429_retry_after']}/{f['429_bare']}", _na(f["stalls"]), _na(f["resets"]), f["moderated"],
                 f["failed_jobs"], r["gateway_kills"], r["driver_kills"], r["server_charges"], f"{r['certain']:g}",
                 f"{r['uncertain_calls']}/{r['uncertain_usd']:g}", f"{r['uncertain_billed']:g}", r["rebought"],
                 r["bought_again_after_failed_job"], r["double_charges"], marks, r["wall_s"])
        out.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(out)


def _na(v: Any) -> str:
    return "n/a" if v is None else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver", help=argparse.SUPPRESS)  # internal: run as an arm's driver
    ap.add_argument("--quick", action="store_true", help="CI size: N=24, 3 gateway kills, 1 driver kill per arm")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--seed", type=int, default=0, help="draws the faults and the kill moments")
    ap.add_argument("--n", type=int, default=None, help="prompts per arm (quick 24, full 200)")
    ap.add_argument("--kills", type=int, default=None, help="gateway kills per arm (quick 3, full 20)")
    ap.add_argument("--arm-timeout", type=float, default=None, help="seconds an arm may take")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/spend_campaign.jsonl")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = ap.parse_args()
    if args.driver:
        return driver(json.loads(args.driver))
    args.n = args.n or (24 if args.quick else 200)
    args.kills = args.kills if args.kills is not None else (3 if args.quick else 20)
    args.arm_timeout = args.arm_timeout or (150.0 if args.quick else 1200.0)
    command = "python benchmarks/spend_campaign.py " + " ".join(sys.argv[1:])

    os.environ.pop("RAY_ADDRESS", None)
    # A fresh cluster of our own (never one a test session or a shell already runs).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE)
    address = ray.get_runtime_context().gcs_address
    workdir = Path(tempfile.mkdtemp(prefix="spend-campaign-"))
    rows = []
    t0 = time.perf_counter()
    try:
        for arm in args.arms:
            row = run_arm(arm, args, address, workdir)
            rows.append(row)
            mark = "ok" if row["checks"]["all"] else "FAILED: " + "; ".join(row["violations"][:3])
            print(f"{arm}: {row['images']}/{row['prompts']} images, {row['server_charges']} charges, "
                  f"{row['gateway_kills']} gateway kills, {row['driver_kills']} driver kills, "
                  f"{row['wall_s']}s: {mark}", flush=True)
    finally:
        ray.shutdown()
        if args.keep or not all(r["checks"]["all"] for r in rows):
            print(f"run folders (forensics.json in each): {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - t0
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for row in rows:
        row.update(command=command, date=stamp, mode="quick" if args.quick else "full", seed=args.seed,
                   campaign_wall_s=round(total, 1))
    print()
    print(table(rows))
    print(f"\n{len(rows)} arms, {total:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0 if rows and all(r["checks"]["all"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
