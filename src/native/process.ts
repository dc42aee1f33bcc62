// Process attributes (native/process.cc).
import { addon } from './addon.js';

interface ProcessBinding {
  setIoFlusher(): void;
  isIoFlusher(): boolean;
  redirectStdio(fd: number): void;
}

const binding = addon<ProcessBinding>();

/**
 * PR_SET_IO_FLUSHER for this thread and every thread or child started after it: call it first
 * thing in a daemon that serves a block device, before any fs or threadpool work.
 */
export function setIoFlusher(): void {
  binding.setIoFlusher();
}

/** PR_GET_IO_FLUSHER for the calling thread. */
export function isIoFlusher(): boolean {
  return binding.isIoFlusher();
}

/**
 * Points stdout and stderr (fds 1 and 2) at the open file `fd` (dup2); the caller closes `fd`.
 * A --daemon child's log reopen (SIGHUP from logrotate).
 */
export function redirectStdio(fd: number): void {
  binding.redirectStdio(fd);
}
