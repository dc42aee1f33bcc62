// Where ulobdev keeps its files unless told otherwise: caches (cache, bitmap, metadata) under
// STATE_DIR, and per device a control socket, a log and a run directory (NBD socket, FUSE mount)
// under RUN_DIR. The commands take --state-dir and --run-dir (hidden; the tests use them).

/** Default directory of caches named after the backing disk's identity. */
export const STATE_DIR = '/var/lib/ulobdev';
/** Default directory of control sockets (NAME.sock), logs (NAME.log) and run directories (NAME/). */
export const RUN_DIR = '/run/ulobdev';
/** Settings of ulobdev@NAME.service: NAME.conf (DEVICE, BACKEND, CACHE, FLUSH, OPTIONS). */
export const CONFIG_DIR = '/etc/ulobdev';
