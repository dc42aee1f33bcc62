// The exit codes of ulobdev and ulohttp: one per kind of failure (src/errors.ts), in one table that
// the README's Use section and the man pages take as they are. Invariant 6: every bad input and
// every refusal exits 1 and changes nothing. The other codes are sysexits.h's.
import { CommanderError } from 'commander';
import { UlobError, type ErrorKind } from '../errors.js';
import { systemErrorCode } from '../errno.js';

export interface ExitCode {
  /** Short name, as in the tables. */
  name: string;
  code: number;
  /** One sentence for the man page's EXIT STATUS. */
  meaning: string;
}

export const EXIT_CODES = [
  { name: 'ok', code: 0, meaning: 'Done.' },
  {
    name: 'refused',
    code: 1,
    meaning:
      'Bad input or a refusal, and nothing was changed: a usage error, an invalid value, a busy, missing or foreign device, disk, module or cache, a device that is not attached, or an attach that failed (an attach undoes what it began).',
  },
  {
    name: 'unavailable',
    code: 69,
    meaning: 'The daemon did not answer: it exited before it was ready or during the request, or stopped answering (EX_UNAVAILABLE).',
  },
  { name: 'internal', code: 70, meaning: 'An internal error (a bug): please report it with the daemon log (EX_SOFTWARE).' },
  {
    name: 'io',
    code: 74,
    meaning:
      'An I/O error of the disk, the cache, the network or a helper program stopped work the command had begun, e.g. a flush --wait whose write-back failed; the dirty blocks stay in the cache (EX_IOERR).',
  },
] as const satisfies readonly ExitCode[];

type ExitName = (typeof EXIT_CODES)[number]['name'];

/** The code of an exit name. */
export function exitCode(name: ExitName): number {
  return EXIT_CODES.find((e) => e.name === name)!.code;
}

const BY_KIND: Record<ErrorKind, ExitName> = { refused: 'refused', io: 'io', daemon: 'unavailable', internal: 'internal' };

// Failures of a command that undid everything it began (an attach): whatever the cause, they
// changed nothing, so they are refusals; only an internal error keeps its own code.
const undoneFailures = new WeakSet<object>();

/** Marks `err` as the failure of a command that was rolled back; returns it for `throw`. */
export function undone(err: unknown): unknown {
  if (typeof err === 'object' && err !== null) undoneFailures.add(err);
  return err;
}

/** The kind of any thrown value: ours by code, a system error (errno name) as I/O, else internal. */
export function kindOf(err: unknown): ErrorKind {
  if (err instanceof UlobError) return err.kind;
  if (systemErrorCode(err) !== undefined) return 'io';
  return 'internal';
}

/** The exit code for a command that failed with `err`. */
export function exitCodeFor(err: unknown): number {
  if (err instanceof CommanderError) return err.exitCode === 0 ? exitCode('ok') : exitCode('refused');
  const kind = kindOf(err);
  if (kind !== 'internal' && undoneFailures.has(err as object)) return exitCode('refused');
  return exitCode(BY_KIND[kind]);
}
