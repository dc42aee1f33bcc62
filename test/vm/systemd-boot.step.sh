#!/bin/sh
# The guest side of test/vm/systemd-boot.test.ts: run by ulobvm-step.service once per boot of a
# Debian 13 VM (systemd as PID 1), from the 9p scratch share. Boot 1 installs the .deb and sets the
# disk up as docs/laptop.md says, step for step, writes, kill -9s the daemon and watches systemd
# bring it back, writes again and reboots; boot 2 checks the mount at boot, that the files are
# read from flash (the disk's read counter stays put) and the flush at the reboot, then powers
# off. Each boot writes boot-N.log (KEY value lines the test reads) and ends the boot itself.
S=/mnt/scratch
n=$(($(cat "$S/boots" 2>/dev/null || echo 0) + 1))
echo "$n" >"$S/boots"
exec >"$S/boot-$n.log" 2>&1
set -eu
ended=
end() {
  ended=1
  sync
  systemctl --no-block "$1"
  exit 0
}
trap 'rc=$?; if [ -z "$ended" ]; then echo "STEP-FAILED boot $n (exit $rc)"; sync; systemctl --no-block poweroff; fi' EXIT

DISK=/dev/disk/by-id/ata-QEMU_HARDDISK_ULOBHDD1
echo "BOOT $n"
echo "KERNEL $(uname -r)"
echo "PID1 $(cat /proc/1/comm)"
# Seconds from the kernel's start to this step (boot is not "finished" while this unit runs).
echo "UPTIME $(cut -d' ' -f1 /proc/uptime)"

# Status as one line of JSON.
status() { ulobdev status --json data | tr -d '\n'; echo; }
# The previous boot's journal of the unit, between markers.
journal_before() {
  echo "JOURNAL-BEGIN $1"
  journalctl -b -1 -u ulobdev@data -o cat --no-pager || true
  echo "JOURNAL-END $1"
}
# Waits until the unit runs again after $1 restarts, and the cached device answers.
wait_restarted() {
  i=0
  while [ "$i" -lt 300 ]; do
    if [ "$(systemctl show -p NRestarts --value ulobdev@data)" -ge "$1" ] && [ "$(systemctl is-active ulobdev@data)" = active ] &&
      ulobdev status data >/dev/null 2>&1; then
      return 0
    fi
    i=$((i + 1))
    sleep 1
  done
  return 1
}

case $n in
1)
  # The user's disk already holds a filesystem and files.
  udevadm wait --timeout=60 "$DISK"
  mkfs.ext4 -q -L data "$DISK"
  mkdir -p /mnt/old && mount "$DISK" /mnt/old
  head -c 1048576 /dev/urandom >/mnt/old/old.bin
  (cd /mnt/old && sha256sum old.bin) >"$S/old.sha"
  umount /mnt/old

  # --- docs/laptop.md, 1. Install ---
  dpkg -i "$S/ulobdev.deb"
  echo "INSTALLED $(dpkg-query -W -f='${Version}' ulobdev)"
  # --- docs/laptop.md, 4. As a service ---
  mkdir -p /etc/ulobdev
  install -m 600 /usr/share/doc/ulobdev/example.conf /etc/ulobdev/data.conf
  sed -i -e "s|^BACKEND=.*|BACKEND=$DISK|" -e "s|^CACHE=.*|CACHE=/var/lib/ulobdev/data.cache|" \
    -e "s|^FLUSH=.*|FLUSH=0 3 * * *|" -e "s|^OPTIONS=.*|OPTIONS=--spindown|" /etc/ulobdev/data.conf
  mkdir -p /mnt/data
  echo "/dev/ulobdev/data  /mnt/data  ext4  noatime,nofail,x-systemd.requires=ulobdev@data.service,x-systemd.device-timeout=5min  0  2" >>/etc/fstab
  systemctl daemon-reload
  systemctl enable --now ulobdev@data
  udevadm wait --timeout=180 /dev/ulobdev/data || {
    echo "NO-STABLE-NAME"; ls -la /dev/ulobdev /run/ulobdev 2>&1; losetup -a
    for l in /sys/block/loop*/loop/backing_file; do echo "$l: $(cat "$l")"; done
    l=$(losetup -j /run/ulobdev/data/fuse/disk | cut -d: -f1)
    [ -n "$l" ] && udevadm info "$l" && /usr/lib/ulobdev/ulobdev-name "${l#/dev/}"
    journalctl -b -u ulobdev@data -u systemd-udevd -o cat --no-pager | tail -30
    exit 1
  }
  mount /mnt/data
  # ---
  (cd /mnt/data && sha256sum -c "$S/old.sha") && echo "OLD-READ ok"
  head -c 3145728 /dev/urandom >/mnt/data/a.bin
  (cd /mnt/data && sha256sum a.bin) >"$S/a.sha"
  sync
  echo "STATUS1 $(status)"

  # kill -9: systemd restarts the daemon. While the dead device is still mounted each restart
  # refuses, naming it (docs/laptop.md, 4. and 7.); once it is unmounted the next one attaches.
  kill -9 "$(systemctl show -p MainPID --value ulobdev@data)"
  refused() { journalctl -b -u ulobdev@data -o cat --no-pager | grep -c 'left over from an unclean shutdown' || true; }
  i=0
  while [ "$i" -lt 300 ] && [ "$(refused)" -eq 0 ] && mountpoint -q /mnt/data; do
    i=$((i + 1))
    sleep 1
  done
  echo "MOUNTED-AFTER-KILL $(mountpoint -q /mnt/data && echo yes || echo no)"
  echo "REFUSED-WHILE-MOUNTED $(refused)"
  if mountpoint -q /mnt/data; then umount /mnt/data 2>/dev/null || umount -l /mnt/data; fi
  if wait_restarted 1; then echo "RESTARTED ok"; else echo "RESTARTED no"; fi
  echo "RESTARTS $(systemctl show -p NRestarts --value ulobdev@data) $(systemctl is-active ulobdev@data)"
  journalctl -b -u ulobdev@data -o cat --no-pager | tail -20 | sed 's/^/AFTER-KILL /'
  echo "STATUS-AFTER-KILL $(status || true)"
  echo "STABLE-NAME-AFTER-KILL $(readlink -f /dev/ulobdev/data)"
  systemctl reset-failed mnt-data.mount 2>/dev/null || true
  systemctl start mnt-data.mount
  (cd /mnt/data && sha256sum -c "$S/a.sha") && echo "A-READ-AFTER-KILL ok"

  # Written just before the reboot: dirty at the stop, which flushes it (the schedule implies it).
  head -c 2097152 /dev/urandom >/mnt/data/b.bin
  (cd /mnt/data && sha256sum b.bin) >"$S/b.sha"
  sync
  echo "STATUS2 $(status)"
  end reboot
  ;;
2)
  systemctl start mnt-data.mount
  src=$(findmnt -n -o SOURCE /mnt/data)
  echo "MOUNT-SOURCE $src"
  echo "STABLE-NAME $(readlink -f /dev/ulobdev/data)"
  echo "BACKING $(cat "/sys/block/${src#/dev/}/loop/backing_file")"
  echo "ACTIVE $(systemctl is-active ulobdev@data) $(systemctl is-active mnt-data.mount)"
  # On flash: reading every file back from a cold page cache reads nothing from the disk
  # (/sys/block/sdX/stat field 3: sectors read).
  hdd=$(basename "$(readlink -f "$DISK")")
  sync
  echo 3 >/proc/sys/vm/drop_caches
  r0=$(awk '{print $3}' "/sys/block/$hdd/stat")
  (cd /mnt/data && sha256sum -c "$S/old.sha" "$S/a.sha" "$S/b.sha") && echo "FILES-READ ok"
  r1=$(awk '{print $3}' "/sys/block/$hdd/stat")
  echo "DISK-SECTORS-READ $((r1 - r0))"
  journal_before 1
  echo "STATUS3 $(status)"
  end poweroff
  ;;
*)
  echo "STEP-FAILED unexpected boot $n"
  end poweroff
  ;;
esac
