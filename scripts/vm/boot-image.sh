#!/bin/bash
# A Debian 13 that boots with systemd as PID 1, for test/vm/systemd-boot.test.ts: a debootstrapped
# trixie root with systemd, udev, Debian's own kernel (the 6.12 that scripts/vm/prepare.sh pinned,
# so the uloop.ko it builds loads here) and a small initramfs-tools initramfs, and what ulobdev's
# package depends on (nodejs, fuse3, libnbd-bin). Made once and cached under .vm/, keyed by its
# inputs (this script, the kernel version): the root tree .vm/trixie-boot and, made from it, the
# root disk image .vm/trixie-boot.img (ext4, mkfs.ext4 -d). A run boots a qcow2 overlay of that
# image, so the cached image stays clean and a run copies nothing.
#   BOOT_KVER=6.12.118+deb13-amd64 boot-image.sh     prints ROOTFS, IMAGE, KERNEL, INITRD, KVER
# The kernel's .deb must be in .vm/debs (prepare.sh 6.12 puts it there). Logs go to stderr.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VM=${ULOOP_VM_DIR:-$ROOT/.vm}
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
mkdir -p "$VM"
# shellcheck source=scripts/vm/debian.sh
. "$ROOT/scripts/vm/debian.sh"
KVER=${BOOT_KVER:-$(cat "$VM/kernels/6.12" 2>/dev/null || true)}
[ -n "$KVER" ] || { echo "boot-image: no kernel version (run scripts/vm/prepare.sh 6.12 first, or set BOOT_KVER)" >&2; exit 1; }

exec 9>"$VM/.lock"
flock 9

need=''
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v qemu-img >/dev/null || need="$need qemu-utils"
command -v debootstrap >/dev/null || need="$need debootstrap"
command -v mkfs.ext4 >/dev/null || need="$need e2fsprogs"
if [ -n "$need" ]; then
  echo "boot-image: installing$need" >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $need >&2
fi

R="$VM/trixie-boot"
IMG="$VM/trixie-boot.img"
PACKAGES=systemd-sysv,udev,kmod,initramfs-tools,linux-base,e2fsprogs,nodejs,fuse3,libnbd-bin,util-linux,procps,zstd
# The cache key: everything the image is made from.
KEY="$(sha256sum <"$0" | cut -c1-16) $KVER $PACKAGES"
if [ "$(cat "$R/.ulob-boot" 2>/dev/null)" != "$KEY" ]; then
  rm -f "$IMG"
  # The debootstrapped tree is kept while PACKAGES stay the same (trixie_root's own key); every
  # step below is idempotent, so a change here re-runs them on it.
  trixie_root "$R" "$PACKAGES"
  # dpkg without a fsync per file (debian.sh): the kernel package's 5,200 files here, and the guest's
  # `dpkg -i` of the .deb (a tree debootstrapped before this line existed lacks the setting).
  dpkg_unsafe_io "$R"
  # Debian's kernel, the version prepare.sh pinned (trixie-security's point release may be newer
  # than what debootstrap's trixie suite has).
  deb_update
  deb_download "$VM/debs" "linux-image-$KVER"
  cp "$(compgen -G "$VM/debs/linux-image-${KVER}_*.deb" | sort -V | tail -1)" "$R/tmp/linux-image.deb"
  # A small initramfs: what mounts /dev/vda (virtio, ext4), not every driver (MODULES=most).
  sed -i 's/^MODULES=.*/MODULES=list/' "$R/etc/initramfs-tools/initramfs.conf"
  printf 'virtio_pci\nvirtio_blk\next4\n' >"$R/etc/initramfs-tools/modules"
  in_root "$R" dpkg -i /tmp/linux-image.deb >&2
  rm -f "$R/tmp/linux-image.deb"
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
  # A fixed machine id: not a first boot (no first-boot units), and one journal directory for all
  # boots (journalctl -b -1).
  echo 0123456789abcdef0123456789abcdef >"$R/etc/machine-id"
  # What the first boot would do under TCG at a cost of 30-60 s (systemd-analyze blame in the guest):
  # done here once. The .updated stamps tell ldconfig.service, systemd-update-done and
  # journal-catalog-update (ConditionNeedsUpdate) there is nothing to do.
  in_root "$R" ldconfig
  in_root "$R" journalctl --update-catalog
  in_root "$R" systemd-sysusers >&2
  mkdir -p "$R/var/log/journal"
  touch "$R/etc/.updated" "$R/var/.updated"
  # Units the test does not need (systemd-analyze blame/critical-chain in the guest): timers that
  # would start package or filesystem maintenance in the middle of a test, logins on the consoles,
  # pseudo-filesystems and modules nothing here uses, the random seed.
  for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer man-db.timer getty@tty1.service serial-getty@ttyS0.service getty-static.service \
    systemd-tmpfiles-clean.timer modprobe@drm.service modprobe@efi_pstore.service modprobe@configfs.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount dev-hugepages.mount dev-mqueue.mount \
    systemd-random-seed.service systemd-pstore.service systemd-firstboot.service systemd-hwdb-update.service \
    systemd-udev-load-credentials.service systemd-journal-catalog-update.service ldconfig.service \
    systemd-update-done.service systemd-sysusers.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$u"
  done
  cat >"$R/etc/systemd/system/ulobvm-step.service" <<'UNIT'
[Unit]
Description=ulobdev VM test: this boot's step (/mnt/scratch/step.sh)
After=multi-user.target mnt-scratch.mount

[Service]
Type=oneshot
# mnt-scratch.mount can run before the 9p virtio device is probed ("9pnet_virtio: no channels
# available for device scratch" under a loaded host, the cc10 clean-clone run): mount it here,
# trying for up to 120 s, and only then look for the step.
# ($$: systemd's own escape of a shell's $.)
ExecStartPre=/bin/sh -c 'i=0; until mountpoint -q /mnt/scratch || mount /mnt/scratch; do i=$$((i+1)); [ $$i -ge 120 ] && exit 1; sleep 1; done'
ExecStart=/bin/sh -c '[ -f /mnt/scratch/step.sh ] || exit 0; exec /bin/sh /mnt/scratch/step.sh'
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/ulobvm-step.service "$R/etc/systemd/system/multi-user.target.wants/ulobvm-step.service"
  # Node under TCG: `node -e 0` takes 25 s with V8's JIT and 10 s without (measured in this guest),
  # and every daemon start and every ulobdev command is a Node start. The daemon's data path is
  # native (the addon), so the test runs Node jitless. (Node then warns once per start that it
  # disabled WebAssembly: only ulohttp's HTTP client would use it, and this test does not run it.)
  mkdir -p "$R/etc/systemd/system.conf.d"
  printf '[Manager]\nDefaultEnvironment=NODE_OPTIONS=--jitless\n' >"$R/etc/systemd/system.conf.d/ulobvm-node.conf"
  # The 9p modules must load before mnt-scratch.mount: systemd-modules-load.
  printf '9pnet_virtio\n9p\n' >"$R/etc/modules-load.d/ulobvm.conf"
  echo "$KEY" >"$R/.ulob-boot"
fi
[ -f "$R/boot/vmlinuz-$KVER" ] && [ -f "$R/boot/initrd.img-$KVER" ] ||
  { echo "boot-image: no kernel or initramfs for $KVER in $R/boot" >&2; exit 1; }

# The root disk image, made from the tree once (3 GiB, sparse).
if [ ! -f "$IMG" ] || [ "$(cat "$IMG.key" 2>/dev/null)" != "$KEY" ]; then
  rm -f "$IMG" "$IMG.tmp"
  truncate -s 3G "$IMG.tmp"
  mkfs.ext4 -q -F -L root -E root_owner=0:0 -d "$R" "$IMG.tmp"
  echo "$KEY" >"$IMG.key"
  mv "$IMG.tmp" "$IMG"
fi

echo "ROOTFS=$R"
echo "IMAGE=$IMG"
echo "KVER=$KVER"
echo "KERNEL=$R/boot/vmlinuz-$KVER"
echo "INITRD=$R/boot/initrd.img-$KVER"
