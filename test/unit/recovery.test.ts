/**
 * Pure parts of the recovery features: the damage report's merging, the
 * salvage wrapper's per-granule retry (over an in-memory driver with bad
 * granules), snapshot file names, qcow2 create planning.
 */
import { describe, expect, it } from 'vitest';
import { CorruptionError, QmountError } from '../../src/errors.js';
import type { BlockDriver } from '../../src/formats/driver.js';
import { planQcow2 } from '../../src/formats/qcow2/create.js';
import { snapshotFileNames } from '../../src/formats/qcow2/snapshot-open.js';
import type { Qcow2Snapshot } from '../../src/formats/qcow2/snapshot.js';
import { DamageReport, SalvageDriver } from '../../src/formats/salvage.js';

describe('DamageReport', () => {
  it('merges touching ranges of the same reason, keeps others apart, sorted', () => {
    const r = new DamageReport();
    const seen: number[] = [];
    r.onNew = (x) => seen.push(x.start);
    r.add(8192, 4096, 'a');
    r.add(0, 4096, 'a');
    r.add(4096, 4096, 'a');
    r.add(12288, 4096, 'b');
    r.add(0, 4096, 'a'); // known: not new
    expect(r.ranges()).toEqual([
      { start: 0, length: 12288, reason: 'a' },
      { start: 12288, length: 4096, reason: 'b' },
    ]);
    expect(r.bytes()).toBe(16384);
    expect(seen).toEqual([8192, 0, 4096, 12288]);
  });
});

/** 64 KiB of bytes i & 0xff; reads touching a bad 4 KiB granule fail with `err`. */
function fakeDriver(bad: Set<number>, err: () => Error): BlockDriver {
  const size = 65536;
  const data = Buffer.alloc(size);
  for (let i = 0; i < size; i++) data[i] = i & 0xff;
  const d = {
    format: 'raw',
    filename: 'fake',
    virtualSize: size,
    readOnly: true,
    read: async (buf: Buffer, off: number, len: number, pos: number) => {
      for (let g = Math.floor(pos / 4096); g * 4096 < pos + len; g++) if (bad.has(g)) throw err();
      data.copy(buf, off, pos, pos + len);
    },
    close: async () => {},
    info: () => ({ format: 'raw', filename: 'fake', virtualSize: size, features: [] }),
  };
  return d as unknown as BlockDriver;
}

describe('SalvageDriver', () => {
  it('serves good granules exactly, zeros and reports bad ones', async () => {
    const report = new DamageReport();
    const s = new SalvageDriver(fakeDriver(new Set([2, 3, 9]), () => new CorruptionError('broken')), report, 4096);
    const buf = Buffer.alloc(65536, 0xee);
    await s.read(buf, 0, 65536, 0);
    for (let i = 0; i < 65536; i++) {
      const g = Math.floor(i / 4096);
      const want = g === 2 || g === 3 || g === 9 ? 0 : i & 0xff;
      if (buf[i] !== want) throw new Error(`byte ${i}: ${buf[i]} != ${want}`);
    }
    expect(report.ranges()).toEqual([
      { start: 8192, length: 8192, reason: 'broken' },
      { start: 36864, length: 4096, reason: 'broken' },
    ]);
  });

  it('passes errors other than EIO on', async () => {
    const s = new SalvageDriver(fakeDriver(new Set([0]), () => new QmountError('EBADF', 'closed')), new DamageReport(), 4096);
    await expect(s.read(Buffer.alloc(4096), 0, 4096, 0)).rejects.toThrow(/closed/);
  });

  it('is read-only', async () => {
    const s = new SalvageDriver(fakeDriver(new Set(), () => new Error('x')), new DamageReport(), 4096);
    await expect(s.write()).rejects.toMatchObject({ errno: 'EROFS' });
  });
});

describe('snapshotFileNames', () => {
  const snap = (id: string, name: string) => ({ id, name }) as Qcow2Snapshot;
  it('NAME.raw for unique printable names, id-ID.raw otherwise, index-N.raw as the last resort', () => {
    const names = snapshotFileNames([
      snap('1', 'base'),
      snap('2', 'dup'),
      snap('3', 'dup'),
      snap('4', 'a/b'),
      snap('5', 'tab\there'),
      snap('6', ''),
      snap('7', '..'),
      snap('8', 'id-9'), // takes id-9.raw ...
      snap('9', 'x\ny'), // ... so snapshot 9 falls back to its index
      snap('1', 'same id'),
      snap('x/y', 'dup'),
    ]);
    expect(names).toEqual([
      'base.raw',
      'id-2.raw',
      'id-3.raw',
      'id-4.raw',
      'id-5.raw',
      'id-6.raw',
      'id-7.raw',
      'id-9.raw',
      'index-8.raw',
      'same id.raw',
      'index-10.raw',
    ]);
    expect(new Set(names).size).toBe(names.length);
  });
});

describe('planQcow2', () => {
  it('counts every cluster it refcounts: header, reftable, refblocks, L1, L2, data', () => {
    const p = planQcow2({ size: 100 * 1024 * 1024, clusterSize: 512, refcountBits: 64, preallocation: 'metadata' });
    // 512-byte clusters: 64 entries per L2 table, 64 refcounts (64-bit) per block.
    expect(p.dataClusters).toBe(204800);
    expect(p.l2Tables).toBe(3200);
    expect(p.refBlocks).toBe(Math.ceil(p.totalClusters / 64));
    expect(p.refTableClusters).toBe(Math.ceil((p.refBlocks * 8) / 512));
    expect(p.totalClusters).toBe(1 + p.refTableClusters + p.refBlocks + p.l1Clusters + p.l2Tables + p.dataClusters);
  });

  it('refuses what qemu-img refuses', () => {
    expect(() => planQcow2({ size: 1 << 20, version: 2, lazyRefcounts: true })).toThrow(/compatibility level 1\.1/);
    expect(() => planQcow2({ size: 1 << 20, extendedL2: true, clusterSize: 8192 })).toThrow(/16384/);
    expect(() => planQcow2({ size: 1 << 20, refcountBits: 3 })).toThrow(/power of two/);
  });
});
