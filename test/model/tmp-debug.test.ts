import { it } from 'vitest';
import { runUloopModel } from '../support/uloop-model.js';
const C = { blockSize: 4096, blocks: 8, tail: 0, zero: true, budgetBlocks: 4, unitBlocks: 2 };
it('read', () => runUloopModel(C, { seed: 1, steps: [{ op: { kind: 'read', sector: 0, count: 8 } }] }), 10000);
it('read all', () => runUloopModel(C, { seed: 1, steps: [{ op: { kind: 'read', sector: 0, count: 24 } }, { op: { kind: 'read', sector: 24, count: 24 } }] }), 10000);
it('write then read', () => runUloopModel(C, { seed: 1, steps: [{ op: { kind: 'write', sector: 0, count: 40, fua: false } }, { op: { kind: 'read', sector: 40, count: 24 } }] }), 10000);
it('zero', () => runUloopModel(C, { seed: 1, steps: [{ op: { kind: 'zero', sector: 0, count: 16 } }, { op: { kind: 'read', sector: 0, count: 16 } }] }), 10000);
it('evict', () => runUloopModel(C, { seed: 1, steps: [{ op: { kind: 'read', sector: 0, count: 16 } }, { op: { kind: 'evict', blocks: 2 } }, { op: { kind: 'read', sector: 0, count: 16 } }] }), 10000);
it('writeback', () => runUloopModel(C, { seed: 1, steps: [{ op: { kind: 'write', sector: 0, count: 16, fua: false } }, { op: { kind: 'writeback' } }] }), 10000);
