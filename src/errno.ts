// errno names and descriptions where libuv has none. Node names a system error by libuv's table
// (util.getSystemErrorMap()), which lacks about 70 of Linux's errno values, among them ones a cache
// of disks meets: ESTALE (an NFS or FUSE file handle gone stale), EUCLEAN (a filesystem that needs
// fsck), ENOMEDIUM, EDQUOT. For those node and our addon (uv_err_name_r) produce the code
// "Unknown system error -116" and a message that says nothing a user can act on. Here they get
// the kernel's name and glibc's strerror text instead.
import { constants } from 'node:os';
import { getSystemErrorMap } from 'node:util';

/**
 * Linux errno values libuv does not name, with glibc's strerror text in libuv's lower case.
 * Numbers from include/uapi/asm-generic/errno-base.h and errno.h (x86, arm64 and every
 * architecture that uses the generic table).
 */
const UNNAMED: ReadonlyMap<number, readonly [name: string, description: string]> = new Map([
  [8, ['ENOEXEC', 'exec format error']],
  [10, ['ECHILD', 'no child processes']],
  [15, ['ENOTBLK', 'block device required']],
  [33, ['EDOM', 'numerical argument out of domain']],
  [35, ['EDEADLK', 'resource deadlock avoided']],
  [37, ['ENOLCK', 'no locks available']],
  [42, ['ENOMSG', 'no message of desired type']],
  [43, ['EIDRM', 'identifier removed']],
  [44, ['ECHRNG', 'channel number out of range']],
  [45, ['EL2NSYNC', 'level 2 not synchronized']],
  [46, ['EL3HLT', 'level 3 halted']],
  [47, ['EL3RST', 'level 3 reset']],
  [48, ['ELNRNG', 'link number out of range']],
  [50, ['ENOCSI', 'no CSI structure available']],
  [51, ['EL2HLT', 'level 2 halted']],
  [52, ['EBADE', 'invalid exchange']],
  [53, ['EBADR', 'invalid request descriptor']],
  [54, ['EXFULL', 'exchange full']],
  [55, ['ENOANO', 'no anode']],
  [56, ['EBADRQC', 'invalid request code']],
  [57, ['EBADSLT', 'invalid slot']],
  [59, ['EBFONT', 'bad font file format']],
  [60, ['ENOSTR', 'device not a stream']],
  [62, ['ETIME', 'timer expired']],
  [63, ['ENOSR', 'out of streams resources']],
  [65, ['ENOPKG', 'package not installed']],
  [66, ['EREMOTE', 'object is remote']],
  [67, ['ENOLINK', 'link has been severed']],
  [68, ['EADV', 'advertise error']],
  [69, ['ESRMNT', 'srmount error']],
  [70, ['ECOMM', 'communication error on send']],
  [72, ['EMULTIHOP', 'multihop attempted']],
  [73, ['EDOTDOT', 'RFS specific error']],
  [74, ['EBADMSG', 'bad message']],
  [76, ['ENOTUNIQ', 'name not unique on network']],
  [77, ['EBADFD', 'file descriptor in bad state']],
  [78, ['EREMCHG', 'remote address changed']],
  [79, ['ELIBACC', 'can not access a needed shared library']],
  [80, ['ELIBBAD', 'accessing a corrupted shared library']],
  [81, ['ELIBSCN', '.lib section in a.out corrupted']],
  [82, ['ELIBMAX', 'attempting to link in too many shared libraries']],
  [83, ['ELIBEXEC', 'cannot exec a shared library directly']],
  [85, ['ERESTART', 'interrupted system call should be restarted']],
  [86, ['ESTRPIPE', 'streams pipe error']],
  [87, ['EUSERS', 'too many users']],
  [96, ['EPFNOSUPPORT', 'protocol family not supported']],
  [102, ['ENETRESET', 'network dropped connection on reset']],
  [109, ['ETOOMANYREFS', 'too many references: cannot splice']],
  [115, ['EINPROGRESS', 'operation now in progress']],
  [116, ['ESTALE', 'stale file handle']],
  [117, ['EUCLEAN', 'structure needs cleaning']],
  [118, ['ENOTNAM', 'not a XENIX named type file']],
  [119, ['ENAVAIL', 'no XENIX semaphores available']],
  [120, ['EISNAM', 'is a named type file']],
  [122, ['EDQUOT', 'disk quota exceeded']],
  [123, ['ENOMEDIUM', 'no medium found']],
  [124, ['EMEDIUMTYPE', 'wrong medium type']],
  [126, ['ENOKEY', 'required key not available']],
  [127, ['EKEYEXPIRED', 'key has expired']],
  [128, ['EKEYREVOKED', 'key has been revoked']],
  [129, ['EKEYREJECTED', 'key was rejected by service']],
  [130, ['EOWNERDEAD', 'owner died']],
  [131, ['ENOTRECOVERABLE', 'state not recoverable']],
  [132, ['ERFKILL', 'operation not possible due to RF-kill']],
  [133, ['EHWPOISON', 'memory page has hardware error']],
]);

const UNKNOWN = /Unknown system error (-?\d+)/;

/**
 * The name and description of an errno value (positive, as the kernel returns it, or negative, as
 * libuv and node's `err.errno` carry it): libuv's where it has one ('EIO', 'i/o error'), else the
 * table above ('ESTALE', 'stale file handle'), else os.constants.errno's name, else
 * ['errno N', 'unknown error N'].
 */
export function errnoInfo(errno: number): readonly [name: string, description: string] {
  const n = Math.abs(errno);
  const uv = getSystemErrorMap().get(-n);
  if (uv) return uv;
  const ours = UNNAMED.get(n);
  if (ours) return ours;
  const name = Object.entries(constants.errno).find(([, v]) => v === n)?.[0];
  return [name ?? `errno ${n}`, `unknown error ${n}`];
}

/** The errno value of a system error libuv could not name, from its code or (node's fs: code 'UNKNOWN') its errno. */
function unnamedErrno(err: unknown): number | undefined {
  const { code, errno } = (err ?? {}) as { code?: unknown; errno?: unknown };
  if (typeof code !== 'string') return undefined;
  const m = UNKNOWN.exec(code);
  if (m) return Number(m[1]);
  return code === 'UNKNOWN' && typeof errno === 'number' ? errno : undefined;
}

/**
 * The errno name of a system error ('EIO', 'ESTALE'): its `code` where that is a name, else the
 * name of the errno libuv could not name (the addon's code "Unknown system error -116", node's
 * fs code 'UNKNOWN' with `errno` -116); undefined for anything that is not a system error.
 */
export function systemErrorCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null | undefined)?.code;
  if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
  const n = unnamedErrno(err);
  if (n === undefined) return undefined;
  const [name] = errnoInfo(n);
  return /^E[A-Z0-9]+$/.test(name) ? name : undefined;
}

/**
 * `message` with what libuv says for an errno it cannot name put as the errno's name and
 * description ("ESTALE: stale file handle"): "Unknown system error -116: Unknown system error
 * -116" (the addon) or a lone "Unknown system error -116" (node's child_process), and, given the
 * error `err` whose message it is, node's fs form "UNKNOWN: unknown error". Any other message is
 * returned as it is.
 */
export function nameUnknownErrno(message: string, err?: unknown): string {
  const named = (_: string, n: string) => errnoInfo(Number(n)).join(': ');
  let out = message.replace(/Unknown system error (-?\d+): Unknown system error -?\d+/g, named).replace(new RegExp(UNKNOWN.source, 'g'), named);
  const n = (err as { code?: unknown })?.code === 'UNKNOWN' ? unnamedErrno(err) : undefined;
  if (n !== undefined) out = out.replace(/^UNKNOWN: unknown error/, errnoInfo(n).join(': '));
  return out;
}
