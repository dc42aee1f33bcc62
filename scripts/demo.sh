#!/usr/bin/env bash
# make demo: a file-backed "disk" with a filesystem goes behind the flash cache, is mounted through
# a loop device, read and written; the disk itself changes only when the flusher writes back.
set -euo pipefail
cd "$(dirname "$0")/.."

ULOBDEV=(node "$PWD/dist/cli/ulobdev.js")
DEMO=${ULOBDEV_DEMO_DIR:-$PWD/.demo}
# The disk records (one per cached disk, STATE_DIR/disks) of the demo's throw-away disk stay in the
# demo's directory, not in the host's /var/lib/ulobdev: `rm -rf .demo` removes everything.
export ULOBDEV_STATE_DIR=$DEMO/state
DISK=$DEMO/disk.img
MNT=$DEMO/mnt
LOOP=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
  set +e
  mountpoint -q "$MNT" && umount "$MNT"
  [ -n "$LOOP" ] && "${ULOBDEV[@]}" detach "$LOOP" >/dev/null 2>&1
}
trap cleanup EXIT

if [ "$(id -u)" -ne 0 ]; then
  echo "make demo binds a loop device and mounts it: run it as root" >&2
  exit 1
fi

rm -rf "$DEMO"
mkdir -p "$DEMO/seed/docs" "$MNT"
for i in $(seq 1 20); do head -c $((i * 37 * 1024)) /dev/urandom > "$DEMO/seed/docs/file$i.bin"; done
cp README.md "$DEMO/seed/"

say "A 256 MiB 'disk' (a file here; /dev/sdb on a real machine) with an ext4 filesystem and 21 files"
run truncate -s 256M "$DISK"
run mkfs.ext4 -q -d "$DEMO/seed" "$DISK"
DISK_SUM_BEFORE=$(sha256sum "$DISK" | cut -d' ' -f1)

say "Attach it behind the cache, write-back, as a free loop device"
LOOP=$(losetup -f)
run "${ULOBDEV[@]}" -c "$DEMO/disk.cache" -b "$DEMO/disk.bitmap" --writeback --daemon "$LOOP" "$DISK"
run mount "$LOOP" "$MNT"

say "Read every file: misses are fetched from the disk once and kept on flash"
(cd "$DEMO/seed" && find . -type f -exec sha256sum {} +) > "$DEMO/seed.sums"
(cd "$MNT" && run sha256sum --quiet -c "$DEMO/seed.sums") && echo "all 21 files read back intact"

say "Write new files: they land on flash, marked dirty"
run dd if=/dev/urandom of="$MNT/new.bin" bs=1M count=16 status=none
sha256sum "$MNT/new.bin" | sed "s#$MNT/##" > "$DEMO/new.sum"
run sync
run "${ULOBDEV[@]}" status "$LOOP"
if [ "$(sha256sum "$DISK" | cut -d' ' -f1)" = "$DISK_SUM_BEFORE" ]; then
  echo "the disk itself is unchanged: the writes wait on flash for the flusher"
else
  echo "unexpected: the disk changed before a flush" >&2
  exit 1
fi

say "Unmount, detach, attach again: everything is still there"
run umount "$MNT"
run "${ULOBDEV[@]}" detach "$LOOP"
run "${ULOBDEV[@]}" -c "$DEMO/disk.cache" -b "$DEMO/disk.bitmap" --writeback --daemon "$LOOP" "$DISK"
run mount "$LOOP" "$MNT"
(cd "$MNT" && sha256sum --quiet -c "$DEMO/seed.sums" && sha256sum --quiet -c "$DEMO/new.sum") && echo "all 22 files intact after re-attach"
run umount "$MNT"

say "Write the dirty blocks back to the disk in one sorted pass"
run "${ULOBDEV[@]}" flush --wait "$LOOP"
run "${ULOBDEV[@]}" status "$LOOP"
run "${ULOBDEV[@]}" detach "$LOOP"
# The daemon logged to /run/ulobdev/NAME.log (--daemon); the demo is over, so its log goes too
# (kept when the demo fails: it says why).
rm -f "/run/ulobdev/$(basename "$LOOP").log"
LOOP=""

say "The disk on its own now holds the same filesystem, clean"
run fsck.ext4 -fn "$DISK"
mount -o loop,ro "$DISK" "$MNT"
(cd "$MNT" && sha256sum --quiet -c "$DEMO/new.sum") && echo "new.bin is on the disk itself"
umount "$MNT"

say "Done. Files are in $DEMO (remove with: rm -rf $DEMO)"
