#!/bin/sh
# The guest side of test/vm/systemd-boot.test.ts: run by ulobvm-step.service once per boot of a
# Debian 13 VM (systemd as PID 1), from the 9p scratch share. Two disks, each set up as
# docs/laptop.md says, step for step: `data` on /dev/loopN (a flush schedule: flush at stop) and
# `data2` on /dev/uloop0 (the module installed where DKMS puts it; manual flushes only: no flush at
# stop, its dirty bits stay).
#   Boot 1 installs the .deb and sets both up, writes, kill -9s data's daemon and watches systemd
#     bring it back, writes again and reboots.
#   Boot 2 checks both mounts at boot, that the files are read from flash (the disks' read counters
#     stay put), data's flush at the reboot and data2's dirty bits; kill -9s data2's daemon (the
#     mount stays: the kernel keeps the device), writes and fsyncs, and asks the host to kill the
#     VM (an unclean reset: the file `reset` in the share).
#   Boot 3 (a new qemu) checks that data2 came back with what was fsynced, then switches data2 to a
#     schedule (restart: that stop must not flush), stops it (this stop must flush) and powers off.
# Each boot writes boot-N.log (KEY value lines the test reads) and ends the boot itself.
S=/mnt/scratch
n=$(($(cat "$S/boots" 2>/dev/null || echo 0) + 1))
echo "$n" >"$S/boots"
exec >"$S/boot-$n.log" 2>&1
set -eu
ended=
# The kernel's log of this boot, for the host's splat check (the console is quiet).
save_dmesg() { dmesg >"$S/dmesg-$n.log" 2>&1 || true; }
end() {
  ended=1
  save_dmesg
  sync
  systemctl --no-block "$1"
  exit 0
}
trap 'rc=$?; if [ -z "$ended" ]; then echo "STEP-FAILED boot $n (exit $rc)"; sync; systemctl --no-block poweroff; fi' EXIT

DISK=/dev/disk/by-id/ata-QEMU_HARDDISK_ULOBHDD1
DISK2=/dev/disk/by-id/ata-QEMU_HARDDISK_ULOBHDD2
echo "BOOT $n"
echo "KERNEL $(uname -r)"
echo "PID1 $(cat /proc/1/comm)"
# Seconds from the kernel's start to this step (boot is not "finished" while this unit runs).
echo "UPTIME $(cut -d' ' -f1 /proc/uptime)"

# Where a boot's time goes: "T LABEL SECONDS-SINCE-KERNEL-START" (read by nobody but people).
t() { echo "T $1 $(cut -d' ' -f1 /proc/uptime)"; }
# Status as one line of JSON (of data, or of the name given). Each `ulobdev` command is a Node
# start, 10-20 s under TCG: where both daemons run, one `statuses` reads them both.
status() { ulobdev status --json "${1:-data}" | tr -d '\n'; echo; }
# Every attached device's status, one line of a JSON array (the test picks each by its name).
statuses() { ulobdev status --json | tr -d '\n'; echo; }
# The previous boot's journal of a unit (default ulobdev@data), between markers.
journal_before() {
  echo "JOURNAL-BEGIN $1${2:+ $2}"
  journalctl -b -1 -u "ulobdev@${2:-data}" -o cat --no-pager || true
  echo "JOURNAL-END $1${2:+ $2}"
}
# This boot's journal of ulobdev@$1, each line prefixed with $2.
journal_now() { journalctl -b -u "ulobdev@$1" -o cat --no-pager | sed "s/^/$2 /"; }
# Sectors read from both disks so far (/sys/block/sdX/stat field 3).
disk_reads() {
  t=0
  for d in "$DISK" "$DISK2"; do t=$((t + $(awk '{print $3}' "/sys/block/$(basename "$(readlink -f "$d")")/stat"))); done
  echo "$t"
}
# (POSIX sh: the step runs under dash.) Block requests issued to either disk between trace_on and trace_off ("READ-TRACE LABEL ..."
# lines: device, op, sector + count, and the task that issued them), so a read of a disk in a
# check that expects none says who read what. Best effort: tracefs may be missing.
TR=/sys/kernel/tracing
trace_on() {
  mountpoint -q $TR || mount -t tracefs tracefs $TR || return 0
  echo 0 >$TR/tracing_on && : >$TR/trace || return 0
  echo 1 >$TR/events/block/block_rq_issue/enable && echo 1 >$TR/tracing_on || true
} 2>/dev/null
trace_off() {
  [ -w $TR/tracing_on ] || return 0
  echo 0 >$TR/tracing_on || return 0
  d1=$(tr ':' ',' <"/sys/block/$(basename "$(readlink -f "$DISK")")/dev") || return 0
  d2=$(tr ':' ',' <"/sys/block/$(basename "$(readlink -f "$DISK2")")/dev") || return 0
  { grep -E "block_rq_issue: ($d1|$d2) " $TR/trace | head -40 | sed "s/^/READ-TRACE $1 /"; } || true
  echo 0 >$TR/events/block/block_rq_issue/enable || true
} 2>/dev/null
# Waits until ulobdev@$2 (default data) runs again after $1 restarts, and its device answers;
# its status (one line of JSON) is then in $restarted_status. The daemon listens on its control
# socket last, once its device is bound: until a socket newer than /tmp/killed (touched before the
# kill) is there, the loop asks systemd only, and `ulobdev status` (a Node start) runs once it is.
restarted_status=
wait_restarted() {
  u=${2:-data}
  i=0
  while [ "$i" -lt 300 ]; do
    if [ "$(systemctl show -p NRestarts --value "ulobdev@$u")" -ge "$1" ] && [ "$(systemctl is-active "ulobdev@$u")" = active ] &&
      [ -n "$(find /run/ulobdev -maxdepth 1 -name "$u.sock" -type s -newer /tmp/killed 2>/dev/null)" ] &&
      restarted_status=$(ulobdev status --json "$u" 2>/dev/null); then
      restarted_status=$(printf '%s' "$restarted_status" | tr -d '\n')
      return 0
    fi
    i=$((i + 1))
    sleep 1
  done
  return 1
}

case $n in
1)
  # The user's disks already hold a filesystem and files.
  # (A poll: at load 17 on the shared 2 cores udev's coldplug took more than 60 s.)
  udevadm wait --timeout=300 "$DISK" "$DISK2"
  # Inode tables and journal written now, not by ext4lazyinit in the background over the next
  # boots: its steps read blocks the cache never saw, and the read checks below (boots 2 and 3)
  # traced exactly those reads (docs/laptop.md says what lazy init costs a sleeping disk).
  mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 -L data "$DISK"
  mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 -L data2 "$DISK2"
  mkdir -p /mnt/old
  for d in "$DISK:old" "$DISK2:old2"; do
    mount "${d%:*}" /mnt/old
    head -c 1048576 /dev/urandom >"/mnt/old/${d#*:}.bin"
    (cd /mnt/old && sha256sum "${d#*:}.bin") >"$S/${d#*:}.sha"
    umount /mnt/old
  done

  t mkfs-done
  # --- docs/laptop.md, 1. Install ---
  dpkg -i "$S/ulobdev.deb"
  t dpkg-done
  echo "INSTALLED $(dpkg-query -W -f='${Version}' ulobdev)"
  # --- docs/laptop.md, 10. The kernel module: uloop.ko where `dkms install` puts it (built on the
  # host for this kernel: DKMS itself is test/vm/dkms.test.ts; building under TCG costs minutes) ---
  install -D -m 644 "$S/uloop.ko" "/lib/modules/$(uname -r)/updates/dkms/uloop.ko"
  depmod -a
  echo "MODULE $(modinfo -n uloop)"
  t installed
  # --- docs/laptop.md, 4. As a service, once per disk ---
  mkdir -p /etc/ulobdev
  install -m 600 /usr/share/doc/ulobdev/example.conf /etc/ulobdev/data.conf
  sed -i -e "s|^BACKEND=.*|BACKEND=$DISK|" -e "s|^CACHE=.*|CACHE=/var/lib/ulobdev/data.cache|" \
    -e "s|^FLUSH=.*|FLUSH=0 3 * * *|" -e "s|^OPTIONS=.*|OPTIONS=--spindown|" /etc/ulobdev/data.conf
  # data2: /dev/uloop0, manual flushes only (FLUSH= empty, no limits): nothing flushes it at stop.
  install -m 600 /usr/share/doc/ulobdev/example.conf /etc/ulobdev/data2.conf
  sed -i -e "s|^DEVICE=.*|DEVICE=/dev/uloop0|" -e "s|^BACKEND=.*|BACKEND=$DISK2|" -e "s|^CACHE=.*|CACHE=/var/lib/ulobdev/data2.cache|" \
    -e "s|^FLUSH=.*|FLUSH=|" -e "s|^OPTIONS=.*|OPTIONS=|" /etc/ulobdev/data2.conf
  mkdir -p /mnt/data /mnt/data2
  for n2 in data data2; do
    echo "/dev/ulobdev/$n2  /mnt/$n2  ext4  noatime,nofail,x-systemd.requires=ulobdev@$n2.service,x-systemd.device-timeout=5min  0  2" >>/etc/fstab
  done
  systemctl daemon-reload
  systemctl enable --now ulobdev@data ulobdev@data2
  udevadm wait --timeout=180 /dev/ulobdev/data /dev/ulobdev/data2 || {
    echo "NO-STABLE-NAME"; ls -la /dev/ulobdev /run/ulobdev 2>&1; losetup -a
    journalctl -b -u ulobdev@data -u ulobdev@data2 -u systemd-udevd -o cat --no-pager | tail -30
    exit 1
  }
  t enabled
  mount /mnt/data
  mount /mnt/data2
  # ---
  (cd /mnt/data && sha256sum -c "$S/old.sha") && echo "OLD-READ ok"
  (cd /mnt/data2 && sha256sum -c "$S/old2.sha") && echo "OLD2-READ ok"
  head -c 3145728 /dev/urandom >/mnt/data/a.bin
  head -c 3145728 /dev/urandom >/mnt/data2/a2.bin
  (cd /mnt/data && sha256sum a.bin) >"$S/a.sha"
  (cd /mnt/data2 && sha256sum a2.bin) >"$S/a2.sha"
  sync

  # kill -9: systemd restarts the daemon. While the dead device is still mounted each restart
  # refuses, naming it (docs/laptop.md, 4. and 7.); once it is unmounted the next one attaches.
  t kill
  touch /tmp/killed
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
  echo "STATUS-AFTER-KILL $restarted_status"
  echo "STABLE-NAME-AFTER-KILL $(readlink -f /dev/ulobdev/data)"
  systemctl reset-failed mnt-data.mount 2>/dev/null || true
  systemctl start mnt-data.mount
  (cd /mnt/data && sha256sum -c "$S/a.sha") && echo "A-READ-AFTER-KILL ok"
  t restarted

  # Written just before the reboot: dirty at the stop. data's schedule implies a flush at stop;
  # data2 (manual only) keeps it dirty.
  head -c 2097152 /dev/urandom >/mnt/data/b.bin
  head -c 2097152 /dev/urandom >/mnt/data2/b2.bin
  (cd /mnt/data && sha256sum b.bin) >"$S/b.sha"
  (cd /mnt/data2 && sha256sum b2.bin) >"$S/b2.sha"
  sync
  echo "STATUS2 $(statuses)"
  t end
  end reboot
  ;;
2)
  # What the boot itself did with the mounts, before this step starts them (it only waits for
  # them: a mount the boot never queued would otherwise be made here and pass; newuser13).
  for m in mnt-data mnt-data2; do
    echo "BOOT-MOUNT $m $(systemctl show -p ActiveState --value $m.mount) job=$(systemctl show -p Job --value $m.mount)"
  done
  systemctl start mnt-data.mount mnt-data2.mount
  src=$(findmnt -n -o SOURCE /mnt/data)
  echo "MOUNT-SOURCE $src"
  echo "STABLE-NAME $(readlink -f /dev/ulobdev/data)"
  echo "BACKING $(cat "/sys/block/${src#/dev/}/loop/backing_file")"
  echo "ACTIVE $(systemctl is-active ulobdev@data) $(systemctl is-active mnt-data.mount)"
  src2=$(findmnt -n -o SOURCE /mnt/data2)
  echo "MOUNT-SOURCE2 $src2"
  echo "STABLE-NAME2 $(readlink -f /dev/ulobdev/data2)"
  echo "ACTIVE2 $(systemctl is-active ulobdev@data2) $(systemctl is-active mnt-data2.mount)"
  echo "STATUS3 $(statuses)"
  # On flash: reading every file back from a cold page cache reads nothing from either disk.
  sync
  echo 3 >/proc/sys/vm/drop_caches
  trace_on
  r0=$(disk_reads)
  (cd /mnt/data && sha256sum -c "$S/old.sha" "$S/a.sha" "$S/b.sha") && echo "FILES-READ ok"
  (cd /mnt/data2 && sha256sum -c "$S/old2.sha" "$S/a2.sha" "$S/b2.sha") && echo "FILES2-READ ok"
  r1=$(disk_reads)
  trace_off 2
  echo "DISK-SECTORS-READ $((r1 - r0))"
  journal_before 1
  journal_before 1 data2
  # systemd's own lines about the unit and the daemon's FUSE mount (the loop device's backing
  # file), in the order they happened: at shutdown the mount must go after the unit has stopped.
  echo "JOURNAL-BEGIN 1 fuse-order"
  journalctl -b -1 -u ulobdev@data.service -u run-ulobdev-data-fuse.mount -o cat --no-pager |
    grep -E '^(Stopping|Stopped|Unmounting|Unmounted|Failed unmounting) ' || true
  echo "JOURNAL-END 1 fuse-order"
  t checked

  # kill -9 of data2's daemon: systemd starts it again, it takes /dev/uloop0 back from the kernel.
  before=$(cat /sys/block/uloop0/dev)
  touch /tmp/killed
  kill -9 "$(systemctl show -p MainPID --value ulobdev@data2)"
  if wait_restarted 1 data2; then echo "RESTARTED2 ok"; else echo "RESTARTED2 no"; fi
  echo "SAME-DEVICE2 $([ "$(cat /sys/block/uloop0/dev 2>/dev/null)" = "$before" ] && echo yes || echo no)"
  echo "MOUNTED-AFTER-KILL2 $(mountpoint -q /mnt/data2 && echo yes || echo no)"
  journal_now data2 AFTER-KILL2
  echo "STATUS-AFTER-KILL2 $restarted_status"
  systemctl reset-failed mnt-data2.mount 2>/dev/null || true
  systemctl start mnt-data2.mount
  echo 3 >/proc/sys/vm/drop_caches
  (cd /mnt/data2 && sha256sum -c "$S/a2.sha" "$S/b2.sha") && echo "A2-READ-AFTER-KILL ok"
  # Acknowledged (fsync), then the power goes: the host kills qemu when `reset` appears.
  head -c 2097152 /dev/urandom >/tmp/c2.bin
  (cd /tmp && sha256sum c2.bin) >"$S/c2.sha"
  dd if=/tmp/c2.bin of=/mnt/data2/c2.bin bs=1M conv=fsync status=none
  ended=1
  t end
  echo "RESET"
  save_dmesg
  sync
  : >"$S/reset"
  sleep 600
  ;;
3)
  # After the reset: both daemons started at boot, data2 from a cache not closed cleanly.
  systemctl start mnt-data.mount mnt-data2.mount
  echo "MOUNT-SOURCE2 $(findmnt -n -o SOURCE /mnt/data2)"
  echo "MOUNT-SOURCE $(findmnt -n -o SOURCE /mnt/data)"
  journal_now data2 BOOT3
  echo "STATUS5-U $(status data2)"
  sync
  echo 3 >/proc/sys/vm/drop_caches
  trace_on
  r0=$(disk_reads)
  (cd /mnt/data2 && sha256sum -c "$S/old2.sha" "$S/a2.sha" "$S/b2.sha" "$S/c2.sha") && echo "FILES2-READ-3 ok"
  (cd /mnt/data && sha256sum -c "$S/old.sha" "$S/a.sha" "$S/b.sha") && echo "FILES-READ-3 ok"
  r1=$(disk_reads)
  trace_off 3
  echo "DISK-SECTORS-READ-3 $((r1 - r0))"
  # data2 gets a schedule: the restart's stop (manual flushes only) must leave its data dirty, and
  # the stop after it (a schedule implies flush at stop) must write it all back.
  sed -i -e "s|^FLUSH=.*|FLUSH=0 3 * * *|" /etc/ulobdev/data2.conf
  t checked
  echo "MARK restart"
  systemctl restart ulobdev@data2
  systemctl start mnt-data2.mount
  echo "MARK stop"
  systemctl stop mnt-data2.mount ulobdev@data2
  journal_now data2 STOP3
  t end
  end poweroff
  ;;
*)
  echo "STEP-FAILED unexpected boot $n"
  end poweroff
  ;;
esac
