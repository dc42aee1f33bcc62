// ulobdev(8) and ulohttp(8): the commands' own definitions (buildProgram) rendered by manpage.ts,
// plus the prose that lives nowhere else. `make man` writes them (scripts/man.mjs).
import { EXIT_CODES } from './exit-codes.js';
import { renderManPage, type ManSection } from './manpage.js';
import { buildProgram as ulobdevProgram } from './ulobdev.js';
import { buildProgram as ulohttpProgram } from './ulohttp.js';

const DOC = '/usr/share/doc/ulobdev';

const FILES: ManSection = {
  title: 'FILES',
  items: [
    ['/var/lib/ulobdev/', 'Caches named after the disk\'s identity (WWN or serial): ID.cache, ID.bitmap and the metadata ID.cache.meta, unless -c, -b or --metadata say otherwise. They hold data the disk may not have yet: never delete them by hand; use ulobdev discard.'],
    ['CACHE.meta-wal', 'The metadata\'s journal (SQLite WAL) while a daemon has the cache open, and after a crash: it holds the last transactions, so it moves with the cache; a crashed cache copied without it is refused.'],
    ['CACHE.meta-reserve', '1 MiB of flash held back for a flush\'s own metadata when the flash filesystem is full (given up for that flush, taken back afterwards).'],
    ['CACHE.cow', 'While a flush runs: the old versions of blocks rewritten meanwhile, beyond the memory kept for them, so that the disk gets the flush start\'s content (removed when the flush ends).'],
    ['/run/ulobdev/NAME.sock', 'The control socket of the device named NAME (--name, or loop6 for /dev/loop6): status, flush, report and detach talk to it.'],
    ['/run/ulobdev/NAME.log', 'The log of a daemon started with --daemon (in the foreground it logs to stderr, the journal under systemd). SIGHUP makes the daemon reopen it.'],
    ['/etc/logrotate.d/ulobdev', 'Rotates those logs (/run is RAM): weekly, or past 1 MiB, four kept; logrotate sends the SIGHUP.'],
    ['/dev/ulobdev/NAME', 'A stable name of the cached device, made by udev (60-ulobdev.rules): use it in fstab instead of /dev/loopN.'],
    ['/etc/ulobdev/NAME.conf', 'Settings of ulobdev@NAME.service: DEVICE, BACKEND, CACHE, FLUSH, OPTIONS (see example.conf in ' + DOC + ').'],
  ],
};

/** ulobdev(8). */
export function ulobdevManPage(meta: { date: string; version: string }): string {
  return renderManPage(ulobdevProgram(), {
    section: 8,
    ...meta,
    exitCodes: EXIT_CODES,
    description: [
      'ulobdev puts a spinning disk (BACKEND) behind a cache file on flash and exposes the cached disk as DEVICE. Reads are served from flash once a block was read, writes land on flash marked dirty, and the disk can sleep until a flush writes the dirty blocks back in one sorted pass: on the --flush schedule, above --dirty-max, past --max-dirty-age, on ulobdev flush, or at detach.',
      'DEVICE is /dev/loopN (a loop device over a FUSE file: no module of ours), /dev/loop (the first free loop device, as losetup -f), /dev/nbdN (the kernel NBD client), /dev/uloopN (the uloop module), /dev/ublkbN (the kernel\'s ublk driver; /dev/ublkb, the next free one), or an NBD URL to serve only.',
      'Every write acknowledged and followed by a FLUSH (fsync) survives a crash of the daemon or a power loss: it is on flash, and the cache remembers which blocks the disk lacks. A cache made for one disk is refused for any other.',
      'The disk written without ulobdev after a detach (mounted directly: a rescue boot, fstab finding the raw partition by UUID=) is noticed by the next attach, from a fingerprint of the disk\'s first and last MiB and the first MiB of each partition (from the kernel and from the disk\'s own GPT or MBR), where ext4, XFS and btrfs write at a read-write mount: a cache holding no dirty data starts cold, one holding dirty data is refused (ULOB_E_DISK_CHANGED: ulobdev discard --force keeps the disk\'s changes). A change outside those regions (4 KiB at 1, 2, 16 and 17 MiB past each start are hashed too: LVM and LUKS at their default offsets) or one made after a flush cut by a crash is not seen: after writing the disk without ulobdev on purpose, run ulobdev discard.',
      'Run in the foreground (as ulobdev@.service does), SIGTERM stops the daemon: it waits up to --stop-timeout for DEVICE to be unmounted, flushes if the policy says so, and exits; a device still mounted then is left to fail further I/O, with one line in the log saying so.',
    ],
    sections: [
      FILES,
      {
        title: 'EXAMPLES',
        paragraphs: [
          '$ ulobdev --writeback --flush \'*/30 * * * *\' --spindown --daemon /dev/loop6 /dev/disk/by-id/ata-DISK',
          '$ ulobdev status /dev/loop6',
          '$ ulobdev flush --wait /dev/loop6',
          'As a service, set up once: ' + DOC + '/laptop.md.',
        ],
      },
      {
        title: 'SEE ALSO',
        paragraphs: ['ulohttp(8), losetup(8), hdparm(8), nbdfuse(1), fstab(5), systemd.service(5); ' + DOC + '/laptop.md, design.md and reference.md.'],
      },
    ],
  });
}

/** ulohttp(8). */
export function ulohttpManPage(meta: { date: string; version: string }): string {
  return renderManPage(ulohttpProgram(), {
    section: 8,
    ...meta,
    exitCodes: EXIT_CODES,
    description: [
      'ulohttp exposes a disk or filesystem image on an HTTP(S) server as a read-only local device (the same DEVICE forms as ulobdev). A block is fetched with a Range request the first time it is read and served from the cache afterwards, across runs. A server that ignores ranges is refused rather than downloaded; an image that changes on the server fails further reads of uncached blocks instead of mixing two versions.',
    ],
    sections: [
      {
        title: 'FILES',
        items: [
          ['/var/lib/ulobdev/http-NAME-HASH.cache', 'The default cache, named after the URL; it remembers the image\'s size and ETag or Last-Modified.'],
          ['/run/ulobdev/NAME.sock', 'The control socket, as for ulobdev.'],
          ['/run/ulobdev/NAME.log', 'The log of a daemon started with --daemon, rotated as ulobdev\'s (/etc/logrotate.d/ulobdev).'],
        ],
      },
      { title: 'EXAMPLES', paragraphs: ['$ ulohttp --daemon /dev/loop5 https://example.org/images/debian.ext4', '$ mount -o ro /dev/loop5 /mnt/img'] },
      { title: 'SEE ALSO', paragraphs: ['ulobdev(8), losetup(8); ' + DOC + '/README.md.'] },
    ],
  });
}
