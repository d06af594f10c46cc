/**
 * The mount side of sparse files, against an in-memory driver
 * (test/helpers/mem-driver.ts): DiskService's lseek (SEEK_DATA/SEEK_HOLE),
 * fallocate modes, truncate and st_blocks, and the errno each case answers
 * (mount/sparse.ts has the rules). The real drivers and tools run in
 * test/e2e/sparse-mount.test.ts.
 */
import os from 'node:os';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import { DiskService } from '../../mount/service.js';
import { MountTree } from '../../mount/tree.js';
import { FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH, FALLOC_FL_ZERO_RANGE as ZERO, SEEK_DATA, SEEK_HOLE } from '../../mount/sparse.js';
import { configureLogging, logger } from '../../src/log.js';
import { MemDriver } from '../helpers/mem-driver.js';

const E = os.constants.errno;
const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const C = 64 * KiB;

beforeAll(() => configureLogging({ level: 'silent' }));

/** A service over a one-file tree (disk.raw = d), with its data ops bound to that file. */
function service(d: MemDriver, opts: { readOnly?: boolean; discard?: 'unmap' | 'ignore' } = {}) {
  const readOnly = opts.readOnly ?? false;
  const disk = new DiskService(MountTree.build([{ path: 'disk.raw', source: d }], { readOnly }), { readOnly, allowOther: false, discard: opts.discard, log: logger('test') });
  const published: Array<[number, number]> = [];
  disk.onAttrs = (_f, size, blocks) => published.push([size, blocks]);
  const f = disk.main;
  const svc = {
    get size() {
      return disk.size;
    },
    fileStat: () => disk.fileStat(f),
    lseek: (pos: number, whence: number) => disk.lseek(f, pos, whence),
    fallocate: (mode: number, pos: number, length: number) => disk.fallocate(f, mode, pos, length),
    truncate: (path: string, size: number) => disk.truncate(path, size),
    write: (buf: Buffer, off: number, len: number, pos: number) => disk.write(f, buf, off, len, pos),
  };
  return { svc, published };
}

function fill(d: MemDriver, pos: number, len: number, byte = 0xab): Promise<void> {
  return d.write(Buffer.alloc(len, byte), 0, len, pos);
}

async function readBack(d: MemDriver, pos: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await d.read(b, 0, len, pos);
  return b;
}

describe('lseek', () => {
  it('walks data and holes like the extents, EOF is a hole, ENXIO at and past the end', async () => {
    const d = new MemDriver(10 * GiB);
    await fill(d, 0, C);
    await fill(d, 5 * MiB, 3 * C);
    await fill(d, 7 * GiB + 5, 10);
    d.clusters.set(Math.floor(6 * MiB / C), 'zero'); // a zero cluster is a hole
    await fill(d, 10 * GiB - C, C);
    const { svc } = service(d);
    const walk: Array<[number, number]> = [];
    let pos = 0;
    for (;;) {
      const data = await svc.lseek(pos, SEEK_DATA);
      if (data === -E.ENXIO) break;
      expect(data).toBeGreaterThanOrEqual(0);
      const hole = await svc.lseek(data, SEEK_HOLE);
      walk.push([data, hole]);
      pos = hole;
      if (hole >= 10 * GiB) break;
    }
    expect(walk).toEqual([[0, C], [5 * MiB, 5 * MiB + 3 * C], [7 * GiB, 7 * GiB + C], [10 * GiB - C, 10 * GiB]]);
    expect(await svc.lseek(C / 2, SEEK_DATA)).toBe(C / 2); // inside data: the offset itself
    expect(await svc.lseek(C + 1, SEEK_HOLE)).toBe(C + 1);
    expect(await svc.lseek(10 * GiB, SEEK_DATA)).toBe(-E.ENXIO);
    expect(await svc.lseek(10 * GiB, SEEK_HOLE)).toBe(-E.ENXIO);
    expect(await svc.lseek(10 * GiB + 1, SEEK_HOLE)).toBe(-E.ENXIO);
    expect(await svc.lseek(0, 2 /* SEEK_END */)).toBe(-E.EINVAL);
  });

  it('a disk ending in data has its only hole at EOF; an empty one has no data (ENXIO)', async () => {
    const d = new MemDriver(4 * C);
    await fill(d, 0, 4 * C);
    const { svc } = service(d);
    expect(await svc.lseek(0, SEEK_HOLE)).toBe(4 * C);
    const e = new MemDriver(3 * GiB);
    const { svc: empty } = service(e);
    expect(await empty.lseek(0, SEEK_DATA)).toBe(-E.ENXIO);
    expect(await empty.lseek(12345, SEEK_HOLE)).toBe(12345);
    // Bounded windows: a 3 GiB empty disk takes a few calls, none larger than 4 GiB.
    expect(e.calls.length).toBeLessThan(10);
  });

  it('one block-status answer serves the lseeks after it, until anything changes', async () => {
    const d = new MemDriver(GiB);
    await fill(d, 10 * MiB, C);
    const { svc } = service(d);
    expect(await svc.lseek(0, SEEK_DATA)).toBe(10 * MiB);
    expect(d.calls.length).toBe(1);
    expect(await svc.lseek(10 * MiB, SEEK_HOLE)).toBe(10 * MiB + C);
    expect(d.calls.length).toBe(1); // answered from the first call's extents
    expect(await svc.lseek(10 * MiB + C, SEEK_DATA)).toBe(-E.ENXIO);
    const asked = d.calls.length;
    expect(asked).toBe(3); // the rest of the first window from the cache, then [256M, 768M) and [768M, 1G)
    // A write through the mount invalidates what was cached: the new data is found.
    expect(await svc.write(Buffer.alloc(10, 1), 0, 10, 500 * MiB)).toBe(10);
    expect(await svc.lseek(10 * MiB + C, SEEK_DATA)).toBe(500 * MiB);
    expect(d.calls.length).toBeGreaterThan(asked);
    // So does a discard.
    expect(await svc.fallocate(PUNCH | KEEP, 500 * MiB, C)).toBe(0);
    expect(await svc.lseek(10 * MiB + C, SEEK_DATA)).toBe(-E.ENXIO);
    // And a write that completes while a block-status call is under way keeps its answer out of the cache.
    const slow = d.blockStatus.bind(d);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    d.blockStatus = async (g, l) => {
      const r = await slow(g, l);
      await gate;
      return r;
    };
    const pending = svc.lseek(0, SEEK_DATA);
    await svc.write(Buffer.alloc(10, 1), 0, 10, 100 * MiB); // inside the window being asked about
    release();
    expect(await pending).toBe(10 * MiB);
    d.blockStatus = slow;
    expect(await svc.lseek(10 * MiB + C, SEEK_DATA)).toBe(100 * MiB);
  });

  it('a source without block status is one data extent', async () => {
    const d = new MemDriver(8 * C);
    d.noStatus = true;
    const { svc } = service(d);
    expect(await svc.lseek(100, SEEK_DATA)).toBe(100);
    expect(await svc.lseek(100, SEEK_HOLE)).toBe(8 * C);
  });
});

describe('fallocate', () => {
  it('PUNCH_HOLE|KEEP_SIZE zeros and unmaps (cut at the end of the disk); st_blocks drops and is published', async () => {
    const d = new MemDriver(16 * C);
    await fill(d, 0, 16 * C);
    const { svc, published } = service(d);
    expect(svc.fileStat().blocks).toBe(16 * C / 512);
    expect(await svc.fallocate(PUNCH | KEEP, C + 100, 3 * C)).toBe(0);
    expect(d.calls).toEqual([`writeZeroes ${C + 100} ${3 * C} unmap`]);
    const back = await readBack(d, C, 5 * C);
    expect(back.subarray(0, 100).every((b) => b === 0xab)).toBe(true);
    expect(back.subarray(100, 100 + 3 * C).every((b) => b === 0)).toBe(true);
    expect(back.subarray(100 + 3 * C).every((b) => b === 0xab)).toBe(true);
    expect(d.allocatedBytes()).toBe(14 * C); // clusters 2 and 3 whole; 1 and 4 zeroed in place
    expect(svc.fileStat().blocks).toBe(14 * C / 512);
    expect(published).toEqual([[16 * C, 14 * C / 512]]);
    // Past the end: only the part inside is zeroed; wholly past: nothing.
    expect(await svc.fallocate(PUNCH | KEEP, 15 * C, 10 * C)).toBe(0);
    expect(await svc.fallocate(PUNCH | KEEP, 20 * C, C)).toBe(0);
    expect(d.calls.slice(1)).toEqual([`writeZeroes ${15 * C} ${C} unmap`]);
    expect(d.virtualSize).toBe(16 * C);
  });

  it('--discard ignore: PUNCH_HOLE still reads back zeros but frees nothing', async () => {
    const d = new MemDriver(4 * C);
    await fill(d, 0, 4 * C);
    const { svc } = service(d, { discard: 'ignore' });
    expect(await svc.fallocate(PUNCH | KEEP, 0, 2 * C)).toBe(0);
    expect(d.calls).toEqual([`writeZeroes 0 ${2 * C} keep`]);
    expect((await readBack(d, 0, 2 * C)).every((b) => b === 0)).toBe(true);
  });

  it('ZERO_RANGE never unmaps; without KEEP_SIZE past the end it grows the disk (to a 512 multiple) first', async () => {
    const d = new MemDriver(4 * C);
    await fill(d, 0, 4 * C);
    const { svc, published } = service(d);
    expect(await svc.fallocate(ZERO | KEEP, 0, C)).toBe(0);
    expect(await svc.fallocate(ZERO, 3 * C, 2 * C + 1)).toBe(0);
    expect(d.calls).toEqual([`writeZeroes 0 ${C} keep`, `resize ${5 * C + 512}`, `writeZeroes ${3 * C} ${C} keep`]);
    expect(svc.size).toBe(5 * C + 512);
    expect(svc.fileStat().size).toBe(5 * C + 512);
    expect(published[published.length - 1]).toEqual([5 * C + 512, d.allocatedBytes() / 512]);
    expect(await svc.fallocate(ZERO | KEEP, 10 * C, C)).toBe(0);
    expect(svc.size).toBe(5 * C + 512);
  });

  it('mode 0 and KEEP_SIZE alone: nothing to do inside, growth past the end (mode 0 only)', async () => {
    const d = new MemDriver(4 * C);
    const { svc } = service(d);
    expect(await svc.fallocate(0, 0, 4 * C)).toBe(0);
    expect(await svc.fallocate(KEEP, 0, 8 * C)).toBe(0);
    expect(d.calls).toEqual([]);
    expect(await svc.fallocate(0, 4 * C, 1000)).toBe(0);
    expect(d.calls).toEqual([`resize ${4 * C + 1024}`]);
    expect(svc.size).toBe(4 * C + 1024);
  });

  it('refuses what Linux refuses, and everything on a read-only mount', async () => {
    const d = new MemDriver(4 * C);
    const { svc } = service(d);
    expect(await svc.fallocate(PUNCH, 0, C)).toBe(-E.EINVAL); // punch without KEEP_SIZE
    expect(await svc.fallocate(PUNCH | ZERO | KEEP, 0, C)).toBe(-E.EINVAL);
    expect(await svc.fallocate(0x08 /* COLLAPSE_RANGE */, 0, C)).toBe(-E.EOPNOTSUPP);
    expect(await svc.fallocate(0x20 /* INSERT_RANGE */, 0, C)).toBe(-E.EOPNOTSUPP);
    expect(await svc.fallocate(PUNCH | KEEP, 0, 0)).toBe(-E.EINVAL);
    expect(d.calls).toEqual([]);
    const { svc: ro } = service(new MemDriver(4 * C, C, true), { readOnly: true });
    expect(ro.fallocate(PUNCH | KEEP, 0, C)).toBe(-E.EROFS);
    expect(ro.truncate('/disk.raw', 8 * C)).toBe(-E.EROFS);
  });

  it('a 10 GiB discard reaches the driver in bounded pieces', async () => {
    const d = new MemDriver(10 * GiB);
    const { svc } = service(d);
    expect(await svc.fallocate(PUNCH | KEEP, 0, 10 * GiB)).toBe(0);
    expect(d.calls.length).toBe(10);
    expect(d.calls[9]).toBe(`writeZeroes ${9 * GiB} ${GiB} unmap`);
  });
});

describe('truncate', () => {
  it('grows; shrinks only over nothing allocated (EPERM otherwise); sizes must be 512 multiples (EINVAL)', async () => {
    const d = new MemDriver(4 * C);
    await fill(d, 0, C);
    const { svc, published } = service(d);
    expect(await svc.truncate('/disk.raw', 4 * C + GiB)).toBe(0);
    expect(svc.size).toBe(4 * C + GiB);
    expect(published).toEqual([[4 * C + GiB, C / 512]]);
    expect(await svc.truncate('/disk.raw', 2 * C)).toBe(0); // nothing stored past 2C
    expect(await svc.truncate('/disk.raw', C / 2)).toBe(-E.EPERM);
    expect(await svc.truncate('/disk.raw', 3 * C + 1)).toBe(-E.EINVAL);
    expect(svc.size).toBe(2 * C);
    expect(svc.truncate('/disk.raw', 2 * C)).toBe(0); // the current size: no driver call
    expect(d.calls).toEqual([`resize ${4 * C + GiB}`, `resize ${2 * C}`, `resize ${C / 2}`, `resize ${3 * C + 1}`]);
    // Reads and writes follow the new size.
    expect(svc.write(Buffer.alloc(10), 0, 10, 2 * C)).toBe(-E.ENOSPC);
  });

  it('an allocation that changes without a request (a background count) is published by the next refresh', async () => {
    vi.useFakeTimers();
    try {
      const d = new MemDriver(8 * C);
      const { published } = service(d);
      await d.write(Buffer.alloc(10, 1), 0, 10, 0); // behind the service's back
      expect(published).toEqual([]);
      vi.advanceTimersByTime(1000);
      expect(published).toEqual([[8 * C, C / 512]]);
      vi.advanceTimersByTime(5000);
      expect(published.length).toBe(1); // unchanged: nothing more
    } finally {
      vi.useRealTimers();
    }
  });

  it('st_blocks follows writes (published before the write is answered)', async () => {
    const d = new MemDriver(8 * C);
    const { svc, published } = service(d);
    expect(svc.fileStat().blocks).toBe(0);
    expect(await svc.write(Buffer.alloc(100, 1), 0, 100, 3 * C)).toBe(100);
    expect(published).toEqual([[8 * C, C / 512]]);
    expect(await svc.write(Buffer.alloc(100, 1), 0, 100, 3 * C + 200)).toBe(100);
    expect(published.length).toBe(1); // unchanged: nothing published
  });
});
