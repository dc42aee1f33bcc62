#!/bin/bash
# Makes DIR (a `make install DESTDIR=DIR PREFIX=/usr` tree) a Debian package tree: DEBIAN/control,
# the maintainer scripts, md5sums, and the copyright file. Called by `make deb`.
#   control.sh DIR VERSION ARCH UPSTREAM     (UPSTREAM: package.json's version, the module's)
set -euo pipefail
dir=${1:?usage: control.sh DIR VERSION ARCH UPSTREAM}
version=${2:?}
arch=${3:?}
upstream=${4:?}
here=$(cd "$(dirname "$0")" && pwd)

# better-sqlite3 is compiled against the V8 ABI of the node that built it (node-addon-api code,
# our own addon, is not): the package runs on that node major only.
major=$(node -p 'process.versions.node.split(".")[0]')
size=$(du -sk --exclude=DEBIAN "$dir" | cut -f1)

install -d -m 755 "$dir/DEBIAN"
cat >"$dir/DEBIAN/control" <<CONTROL
Package: ulobdev
Version: $version
Architecture: $arch
Maintainer: ulobdev developers <ulobdev@localhost>
Installed-Size: $size
Depends: nodejs (>= 20.19), nodejs (<< $((major + 1))), fuse3, libnbd-bin, util-linux
Recommends: dkms
Suggests: nbd-client, hdparm
Section: admin
Priority: optional
Description: write-back flash cache for spinning disks
 ulobdev puts a laptop or NAS hard disk behind a cache file on flash: reads
 come from flash, writes land on flash marked dirty, and the disk sleeps until
 a scheduled flush writes the dirty blocks back in one sorted pass.
 .
 This package holds the daemon and commands (ulobdev, ulohttp), the
 ulobdev@.service unit, a udev rule for /dev/ulobdev/NAME, and the source of
 the uloop kernel module for DKMS. Built for Node.js $major.
CONTROL

for s in postinst prerm postrm; do
  sed "s/@VERSION@/$upstream/g" "$here/$s" >"$dir/DEBIAN/$s"
  chmod 755 "$dir/DEBIAN/$s"
done
install -m 644 "$here/copyright" "$dir/usr/share/doc/ulobdev/copyright"
# Files under /etc are the admin's to edit: dpkg keeps their changes at an upgrade.
(cd "$dir" && find etc -type f -printf '/%p\n' 2>/dev/null | LC_ALL=C sort) >"$dir/DEBIAN/conffiles"
[ -s "$dir/DEBIAN/conffiles" ] || rm -f "$dir/DEBIAN/conffiles"
(cd "$dir" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$dir/DEBIAN/md5sums"
chmod 644 "$dir/DEBIAN/control" "$dir/DEBIAN/md5sums"
[ ! -e "$dir/DEBIAN/conffiles" ] || chmod 644 "$dir/DEBIAN/conffiles"
