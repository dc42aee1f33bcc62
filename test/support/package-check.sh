#!/bin/sh
# Runs inside the Debian root of scripts/vm/package-test.sh after each dpkg step and prints
# KEY=VALUE lines for test/integration/package.test.ts.
#   check.sh installed|removed|purged
set -u
state=$1
echo "DPKG_STATE=$(dpkg-query -W -f='${db:Status-Abbrev}' ulobdev 2>/dev/null | tr -d ' ')"
echo "VERSION=$(dpkg-query -W -f='${Version}' ulobdev 2>/dev/null)"
# What of ours is on disk, outside /tmp, /run, /proc, /sys and /dev.
echo "FILES=$(find / -xdev \( -path /tmp -o -path /run -o -path /proc -o -path /sys -o -path /dev \) -prune -o \( -name '*ulobdev*' -o -name 'uloop-*' -o -name '*ulohttp*' \) -print 2>/dev/null | sort | tr '\n' ' ')"
[ "$state" = installed ] || exit 0

echo "NODE=$(node --version)"
ulobdev --help >/tmp/help.txt 2>&1 && echo "HELP=ok $(head -1 /tmp/help.txt)" || echo "HELP=failed $(cat /tmp/help.txt)"
zcat /usr/share/man/man8/ulobdev.8.gz | grep -q '^\.TH ULOBDEV 8' && echo "MAN=ok" || echo "MAN=missing"
v=$(dpkg-query -W -f='${Version}' ulobdev); v=${v%%-*}; v=${v%%+*}
grep -q "^PACKAGE_VERSION=\"$v\"" "/usr/src/uloop-$v/dkms.conf" 2>/dev/null && echo "DKMS_SOURCE=ok" || echo "DKMS_SOURCE=missing /usr/src/uloop-$v"
[ -f /usr/lib/systemd/system/ulobdev@.service ] && grep -q '^ExecStart=/usr/sbin/ulobdev ' /usr/lib/systemd/system/ulobdev@.service && echo "UNIT=ok" || echo "UNIT=missing"
[ -f /usr/lib/udev/rules.d/60-ulobdev.rules ] && [ -x /usr/lib/ulobdev/ulobdev-name ] && echo "UDEV=ok" || echo "UDEV=missing"
grep -q '^/run/ulobdev/\*\.log {' /etc/logrotate.d/ulobdev 2>/dev/null && dpkg-query --showformat='${Conffiles}' -W ulobdev | grep -q ' /etc/logrotate.d/ulobdev ' && echo "LOGROTATE=ok" || echo "LOGROTATE=missing"
# The library from the installed copy, as docs/library.md says to import it from another directory.
(cd / && node --input-type=module -e "const m = await import('/usr/lib/ulobdev/dist/index.js'); process.exit(typeof m.createDevice === 'function' ? 0 : 1)") >/tmp/lib.txt 2>&1 && echo "LIB=ok" || echo "LIB=failed $(head -c 300 /tmp/lib.txt | tr '\n' ' ')"

# The whole stack from the package: sqlite metadata, the addon, the NBD server, a flush.
rm -rf /tmp/u && mkdir -p /tmp/u && cd /tmp/u || exit 1
truncate -s 16M disk.img
head -c 1048576 /dev/urandom >data.bin
sock=/tmp/u/nbd.sock
if ulobdev --writeback --daemon -c /tmp/u/c.cache --name pkg "nbd+unix:///?socket=$sock" /tmp/u/disk.img >daemon.out 2>&1 &&
  nbdcopy data.bin "nbd+unix:///ulobdev?socket=$sock" 2>>daemon.out &&
  ulobdev flush --wait pkg >>daemon.out 2>&1 &&
  ulobdev detach pkg >>daemon.out 2>&1 &&
  cmp -n 1048576 data.bin disk.img; then
  echo "DAEMON=ok $(tr '\n' ' ' <daemon.out)"
else
  echo "DAEMON=failed $(tr '\n' ' ' <daemon.out) $(cat /run/ulobdev/pkg.log 2>/dev/null | tail -5 | tr '\n' ' ')"
  ulobdev detach pkg >/dev/null 2>&1
fi
cd / && rm -rf /tmp/u
