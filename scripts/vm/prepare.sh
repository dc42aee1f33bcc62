#!/bin/bash
# Prepares everything a VM test needs for one guest kernel, once, cached under .vm/:
#   prepare.sh [SERIES]     SERIES: 6.1 (Debian 12), 6.12 (Debian 13), newest (trixie-backports, 7.x);
#                           default $ULOBVM_KERNEL, else 6.12.
# - qemu, busybox, fio, dmsetup, ... on the host (the guest's userspace is the host's root, read-only);
# - the guest kernel: Debian's linux-image (and for 7.x its linux-binary/linux-modules) downloaded and
#   unpacked under .vm/k/KVER/tree, never installed into the host; the version is pinned in
#   .vm/kernels/SERIES on first use (delete that file to move to a newer Debian kernel);
# - a busybox initramfs with that kernel's virtio/9p modules;
# - uloop.ko built for it: 6.1 with the host's gcc-12 against linux-headers-6.1 (installed), 6.12 and
#   7.x with gcc-14 in a Debian 13 build root (.vm/trixie-build, see debian.sh) against their unpacked
#   headers. The module is built in .vm/k/KVER/uloop from a copy of kernel/ (make rebuilds it when a
#   source is newer); `make -C kernel` for the host is left alone.
# Idempotent; a second run does only what changed. Prints the paths the harness needs as KEY=VALUE
# lines on stdout; everything else goes to stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VM=${ULOOP_VM_DIR:-$ROOT/.vm}
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
SERIES=${1:-${ULOBVM_KERNEL:-6.12}}
case "$SERIES" in
  6.1 | 6.12 | newest) ;;
  7 | 7.x) SERIES=newest ;;
  *) echo "prepare: unknown kernel series '$SERIES' (use 6.1, 6.12 or newest)" >&2; exit 1 ;;
esac
mkdir -p "$VM/kernels"

# Several test files may prepare at once: one does the work, the others wait and reuse it.
exec 9>"$VM/.lock"
flock 9

need=''
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx modprobe && file -L /bin/busybox 2>/dev/null | grep -q static || need="$need busybox-static"
command -v cpio >/dev/null || need="$need cpio"
command -v fio >/dev/null || need="$need fio"
command -v dmsetup >/dev/null || need="$need dmsetup"
command -v mkfs.ext4 >/dev/null || need="$need e2fsprogs"
command -v nbd-client >/dev/null || need="$need nbd-client"
command -v file >/dev/null || need="$need file"
command -v depmod >/dev/null || need="$need kmod"
command -v xz >/dev/null || need="$need xz-utils"
command -v zstd >/dev/null || need="$need zstd"
command -v debootstrap >/dev/null || need="$need debootstrap"
command -v make-bcache >/dev/null || need="$need bcache-tools"

# The 6.1 kernel: whatever 6.1 ABI Debian 12's linux-image-amd64 points at (the host's own lists).
if [ "$SERIES" = 6.1 ] && [ ! -s "$VM/kernels/6.1" ]; then
  kver=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -1)
  if [ -z "$kver" ]; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
    kver=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -1)
  fi
  [ -n "$kver" ] || { echo "prepare: apt-cache knows no linux-image-amd64 6.1 kernel" >&2; exit 1; }
  echo "$kver" >"$VM/kernels/6.1"
fi
if [ "$SERIES" = 6.1 ]; then
  KVER=$(cat "$VM/kernels/6.1")
  [ -d "/usr/src/linux-headers-$KVER" ] || need="$need linux-headers-$KVER"
fi

if [ -n "$need" ]; then
  echo "prepare: installing$need" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
  # shellcheck disable=SC2086
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $need >&2
fi

# Debian 13 kernels: pinned from the linux-image-amd64 metapackage of trixie (6.12, with its point
# releases from trixie-security) or trixie-backports (newest), through the private lists.
if [ "$SERIES" != 6.1 ]; then
  # shellcheck source=scripts/vm/debian.sh
  . "$ROOT/scripts/vm/debian.sh"
  if [ ! -s "$VM/kernels/$SERIES" ]; then
    deb_update
    case "$SERIES" in 6.12) want='^6\.12\.' ;; newest) want='.' ;; esac
    ver=$(deb_apt apt-cache show linux-image-amd64 | sed -n 's/^Version: //p' | grep -E "$want" | sort -V | tail -1)
    kver=$(deb_apt apt-cache show "linux-image-amd64=$ver" | sed -n 's/^Depends: .*linux-image-\([0-9][^ ,]*-amd64\) .*/\1/p' | head -1)
    [ -n "$kver" ] || { echo "prepare: no $SERIES kernel behind linux-image-amd64 in the trixie lists" >&2; exit 1; }
    echo "$kver" >"$VM/kernels/$SERIES"
  fi
  KVER=$(cat "$VM/kernels/$SERIES")
fi
KDIR="$VM/k/$KVER"
TREE="$KDIR/tree"
mkdir -p "$KDIR"
# The guest's init binds this kernel's module tree onto /lib/modules of the host's root, which it
# sees read-only: the directory must exist on the host. A container or microVM host with no kernel
# package of its own has none until some package makes it (linux-headers-6.1 for the 6.1 kernel,
# dkms): in a clean-clone make test every guest that booted before that failed with
# "ULOBVM_INIT_FAILED: bind .../tree/lib/modules" (five VM files, 2026-12-01 06:15-06:17).
mkdir -p /lib/modules

# The guest kernel: downloaded and unpacked, not installed. 6.12 ships /boot/vmlinuz-KVER and
# /usr/lib/modules; 7.x splits the image into linux-binary (vmlinuz in the module dir) and
# linux-modules. The tree gets /lib/modules/KVER either way.
if [ ! -f "$TREE/lib/modules/$KVER/modules.dep" ]; then
  rm -rf "$TREE" "$TREE.tmp"
  if [ "$SERIES" = 6.1 ]; then
    mkdir -p "$VM/debs" && (cd "$VM/debs" && { compgen -G "linux-image-${KVER}_*.deb" >/dev/null || apt-get download "linux-image-$KVER" >&2; })
    dpkg-deb -x "$(compgen -G "$VM/debs/linux-image-${KVER}_*.deb" | head -1)" "$TREE.tmp"
  else
    deb_update
    pkgs=("linux-image-$KVER")
    for extra in base binary modules; do
      if deb_apt apt-cache show "linux-$extra-$KVER" >/dev/null 2>&1; then pkgs+=("linux-$extra-$KVER"); fi
    done
    deb_unpack "$VM/debs" "$TREE.tmp" "${pkgs[@]}"
  fi
  if [ -d "$TREE.tmp/usr/lib/modules/$KVER" ] && [ ! -d "$TREE.tmp/lib/modules/$KVER" ]; then
    mkdir -p "$TREE.tmp/lib" && mv "$TREE.tmp/usr/lib/modules" "$TREE.tmp/lib/modules"
  fi
  mkdir -p "$TREE.tmp/boot"
  [ -f "$TREE.tmp/boot/vmlinuz-$KVER" ] || mv "$TREE.tmp/lib/modules/$KVER/vmlinuz" "$TREE.tmp/boot/vmlinuz-$KVER"
  depmod -b "$TREE.tmp" "$KVER"
  mv "$TREE.tmp" "$TREE"
fi

# The initramfs: busybox, the 9p stack's modules in load order (from modules.dep: which of them exist,
# and whether fscache is part of netfs, changes between releases) and the init script.
INITRD="$KDIR/initramfs.cpio.gz"
if [ ! -f "$INITRD" ] || [ "$ROOT/scripts/vm/init" -nt "$INITRD" ] || [ /bin/busybox -nt "$INITRD" ] || [ "$0" -nt "$INITRD" ]; then
  stage="$KDIR/initramfs"
  rm -rf "$stage" && mkdir -p "$stage"/{bin,dev,proc,sys,host,scratch,lib/modules}
  cp /bin/busybox "$stage/bin/busybox"
  cp "$ROOT/scripts/vm/init" "$stage/init" && chmod 755 "$stage/init"
  for m in virtio_pci 9pnet_virtio 9p; do
    modprobe -d "$TREE" -S "$KVER" --show-depends "$m"
  done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' >"$KDIR/initramfs.list"
  : >"$stage/lib/modules/order"
  while read -r ko; do
    m=$(basename "$ko"); m=${m%%.ko*}
    case "$ko" in
      *.xz) xz -dc "$ko" >"$stage/lib/modules/$m.ko" ;;
      *.zst) zstd -qdc "$ko" >"$stage/lib/modules/$m.ko" ;;
      *) cp "$ko" "$stage/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$stage/lib/modules/order"
  done <"$KDIR/initramfs.list"
  grep -qx 9p "$stage/lib/modules/order" || { echo "prepare: 9p.ko not found in $KVER's modules" >&2; exit 1; }
  echo "$KVER" >"$stage/kver"
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
fi

# The module, for the guest's kernel, built from a copy of kernel/ (mtimes kept, so make rebuilds only
# what changed). Any compiler warning is an error here: the module must build clean on every kernel.
BUILD="$KDIR/uloop"
# Kbuild's own "nothing to do" runs the compiler about 40 times (its cc-option probes): 5-20 s per
# call, and every VM test file calls this. So make runs only when a source in kernel/ (or the
# kernel's headers) is newer than the uloop.ko it built last; a build with warnings deletes its .ko.
module_current() {
  local hdr=/usr/src/linux-headers-$KVER
  [ "$SERIES" = 6.1 ] || hdr=$VM/trixie-build$hdr
  [ -f "$BUILD/uloop.ko" ] && [ -f "$hdr/.config" ] && [ ! "$hdr/.config" -nt "$BUILD/uloop.ko" ] &&
    [ -z "$(find "$ROOT/kernel" \( -name '*.o' -o -name '*.ko' -o -name '*.mod' -o -name '*.mod.c' -o -name '.*.cmd' \
      -o -name Module.symvers -o -name modules.order \) -prune -o -newer "$BUILD/uloop.ko" -print -quit)" ]
}
if [ -z "${ULOOP_VM_NO_MODULE:-}" ] && [ -f "$ROOT/kernel/uloop.c" ] && ! module_current; then
  mkdir -p "$BUILD"
  cp -a "$ROOT/kernel/." "$BUILD/"
  rm -f "$BUILD"/*.ko.tmp
  if [ "$SERIES" = 6.1 ]; then
    log=$(make -C "$BUILD" KDIR="/usr/src/linux-headers-$KVER" 2>&1) || { echo "$log" >&2; exit 1; }
  else
    trixie_root "$VM/trixie-build" "$TRIXIE_BUILD_PACKAGES"
    if [ ! -f "$VM/trixie-build/usr/src/linux-headers-$KVER/.config" ]; then
      deb_update
      kbuild=$(deb_apt apt-cache show "linux-headers-$KVER" | sed -n 's/^Depends: .*\(linux-kbuild-[^ ,]*\).*/\1/p' | head -1)
      deb_unpack "$VM/debs" "$VM/trixie-build" "linux-headers-$KVER" "linux-headers-${KVER%-amd64}-common" "$kbuild"
    fi
    log=$(CHROOT_BINDS="$BUILD:/build" in_root "$VM/trixie-build" make -C /build KDIR="/usr/src/linux-headers-$KVER" 2>&1) ||
      { echo "$log" >&2; exit 1; }
  fi
  echo "$log" >"$KDIR/uloop-build.log"
  if grep -E 'warning:|error:' "$KDIR/uloop-build.log" | grep -v 'pahole version' >&2; then
    echo "prepare: uloop.c builds with warnings against $KVER (full log: $KDIR/uloop-build.log)" >&2
    rm -f "$BUILD"/*.o "$BUILD"/*.ko # so that the next run compiles (and warns) again
    exit 1
  fi
fi

# The C client the module's own tests use.
if [ ! -x "$VM/uloopctl" ] || [ "$ROOT/test/vm/uloopctl.c" -nt "$VM/uloopctl" ] || [ "$ROOT/kernel/include/uapi/uloop.h" -nt "$VM/uloopctl" ]; then
  gcc -O2 -Wall -Wextra -o "$VM/uloopctl" "$ROOT/test/vm/uloopctl.c"
fi

# The dm-log-writes replayer the durability test uses (Debian packages no replay-log).
if [ ! -x "$VM/log-replay" ] || [ "$ROOT/test/vm/log-replay.c" -nt "$VM/log-replay" ]; then
  gcc -O2 -Wall -Wextra -o "$VM/log-replay" "$ROOT/test/vm/log-replay.c"
fi

echo "SERIES=$SERIES"
echo "KVER=$KVER"
echo "KERNEL=$TREE/boot/vmlinuz-$KVER"
echo "INITRD=$INITRD"
echo "MODULES=$TREE/lib/modules"
echo "ULOOP_KO=$BUILD/uloop.ko"
echo "ULOOPCTL=$VM/uloopctl"
echo "LOG_REPLAY=$VM/log-replay"
