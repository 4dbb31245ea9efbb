"""Every example configuration loads, and the runnable ones prepare (their
prompt files read and checked, the student resolved) without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from evolve.config import RunConfig
from evolve.loop import prepare

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads(path):
    RunConfig.load(path)


@pytest.mark.parametrize("name", ["tiny.yaml", "free-text.yaml", "latent-free-text.yaml", "latent-tiny.yaml"])
def test_runnable_configs_prepare(name, tmp_path):
    cfg = RunConfig.load(CONFIGS / name).model_copy(update={"run_dir": str(tmp_path / "run")})
    ready = prepare(cfg)
    assert ready.heldout and (tmp_path / "run" / "config.json").exists()
    if not ready.cfg.student.is_latent:  # a pixel student knows its words before it is built
        assert ready.cfg.student.vocabulary


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_api_teachers_options_are_ones_their_provider_reads(path):
    """A provider option the client does not read (a typo, a request field
    outside `params`) fails when the gateway is made, before anything is bought."""
    from actors.providers import PROVIDER_KINDS, make_provider

    for t in RunConfig.load(path).teachers:
        if t.kind in PROVIDER_KINDS:
            make_provider(t.kind, t.base_url, t.model, None, timeout_s=t.timeout_s, extra=t.provider_options)


def test_an_option_the_provider_does_not_read_is_refused():
    from actors.providers import make_provider

    with pytest.raises(ValueError, match=r"\['quality'\].*params"):
        make_provider("openai", None, "dall-e-3", None, extra={"size": "1024x1024", "quality": "standard"})
