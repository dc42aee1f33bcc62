// The fixed newstyle handshake of one connection (doc/proto.md, "Option haggling"): the client's
// flags, then options until one of them (NBD_OPT_EXPORT_NAME or NBD_OPT_GO) starts the
// transmission phase. It decides what the connection speaks from then on: structured replies, the
// base:allocation context, the transmission flags.
import type { Logger } from 'pino';
import { NbdProtocolError } from '../../errors.js';
import type { ExportConfig } from './export.js';
import {
  BASE_ALLOCATION,
  ByteQueue,
  ClientFlag,
  HandshakeFlag,
  Info,
  Opt,
  Rep,
  TxFlag,
  decodeClientFlags,
  decodeOption,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionError,
  encodeOptionReply,
  encodeServerData,
  optionName,
  parseInfoRequest,
  parseMetaContextRequest,
  type NbdOption,
} from './protocol.js';

/** Option data beyond this is not a client we want to serve (strings are at most 4 KiB). */
const MAX_OPTION_DATA = 64 * 1024;
/** Options one connection may send before it is cut off as a denial of service. */
const MAX_OPTIONS = 1024;
/** The id of base:allocation in SET_META_CONTEXT replies and BLOCK_STATUS chunks. */
export const BASE_ALLOCATION_ID = 1;

/** What the handshake agreed on; fixed for the rest of the connection. */
export interface Negotiated {
  structured: boolean;
  /** base:allocation was selected, so BLOCK_STATUS is allowed. */
  metaContext: boolean;
  transmissionFlags: number;
}

/**
 * What one step of the handshake left: 'wait' for more bytes, 'more' messages to read, 'aborted'
 * by the client (NBD_OPT_ABORT, acknowledged), or 'transmission' begins.
 */
export type HandshakeStep = 'wait' | 'more' | 'aborted' | 'transmission';

export class Handshake {
  readonly #config: ExportConfig;
  readonly #send: (buf: Buffer) => void;
  readonly #log: Logger;
  #clientFlags: number | null = null;
  #options = 0;
  #structured = false;
  #metaContext = false;
  #transmissionFlags = 0;

  /** Sends the server's greeting at once. */
  constructor(config: ExportConfig, send: (buf: Buffer) => void, log: Logger) {
    this.#config = config;
    this.#send = send;
    this.#log = log;
    send(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  }

  get negotiated(): Negotiated {
    return { structured: this.#structured, metaContext: this.#metaContext, transmissionFlags: this.#transmissionFlags };
  }

  /**
   * Decodes and answers at most one message (the client flags or one option) from `q`. Throws
   * NbdProtocolError for a client that must be dropped.
   */
  step(q: ByteQueue): HandshakeStep {
    if (this.#clientFlags === null) {
      const flags = decodeClientFlags(q);
      if (flags === null) return 'wait';
      const unknown = flags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES);
      if (unknown) throw new NbdProtocolError(`unknown client flags 0x${(flags >>> 0).toString(16)}`);
      this.#clientFlags = flags;
      return 'more';
    }
    const option = decodeOption(q, MAX_OPTION_DATA);
    if (!option) return 'wait';
    return this.#onOption(option);
  }

  #onOption({ option, data }: NbdOption): HandshakeStep {
    if (++this.#options > MAX_OPTIONS) throw new NbdProtocolError(`more than ${MAX_OPTIONS} options in one handshake`);
    const clientFlags = this.#clientFlags!;
    if (!(clientFlags & ClientFlag.FIXED_NEWSTYLE) && option !== Opt.EXPORT_NAME) {
      throw new NbdProtocolError(`${optionName(option)} from a client that did not agree to fixed newstyle`);
    }
    const c = this.#config;
    switch (option) {
      case Opt.EXPORT_NAME: {
        const name = data.toString('utf8');
        // This option cannot be answered with an error: an unknown name ends the session.
        if (!c.names.has(name)) throw new NbdProtocolError(`NBD_OPT_EXPORT_NAME for unknown export ${JSON.stringify(name)}`);
        this.#transmissionFlags = this.#flagsFor();
        this.#send(encodeExportNameReply(c.backend.size, this.#transmissionFlags, !(clientFlags & ClientFlag.NO_ZEROES)));
        return 'transmission';
      }
      case Opt.ABORT:
        this.#send(encodeOptionReply(option, Rep.ACK));
        return 'aborted';
      case Opt.LIST:
        if (data.byteLength !== 0) return this.#optionError(option, Rep.ERR_INVALID, 'NBD_OPT_LIST takes no data');
        this.#send(encodeOptionReply(option, Rep.SERVER, encodeServerData(c.exportName, c.description)));
        this.#send(encodeOptionReply(option, Rep.ACK));
        return 'more';
      case Opt.INFO:
      case Opt.GO:
        return this.#onInfo(option, data);
      case Opt.STRUCTURED_REPLY:
        if (data.byteLength !== 0) return this.#optionError(option, Rep.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.#structured = true;
        this.#send(encodeOptionReply(option, Rep.ACK));
        return 'more';
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.#onMetaContext(option, data);
      case Opt.STARTTLS:
        return this.#optionError(option, Rep.ERR_UNSUP, 'TLS is not supported by this server');
      default:
        return this.#optionError(option, Rep.ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  #onInfo(option: number, data: Buffer): HandshakeStep {
    const c = this.#config;
    const req = parseInfoRequest(data);
    if (!req) return this.#optionError(option, Rep.ERR_INVALID, `malformed ${optionName(option)}`);
    if (!c.names.has(req.name)) return this.#optionError(option, Rep.ERR_UNKNOWN, `no export named ${JSON.stringify(req.name)}`);
    const flags = this.#flagsFor();
    this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoExport(c.backend.size, flags)));
    const wanted = new Set(req.requests);
    if (wanted.has(Info.NAME)) this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.NAME, c.exportName)));
    if (wanted.has(Info.DESCRIPTION) && c.description) {
      this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoString(Info.DESCRIPTION, c.description)));
    }
    if (wanted.has(Info.BLOCK_SIZE)) {
      // A minimum the size is not a multiple of would make clients drop the tail; say 1 then.
      const min = c.backend.size % c.minBlockSize === 0 ? c.minBlockSize : 1;
      this.#send(encodeOptionReply(option, Rep.INFO, encodeInfoBlockSize(min, c.preferredBlockSize, c.maxPayload)));
    }
    this.#send(encodeOptionReply(option, Rep.ACK));
    if (option !== Opt.GO) return 'more';
    this.#transmissionFlags = this.#flagsFor();
    return 'transmission';
  }

  #onMetaContext(option: number, data: Buffer): HandshakeStep {
    if (!this.#structured) return this.#optionError(option, Rep.ERR_INVALID, 'negotiate structured replies first');
    const req = parseMetaContextRequest(data);
    if (!req) return this.#optionError(option, Rep.ERR_INVALID, `malformed ${optionName(option)}`);
    if (!this.#config.names.has(req.name)) return this.#optionError(option, Rep.ERR_UNKNOWN, `no export named ${JSON.stringify(req.name)}`);
    if (option === Opt.LIST_META_CONTEXT) {
      const all = req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION);
      if (all) this.#send(encodeOptionReply(option, Rep.META_CONTEXT, encodeMetaContext(0, BASE_ALLOCATION)));
    } else {
      this.#metaContext = req.queries.includes(BASE_ALLOCATION);
      if (this.#metaContext) this.#send(encodeOptionReply(option, Rep.META_CONTEXT, encodeMetaContext(BASE_ALLOCATION_ID, BASE_ALLOCATION)));
    }
    this.#send(encodeOptionReply(option, Rep.ACK));
    return 'more';
  }

  #optionError(option: number, type: number, message: string): HandshakeStep {
    this.#log.debug({ option: optionName(option), reply: type >>> 0 }, message);
    this.#send(encodeOptionError(option, type, message));
    return 'more';
  }

  #flagsFor(): number {
    let f = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_CACHE | TxFlag.CAN_MULTI_CONN;
    if (this.#config.backend.readOnly) f |= TxFlag.READ_ONLY;
    else f |= TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES;
    // Every read is answered with one data chunk, so "don't fragment" costs nothing.
    if (this.#structured) f |= TxFlag.SEND_DF;
    return f;
  }
}
