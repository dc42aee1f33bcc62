// The NBD frontend: a server for a BlockBackend, and the codec it speaks.
export { NbdServer, formatNbdUrl, parseNbdUrl, type NbdAddress, type NbdListenAddress, type NbdServerOptions } from './server.js';
export * as nbd from './protocol.js';
export type { BlockBackend } from '../backend.js';
