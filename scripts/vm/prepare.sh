#!/bin/bash
# Prepares everything the VM tests need, once: qemu, busybox, Debian's 6.1 kernel unpacked under
# .vm/ (never installed into the host), its headers (installed: the module builds against them),
# a busybox initramfs, and uloop.ko built for that kernel. Idempotent; a second run does only what
# changed (the module is rebuilt by make when its sources are newer).
# Prints the paths the harness needs as KEY=VALUE lines on stdout; everything else goes to stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VM=${ULOOP_VM_DIR:-$ROOT/.vm}
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
mkdir -p "$VM"

# Several test files may prepare at once: one does the work, the others wait and reuse it.
exec 9>"$VM/.lock"
flock 9

# The reference kernel: whatever 6.1 ABI Debian's linux-image-amd64 points at, pinned on first run.
if [ ! -s "$VM/kver" ]; then
  kver=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -1)
  if [ -z "$kver" ]; then
    echo "prepare: apt-cache knows no linux-image-amd64 6.1 kernel; run apt-get update" >&2
    exit 1
  fi
  echo "$kver" > "$VM/kver"
fi
KVER=$(cat "$VM/kver")

need=''
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx modprobe && file -L /bin/busybox 2>/dev/null | grep -q static || need="$need busybox-static"
[ -d "/usr/src/linux-headers-$KVER" ] || need="$need linux-headers-$KVER"
command -v cpio >/dev/null || need="$need cpio"
command -v fio >/dev/null || need="$need fio"
command -v dmsetup >/dev/null || need="$need dmsetup"
command -v mkfs.ext4 >/dev/null || need="$need e2fsprogs"
command -v nbd-client >/dev/null || need="$need nbd-client"
command -v file >/dev/null || need="$need file"
command -v depmod >/dev/null || need="$need kmod"
if [ -n "$need" ]; then
  echo "prepare: installing$need" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
  # shellcheck disable=SC2086
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $need >&2
fi

# The guest kernel: downloaded and unpacked, not installed.
KDIR="$VM/kernel"
if [ ! -f "$KDIR/lib/modules/$KVER/modules.dep" ]; then
  rm -rf "$KDIR" "$VM/deb" && mkdir -p "$VM/deb"
  (cd "$VM/deb" && apt-get download "linux-image-$KVER" >&2 2>&1)
  dpkg-deb -x "$VM"/deb/linux-image-"$KVER"_*.deb "$KDIR.tmp"
  depmod -b "$KDIR.tmp" "$KVER"
  mv "$KDIR.tmp" "$KDIR" && rm -rf "$VM/deb"
fi

# The initramfs: busybox, the 9p stack's modules (no modprobe before the module tree is mounted)
# and the init script. Rebuilt when init changes.
INITRD="$VM/initramfs.cpio.gz"
if [ ! -f "$INITRD" ] || [ "$ROOT/scripts/vm/init" -nt "$INITRD" ] || [ /bin/busybox -nt "$INITRD" ]; then
  stage="$VM/initramfs"
  rm -rf "$stage" && mkdir -p "$stage"/{bin,dev,proc,sys,host,scratch,lib/modules}
  cp /bin/busybox "$stage/bin/busybox"
  cp "$ROOT/scripts/vm/init" "$stage/init" && chmod 755 "$stage/init"
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p; do
    ko=$(find "$KDIR/lib/modules/$KVER/kernel" -name "$m.ko*" | head -1)
    [ -n "$ko" ] || { echo "prepare: $m.ko not found in linux-image-$KVER" >&2; exit 1; }
    case "$ko" in
      *.xz) xz -dc "$ko" > "$stage/lib/modules/$m.ko" ;;
      *) cp "$ko" "$stage/lib/modules/$m.ko" ;;
    esac
  done
  echo "$KVER" > "$stage/kver"
  (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
fi

# The module, for the guest's kernel.
[ -n "${ULOOP_VM_NO_MODULE:-}" ] || [ ! -f "$ROOT/kernel/uloop.c" ] || make -s -C "$ROOT/kernel" KDIR="/usr/src/linux-headers-$KVER" >&2

# The C client the module's own tests use.
if [ ! -x "$VM/uloopctl" ] || [ "$ROOT/test/vm/uloopctl.c" -nt "$VM/uloopctl" ] || [ "$ROOT/kernel/include/uapi/uloop.h" -nt "$VM/uloopctl" ]; then
  gcc -O2 -Wall -Wextra -o "$VM/uloopctl" "$ROOT/test/vm/uloopctl.c"
fi

# The dm-log-writes replayer the durability test uses (Debian packages no replay-log).
if [ ! -x "$VM/log-replay" ] || [ "$ROOT/test/vm/log-replay.c" -nt "$VM/log-replay" ]; then
  gcc -O2 -Wall -Wextra -o "$VM/log-replay" "$ROOT/test/vm/log-replay.c"
fi

echo "KVER=$KVER"
echo "KERNEL=$KDIR/boot/vmlinuz-$KVER"
echo "INITRD=$INITRD"
echo "MODULES=$KDIR/lib/modules"
echo "ULOOP_KO=$ROOT/kernel/uloop.ko"
echo "ULOOPCTL=$VM/uloopctl"
echo "LOG_REPLAY=$VM/log-replay"
