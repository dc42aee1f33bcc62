# ulobdev — `make demo` and `make test` do all set-up on a fresh Debian machine (as root).
SHELL := /bin/bash
NODE_MODULES_STAMP := node_modules/.package-lock.json
ADDON := build/Release/ulob_native.node
TS_STAMP := dist/.built
BUNDLE := dist/cli/ulobdev.bundle.js

.PHONY: all deps build man test test-long test-kernels demo bench clean install deb

all: build

# Debian packages the build, tests and demo need; installs only what is missing.
deps: $(NODE_MODULES_STAMP)
	@bash scripts/install-test-deps.sh

$(NODE_MODULES_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

# npm ci builds the addon already (npm runs `node-gyp rebuild` for a package with a binding.gyp and
# no install script), so node_modules is only an order-only prerequisite: a fresh install does not
# make it build a second time; a change to its sources does.
$(ADDON): binding.gyp $(wildcard native/*.cc native/*.h kernel/include/uapi/*.h) | $(NODE_MODULES_STAMP)
	npx node-gyp rebuild
	@touch $@

$(TS_STAMP): $(NODE_MODULES_STAMP) tsconfig.json $(shell find src -name '*.ts')
	npx tsc -p tsconfig.json
	@touch $@

# ulobdev as one file (rolldown, Vite's bundler): a start reads and compiles one module instead of
# about 120 (resolving each costs a dozen stats), which is most of a restart's time on a slow
# machine (docs/design.md, "Start time"). It sits beside dist/cli/ulobdev.js, so the addon's path
# and the packages it loads on demand (pino-pretty, cli-progress, cron) resolve the same;
# better-sqlite3 finds its addon by its own path and stays outside.
$(BUNDLE): $(TS_STAMP)
	npx rolldown dist/cli/ulobdev.js --platform node --format esm --external better-sqlite3 --file $@ --log-level warn

MAN_PAGES := out/man/ulobdev.8 out/man/ulohttp.8

# ulobdev(8) and ulohttp(8) from the commands' own option definitions (src/cli/man-pages.ts).
$(MAN_PAGES) &: $(TS_STAMP) scripts/man.mjs package.json
	node scripts/man.mjs out/man

build: $(NODE_MODULES_STAMP) $(ADDON) $(TS_STAMP) $(BUNDLE) $(MAN_PAGES)

man: $(MAN_PAGES)

# Every test, both cores busy (scripts/test.sh): the host tests (unit, model, integration) in one
# lane (two files at a time, longest first), the VM files (test/vm, Debian 13's 6.12; test/vm/kernel-smoke.test.ts runs the module's
# main path on Debian 12's 6.1 and the newest 7.x as well; kernels are cached under .vm/) from a
# longest-first queue, one guest at a time, two once package.test is done; package.test (debootstrap
# and dpkg in Debian 12 and 13 roots, mostly waiting) in a lane of its own beside them. The model and
# fuzz tests run ULOB_TEST_SCALE's share of their full repetition counts (test/support/scale.ts:
# 0.4 by default, which keeps the suite under 30 min on 2 cores); `make test-long` runs them all.
test: deps build
	bash scripts/test.sh

# make test with the full repetition counts of the model and fuzz tests (ULOB_TEST_SCALE=1).
test-long: deps build
	ULOB_TEST_SCALE=1 bash scripts/test.sh

# The whole VM suite on each kernel in turn: 6.1, 6.12 and the newest 7.x (ULOBVM_KERNEL, see
# test/support/vm.ts). KERNELS="6.12 newest" picks fewer.
KERNELS ?= 6.1 6.12 newest
test-kernels: deps build
	@set -e; for k in $(KERNELS); do echo "== VM suite on $$k"; ULOBVM_KERNEL=$$k npx vitest run --project vm; done

demo: deps build
	bash scripts/demo.sh

bench: deps build
	node bench/engine.js

clean:
	rm -rf build dist out

# --- make install / make deb ---------------------------------------------------------------------
# A self-contained build under $(LIBDIR) (dist, production node_modules, the addon), the commands
# in $(SBINDIR), systemd units, the udev rule, the logrotate snippet, docs, man pages, and the
# module source for DKMS.
VERSION := $(shell node -p "require('./package.json').version" 2>/dev/null)
PREFIX ?= /usr
DESTDIR ?=
SBINDIR ?= $(PREFIX)/sbin
LIBDIR ?= $(PREFIX)/lib/ulobdev
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/ulobdev
UNITDIR ?= $(PREFIX)/lib/systemd/system
# udev reads /usr/lib/udev and /etc/udev only: a /usr/local install puts its rule in /etc.
UDEVRULESDIR ?= $(if $(filter /usr,$(PREFIX)),/usr/lib/udev/rules.d,/etc/udev/rules.d)
UDEVLIBDIR ?= $(LIBDIR)
# logrotate reads /etc/logrotate.d only, whatever the prefix (the --daemon logs in /run/ulobdev).
LOGROTATEDIR ?= /etc/logrotate.d
# DKMS looks for module sources in /usr/src, whatever the prefix.
DKMSDIR ?= /usr/src/uloop-$(VERSION)
# The node the commands run with; better-sqlite3 is built for its ABI.
NODE ?= $(shell command -v node)
PROD := out/prod

# Production node_modules: the dev tree pruned (no download), better-sqlite3 without its sources
# and intermediate objects.
$(PROD)/.done: $(NODE_MODULES_STAMP) package.json package-lock.json
	rm -rf $(PROD) && mkdir -p $(PROD)
	cp package.json package-lock.json $(PROD)/
	cp -a node_modules $(PROD)/
	cd $(PROD) && npm prune --omit=dev --no-audit --no-fund --ignore-scripts >/dev/null
	cd $(PROD)/node_modules/better-sqlite3 && rm -rf deps src build/Release/obj build/Release/obj.target build/Release/.deps \
	  build/Release/sqlite3.a build/Release/test_extension.node build/deps build/Makefile build/*.mk build/config.gypi
	find $(PROD)/node_modules -depth -type d -empty -delete
	@touch $@

install: build $(PROD)/.done
	@test -n "$(NODE)" || { echo "make install: no node in PATH (set NODE=/usr/bin/node)" >&2; exit 1; }
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(DOCDIR) \
	  $(DESTDIR)$(UNITDIR) $(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(UDEVLIBDIR) $(DESTDIR)$(DKMSDIR)
	install -m 644 package.json $(DESTDIR)$(LIBDIR)/
	rm -rf $(DESTDIR)$(LIBDIR)/dist $(DESTDIR)$(LIBDIR)/node_modules $(DESTDIR)$(LIBDIR)/build
	cp -R dist $(DESTDIR)$(LIBDIR)/dist && rm -f $(DESTDIR)$(LIBDIR)/dist/.built
	cp -R $(PROD)/node_modules $(DESTDIR)$(LIBDIR)/node_modules
	install -D -m 644 $(ADDON) $(DESTDIR)$(LIBDIR)/$(ADDON)
	for c in ulobdev ulohttp; do \
	  entry=$(LIBDIR)/dist/cli/$$c.js; [ -e dist/cli/$$c.bundle.js ] && entry=$(LIBDIR)/dist/cli/$$c.bundle.js; \
	  printf '#!/bin/sh\nexec %s %s "$$@"\n' "$(NODE)" "$$entry" >$(DESTDIR)$(SBINDIR)/$$c; \
	  chmod 755 $(DESTDIR)$(SBINDIR)/$$c; \
	  gzip -9nc out/man/$$c.8 >$(DESTDIR)$(MANDIR)/man8/$$c.8.gz; \
	done
	sed -e 's|/usr/sbin/|$(SBINDIR)/|g' -e 's|file:/usr/share/doc/ulobdev/|file:$(DOCDIR)/|g' contrib/systemd/ulobdev@.service >$(DESTDIR)$(UNITDIR)/ulobdev@.service
	sed 's|/usr/lib/ulobdev/|$(UDEVLIBDIR)/|g' contrib/udev/60-ulobdev.rules >$(DESTDIR)$(UDEVRULESDIR)/60-ulobdev.rules
	install -m 755 contrib/udev/ulobdev-name $(DESTDIR)$(UDEVLIBDIR)/ulobdev-name
	install -D -m 644 contrib/logrotate/ulobdev $(DESTDIR)$(LOGROTATEDIR)/ulobdev
	install -m 644 README.md docs/*.md contrib/systemd/example.conf $(DESTDIR)$(DOCDIR)/
	cd kernel && files=$$(git ls-files . 2>/dev/null | grep -v '^\.'); [ -n "$$files" ] || files="Kbuild Makefile dkms.conf uloop.c include/uapi/uloop.h"; \
	  for f in $$files; do install -D -m 644 $$f $(DESTDIR)$(DKMSDIR)/$$f; done
	sed -i 's/^PACKAGE_VERSION=.*/PACKAGE_VERSION="$(VERSION)"/' $(DESTDIR)$(DKMSDIR)/dkms.conf

# A Debian package (dpkg-deb) of `make install` with PREFIX=/usr. DEB_VERSION for test builds.
DEB_VERSION ?= $(VERSION)
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null)
DEB := out/ulobdev_$(DEB_VERSION)_$(DEB_ARCH).deb
DEB_INPUTS := $(ADDON) $(TS_STAMP) $(BUNDLE) $(MAN_PAGES) $(PROD)/.done Makefile README.md package.json \
  $(shell find contrib docs kernel -type f -not -name '.*' -not -name '*.o' -not -name '*.ko' \
    -not -name '*.mod' -not -name '*.mod.c' -not -name modules.order -not -name Module.symvers 2>/dev/null)
$(DEB): $(DEB_INPUTS)
	rm -rf out/deb
	$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/out/deb PREFIX=/usr NODE=/usr/bin/node
	bash contrib/debian/control.sh out/deb "$(DEB_VERSION)" "$(DEB_ARCH)" "$(VERSION)"
	dpkg-deb --root-owner-group -Zxz --build out/deb $@

deb: build $(DEB)
	@echo "$(DEB)"
