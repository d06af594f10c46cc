/**
 * --detect-zeroes (src/formats/zero-detect.ts): which part of a write becomes
 * writeZeroes (a recording fake driver), and on real QED and raw images that
 * zeros over unallocated clusters allocate nothing with `on`, data clusters
 * are freed with `unmap`, and `off` leaves writes alone; content always
 * equals what plain writes give.
 */
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { BlockDriver, BlockExtent, ImageInfo } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { isAllZero, withDetectZeroes } from '../../src/formats/zero-detect.js';
import { nativeZeroTest } from '../../src/io/fileops.js';
import { qemuCheck, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const log = pino({ level: 'silent' });

type Call = [string, number, number, boolean?];

function fake(size: number, clusterSize: number | undefined, readOnly = false): BlockDriver & { calls: Call[] } {
  const calls: Call[] = [];
  return {
    calls,
    format: 'qed',
    filename: 'fake',
    virtualSize: size,
    readOnly,
    read: () => Promise.resolve(),
    write: (_b, _o, len, g) => {
      calls.push(['write', g, len]);
      return Promise.resolve();
    },
    writeZeroes: (g, len, o) => {
      calls.push(['zeroes', g, len, o.unmap]);
      return Promise.resolve();
    },
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
    info: (): ImageInfo => ({ format: 'qed', filename: 'fake', virtualSize: size, clusterSize, features: [] }),
    blockStatus: (): Promise<BlockExtent[]> => Promise.resolve([]),
    resize: () => Promise.resolve(),
    allocatedBytes: () => 0,
  };
}

describe('isAllZero', () => {
  it('finds a non-zero byte anywhere, at step boundaries too', () => {
    const b = Buffer.alloc(3 * MiB + 7);
    expect(isAllZero(b, 0, b.length)).toBe(true);
    expect(isAllZero(b, 5, 0)).toBe(true);
    for (const at of [0, 1, MiB - 1, MiB, 2 * MiB + 3, b.length - 1]) {
      b[at] = 1;
      expect(isAllZero(b, 0, b.length), `byte ${at}`).toBe(false);
      expect(isAllZero(b, at + 1, b.length - at - 1), `after byte ${at}`).toBe(true);
      b[at] = 0;
    }
  });
});

describe('native/fileops isZero (the one-pass test isAllZero uses from 64 KiB)', () => {
  it('is built, and agrees with a byte scan at unaligned starts, block edges and the last byte', () => {
    const test = nativeZeroTest();
    expect(test).not.toBeNull();
    const b = Buffer.alloc(MiB + 300);
    const slow = (off: number, len: number): boolean => b.subarray(off, off + len).every((x) => x === 0);
    const ranges: Array<[number, number]> = [[0, b.length], [1, 255], [31, 257], [33, 64 * KiB], [7, MiB + 200], [b.length - 1, 1], [5, 0]];
    for (const at of [0, 1, 31, 32, 255, 256, 257, 64 * KiB - 1, MiB, b.length - 1]) {
      b[at] = 0x80;
      for (const [off, len] of ranges) expect(test!(b, off, len), `byte ${at}, range ${off}+${len}`).toBe(slow(off, len));
      b[at] = 0;
    }
    // Malformed: outside the buffer, negative.
    expect(test!(b, b.length, 1)).toBe(false);
    expect(test!(b, -1, 4)).toBe(false);
  });

  it('finds one set bit at every place the vector test splits a range (unaligned ends, short ranges, the last 32 bytes)', () => {
    const test = nativeZeroTest()!;
    const b = Buffer.alloc(8192 + 128);
    for (const len of [1, 31, 32, 33, 63, 64, 65, 95, 96, 97, 255, 256, 257, 288, 319, 4096, 8192]) {
      for (let off = 0; off < 64; off++) {
        expect(test(b, off, len), `zeros ${off}+${len}`).toBe(true);
        b[off - 1 < 0 ? b.length - 1 : off - 1] = 1;
        b[off + len] = 1; // just outside on both sides: not part of the range
        expect(test(b, off, len), `outside ${off}+${len}`).toBe(true);
        for (let at = 0; at < len; at += at < 40 || at > len - 40 ? 1 : 29) {
          b[off + at] = 1 << (at & 7);
          expect(test(b, off, len), `bit in byte ${at} of ${off}+${len}`).toBe(false);
          b[off + at] = 0;
        }
        b.fill(0);
      }
    }
  });
});

describe('withDetectZeroes (fake driver, 64 KiB clusters)', () => {
  const cs = 64 * KiB;
  it('off returns the driver itself', () => {
    const d = fake(MiB, cs);
    expect(withDetectZeroes(d, 'off')).toBe(d);
  });

  it('on: whole clusters of a zero write become writeZeroes(unmap false), the edges stay writes', async () => {
    const d = fake(4 * MiB, cs);
    const w = withDetectZeroes(d, 'on');
    const z = Buffer.alloc(3 * cs);
    await w.write(z, 0, 3 * cs, 0);
    await w.write(z, 0, 3 * cs - 100, 100);
    await w.write(z, 0, cs, 4096); // no whole cluster inside
    await w.write(z, 0, 1000, cs); // shorter than a cluster
    expect(d.calls).toEqual([
      ['zeroes', 0, 3 * cs, false],
      ['write', 100, cs - 100],
      ['zeroes', cs, 2 * cs, false],
      ['write', 4096, cs],
      ['write', cs, 1000],
    ]);
  });

  it('unmap: writeZeroes(unmap true); data, read-only drivers and bad ranges go to write unchanged', async () => {
    const d = fake(4 * MiB, cs);
    const w = withDetectZeroes(d, 'unmap');
    const z = Buffer.alloc(2 * cs);
    await w.write(z, 0, 2 * cs, 2 * cs);
    const data = Buffer.alloc(2 * cs);
    data[cs + 5] = 1;
    await w.write(data, 0, 2 * cs, 0);
    await w.write(z, 0, 2 * cs, 4 * MiB - cs); // past the end: the driver answers ENOSPC
    await w.write(z, 0, 2 * cs, -cs);
    expect(d.calls).toEqual([
      ['zeroes', 2 * cs, 2 * cs, true],
      ['write', 0, 2 * cs],
      ['write', 4 * MiB - cs, 2 * cs],
      ['write', -cs, 2 * cs],
    ]);
    const ro = fake(4 * MiB, cs, true);
    await withDetectZeroes(ro, 'unmap').write(z, 0, 2 * cs, 0);
    expect(ro.calls).toEqual([['write', 0, 2 * cs]]);
  });

  it('a disk whose size is not a multiple of the cluster: the last cluster is whole when the write reaches the end', async () => {
    const size = 4 * MiB + 512;
    const d = fake(size, cs);
    const z = Buffer.alloc(cs + 512);
    await withDetectZeroes(d, 'on').write(z, 0, z.length, 4 * MiB - cs);
    expect(d.calls).toEqual([['zeroes', 4 * MiB - cs, cs + 512, false]]);
  });

  it('raw (no cluster size): 4 KiB granules', async () => {
    const d = fake(MiB, undefined);
    await withDetectZeroes(d, 'on').write(Buffer.alloc(16 * KiB), 0, 16 * KiB, 2048);
    expect(d.calls).toEqual([
      ['write', 2048, 2048],
      ['zeroes', 4096, 12288, false],
      ['write', 16384, 2048],
    ]);
  });
});

describe('withDetectZeroes on real images', () => {
  let dir: string;
  let cleanup: () => void;
  beforeEach(() => ({ dir, cleanup } = scratchDir('detect-zeroes')));
  afterEach(() => cleanup());

  const dataBytes = (ext: BlockExtent[]): number => ext.filter((e) => e.data && e.depth === 0).reduce((n, e) => n + e.length, 0);

  it('QED: on allocates nothing for zeros over unallocated clusters, off does, unmap frees data clusters; contents equal', async () => {
    const results: Record<string, { data: number; content: Buffer; check: number }> = {};
    for (const mode of ['off', 'on', 'unmap'] as const) {
      const img = path.join(dir, `${mode}.qed`);
      qemuImg('create', '-q', '-f', 'qed', img, String(8 * MiB));
      qemuIo(img, 'qed', ['write -P 1 4M 1M']);
      const d = withDetectZeroes(await openImage(img, { readOnly: false, format: 'qed', log }), mode);
      await d.write(Buffer.alloc(MiB), 0, MiB, 0); // zeros over unallocated clusters
      await d.write(Buffer.alloc(512 * KiB + 1000), 0, 512 * KiB + 1000, 4 * MiB + 1000); // zeros over data
      const content = Buffer.alloc(8 * MiB);
      await d.read(content, 0, content.length, 0);
      const data = dataBytes(await d.blockStatus(0, d.virtualSize));
      await d.close();
      results[mode] = { data, content, check: qemuCheck(img, 'qed').code };
    }
    expect(results.off.data).toBe(2 * MiB);
    expect(results.on.data).toBe(MiB);
    expect(results.unmap.data).toBe(MiB - 448 * KiB); // 7 whole 64 KiB clusters freed
    expect(results.on.content.equals(results.off.content)).toBe(true);
    expect(results.unmap.content.equals(results.off.content)).toBe(true);
    expect([results.off.check, results.on.check, results.unmap.check]).toEqual([0, 0, 3]);
  });

  it('raw: unmap punches holes for zero writes (the file\'s allocation drops), on keeps the space', async () => {
    for (const mode of ['on', 'unmap'] as const) {
      const img = path.join(dir, `${mode}.raw`);
      fs.writeFileSync(img, Buffer.alloc(4 * MiB, 0x5a));
      const d = withDetectZeroes(await openImage(img, { readOnly: false, format: 'raw', log }), mode);
      await d.write(Buffer.alloc(2 * MiB), 0, 2 * MiB, MiB);
      await d.close();
      const blocks = fs.statSync(img).blocks * 512;
      if (mode === 'unmap') expect(blocks).toBeLessThanOrEqual(2 * MiB + 64 * KiB);
      else expect(blocks).toBeGreaterThanOrEqual(4 * MiB);
      const back = fs.readFileSync(img);
      expect(back.subarray(MiB, 3 * MiB).every((b) => b === 0)).toBe(true);
      expect(back.subarray(0, MiB).every((b) => b === 0x5a)).toBe(true);
    }
  });
});
