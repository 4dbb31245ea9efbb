"""The fault campaign's quick mode (benchmarks/spend_campaign.py --quick) passes all its checks.

Every arm (one simulated provider and uncertain-call policy each) buys 24 prompts through a
gateway actor that is SIGKILLed at random moments, with a driver that is itself killed and
restarted once, under 5xx, 429s, stalls, resets, failed jobs and moderation. The campaign runs its
own Ray cluster in a subprocess (`ray.init(address="local")`, no RAY_ADDRESS), so it never joins
the test session's shared instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"openai-skip", "openai-rebuy", "openai-idempotent", "bfl", "fal", "replicate", "stability", "ideogram"}


@pytest.mark.integration
def test_quick_campaign_passes_every_check(tmp_path: Path) -> None:
    out = tmp_path / "campaign.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/spend_campaign.py"), "--quick", "--out", str(out)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["arm"] for r in rows} == ARMS, tail
    for r in rows:
        assert r["checks"]["all"], (r["arm"], r["violations"])
        assert r["gateway_kills"] >= 1 and r["driver_kills"] == 1, (r["arm"], r["gateway_kills"], r["driver_kills"])
        assert r["images"] + sum(r["typed_failures"].values()) == r["prompts"] == 24, r["arm"]
        assert r["server_charges"] > 0, r["arm"]
        assert not r["knobs_missing"], (r["arm"], r["knobs_missing"])
    # The faults were there, across the campaign (a kill-heavy arm may make few calls of its
    # own; stalls and resets, ~4% of billed answers each, are counted together).
    faults = {k: sum(r["faults"][k] or 0 for r in rows)
              for k in ("5xx", "429_retry_after", "429_bare", "stalls", "resets")}
    assert faults["5xx"] > 0 and faults["429_retry_after"] > 0 and faults["429_bare"] > 0, faults
    assert faults["stalls"] + faults["resets"] > 0, faults
    # The idempotent server never billed a key twice; under skip nothing was bought again.
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["openai-idempotent"]["max_charges_per_key"] <= 1
    assert all(r["double_charges"] == 0 and r["rebought"] == 0 for r in rows if r["policy"] == "skip")
