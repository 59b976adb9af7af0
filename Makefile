# Every target installs what it needs when .venv is missing, so each works alone on a fresh clone.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
MODEL   ?= models/demo-tiny
SIZE    ?= tiny
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: install serve test bench bench-http bench-cache bench-train bench-plan bench-policies bench-paper demo-model clean

install: .venv/.installed

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

$(MODEL)/config.json: | .venv/.installed
	.venv/bin/mace demo-model $(MODEL) --size $(SIZE)

demo-model: $(MODEL)/config.json

serve: .venv/.installed $(MODEL)/config.json
	.venv/bin/mace serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: .venv/.installed
	$(PY) -m pytest -q

bench: .venv/.installed
	$(MAKE) demo-model MODEL=models/demo-base SIZE=base
	.venv/bin/mace bench engine --model models/demo-base --out bench-results/engine.json
	$(MAKE) bench-http
	$(MAKE) bench-cache
	$(MAKE) bench-train
	$(MAKE) bench-plan
	$(MAKE) bench-policies
	$(MAKE) bench-paper

bench-http: .venv/.installed
	$(MAKE) demo-model MODEL=models/demo-base SIZE=base
	.venv/bin/mace bench http --model models/demo-base --out bench-results/http.json

bench-cache: .venv/.installed
	$(MAKE) demo-model MODEL=models/demo-base SIZE=base
	.venv/bin/mace bench cache --model models/demo-base --out bench-results/cache.json

bench-train: .venv/.installed
	$(MAKE) demo-model MODEL=models/demo-base SIZE=base
	.venv/bin/mace bench train --model models/demo-base --out bench-results/train.json

bench-plan: .venv/.installed
	.venv/bin/mace bench plan --out bench-results/plan.json

bench-policies: .venv/.installed
	$(MAKE) demo-model MODEL=models/demo-base SIZE=base
	.venv/bin/mace bench policies --model models/demo-base --out bench-results/policies.json

# Builds models/demo-tiny-pretrained once (about a minute); `mace bench paper --quick` for the short run.
bench-paper: .venv/.installed
	.venv/bin/mace bench paper --out-dir bench-results/paper-full

clean:
	rm -rf .venv models bench-results
