# ulobdev — `make demo` and `make test` do all set-up on a fresh Debian machine (as root).
SHELL := /bin/bash
NODE_MODULES_STAMP := node_modules/.package-lock.json
ADDON := build/Release/ulob_native.node
TS_STAMP := dist/.built

.PHONY: all deps build test test-kernels demo bench clean

all: build

# Debian packages the build, tests and demo need; installs only what is missing.
deps: $(NODE_MODULES_STAMP)
	@bash scripts/install-test-deps.sh

$(NODE_MODULES_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

$(ADDON): $(NODE_MODULES_STAMP) binding.gyp $(wildcard native/*.cc native/*.h kernel/include/uapi/*.h)
	npx node-gyp rebuild
	@touch $@

$(TS_STAMP): $(NODE_MODULES_STAMP) tsconfig.json $(shell find src -name '*.ts')
	npx tsc -p tsconfig.json
	@touch $@

build: $(NODE_MODULES_STAMP) $(ADDON) $(TS_STAMP)

# Every test; the VM suite (test/vm) boots Debian 13's 6.12, and test/vm/kernel-smoke.test.ts runs the
# module's main path on Debian 12's 6.1 and the newest 7.x as well. Kernels are cached under .vm/.
test: deps build
	npx vitest run

# The whole VM suite on each kernel in turn: 6.1, 6.12 and the newest 7.x (ULOBVM_KERNEL, see
# test/support/vm.ts). KERNELS="6.12 newest" picks fewer.
KERNELS ?= 6.1 6.12 newest
test-kernels: deps build
	@set -e; for k in $(KERNELS); do echo "== VM suite on $$k"; ULOBVM_KERNEL=$$k npx vitest run test/vm; done

demo: deps build
	bash scripts/demo.sh

bench: deps build
	node bench/engine.js

clean:
	rm -rf build dist
