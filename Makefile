# `make demo` runs the main job, `make test` the test suite; both set themselves up through `make install`
# (venv .venv/ at the repo root, ROS 2 wheels, CPU torch, MuJoCo ...), which is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
# The ROS wheels and `ros2 run`-style lookups find the package through the venv prefix (shared/ROS_NOTES.md).
RUN := env AMENT_PREFIX_PATH=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH

.PHONY: install demo test lint bench clean
install: $(VENV)/.installed

# A regular (not editable) install: pip's editable mode skips data_files, and the nodes must find
# share/mql_ros and lib/mql_ros exactly as a user's install does. Any source change re-installs.
SOURCES := $(shell find mql_ros launch config urdf scripts checkpoints -type f -not -name '*.pyc' -not -name '*.so' 2>/dev/null)
$(VENV)/.installed: requirements.txt setup.py setup.cfg package.xml $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	# the C kernel next to the sources too: the tests import the source tree
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

demo: install
	$(RUN) $(VENV)/bin/mql-ros demo

test: install
	$(RUN) $(PY) -m pytest test -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(RUN) $(PY) benchmarks/speed.py
	$(RUN) $(PY) benchmarks/oracle_search.py
	$(RUN) $(PY) benchmarks/adaptation.py
	$(RUN) $(PY) benchmarks/validation_guard.py
	$(RUN) $(PY) benchmarks/archive.py
	$(RUN) $(PY) benchmarks/ros_latency.py
	$(RUN) $(PY) benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info mql_ros/core/*.so
