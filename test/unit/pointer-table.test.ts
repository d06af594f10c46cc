import { describe, expect, it } from 'vitest';
import { PendingPointers } from '../../src/formats/pointer-table.js';

/** A table of 8 entries, entry i = 100 + i (what the disk has too, at first). */
function table(): Buffer {
  const t = Buffer.alloc(64);
  for (let i = 0; i < 8; i++) t.writeBigUInt64BE(BigInt(100 + i), i * 8);
  return t;
}

const entries = (b: Buffer): number[] => Array.from({ length: b.length / 8 }, (_, i) => Number(b.readBigUInt64BE(i * 8)));

describe('PendingPointers', () => {
  it('writes the span of the entries whose target was written, with the old value for one whose target was not, then syncs', async () => {
    const t = table();
    const pp = new PendingPointers();
    for (const [i, target] of [[2, 9002], [3, 9003], [5, 9005]] as const) {
      pp.note(t, i, target);
      t.writeBigUInt64BE(BigInt(target), i * 8);
    }
    expect(pp.isNew(9003)).toBe(true);
    pp.written(9002);
    pp.written(9005);
    expect(pp.isNew(9002)).toBe(false);
    expect(pp.isNew(9003)).toBe(true);
    const log: string[] = [];
    const writes: Array<[number, number[]]> = [];
    const written = await pp.writeReady(
      t,
      async (span, first) => {
        log.push('write');
        writes.push([first, entries(span)]);
      },
      async () => {
        log.push('sync');
      },
    );
    expect(written).toBe(2);
    expect(log).toEqual(['write', 'sync']);
    expect(writes).toEqual([[2, [9002, 103, 104, 9005]]]); // entry 3 keeps the disk's value, 4 is unchanged
    expect(pp.size).toBe(1);
    // Next flush: the rest.
    writes.length = 0;
    pp.written(9003);
    expect(await pp.writeReady(t, async (span, first) => void writes.push([first, entries(span)]), async () => {})).toBe(1);
    expect(writes).toEqual([[3, [9003]]]);
    expect(pp.size).toBe(0);
  });

  it('writes and syncs nothing when no target was written; a failed write keeps every entry pending', async () => {
    const t = table();
    const pp = new PendingPointers();
    pp.note(t, 1, 7);
    t.writeBigUInt64BE(7n, 8);
    let calls = 0;
    expect(await pp.writeReady(t, async () => void calls++, async () => void calls++)).toBe(0);
    expect(calls).toBe(0);
    pp.written(7);
    await expect(pp.writeReady(t, async () => Promise.reject(new Error('EIO')), async () => {})).rejects.toThrow('EIO');
    expect(pp.size).toBe(1);
  });

  it('a second change of a pending entry keeps the value the disk had before the first', async () => {
    const t = table();
    const pp = new PendingPointers();
    pp.note(t, 4, 50);
    t.writeBigUInt64BE(50n, 32);
    pp.note(t, 4, 60);
    t.writeBigUInt64BE(60n, 32);
    pp.note(t, 6, 70);
    t.writeBigUInt64BE(70n, 48);
    const writes: Array<[number, number[]]> = [];
    // 60 not written: only entry 6 is.
    pp.written(70);
    await pp.writeReady(t, async (span, first) => void writes.push([first, entries(span)]), async () => {});
    expect(writes).toEqual([[6, [70]]]);
    // Now 4 is between written ones: note 2 and 6 again, both written -> 4 gets 104, its disk value before any change.
    pp.note(t, 2, 20);
    t.writeBigUInt64BE(20n, 16);
    pp.note(t, 6, 71);
    t.writeBigUInt64BE(71n, 48);
    pp.written(20);
    pp.written(71);
    writes.length = 0;
    await pp.writeReady(t, async (span, first) => void writes.push([first, entries(span)]), async () => {});
    expect(writes).toEqual([[2, [20, 103, 104, 105, 71]]]);
  });
});
