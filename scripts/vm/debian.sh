# shellcheck shell=bash
# Debian 13 (trixie) for the VM tests, without touching the machine's own apt setup: a private
# sources list and private package lists under $VM/apt, `apt-get download` into caches under $VM,
# and a debootstrapped trixie root. Sourced by scripts/vm/prepare.sh and by anything else that needs
# a trixie root or trixie packages (a systemd-booting VM image, the DKMS test):
#
#   VM=/path/to/.vm; . scripts/vm/debian.sh
#   deb_update                         # once per run: refreshes the private lists (at most daily)
#   deb_latest 'linux-image-6\.12\.[0-9.+~a-z-]*-amd64$' trixie   # newest matching package name
#   deb_download DIR pkg...            # .debs into DIR (kept: a second call downloads nothing)
#   deb_unpack DIR DEST pkg...         # download + dpkg-deb -x each into DEST
#   trixie_root DIR pkg,pkg,...        # debootstrap --variant=minbase trixie DIR (cached by DIR)
#   deb_bootstrap ARGS...              # debootstrap without its machine-wide closing sync
#   dpkg_unsafe_io DIR                 # dpkg in the root DIR skips its fsyncs (before debootstrap)
#   in_root DIR cmd...                 # chroot with /proc, /sys, /dev (CHROOT_BINDS for more)
#
# Or run it as a command (VM defaults to the project's .vm/; takes .vm/.lock as prepare.sh does):
#   bash scripts/vm/debian.sh root .vm/trixie-boot systemd-sysv,udev,kmod
#   bash scripts/vm/debian.sh download .vm/debs linux-image-6.12.118+deb13-amd64
#   bash scripts/vm/debian.sh latest '^linux-image-7\.[0-9.]*\+deb13-amd64$' trixie-backports
#
# Every function logs to stderr and fails (returns non-zero under set -e) with one line saying why.

if [ -z "${VM:-}" ] && [ "${BASH_SOURCE[0]}" = "$0" ]; then
  VM=$(cd "$(dirname "$0")/../.." && pwd)/.vm
fi
: "${VM:?debian.sh: set VM to the cache directory (.vm) first}"
DEB_MIRROR=${ULOOP_DEB_MIRROR:-http://deb.debian.org/debian}
DEB_SECURITY=${ULOOP_DEB_SECURITY:-http://deb.debian.org/debian-security}
DEB_APT="$VM/apt"
# What the module build root holds: gcc-14 and kbuild's tools (pahole for module BTF), and dkms.
TRIXIE_BUILD_PACKAGES=gcc-14,make,libc6-dev,libelf-dev,bc,kmod,dwarves,dkms,openssl

# apt-get/apt-cache with the private lists: our sources, our lists, our archive cache; the host's
# /etc/apt/sources.list* and /var/lib/apt/lists are neither read nor written.
deb_apt() {
  local tool=$1; shift
  "$tool" -q -o Dir::Etc::SourceList="$DEB_APT/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$DEB_APT/lists" -o Dir::Cache="$DEB_APT/cache" \
    -o Dir::State::status="$DEB_APT/status" -o APT::Get::List-Cleanup=0 \
    -o Acquire::Languages=none -o APT::Sandbox::User=root -o DPkg::Lock::Timeout=300 "$@"
}

# Writes the private sources list (trixie, its updates, security and backports) and refreshes the
# lists when they are missing or older than a day. ULOOP_DEB_UPDATE=1 forces a refresh.
deb_update() {
  mkdir -p "$DEB_APT/lists/partial" "$DEB_APT/cache/archives/partial"
  [ -f "$DEB_APT/status" ] || : >"$DEB_APT/status" # an empty dpkg status: nothing counts as installed
  local want
  want=$(cat <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEB_MIRROR trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEB_MIRROR trixie-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEB_MIRROR trixie-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEB_SECURITY trixie-security main
EOF
)
  local stamp="$DEB_APT/updated"
  if [ "$(cat "$DEB_APT/sources.list" 2>/dev/null)" != "$want" ]; then
    printf '%s\n' "$want" >"$DEB_APT/sources.list"
    rm -f "$stamp"
  fi
  if [ -n "${ULOOP_DEB_UPDATE:-}" ] || [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440)" ]; then
    echo "debian.sh: refreshing the private trixie package lists in $DEB_APT" >&2
    deb_apt apt-get update >&2 || { echo "debian.sh: apt-get update with $DEB_APT/sources.list failed" >&2; return 1; }
    touch "$stamp"
  fi
}

# Prints the newest package name matching the extended regex $1 in suite $2 (trixie or
# trixie-backports), by version order of the names; fails when there is none.
deb_latest() {
  local re=$1 suite=$2 name
  name=$(deb_apt apt-cache search --names-only "$re" 2>/dev/null | awk '{print $1}' |
    while read -r p; do
      if deb_apt apt-cache madison "$p" 2>/dev/null | grep -q " $suite/"; then echo "$p"; fi
    done | sort -V | tail -1)
  [ -n "$name" ] || { echo "debian.sh: no package matching $re in $suite" >&2; return 1; }
  echo "$name"
}

# Downloads the named packages (newest version in the private lists) into DIR, once.
deb_download() {
  local dir=$1; shift
  mkdir -p "$dir"
  local p todo=()
  for p in "$@"; do
    compgen -G "$dir/${p}_*.deb" >/dev/null || todo+=("$p")
  done
  [ ${#todo[@]} -eq 0 ] && return 0
  echo "debian.sh: downloading ${todo[*]}" >&2
  (cd "$dir" && deb_apt apt-get download "${todo[@]}" >&2) ||
    { echo "debian.sh: apt-get download ${todo[*]} failed" >&2; return 1; }
}

# Downloads and unpacks the named packages into DEST (dpkg-deb -x, no maintainer scripts).
deb_unpack() {
  local dir=$1 dest=$2; shift 2
  deb_download "$dir" "$@"
  mkdir -p "$dest"
  local p
  for p in "$@"; do
    dpkg-deb -x "$(compgen -G "$dir/${p}_*.deb" | sort -V | tail -1)" "$dest"
  done
}

# debootstrap ARGS... without its closing `sync`: that one flushes every program's dirty pages on
# the machine, not the root's (the pkg-trixie debootstrap sat in it for over 6 minutes at load 12,
# holding its lock). The roots made here are caches with a marker file written last; after a power
# loss right after a debootstrap, delete the root and it is made again.
deb_bootstrap() {
  local shim rc=0
  shim=$(mktemp -d)
  printf '#!/bin/sh\nexit 0\n' >"$shim/sync" && chmod 755 "$shim/sync"
  PATH="$shim:$PATH" debootstrap "$@" || rc=$?
  rm -rf "$shim"
  return $rc
}

# Makes dpkg in the root DIR (made or about to be made by debootstrap, which keeps the file) skip
# its fsyncs of the files it unpacks: force-unsafe-io in DIR/etc/dpkg/dpkg.cfg.d. A fsync costs
# ~11 ms on this 2-core host under load and a root holds 5,000-27,000 files: the pkg-trixie
# debootstrap took 441 s with the fsyncs and 259 s without (the same root, offline, at nice 10 and
# load 9.7, session 14). The roots made here are caches whose marker file is written last, and
# throwaway overlays over them: none has to survive a power loss in the middle of a dpkg run. The
# boot VM's root keeps the setting for its guest's `dpkg -i` of the .deb (systemd-boot.test).
dpkg_unsafe_io() {
  mkdir -p "$1/etc/dpkg/dpkg.cfg.d" && echo force-unsafe-io >"$1/etc/dpkg/dpkg.cfg.d/ulobvm-unsafe-io"
}

# Makes a Debian 13 root in DIR with `debootstrap --variant=minbase trixie`, including the
# comma-separated packages $2; cached: a finished root (DIR/.ulob-root naming what it includes) is
# reused. The debootstrap download cache lives in $DEB_BOOTSTRAP_CACHE (default $VM/apt/debootstrap)
# so a re-made root is offline; debootstrap's log in $VM/debootstrap-NAME.log (NAME: DIR's name).
# Two callers that do not share one lock must not share one cache directory either.
trixie_root() {
  local dir=$1 include=${2:-}
  if [ -f "$dir/.ulob-root" ] && [ "$(cat "$dir/.ulob-root")" = "$include" ]; then return 0; fi
  command -v debootstrap >/dev/null || { echo "debian.sh: debootstrap is missing (apt-get install debootstrap)" >&2; return 1; }
  # Never delete through a live /proc, /sys or /dev bind mount of in_root.
  if grep -qE " ($dir|$dir.tmp)/" /proc/mounts; then
    echo "debian.sh: $dir has mounts inside (an in_root still running?); not replacing it" >&2
    return 1
  fi
  rm -rf --one-file-system "$dir" "$dir.tmp"
  local cache=${DEB_BOOTSTRAP_CACHE:-$DEB_APT/debootstrap} log
  log="$VM/debootstrap-$(basename "$dir").log"
  mkdir -p "$cache"
  echo "debian.sh: debootstrap trixie into $dir (+ $include)" >&2
  dpkg_unsafe_io "$dir.tmp"
  deb_bootstrap --variant=minbase ${include:+--include="$include"} \
    --cache-dir="$cache" trixie "$dir.tmp" "$DEB_MIRROR" >"$log" 2>&1 ||
    { echo "debian.sh: debootstrap trixie failed; see $log" >&2; return 1; }
  echo "$include" >"$dir.tmp/.ulob-root"
  mv "$dir.tmp" "$dir"
}

# Runs a command in a trixie root with /proc, /sys and /dev mounted, unmounting them on return
# (also on failure). Extra bind mounts: CHROOT_BINDS="host:guest host:guest".
in_root() {
  local dir=$1; shift
  local m mounted=() b
  for m in proc sys dev; do
    mount --bind "/$m" "$dir/$m" && mounted=("$dir/$m" "${mounted[@]}")
  done
  for b in ${CHROOT_BINDS:-}; do
    mkdir -p "$dir${b#*:}" && mount --bind "${b%%:*}" "$dir${b#*:}" && mounted=("$dir${b#*:}" "${mounted[@]}")
  done
  local rc=0
  chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@" || rc=$?
  for m in "${mounted[@]}"; do umount -l "$m" || true; done
  return $rc
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  mkdir -p "$VM"
  exec 9>"$VM/.lock"
  flock 9
  cmd=${1:-}
  shift || true
  case "$cmd" in
    update) ULOOP_DEB_UPDATE=1 deb_update ;;
    download) deb_update && deb_download "$@" ;;
    unpack) deb_update && deb_unpack "$@" ;;
    latest) deb_update && deb_latest "$@" ;;
    root) trixie_root "$@" ;;
    *) echo "usage: debian.sh update | download DIR PKG... | unpack DIR DEST PKG... | latest REGEX SUITE | root DIR [PKG,PKG,...]" >&2; exit 1 ;;
  esac
fi
