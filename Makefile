# The two commands the README opens with. Each does its own set-up first.
.PHONY: setup run test test-fast bench
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled

setup:
	@scripts/setup

run: setup          ## the main job, shapes-world defaults (ARGS="--rounds 2 ..." to change)
	.venv/bin/evolve run $(ARGS)

test: setup         ## the whole test suite
	.venv/bin/python -m pytest -q --durations=12 $(ARGS)

test-fast: setup    ## unit tests only, no Ray
	.venv/bin/python -m pytest -q -m "not integration" $(ARGS)
