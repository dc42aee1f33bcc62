// Disk power commands as bytes (src/writeback/power.ts): the ATA PASS-THROUGH(16) CDB, the result
// registers decoded from both sense formats, CHECK POWER MODE's states, the hdparm -S timer values.
// The SG_IO path itself needs an emulated ATA disk (a VM); this test covers everything around it.
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { ATA, ataPassThrough16, decodeAtaReturn, DiskPower, onAcPower, powerStateFromCount, standbyTimerCount, standbyTimerSeconds } from '../../src/writeback/power.js';

describe('ATA PASS-THROUGH(16)', () => {
  it('encodes CHECK POWER MODE as a non-data command asking for the registers back', () => {
    const cdb = ataPassThrough16({ command: ATA.CHECK_POWER_MODE });
    expect([...cdb]).toEqual([0x85, 0x06, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xe5, 0]);
  });

  it('puts count, features and LBA in the low bytes of each 16-bit field', () => {
    const cdb = ataPassThrough16({ command: ATA.IDLE, count: 120, features: 0x05, lba: 0x123456, device: 0x40 });
    expect(cdb[4]).toBe(0x05);
    expect(cdb[6]).toBe(120);
    expect([cdb[8], cdb[10], cdb[12]]).toEqual([0x56, 0x34, 0x12]);
    expect(cdb[13]).toBe(0x40);
    expect(cdb[14]).toBe(0xe3);
    expect([cdb[3], cdb[5], cdb[7], cdb[9], cdb[11]]).toEqual([0, 0, 0, 0, 0]);
  });
});

describe('ATA result registers from sense data', () => {
  it('reads the ATA Status Return descriptor of descriptor-format sense', () => {
    const sense = Buffer.alloc(32);
    sense[0] = 0x72;
    sense[1] = 0x01; // RECOVERED ERROR
    sense[2] = 0x00;
    sense[3] = 0x1d; // ATA PASS THROUGH INFORMATION AVAILABLE
    sense[7] = 14;
    sense.set([0x09, 0x0c, 0x00, 0x00, 0x00, 0xff, 0, 0, 0, 0, 0, 0, 0x40, 0x50], 8);
    expect(decodeAtaReturn(sense, 22)).toEqual({ error: 0, count: 0xff, status: 0x50 });
  });

  it('skips other descriptors before it', () => {
    const sense = Buffer.alloc(40);
    sense[0] = 0x72;
    sense[7] = 12 + 14;
    sense.set([0x00, 0x0a, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8); // information descriptor
    sense.set([0x09, 0x0c, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0x40, 0x51], 20);
    expect(decodeAtaReturn(sense, 34)).toEqual({ error: 0x04, count: 0x00, status: 0x51 });
  });

  it('reads fixed-format sense (error, status, device, count in INFORMATION)', () => {
    const sense = Buffer.alloc(18);
    sense[0] = 0x70;
    sense.set([0x00, 0x50, 0x40, 0x80], 3);
    expect(decodeAtaReturn(sense, 18)).toEqual({ error: 0, status: 0x50, count: 0x80 });
  });

  it('returns null for sense without ATA registers', () => {
    expect(decodeAtaReturn(Buffer.alloc(32), 0)).toBeNull();
    const sense = Buffer.alloc(32);
    sense[0] = 0x72;
    sense[7] = 0;
    expect(decodeAtaReturn(sense, 8)).toBeNull();
  });
});

describe('power states and the standby timer', () => {
  it('maps CHECK POWER MODE counts to states', () => {
    expect(powerStateFromCount(0x00)).toBe('standby');
    expect(powerStateFromCount(0x01)).toBe('standby');
    expect(powerStateFromCount(0x40)).toBe('standby');
    expect(powerStateFromCount(0x41)).toBe('active');
    expect(powerStateFromCount(0x80)).toBe('idle');
    expect(powerStateFromCount(0x83)).toBe('idle');
    expect(powerStateFromCount(0xff)).toBe('active');
    expect(powerStateFromCount(0x20)).toBe('unknown');
  });

  it('encodes timeouts as hdparm -S does, rounding up', () => {
    expect(standbyTimerCount(0)).toBe(0);
    expect(standbyTimerCount(1)).toBe(1);
    expect(standbyTimerCount(5)).toBe(1);
    expect(standbyTimerCount(600)).toBe(120);
    expect(standbyTimerCount(1200)).toBe(240);
    expect(standbyTimerCount(1201)).toBe(241);
    expect(standbyTimerCount(3600)).toBe(242);
    expect(standbyTimerCount(19800)).toBe(251);
    expect(standbyTimerCount(10 ** 6)).toBe(251);
    for (const s of [5, 300, 1200, 1800, 7200]) expect(standbyTimerSeconds(standbyTimerCount(s))).toBeGreaterThanOrEqual(s);
  });
});

describe('power control fallbacks', () => {
  it('turns itself off with one warning for a file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ulob-power-'));
    try {
      writeFileSync(join(dir, 'disk'), Buffer.alloc(4096));
      const lines: string[] = [];
      const logger = pino({ level: 'warn' }, { write: (l: string) => lines.push(l) });
      const p = await DiskPower.open(join(dir, 'disk'), logger);
      expect(p.supported).toBe(false);
      expect(await p.state()).toBe('unknown');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/not a block device/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reads AC power from power_supply: mains online, on battery, or no battery at all', async () => {
    const root = mkdtempSync(join(tmpdir(), 'ulob-ps-'));
    try {
      const supply = (name: string, type: string, online?: string) => {
        mkdirSync(join(root, name), { recursive: true });
        writeFileSync(join(root, name, 'type'), `${type}\n`);
        if (online !== undefined) writeFileSync(join(root, name, 'online'), `${online}\n`);
      };
      expect(await onAcPower(root)).toBe(true); // a desktop or NAS
      supply('BAT0', 'Battery');
      supply('AC', 'Mains', '0');
      expect(await onAcPower(root)).toBe(false);
      writeFileSync(join(root, 'AC', 'online'), '1\n');
      expect(await onAcPower(root)).toBe(true);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
