// The daemon wraps the disk's Source twice (DiskHealth.watch for status, observeReads for the
// flush policy's "the disk is spinning"). A wrapper that lists methods by hand silently drops the
// ones it forgets (the flusher's writeMany/zeroAt fast paths were lost once that way): every method
// of the wrapped source must still be there, reach the original with its own `this`, and a method
// the source lacks must stay absent (callers test for it to pick their fallback).
import { describe, expect, it } from 'vitest';
import { DiskHealth } from '../../src/source/health.js';
import { observeReads, type WritableSource } from '../../src/source/source.js';

/** A class-based source (methods on the prototype, private state) with every optional method and one no interface has yet. */
class FullSource implements WritableSource {
  readonly size = 1 << 20;
  readonly id = 'full';
  readonly description = 'full test disk';
  readonly sectorSize = { logical: 512, physical: 4096 };
  readonly calls: string[] = [];
  #io(name: string): Promise<void> {
    this.calls.push(name);
    return Promise.resolve();
  }
  readAt(): Promise<void> { return this.#io('readAt'); }
  copyInto(): Promise<void> { return this.#io('copyInto'); }
  streamInto(): Promise<void> { return this.#io('streamInto'); }
  writeAt(): Promise<void> { return this.#io('writeAt'); }
  writeMany(): Promise<void> { return this.#io('writeMany'); }
  zeroAt(): Promise<void> { return this.#io('zeroAt'); }
  sync(): Promise<void> { return this.#io('sync'); }
  close(): Promise<void> { return this.#io('close'); }
  stats(): Record<string, number> { this.calls.push('stats'); return { n: this.calls.length }; }
  present(): boolean { this.calls.push('present'); return true; }
  /** Stands for a method added to Source after the wrappers were written. */
  discardAt(): Promise<void> { return this.#io('discardAt'); }
}

function methodNames(obj: object): string[] {
  const names = new Set<string>();
  for (let o: object | null = obj; o && o !== Object.prototype; o = Object.getPrototypeOf(o)) {
    for (const k of Object.getOwnPropertyNames(o)) {
      if (k !== 'constructor' && typeof (obj as Record<string, unknown>)[k] === 'function') names.add(k);
    }
  }
  return [...names].sort();
}

const wrappers: Array<[string, (s: WritableSource) => WritableSource]> = [
  ['DiskHealth.watch', (s) => new DiskHealth().watch(s) as WritableSource],
  ['observeReads', (s) => observeReads(s, () => undefined) as WritableSource],
  ['both, as the daemon stacks them', (s) => observeReads(new DiskHealth().watch(s), () => undefined) as WritableSource],
];

describe.each(wrappers)('%s', (_name, wrap) => {
  it('keeps every method and property of the source, each reaching the original with its own this', async () => {
    const src = new FullSource();
    const wrapped = wrap(src) as unknown as Record<string, unknown>;
    const names = methodNames(src);
    expect(names.length).toBe(11);
    expect(methodNames(wrapped)).toEqual(names);
    for (const name of names) {
      src.calls.length = 0;
      await (wrapped[name] as (...a: unknown[]) => unknown)(Buffer.alloc(8), 0, 0);
      expect(src.calls, name).toEqual([name]);
    }
    for (const key of ['size', 'id', 'description', 'sectorSize'] as const) expect(wrapped[key]).toEqual(src[key]);
  });

  it('leaves a method the source lacks absent (callers pick their fallback by it)', () => {
    const io = async () => undefined;
    const bare: WritableSource = { size: 4096, id: 'bare', description: 'bare', readAt: io, writeAt: io, sync: io, close: io };
    const wrapped = wrap(bare);
    for (const name of ['copyInto', 'streamInto', 'writeMany', 'zeroAt', 'stats', 'present', 'sectorSize']) {
      expect(name in wrapped, name).toBe(false);
      expect((wrapped as unknown as Record<string, unknown>)[name], name).toBeUndefined();
    }
    expect(methodNames(wrapped)).toEqual(['close', 'readAt', 'sync', 'writeAt']);
  });
});
