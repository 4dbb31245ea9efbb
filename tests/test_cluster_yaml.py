"""cluster.yaml is a real cluster-launcher file: Ray's own validation accepts it,
its node types offer what the run configs ask for, the dashboard and job API
stay closed to strangers, and the nodes install a pinned set of packages.

None of this brings a cluster up: `ray up` against AWS was not run from here."""

from __future__ import annotations

import copy
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
REMOTE_ROOT = "/home/ray/evolve-director"  # where file_mounts puts the repo on every node
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Custom resources the run configs use to place their parts (docs/design.md,
# "Where each part runs"): each must be offered by a GPU node type.
PART_RESOURCES = {"train": "training workers", "judge": "the VLM judge", "teachers": "diffusers teachers",
                  "sampling": "the student sampling task"}


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def _node_types() -> dict[str, dict]:
    return {name: t["resources"] for name, t in _cluster()["available_node_types"].items()}


def test_cluster_yaml_validates():
    cfg = _cluster()
    _validate(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpus = [t["resources"].get("GPU", 0) for t in cfg["available_node_types"].values()]
    assert max(gpus) >= 1, "the cluster must offer GPUs"


def test_validation_catches_mistakes():
    cfg = _cluster()
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "nope"
    with pytest.raises(Exception):
        _validate(bad)
    bad = copy.deepcopy(cfg)
    bad["max_workerz"] = 3
    with pytest.raises(Exception):
        _validate(bad)


def test_node_types_offer_every_part_resource():
    """Whether or not a shipped config names them yet, the cluster has a GPU
    node type for each part's custom resource; the head has none (only the
    driver and what is pinned to its node run there)."""
    cfg = _cluster()
    types = _node_types()
    for res, part in PART_RESOURCES.items():
        offering = [n for n, r in types.items() if r.get(res, 0) >= 1 and r.get("GPU", 0) >= 1]
        assert offering, f"no GPU node type offers `{res}` ({part})"
    head = types[cfg["head_node_type"]]
    assert not set(head) & set(PART_RESOURCES), "the head must not attract the GPU parts"
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for n, t in cfg["available_node_types"].items()
                                     if n != cfg["head_node_type"])


# -- what each run config asks for --------------------------------------------------------------------------

def _get(obj, dotted: str):
    """obj.a.b (attributes or dict keys); None where a step is missing."""
    for part in dotted.split("."):
        if obj is None:
            return None
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def _num(x, default: float = 0.0) -> float:
    return float(default if x is None else x)


def _asks(cfg) -> list[tuple[str, dict[str, float]]]:
    """(label, the resources one bundle of it needs) for every part that names
    custom resources at a known path. A path the config (or RunConfig) does not
    have yet is skipped; to check a new one, add it here."""
    asks: list[tuple[str, dict[str, float]]] = []

    def add(label: str, custom, **base: float) -> None:
        if custom:  # parts with no custom resources may land anywhere: nothing to check
            asks.append((label, {**{k: v for k, v in base.items() if v}, **custom}))

    train = cfg.train
    add("train.worker_resources", _get(train, "worker_resources"),
        CPU=_num(_get(train, "cpus_per_worker")), GPU=1.0 if _get(train, "use_gpu") else 0.0)
    # backend vllm: the engine's bundle holds a GPU and the judge's resources
    add("judge.resources", _get(cfg, "judge.resources"),
        GPU=1.0 if _get(cfg, "judge.backend") == "vllm" else 0.0)
    add("sample.resources", _get(cfg, "sample.resources"), GPU=_num(_get(cfg, "sample.num_gpus")))
    for t in cfg.teachers or []:
        pipe = _get(t, "pipeline") or {}
        add(f"teachers[{t.name}].pipeline.resources", _get(pipe, "resources"),
            CPU=_num(_get(pipe, "num_cpus"), 1.0), GPU=_num(_get(pipe, "num_gpus"), 1.0))  # DiffusersTeacherConfig's defaults
    return asks


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_example_configs_load_and_fit_the_cluster(name):
    """Every shipped run config is a valid RunConfig, and every part it places
    by custom resources (train.worker_resources, judge.resources,
    sample.resources, a diffusers teacher's pipeline.resources) lands on a
    cluster.yaml node type that has them, and the CPUs and GPUs they come with."""
    from evolve.config import RunConfig

    cfg = RunConfig.load(ROOT / "configs" / name)
    types = _node_types()
    for label, need in _asks(cfg):
        fits = [n for n, offer in types.items() if all(offer.get(k, 0) >= v for k, v in need.items())]
        assert fits, f"{name}: {label} asks for {need}; no node type in cluster.yaml offers it ({types})"


def test_asks_are_collected_from_every_known_path():
    """The collector above finds each path (so a config that sets one is checked)."""
    from evolve.config import RunConfig

    cfg = RunConfig.load(ROOT / "configs" / "all-open.yaml")
    cfg = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"worker_resources": {"train": 1}}),
        "teachers": [t.model_copy(update={"pipeline": {**t.pipeline, "resources": {"teachers": 1}}})
                     for t in cfg.teachers],
    })
    for path, res in (("judge", "judge"), ("sample", "sampling")):
        part = getattr(cfg, path)
        if "resources" in type(part).model_fields:
            cfg = cfg.model_copy(update={path: part.model_copy(update={"resources": {res: 1}})})
    labels = [label for label, _ in _asks(cfg)]
    assert "train.worker_resources" in labels
    assert sum(label.startswith("teachers[") for label in labels) == len(cfg.teachers)
    for path in ("judge", "sample"):
        if "resources" in type(getattr(cfg, path)).model_fields:
            assert f"{path}.resources" in labels


# -- closed to strangers --------------------------------------------------------------------------------------

def _ray_start(commands: list[str]) -> list[list[str]]:
    """The `ray start` commands, split into words (env assignments first)."""
    out = []
    for cmd in commands:
        for part in cmd.split(";"):
            words = shlex.split(part)
            if "ray" in words and "start" in words[words.index("ray"):]:
                out.append(words)
    return out


def _flag(words: list[str], flag: str) -> str | None:
    for i, w in enumerate(words):
        if w == flag:
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def _container_env() -> dict[str, str]:
    env = {}
    for opt in _cluster()["docker"].get("run_options", []):
        words = shlex.split(opt)
        if words and words[0] in ("-e", "--env"):
            k, _, v = words[1].partition("=")
            env[k] = v
    return env


def test_head_dashboard_does_not_listen_beyond_loopback():
    """Regression: the head once started with --dashboard-host=0.0.0.0, which
    opens the dashboard and its job-submission API (arbitrary code) to whoever
    reaches the head. Absent, Ray binds localhost."""
    cfg = _cluster()
    heads = [w for w in _ray_start(cfg["head_start_ray_commands"]) if "--head" in w]
    assert len(heads) == 1, "one `ray start --head` in head_start_ray_commands"
    host = _flag(heads[0], "--dashboard-host")
    assert host is None or host in LOOPBACK, f"dashboard bound to {host}"
    every = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in every)
    for opt in cfg["docker"].get("run_options", []) + cfg["docker"].get("head_run_options", []):
        assert not re.match(r"^(-p|--publish)\b", opt.strip()), f"container publishes ports: {opt}"


def test_token_auth_is_on_for_every_node():
    """Ray token auth: every `ray start` (head and workers) runs with
    RAY_AUTH_MODE=token and finds the same token file, which file_mounts
    brings from the launching machine."""
    cfg = _cluster()
    env = _container_env()
    starts = _ray_start(cfg["head_start_ray_commands"]) + _ray_start(cfg["worker_start_ray_commands"])
    assert len(starts) == 2
    for words in starts:
        assigned = dict(w.split("=", 1) for w in words[:words.index("ray")] if "=" in w)
        mode = assigned.get("RAY_AUTH_MODE", env.get("RAY_AUTH_MODE"))
        assert mode == "token", f"token auth off in: {' '.join(words)}"
        path = assigned.get("RAY_AUTH_TOKEN_PATH", env.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"))
        assert path in cfg["file_mounts"], f"the token file {path} is not in file_mounts"
        assert env.get("RAY_AUTH_TOKEN_PATH", path) == path, "container env and ray start disagree on the token"
    assert env.get("RAY_AUTH_MODE") == "token", "ray CLIs in the container (ray status, ray job) need the mode too"


# -- the image and what the nodes install ---------------------------------------------------------------------

def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(reqs: list[str]) -> dict[str, str]:
    out = {}
    for r in map(Requirement, reqs):
        spec = list(r.specifier)
        if len(spec) == 1 and spec[0].operator == "==":
            out[canonicalize_name(r.name)] = spec[0].version
    return out


def test_image_is_a_published_ray_image_of_the_pinned_versions():
    import ray

    image = _cluster()["docker"]["image"]
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", f"{repo}: ray-ml is no longer published after Ray 2.49"
    m = re.fullmatch(r"(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{3,4})-(?P<platform>gpu|cu\d{3,4})", tag)
    assert m, f"tag {tag} is not {{Ray version}}-py{{XY}}-{{gpu|cuXY}}"
    ray_pin = _pins(_pyproject()["project"]["dependencies"])["ray"]
    assert m["ray"] == ray_pin == ray.__version__
    assert m["py"] == f"{sys.version_info.major}{sys.version_info.minor}", "the image's Python is not the venv's"


def _constraints_path() -> Path:
    cmds = _cluster()["setup_commands"]
    paths = [w for c in cmds for i, w in enumerate(shlex.split(c)) if shlex.split(c)[i - 1] in ("-c", "--constraint")]
    assert len(paths) == 1, "setup_commands install with one constraints file (pip install -c ...)"
    assert paths[0].startswith(REMOTE_ROOT + "/"), "the constraints file comes with the repo"
    assert _cluster()["file_mounts"][REMOTE_ROOT] == "."
    return ROOT / paths[0][len(REMOTE_ROOT) + 1:]


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in _constraints_path().read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.]*)", line)
        assert m, f"not an exact pin: {line!r}"  # no ranges, no +cpu local versions, no -e / URLs
        name = canonicalize_name(m[1])
        assert name not in pins, f"{name} pinned twice"
        pins[name] = m[2]
    return pins


def test_nodes_install_the_project_with_a_full_pinned_set():
    cfg = _cluster()
    setup = " ".join(cfg["setup_commands"])
    assert f'-e "{REMOTE_ROOT}[gpu]"' in setup or f"-e {REMOTE_ROOT}[gpu]" in setup
    assert "--index-url" not in setup and "--extra-index-url" not in setup, "torch 2.13.0's CUDA build is on PyPI"
    lock = _lock()
    assert "evolve-director" not in lock
    for name, version in {"ray": "2.60.0", "torch": "2.13.0", "vllm": "0.29.0"}.items():
        assert lock.get(name) == version, f"{name}=={lock.get(name)}"
    assert "boto3" in lock and "boto3" in " ".join(cfg["head_setup_commands"]), "the head's autoscaler needs boto3"


def test_pyproject_pins_agree_with_the_cluster_constraints():
    project = _pyproject()["project"]
    pins = _pins(project["dependencies"] + project["optional-dependencies"]["gpu"])
    lock = _lock()
    missing = sorted(set(pins) - set(lock))
    assert not missing, f"pinned in pyproject.toml, not in the constraints file: {missing}"
    differ = {n: (v, lock[n]) for n, v in pins.items() if lock[n] != v}
    # (numpy: vLLM 0.29.0, ray[llm]==2.60.0's pin, needs mistral_common, whose
    # every release asks numpy<2.4 on Python <= 3.12: pyproject pins 2.3.5.)
    assert not differ, f"pyproject.toml and the constraints file disagree (pyproject, constraints): {differ}"


def test_head_keeps_run_state_on_its_own_volume():
    """The head's /home/ray/runs is a host folder on its EBS root volume,
    created (owned by the container's uid) before the container starts."""
    cfg = _cluster()
    vols = [shlex.split(o)[1] for o in cfg["docker"].get("head_run_options", [])
            if shlex.split(o)[0] in ("-v", "--volume")]
    host = {v.split(":")[1]: v.split(":")[0] for v in vols}.get("/home/ray/runs")
    assert host, "no volume for /home/ray/runs on the head"
    assert any(f"mkdir -p {host}" in c for c in cfg["initialization_commands"])
