# Two entry points that work on a fresh Debian machine as root:
#   make demo   set everything up, then run the demo (the mesh across NATs, punched or relayed; 30-60 s)
#   make test   set everything up, then run lint and the whole test suite (then the kernel lab)
#   make test-kernel   the kernel-marked tests in a VM with Debian's kernel (QEMU TCG; <= 15 min)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The kernel lab (make test-kernel): Debian's kernel (WireGuard, netem) booted by virtme-ng under QEMU.
KERNEL_LAB_APT := qemu-system-x86 linux-image-amd64 busybox-static
APT_PACKAGES := python3 python3-venv python3-dev gcc wireguard-go wireguard-tools nftables iproute2 iputils-ping procps kmod nghttp2-client systemd nginx-light etcd-server etcd-client prometheus chromium

.PHONY: setup sysdeps kernel-lab-deps venv demo demo-discovery test test-kernel lint format unit integration bench proto clean

setup: sysdeps venv

# System packages: only when one is missing, and only as root (apt-get works as is).
sysdeps:
	@$(call apt_ensure,$(APT_PACKAGES))

kernel-lab-deps:
	@$(call apt_ensure,$(KERNEL_LAB_APT))

define apt_ensure
	missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing system packages (run as root to install):" $$missing; fi; \
	fi
endef

# Python packages in .venv, re-installed only when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup kernel-lab-deps lint
	$(PY) -m pytest -q -rs --durations=20 tests
	$(PY) scripts/kernel_lab.py

# The kernel-marked tests inside a VM running Debian's kernel (see scripts/kernel_lab.py); in CI (CI=true)
# a VM that cannot start fails the run. Extra pytest arguments: make test-kernel ARGS='-k sigterm'
test-kernel: setup kernel-lab-deps
	$(PY) scripts/kernel_lab.py $(ARGS)

unit: venv
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q -rs tests/integration

# The mesh demo: discovery server with STUN, a public node, a relay node, two clouds behind NAT routers, a
# node behind a symmetric NAT and one behind a CGNAT, in network namespaces.
# DEMO_ARGS=--keep leaves the lab up after the checks (node pages forwarded to 127.0.0.1) until Ctrl-C.
demo: setup
	$(PY) -m netns.demo $(DEMO_ARGS)

# The discovery-only demo: a server and three encrypted clients on loopback.
demo-discovery: setup
	$(PY) -m discovery.demo

bench: setup
	$(PY) bench/run_all.py

proto: venv
	$(PY) scripts/genproto.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info .kernel-lab
