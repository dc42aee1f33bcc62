#!/bin/bash
# A Debian 13 that boots with systemd as PID 1, for test/vm/systemd-boot.test.ts (and the Debian 13
# root of the package test): a debootstrapped trixie root with systemd, udev, Debian's own kernel
# and initramfs, and what ulobdev's package depends on (nodejs, fuse3, libnbd-bin), cached under
# .vm/trixie-boot. Prints the paths the harness needs as KEY=VALUE lines; logs go to stderr.
#   boot-image.sh            make the root (once) and print ROOTFS, KERNEL, INITRD, KVER
# A run makes its own ext4 disk image from ROOTFS (mkfs.ext4 -d), so the cached root stays clean.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VM=${ULOOP_VM_DIR:-$ROOT/.vm}
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
mkdir -p "$VM"
# shellcheck source=scripts/vm/debian.sh
. "$ROOT/scripts/vm/debian.sh"

exec 9>"$VM/.lock"
flock 9

need=''
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v debootstrap >/dev/null || need="$need debootstrap"
command -v mkfs.ext4 >/dev/null || need="$need e2fsprogs"
if [ -n "$need" ]; then
  echo "boot-image: installing$need" >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $need >&2
fi

R="$VM/trixie-boot"
# Bump when the configuration below changes: the cached root is then made again.
CONFIG=3
PACKAGES=systemd-sysv,udev,kmod,linux-image-amd64,e2fsprogs,nodejs,fuse3,libnbd-bin,util-linux,procps,zstd
if [ "$(cat "$R/.ulob-boot" 2>/dev/null)" != "$CONFIG $PACKAGES" ]; then
  rm -f "$R/.ulob-root"
  trixie_root "$R" "$PACKAGES"
  # The root disk is virtio /dev/vda (one partitionless ext4); the test's exchange directory is a
  # 9p share of the host's scratch directory.
  cat >"$R/etc/fstab" <<'FSTAB'
/dev/vda  /  ext4  rw,errors=remount-ro  0  1
scratch  /mnt/scratch  9p  trans=virtio,version=9p2000.L,msize=512000,nofail  0  0
FSTAB
  mkdir -p "$R/mnt/scratch"
  echo ulobvm >"$R/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 ulobvm\n' >"$R/etc/hosts"
  # No password login is needed: the test's steps run as a oneshot unit (ulobvm-step.service).
  : >"$R/etc/machine-id"
  # Timers that would start package or filesystem maintenance in the middle of a test.
  for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer getty@tty1.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$u"
  done
  cat >"$R/etc/systemd/system/ulobvm-step.service" <<'UNIT'
[Unit]
Description=ulobdev VM test: this boot's step (/mnt/scratch/step.sh)
After=multi-user.target mnt-scratch.mount
Requires=mnt-scratch.mount
ConditionPathExists=/mnt/scratch/step.sh

[Service]
Type=oneshot
ExecStart=/bin/sh /mnt/scratch/step.sh
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/ulobvm-step.service "$R/etc/systemd/system/multi-user.target.wants/ulobvm-step.service"
  # The 9p modules must load before mnt-scratch.mount: systemd-modules-load.
  printf '9pnet_virtio\n9p\n' >"$R/etc/modules-load.d/ulobvm.conf"
  echo "$CONFIG $PACKAGES" >"$R/.ulob-boot"
fi

KVER=$(ls "$R/lib/modules" | sort -V | tail -1)
[ -f "$R/boot/vmlinuz-$KVER" ] && [ -f "$R/boot/initrd.img-$KVER" ] ||
  { echo "boot-image: no kernel or initramfs for $KVER in $R/boot" >&2; exit 1; }
echo "ROOTFS=$R"
echo "KVER=$KVER"
echo "KERNEL=$R/boot/vmlinuz-$KVER"
echo "INITRD=$R/boot/initrd.img-$KVER"
