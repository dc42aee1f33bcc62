// The NBD server: serves a BlockBackend to NBD clients (nbdfuse, nbd-client, qemu, nbdcopy), and the
// codec it speaks.
export { NbdServer, assertLocalAddress, formatNbdUrl, isLoopbackHost, parseNbdUrl, type NbdAddress, type NbdListenAddress, type NbdServerOptions } from './server.js';
export * as nbd from './protocol.js';
export type { BlockBackend } from '../backend.js';
