# segframe: `make demo` (the main job) and `make test` (the test suite) on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(if $(wildcard ../shared/data/CHASEDB1),../shared/data/CHASEDB1,)
WORK ?= demo_output

.PHONY: install test lint demo bench clean

# every decoder under plugins/ is its own distribution, installed with its test extra (if it has one)
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

$(VENV)/.installed: pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install --no-compile -e ".[test]" $(foreach p,$(PLUGINS),-e "$(p)[test]")
	@# pip compiles every installed file to bytecode on one core (about 95 s of a 3.5-minute install on
	@# 2 cores); compileall does the same on all cores. A file that does not compile (a few third-party
	@# files are Python 2) stays source, as pip leaves it
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
		> /dev/null || true
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .

# pytest-xdist workers; the tests that read the session's trained runs share one (--dist loadgroup)
JOBS ?= 2
test: install lint
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup

demo: install
	$(PY) -m segframe.demo --data "$(DATA)" --work "$(WORK)" $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)")

# the tables of BENCHMARKS.md (random init, CPU unless a GPU is visible); vessels.py trains the demo's
# row against nnU-Net's U-Net on CHASE_DB1 (2 seeds), then the LES-AV rows (2 seeds; at half size, where
# a 2-core run fits in hours); hours on 2 cores;
# --reuse resumes an interrupted run
LESAV ?= ../shared/data/LES-AV
bench: install
	$(PY) benchmarks/overhead.py --write
	$(PY) benchmarks/finetune_modes.py --write
	$(PY) benchmarks/decoders.py --write
	$(PY) benchmarks/vessels.py --data "$(DATA)" --work bench_output --seeds 2 \
		--rows unet upernet+depth6+detail+srec0.4+valbf16+bf16 --section chase-demo-cpu --write
	$(PY) benchmarks/vessels.py --data "$(LESAV)" --scale 0.5 --work bench_output/lesav --seeds 2 --write
	$(PY) benchmarks/nnunet_step.py --work bench_output --write
	$(PY) benchmarks/profile_parts.py --work bench_output --write
	$(PY) benchmarks/window.py --work bench_output --write

clean:
	rm -rf $(WORK) bench_output
