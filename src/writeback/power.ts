// The backing disk's power: read its state without waking it (ATA CHECK POWER MODE), put it to
// sleep (STANDBY IMMEDIATE), set its own standby timer (IDLE with a count, as hdparm -S does). The
// commands go through SG_IO as SCSI ATA PASS-THROUGH(16) (SAT: libata, most USB bridges), or the
// legacy HDIO_DRIVE_CMD ioctl. Disks that take neither (files, virtio, some bridges) get one
// warning and the daemon carries on without power control.
//
// The encoders and decoders are pure functions (unit-tested); native/power.cc only sends bytes.
import { constants as fsc, promises as fsp } from 'node:fs';
import { basename, join } from 'node:path';
import type { Logger } from 'pino';
import { DiskPowerError } from '../errors.js';
import { ataSgIo, hdioDriveCmd } from '../native/power.js';
import { majorMinor } from '../sys.js';

export type PowerState = 'active' | 'idle' | 'standby' | 'sleep' | 'unknown';

/** What the flush scheduler needs from the disk's power control; DiskPower is the real one. */
export interface PowerControl {
  readonly supported: boolean;
  state(): Promise<PowerState>;
  standby(): Promise<void>;
  /**
   * Reads and writes the disk completed so far, anyone's (/proc/diskstats); null when unknown.
   * Tells whether someone touched a sleeping disk without asking it.
   */
  ioCount?(): Promise<number | null>;
}

export const ATA = {
  CHECK_POWER_MODE: 0xe5,
  STANDBY_IMMEDIATE: 0xe0,
  /** IDLE with a count: sets the standby timer without spinning down (hdparm -S). */
  IDLE: 0xe3,
  SET_FEATURES: 0xef,
} as const;

export interface AtaTaskfile {
  command: number;
  features?: number;
  count?: number;
  lba?: number;
  device?: number;
}

/**
 * SCSI ATA PASS-THROUGH(16) (SAT-4, opcode 0x85) for a non-data 28-bit command, asking for the
 * result registers back (CK_COND), which CHECK POWER MODE needs for its count register.
 */
export function ataPassThrough16(tf: AtaTaskfile): Buffer {
  const cdb = Buffer.alloc(16);
  cdb[0] = 0x85;
  cdb[1] = 3 << 1; // PROTOCOL 3: non-data; EXTEND 0
  cdb[2] = 0x20; // CK_COND 1; T_LENGTH 0: no data transfer
  cdb[4] = (tf.features ?? 0) & 0xff;
  cdb[6] = (tf.count ?? 0) & 0xff;
  const lba = tf.lba ?? 0;
  cdb[8] = lba & 0xff;
  cdb[10] = (lba >>> 8) & 0xff;
  cdb[12] = (lba >>> 16) & 0xff;
  cdb[13] = tf.device ?? 0;
  cdb[14] = tf.command;
  return cdb;
}

export interface AtaResult {
  status: number;
  error: number;
  count: number;
}

/**
 * The ATA result registers from the sense data of a pass-through command: the ATA Status Return
 * descriptor (code 0x09) in descriptor-format sense (0x72/0x73), or the fixed-format (0x70/0x71)
 * information bytes. Null when the sense carries neither.
 */
export function decodeAtaReturn(sense: Uint8Array, length = sense.byteLength): AtaResult | null {
  if (length < 8) return null;
  const code = sense[0]! & 0x7f;
  if (code === 0x72 || code === 0x73) {
    const end = Math.min(length, 8 + sense[7]!);
    for (let d = 8; d + 1 < end; d += 2 + sense[d + 1]!) {
      if (sense[d] === 0x09 && sense[d + 1]! >= 0x0c && d + 13 < end + 1) {
        return { error: sense[d + 3]!, count: sense[d + 5]!, status: sense[d + 13]! };
      }
    }
    return null;
  }
  if ((code === 0x70 || code === 0x71) && length >= 18) {
    // SAT fixed format: INFORMATION = error, status, device, count(7:0).
    return { error: sense[3]!, status: sense[4]!, count: sense[6]! };
  }
  return null;
}

/** CHECK POWER MODE's count register to a state (ACS-4, table "power mode"). */
export function powerStateFromCount(count: number): PowerState {
  if (count === 0x00 || count === 0x01 || count === 0x40) return 'standby';
  if (count === 0xff || count === 0x41) return 'active';
  if (count >= 0x80 && count <= 0x83) return 'idle';
  return 'unknown';
}

/**
 * Seconds to the standby timer count (hdparm -S): 0 off; 1-240 in 5 s units (up to 20 min); 241-251 in
 * 30 min units (up to 5.5 h). Rounded up to the next value the drive can hold.
 */
export function standbyTimerCount(seconds: number): number {
  if (!(seconds >= 0)) throw new RangeError('standby timeout must be 0 or more seconds');
  if (seconds === 0) return 0;
  if (seconds <= 1200) return Math.max(1, Math.ceil(seconds / 5));
  return Math.min(251, 240 + Math.ceil(seconds / 1800));
}

/** What a standby count means, in seconds (inverse of standbyTimerCount for 0-251). */
export function standbyTimerSeconds(count: number): number {
  if (count === 0) return 0;
  if (count <= 240) return count * 5;
  if (count <= 251) return (count - 240) * 1800;
  if (count === 252) return 21 * 60;
  if (count === 255) return 21 * 60 + 15;
  return NaN;
}

type Transport = 'sgio' | 'hdio';

const SENSE_BYTES = 64;

export class DiskPower implements PowerControl {
  readonly path: string;
  readonly supported: boolean;
  readonly transport: Transport | null;
  /** Why power commands cannot reach the disk (one clause, for status and the attach's notice); null when they can. */
  readonly offReason: string | null;
  readonly #fd: fsp.FileHandle | null;

  private constructor(path: string, fd: fsp.FileHandle | null, transport: Transport | null, offReason: string | null = null) {
    this.path = path;
    this.#fd = fd;
    this.transport = transport;
    this.supported = transport !== null;
    this.offReason = transport === null ? offReason : null;
  }

  /** Probes the disk behind `path` (its whole disk if a partition). Never throws: unsupported instead. */
  static async open(path: string, logger: Logger): Promise<DiskPower> {
    const off = (why: string) => {
      logger.warn(`disk power control is off for ${path}: ${why}; --spindown, --standby-timeout and spin-up counts do nothing`);
      return new DiskPower(path, null, null, why);
    };
    const st = await fsp.stat(path).catch(() => null);
    if (!st?.isBlockDevice()) return off('it is not a block device');
    const disk = (await wholeDisk(majorMinor(st.rdev))) ?? path;
    let fd: fsp.FileHandle;
    try {
      // O_NONBLOCK: the command path only; never the data path.
      fd = await fsp.open(disk, fsc.O_RDONLY | fsc.O_NONBLOCK);
    } catch (err) {
      return off(`cannot open ${disk} (${(err as { code?: string }).code ?? err})`);
    }
    for (const transport of ['sgio', 'hdio'] as const) {
      const probe = new DiskPower(disk, fd, transport);
      if ((await probe.state().catch(() => 'unknown' as const)) !== 'unknown') return probe;
    }
    await fd.close();
    return off(`${disk} takes neither ATA pass-through (SG_IO) nor HDIO_DRIVE_CMD (virtio, NVMe or a USB bridge without SAT?)`);
  }

  /** CHECK POWER MODE: does not wake the disk. */
  async state(): Promise<PowerState> {
    const r = await this.#command({ command: ATA.CHECK_POWER_MODE });
    return r ? powerStateFromCount(r.count) : 'unknown';
  }

  /** STANDBY IMMEDIATE: the disk flushes its write cache and spins down. */
  async standby(): Promise<void> {
    const r = await this.#command({ command: ATA.STANDBY_IMMEDIATE });
    if (r && r.status & 0x01) throw new DiskPowerError(`${this.path} refused STANDBY IMMEDIATE (ATA error 0x${r.error.toString(16)})`);
  }

  /** The drive's own standby timer, like hdparm -S (IDLE with a count: no spin-down now). */
  async setStandbyTimer(seconds: number): Promise<void> {
    const r = await this.#command({ command: ATA.IDLE, count: standbyTimerCount(seconds) });
    if (r && r.status & 0x01) throw new DiskPowerError(`${this.path} refused the standby timer (ATA error 0x${r.error.toString(16)})`);
  }

  /** Reads and writes completed on the disk, by anyone (/proc/diskstats); null if not found. */
  async ioCount(): Promise<number | null> {
    const name = basename(await fsp.realpath(this.path).catch(() => this.path));
    return diskIoCount(name);
  }

  async close(): Promise<void> {
    await this.#fd?.close().catch(() => undefined);
  }

  async #command(tf: AtaTaskfile): Promise<AtaResult | null> {
    if (!this.#fd || !this.transport) return null;
    if (this.transport === 'sgio') {
      const sense = Buffer.alloc(SENSE_BYTES);
      const r = await ataSgIo(this.#fd.fd, ataPassThrough16(tf), sense, 30_000);
      if (r.hostStatus !== 0) throw new DiskPowerError(`SG_IO to ${this.path}: host status 0x${r.hostStatus.toString(16)}`);
      const ret = decodeAtaReturn(sense, r.senseLength);
      if (!ret && r.status !== 0) throw new DiskPowerError(`SG_IO to ${this.path}: SCSI status 0x${r.status.toString(16)} without ATA registers`);
      return ret;
    }
    // HDIO_DRIVE_CMD (libata's ata_cmd_ioctl): [command, count, features, data sectors = 0];
    // back: [status, error, count].
    const args = Buffer.from([tf.command, tf.count ?? 0, tf.features ?? 0, 0]);
    await hdioDriveCmd(this.#fd.fd, args);
    return { status: args[0]!, error: args[1]!, count: args[2]! };
  }
}

/**
 * Reads plus writes completed on block device `name` (sda), from /proc/diskstats (fields 4 and 8,
 * Documentation/admin-guide/iostats.rst); null when it is not listed.
 */
export async function diskIoCount(name: string, diskstats = '/proc/diskstats'): Promise<number | null> {
  const text = await fsp.readFile(diskstats, 'utf8').catch(() => '');
  for (const line of text.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f[2] === name && f.length >= 11) return Number(f[3]) + Number(f[7]);
  }
  return null;
}

/** /dev/NAME of the disk a partition belongs to; undefined for a whole disk. */
async function wholeDisk(majMin: string): Promise<string | undefined> {
  const sys = `/sys/dev/block/${majMin}`;
  const isPartition = await fsp.access(join(sys, 'partition')).then(() => true, () => false);
  if (!isPartition) return undefined;
  const real = await fsp.realpath(sys).catch(() => null);
  return real ? `/dev/${basename(join(real, '..'))}` : undefined;
}

/**
 * Whether the machine runs on mains power: any online Mains (or USB-C PD) supply, or none at all
 * (a desktop or NAS has no power_supply entries of type Mains or Battery).
 */
export async function onAcPower(root = '/sys/class/power_supply'): Promise<boolean> {
  const names = await fsp.readdir(root).catch(() => [] as string[]);
  let sawBattery = false;
  for (const n of names) {
    const type = (await fsp.readFile(join(root, n, 'type'), 'utf8').catch(() => '')).trim();
    if (type === 'Battery') sawBattery = true;
    if (type !== 'Mains' && type !== 'USB') continue;
    const online = (await fsp.readFile(join(root, n, 'online'), 'utf8').catch(() => '0')).trim();
    if (online === '1') return true;
  }
  return !sawBattery;
}
