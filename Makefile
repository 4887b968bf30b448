# Developer and CI entry points. GNU make, bash; run as root.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
MAKEFLAGS += --no-builtin-rules

# Debian packages the tests, the demo and the benchmark run (zstd and xattrs are
# handled in Python, so no zstd or attr):
#   xfsprogs        mkfs.xfs for init-store's loop-mounted XFS
#   mount           mount, umount, losetup
#   runc            runs commands in created root filesystems
#   busybox-static  a one-file userland for small test images
#   debootstrap     the Debian base image of the demo and the benchmark
#   umoci, skopeo   check that image's layout; umoci is the benchmark's reference unpacker
#   docker-registry the real registry the registry tests, demo and benchmark start on loopback
#   apache2-utils   htpasswd, for the registry's basic-auth variant
#   podman          the registry benchmark's peer
#   uidmap          newuidmap/newgidmap: rootless unpacks in a user namespace (and their tests)
#   nginx           the droplet blobstore (HTTPS, client certificates) of the remote-layer tests
APT_PACKAGES := xfsprogs mount runc busybox-static debootstrap umoci skopeo uidmap \
	docker-registry apache2-utils podman
APT_PACKAGES += nginx
# The BOSH release's tests: ruby renders the job templates (ERB); the rest
# compile the release's packages as a stemcell's compilation VM would.
# /usr/bin/time: the side-by-side benchmark's peak RSS of a command.
APT_PACKAGES += time
APT_PACKAGES += ruby gcc make libc6-dev zlib1g-dev libffi-dev libssl-dev uuid-dev \
  xz-utils bzip2 e2fsprogs util-linux curl

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
LINTED := src tests bench demo demo/build-debian-image

.PHONY: deps apt-deps lint test test-quota demo bench image clean clean-image require-root spec shim \
	fuzz

require-root:
	@if [[ $$(id -u) -ne 0 ]]; then echo "make: this target must run as root" >&2; exit 1; fi

deps: apt-deps $(STAMP)

# apt-get update only when something is missing: a second run touches no network.
# Packaged services must not start (docker-registry's would listen on all
# interfaces): where no policy-rc.d forbids it, one does during the install.
apt-deps: require-root
	@missing=(); \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${db:Status-Abbrev}' "$$p" 2>/dev/null | grep -q '^ii' || missing+=("$$p"); \
	done; \
	if (( $${#missing[@]} )); then \
	  echo "installing: $${missing[*]}"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  if [[ ! -e /usr/sbin/policy-rc.d ]]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
	    trap 'rm -f /usr/sbin/policy-rc.d' EXIT; \
	  fi; \
	  apt-get update -qq; \
	  apt-get install -y -qq --no-install-recommends "$${missing[@]}"; \
	fi

$(STAMP): pyproject.toml
	@[[ -x $(PY) ]] || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

test: deps lint spec shim
	$(VENV)/bin/pytest -m "not xfs_quota"
	$(MAKE) --no-print-directory test-quota

# The native shim Garden runs in front of `grootfs serve` (tests run it too).
# Linked statically (libc6-dev's libc.a): no dynamic loading saves ~0.2 ms of
# its ~0.8 ms per call.
SHIM_CFLAGS := -O2 -Wall -Wextra -Werror -std=c11
SHIM_LDFLAGS := -static
shim: build/grootfs-shim
build/grootfs-shim: src/shim/grootfs-shim.c
	@mkdir -p build
	$(CC) $(SHIM_CFLAGS) $(SHIM_LDFLAGS) -o $@ $<

# Tests that need XFS project quotas enforced: on the host when its kernel can
# (tests/vm/host-has-xfs-quota), else in a VM booted from Debian's kernel.
VM_PACKAGES := qemu-system-x86 linux-image-amd64
test-quota: deps
	@if tests/vm/host-has-xfs-quota; then \
	  echo "test-quota: this kernel enforces XFS project quotas: running on the host"; \
	  $(VENV)/bin/pytest -m xfs_quota; \
	else \
	  echo "test-quota: no XFS quota in this kernel: running in a VM with Debian's kernel"; \
	  $(MAKE) --no-print-directory APT_PACKAGES="$(VM_PACKAGES)" apt-deps; \
	  tests/vm/run -m xfs_quota; \
	fi

# The job templates rendered through Ruby's ERB (spec/support gives BOSH's p, if_p, spec).
spec: apt-deps
	ruby -e 'Dir["spec/**/*_spec.rb"].sort.each { |f| require_relative f }'

# Fuzzing (tests/fuzz, see README "Hostile input"): each parser target runs
# coverage-guided under atheris for FUZZ_SECONDS, then whole creates on a real
# loop XFS store for FUZZ_CREATE_SECONDS; prints executions and findings per
# target, exits 1 on any finding. `make test` runs a short seeded pass.
FUZZ_SECONDS ?= 45
FUZZ_CREATE_SECONDS ?= 300
fuzz: deps require-root
	$(PY) tests/fuzz/fuzz.py --seconds $(FUZZ_SECONDS) --create-seconds $(FUZZ_CREATE_SECONDS)

image: deps
	$(PY) demo/build-debian-image

demo: image shim
	demo/demo.sh

# BENCH_QUICK=1: fewer repetitions, a short cell load, only the side-by-side bench.
# GROOTFS_REFERENCE=/path/to/grootfs: GrootFS (Go) measured beside ours, with ratios.
bench: image shim
	$(PY) bench/bench_hotpath.py
	@if [[ -z "$${BENCH_QUICK:-}" || "$${BENCH_QUICK}" == 0 ]]; then \
	  $(PY) bench/bench_create.py; \
	  $(PY) bench/bench_registry.py; \
	fi

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# The Debian image takes a minute to rebuild, so plain `clean` keeps it.
clean-image:
	rm -rf .cache/debian-bookworm-oci .cache/debian-bookworm.tgz
