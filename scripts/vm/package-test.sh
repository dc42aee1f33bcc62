#!/bin/bash
# Installs, upgrades, removes and purges a ulobdev .deb in a Debian root, the way a user does with
# dpkg, and runs test/support/package-check.sh inside at each step; prints that script's lines.
#   package-test.sh SUITE OLD.deb NEW.deb      SUITE: trixie (Debian 13) or bookworm (Debian 12)
# The roots are debootstrapped once and cached under .vm/ (pkg-SUITE): trixie with Debian 13's own
# nodejs 20.19; bookworm with the nodejs >= 20.19 this host runs (Debian 12 has only 18: users add
# one, as this host did), repacked from the host with dpkg-repack. Each run works in a throwaway
# overlay over the cached root, so the root stays clean; everything is unmounted on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VM=${ULOOP_VM_DIR:-$ROOT/.vm}
SUITE=${1:?usage: package-test.sh SUITE OLD.deb NEW.deb}
OLD=$(realpath "${2:?}")
NEW=$(realpath "${3:?}")
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
# shellcheck source=scripts/vm/debian.sh
. "$ROOT/scripts/vm/debian.sh"
DEPS=nodejs,fuse3,libnbd-bin,util-linux

# The cached roots, each under its own lock and with its own debootstrap cache, not .vm/.lock: the
# VM tests' prepare.sh, boot-image.sh and dkms.sh hold that one for minutes on a clean clone, and
# make test runs this beside them (waiting for each other, one core idled).
R="$VM/pkg-$SUITE"
export DEB_BOOTSTRAP_CACHE="$DEB_APT/debootstrap-pkg-$SUITE"
mkdir -p "$DEB_BOOTSTRAP_CACHE"
(
  flock 9
  case $SUITE in
    trixie) trixie_root "$R" "$DEPS" ;;
    bookworm)
      if [ ! -f "$R/.ulob-root" ]; then
        command -v dpkg-repack >/dev/null || { echo "package-test: dpkg-repack is missing (apt-get install dpkg-repack)" >&2; exit 1; }
        rm -rf --one-file-system "$R" "$R.tmp"
        echo "package-test: debootstrap bookworm into $R" >&2
        deb_bootstrap --variant=minbase --include=fuse3,libnbd-bin,util-linux,python3,ca-certificates \
          --cache-dir="$DEB_BOOTSTRAP_CACHE" bookworm "$R.tmp" "$DEB_MIRROR" >"$VM/debootstrap-pkg-bookworm.log" 2>&1 ||
          { echo "package-test: debootstrap bookworm failed; see $VM/debootstrap-pkg-bookworm.log" >&2; exit 1; }
        host_node=$(dpkg-query -W -f='${Version}' nodejs)
        dpkg --compare-versions "$host_node" ge 20.19 || { echo "package-test: the host's nodejs $host_node is older than 20.19" >&2; exit 1; }
        mkdir -p "$VM/host-debs" && (cd "$VM/host-debs" && rm -f nodejs_*.deb && dpkg-repack nodejs >&2)
        cp "$VM"/host-debs/nodejs_*.deb "$R.tmp/tmp/"
        in_root "$R.tmp" sh -c 'dpkg -i /tmp/nodejs_*.deb && rm /tmp/nodejs_*.deb' >&2
        echo "bookworm $host_node" >"$R.tmp/.ulob-root"
        mv "$R.tmp" "$R"
      fi
      ;;
    *) echo "package-test: SUITE is trixie or bookworm, not $SUITE" >&2; exit 1 ;;
  esac
) 9>"$R.lock"

# A throwaway root: overlay over the cached one.
work=$(mktemp -d "$VM/pkg-run.XXXXXX")
mkdir -p "$work/upper" "$work/work" "$work/root"
cleanup() {
  umount -l "$work/root" 2>/dev/null || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
mount -t overlay overlay -o "lowerdir=$R,upperdir=$work/upper,workdir=$work/work" "$work/root"
M="$work/root"
cp "$OLD" "$M/tmp/old.deb"
cp "$NEW" "$M/tmp/new.deb"
cp "$ROOT/test/support/package-check.sh" "$M/tmp/check.sh"
echo "SUITE=$SUITE $(cat "$M/etc/debian_version")"

step() {
  local name=$1; shift
  local rc=0 out
  out=$(in_root "$M" "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | sed "s/^/$name| /"
  echo "STEP $name rc=$rc"
}
step install dpkg -i /tmp/old.deb
step after-install sh /tmp/check.sh installed
step upgrade dpkg -i /tmp/new.deb
step after-upgrade sh /tmp/check.sh installed
step remove dpkg -r ulobdev
step after-remove sh /tmp/check.sh removed
step reinstall dpkg -i /tmp/new.deb
step purge dpkg -P ulobdev
step after-purge sh /tmp/check.sh purged
