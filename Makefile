# ulobdev — `make demo` and `make test` do all set-up on a fresh Debian machine (as root).
SHELL := /bin/bash
NODE_MODULES_STAMP := node_modules/.package-lock.json
ADDON := build/Release/ulob_native.node
TS_STAMP := dist/.built

.PHONY: all deps build test demo bench clean

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

test: deps build
	npx vitest run

demo: deps build
	bash scripts/demo.sh

bench: deps build
	node bench/engine.js

clean:
	rm -rf build dist
