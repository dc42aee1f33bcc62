#!/bin/bash
# DKMS as a Debian 13 user runs it, in the Debian 13 build root (.vm/trixie-build, which has dkms
# and openssl): kernel/ goes to /usr/src/uloop-VERSION, then `dkms add`, `dkms build -k KVER` and
# `dkms install -k KVER`; with a second kernel, `dkms autoinstall -k KVER2` (what the kernel
# package's postinst hook runs on an upgrade) must build and install it too, because dkms.conf says
# AUTOINSTALL=yes. DKMS signs the module with its own MOK key (/var/lib/dkms/mok.key, made on first
# use), as on a Secure Boot laptop.
#   dkms.sh KVER [KVER2]     (run scripts/vm/prepare.sh for each kernel first: it unpacks the headers)
#   dkms.sh --autoinstall KVER2   only the autoinstall for KVER2, after a `dkms.sh KVER` (the test
#                                 runs it while the guest boots: the guest needs only KVER's module)
# Prints DKMS_KO=the installed module copied out for the VM, DKMS_MOK=the public key (not with
# --autoinstall), and the `dkms status` lines as STATUS=...; everything else goes to stderr. Exits
# non-zero on any failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VM=${ULOOP_VM_DIR:-$ROOT/.vm}
only_autoinstall=
if [ "${1:-}" = --autoinstall ]; then only_autoinstall=1; shift; fi
KVER=${1:?usage: dkms.sh KVER [KVER2] | dkms.sh --autoinstall KVER2}
KVER2=${2:-}
if [ -n "$only_autoinstall" ]; then KVER2=$KVER; KVER=; fi
# shellcheck source=scripts/vm/debian.sh
. "$ROOT/scripts/vm/debian.sh"
R="$VM/trixie-build"

exec 9>"$VM/.lock"
flock 9

for k in $KVER $KVER2; do
  [ -f "$R/usr/src/linux-headers-$k/.config" ] || { echo "dkms.sh: no headers for $k in $R; run scripts/vm/prepare.sh for it first" >&2; exit 1; }
done
eval "$(grep -E '^(PACKAGE_NAME|PACKAGE_VERSION)=' "$ROOT/kernel/dkms.conf")"
SRC="/usr/src/$PACKAGE_NAME-$PACKAGE_VERSION"

if [ -n "$only_autoinstall" ]; then
  in_root "$R" dkms autoinstall -k "$KVER2" >&2
  in_root "$R" dkms status "$PACKAGE_NAME" | sed 's/^/STATUS=/'
  exit 0
fi

# A clean slate: the previous run's registration, tree and installed modules go.
in_root "$R" sh -c "dkms remove $PACKAGE_NAME/$PACKAGE_VERSION --all >/dev/null 2>&1 || true; rm -rf /var/lib/dkms/$PACKAGE_NAME; find /lib/modules -path '*/updates/dkms/$PACKAGE_NAME.ko*' -delete"
rm -rf "${R:?}$SRC" && mkdir -p "$R$SRC"
(cd "$ROOT/kernel" && git ls-files 2>/dev/null | grep . || find . -type f ! -name '*.o' ! -name '*.ko' ! -name '.*' ! -name '*.mod*' ! -name 'Module.symvers' ! -name 'modules.order') |
  (cd "$ROOT/kernel" && cpio -pdm --quiet "$R$SRC")

in_root "$R" dkms add -m "$PACKAGE_NAME" -v "$PACKAGE_VERSION" >&2
in_root "$R" dkms build -m "$PACKAGE_NAME" -v "$PACKAGE_VERSION" -k "$KVER" >&2 ||
  { cat "$R/var/lib/dkms/$PACKAGE_NAME/$PACKAGE_VERSION/build/make.log" >&2 2>/dev/null; exit 1; }
in_root "$R" dkms install -m "$PACKAGE_NAME" -v "$PACKAGE_VERSION" -k "$KVER" >&2
if [ -n "$KVER2" ]; then
  in_root "$R" dkms autoinstall -k "$KVER2" >&2
fi

ko=$(compgen -G "$R/lib/modules/$KVER/updates/dkms/$PACKAGE_NAME.ko*" | head -1) ||
  { echo "dkms.sh: dkms install left no $PACKAGE_NAME.ko in /lib/modules/$KVER/updates/dkms" >&2; exit 1; }
out="$VM/dkms/$KVER"
rm -rf "$out" && mkdir -p "$out"
cp "$ko" "$out/" && cp "$R/var/lib/dkms/mok.pub" "$out/mok.pub"
echo "DKMS_KO=$out/$(basename "$ko")"
echo "DKMS_MOK=$out/mok.pub"
in_root "$R" dkms status "$PACKAGE_NAME" | sed 's/^/STATUS=/'
