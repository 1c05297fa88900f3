# lbllm: `make demo` and `make test` set themselves up (virtualenv in .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lbllm-installed
DEMO_OUT ?= demo_out
# lbllm's CPU LAMB kernel (lbllm/optim/cpu_kernel.py) is compiled on first use; keep it in
# the repo so it is built once per clone, not once per process tree. (DeepSpeed's own CPU
# shared-memory op is not built: lbllm.train.engine.use_gloo_collectives_on_cpu.)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

demo: $(STAMP)
	$(PY) scripts/demo.py --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -x -q tests

bench: $(STAMP)
	$(PY) scripts/bench_optim.py
	$(PY) scripts/bench_data.py

clean:
	rm -rf $(DEMO_OUT) .cache
