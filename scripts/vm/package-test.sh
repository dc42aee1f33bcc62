#!/bin/bash
# Installs, upgrades, removes and purges a ulobdev .deb in a Debian root, the way a user does with
# dpkg, and runs test/support/package-check.sh inside at each step; prints that script's lines.
#   package-test.sh SUITE OLD.deb NEW.deb      SUITE: trixie (Debian 13) or bookworm (Debian 12)
# The roots are debootstrapped once and cached under .vm/ (pkg-SUITE): trixie with Debian 13's own
# nodejs 20.19; bookworm with the nodejs >= 20.19 this host runs (Debian 12 has only 18: users add
# one, as this host did), repacked from the host (repack_host_nodejs). Each run works in a throwaway
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
# Each phase's seconds on stderr ("package-test: TIME bookworm debootstrap 95 s", the wait for the
# root's lock included): where the test's time goes, in every CI log.
phase_t=$SECONDS
phase() { echo "package-test: TIME $SUITE $1 $((SECONDS - phase_t)) s" >&2; phase_t=$SECONDS; }

# Writes the host's installed nodejs package as a .deb to $1, as dpkg-repack does, in one tar and
# uncompressed: its files, directories and links as dpkg lists them (one that is gone, as npm's
# self-updates leave, skipped), its control fields and maintainer scripts from dpkg's database.
# dpkg-repack copies each of nodejs's 5,000 files with its own cp and then compresses 190 MB with xz:
# minutes on 2 busy cores, for a package that lives one test run.
repack_host_nodejs() {
  local out=$1 tree f s
  tree=$(mktemp -d "$VM/nodejs-repack.XXXXXX")
  mkdir -p "$tree/DEBIAN"
  dpkg-query -L nodejs | while IFS= read -r f; do
    case $f in /?*) { [ -e "$f" ] || [ -L "$f" ]; } && printf '%s\n' "${f#/}" ;; esac
  done | tar -C / --no-recursion -cf - -T - | tar -C "$tree" -xpf -
  dpkg-query -s nodejs | awk '/^(Status|Config-Version):/ { next } /^Conffiles:/ { skip = 1; next }
    skip && /^ / { next } { skip = 0; print }' >"$tree/DEBIAN/control"
  dpkg-query -W -f='${Conffiles}\n' nodejs | awk 'NF { print $1 }' >"$tree/DEBIAN/conffiles"
  [ -s "$tree/DEBIAN/conffiles" ] || rm "$tree/DEBIAN/conffiles"
  for s in preinst postinst prerm postrm; do
    [ ! -f "/var/lib/dpkg/info/nodejs.$s" ] || install -m 755 "/var/lib/dpkg/info/nodejs.$s" "$tree/DEBIAN/$s"
  done
  dpkg-deb --root-owner-group -Znone --build "$tree" "$out" >&2
  rm -rf --one-file-system "$tree"
}

# The cached roots, each under its own lock and with its own debootstrap cache, not .vm/.lock: the
# VM tests' prepare.sh, boot-image.sh and dkms.sh hold that one for minutes on a clean clone, and
# make test runs this beside them (waiting for each other, one core idled).
R="$VM/pkg-$SUITE"
export DEB_BOOTSTRAP_CACHE="$DEB_APT/debootstrap-pkg-$SUITE"
mkdir -p "$DEB_BOOTSTRAP_CACHE"
(
  flock 9
  case $SUITE in
    trixie) trixie_root "$R" "$DEPS" && phase debootstrap ;;
    bookworm)
      if [ ! -f "$R/.ulob-root" ]; then
        rm -rf --one-file-system "$R" "$R.tmp"
        echo "package-test: debootstrap bookworm into $R" >&2
        dpkg_unsafe_io "$R.tmp"
        deb_bootstrap --variant=minbase --include=fuse3,libnbd-bin,util-linux,python3,ca-certificates \
          --cache-dir="$DEB_BOOTSTRAP_CACHE" bookworm "$R.tmp" "$DEB_MIRROR" >"$VM/debootstrap-pkg-bookworm.log" 2>&1 ||
          { echo "package-test: debootstrap bookworm failed; see $VM/debootstrap-pkg-bookworm.log" >&2; exit 1; }
        phase debootstrap
        host_node=$(dpkg-query -W -f='${Version}' nodejs)
        dpkg --compare-versions "$host_node" ge 20.19 || { echo "package-test: the host's nodejs $host_node is older than 20.19" >&2; exit 1; }
        repack_host_nodejs "$R.tmp/tmp/nodejs.deb"
        phase repack-nodejs
        in_root "$R.tmp" sh -c 'dpkg -i /tmp/nodejs.deb && rm /tmp/nodejs.deb' >&2
        phase install-nodejs
        echo "bookworm $host_node" >"$R.tmp/.ulob-root"
        mv "$R.tmp" "$R"
      fi
      ;;
    *) echo "package-test: SUITE is trixie or bookworm, not $SUITE" >&2; exit 1 ;;
  esac
) 9>"$R.lock"

phase_t=$SECONDS # the subshell's phase() could not move the parent's clock

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
phase overlay

step() {
  local name=$1; shift
  local rc=0 out
  out=$(in_root "$M" "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | sed "s/^/$name| /"
  echo "STEP $name rc=$rc"
  phase "$name"
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
