#!/bin/sh
# Installs the Debian packages the tests need, only when a command they provide is missing.
# Idempotent: when everything is there it runs no apt command at all and returns at once.
# To add a package, add a "command package" line to the list below.
set -eu

PACKAGES='
qemu-img    qemu-utils
qemu-io     qemu-utils
nbdinfo     libnbd-bin
nbdcopy     libnbd-bin
nbdfuse     libnbd-bin
nbdkit      nbdkit
fio         fio
jq          jq
fusermount3 fuse3
mkfs.ext4   e2fsprogs
losetup     util-linux
nginx       nginx-light
mksquashfs  squashfs-tools
httpdirfs   httpdirfs
groff       groff-base
debootstrap debootstrap
mkfs.xfs    xfsprogs
xfs_repair  xfsprogs
sgdisk      gdisk
partx       util-linux
blkid       util-linux
logrotate   logrotate
'

PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

missing() {
  echo "$PACKAGES" | while read -r cmd pkg; do
    [ -n "$cmd" ] || continue
    command -v "$cmd" >/dev/null 2>&1 || echo "$pkg"
  done | sort -u | tr '\n' ' '
}

todo=$(missing)
[ -n "${todo% }" ] || exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: missing packages: $todo; run this script as root" >&2
  exit 1
fi

# Test files run in parallel and may all call this script: one installs, the others wait.
if command -v flock >/dev/null 2>&1; then
  exec 9>/tmp/ulobdev-install-test-deps.lock
  flock 9
  todo=$(missing)
  [ -n "${todo% }" ] || exit 0
fi

echo "install-test-deps: installing $todo" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
# shellcheck disable=SC2086 # the package list is meant to be split into words
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $todo >&2

todo=$(missing)
if [ -n "${todo% }" ]; then
  echo "install-test-deps: still missing after install: $todo" >&2
  exit 1
fi
