/**
 * The BlockDriver contract (src/formats/driver.ts), run over every driver:
 * one errno per kind of bad request, zero-length requests, requests at and
 * across the end, close twice, I/O after close, and the buffer-lifetime rule;
 * the sparse-image calls (blockStatus, writeZeroes, resize, allocatedBytes).
 * Images are made by qemu-img; each driver gets a fresh one per test.
 */
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errnoOf as errnoName, QmountError } from '../../src/errors.js';
import type { BlockDriver, BlockExtent, FormatName } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { ImageFile } from '../../src/io/file.js';
import { instrumentation } from '../../src/io/instrument.js';
import { patternBytes, qemuCheck, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';

const KiB = 1024;
const SIZE = 4 * 1024 * KiB;
const log = pino({ level: 'silent' });

interface DriverCase {
  name: string;
  format: FormatName;
  build(p: string): void;
}

const DRIVERS: DriverCase[] = [
  {
    name: 'raw',
    format: 'raw',
    build: (p) => fs.writeFileSync(p, patternBytes(SIZE, 1)),
  },
  {
    name: 'qcow2',
    format: 'qcow2',
    build: (p) => {
      qemuImg('create', '-q', '-f', 'qcow2', p, String(SIZE));
      qemuIo(p, 'qcow2', ['write -P 0x11 0 128k', `write -P 0x22 ${SIZE - 64 * KiB} 64k`]);
    },
  },
  {
    name: 'qcow2 v2, 512-byte clusters',
    format: 'qcow2',
    build: (p) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', p, String(SIZE));
      qemuIo(p, 'qcow2', ['write -P 0x11 0 128k']);
    },
  },
  {
    name: 'qed',
    format: 'qed',
    build: (p) => {
      qemuImg('create', '-q', '-f', 'qed', p, String(SIZE));
      qemuIo(p, 'qed', ['write -P 0x11 0 128k', `write -P 0x22 ${SIZE - 64 * KiB} 64k`]);
    },
  },
];

let scratch: { dir: string; cleanup: () => void };
let n = 0;
beforeAll(() => (scratch = scratchDir('contract')));
afterAll(() => {
  instrumentation.clearFaults();
  scratch?.cleanup();
});

/** The errno a request rejected with (a QmountError's, or an I/O error's code), null if it resolved. */
async function errnoOf(p: Promise<unknown>): Promise<string | null> {
  try {
    await p;
    return null;
  } catch (err) {
    expect((err as Error).message).not.toContain('\n');
    if (err instanceof QmountError) return err.errno;
    expect(err, String(err)).toHaveProperty('code');
    return errnoName(err);
  }
}

/**
 * The driver as the mount service calls it: sendNow, then readNow, for
 * reads and writeNow for writes first where the driver has them, read() /
 * write() when they decline. The contract
 * must hold through both (the fast paths answer the same, throw the same).
 */
function viaNow(d: BlockDriver, used: { read: number; write: number; send: number }): BlockDriver {
  const attempt = (op: 'read' | 'write', now: BlockDriver['readNow'], slow: BlockDriver['read']): BlockDriver['read'] => (buf, bufOffset, length, guestOffset) => {
    try {
      if (now?.call(d, buf, bufOffset, length, guestOffset)) {
        used[op]++;
        return Promise.resolve();
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return slow.call(d, buf, bufOffset, length, guestOffset);
  };
  // Large reads: sendNow first (as the fuse3 backend does), its sink reading the file the way the binding's splice does (all of it, or the test fails).
  const viaSend: BlockDriver['read'] = (buf, bufOffset, length, guestOffset) => {
    if (length < 64 * KiB) return readNowFirst(buf, bufOffset, length, guestOffset);
    try {
      const sink = {
        send(fd: number, position: number, len: number): boolean {
          expect(len).toBe(length);
          expect(fs.readSync(fd, buf, bufOffset, len, position), 'the sink read less than it was promised').toBe(len);
          return true;
        },
      };
      if (d.sendNow?.(length, guestOffset, sink)) {
        used.send++;
        return Promise.resolve();
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return readNowFirst(buf, bufOffset, length, guestOffset);
  };
  const readNowFirst = attempt('read', d.readNow, d.read);
  const read = viaSend;
  const write = attempt('write', d.writeNow, d.write);
  return new Proxy(d, {
    get(target, prop) {
      if (prop === 'read') return read;
      if (prop === 'write') return write;
      const v: unknown = Reflect.get(target, prop, target);
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}

const CASES = DRIVERS.flatMap((d) => [
  { ...d, api: 'promises' as const },
  { ...d, api: 'sendNow/readNow/writeNow first' as const },
]);

describe.each(CASES)('BlockDriver contract: $name, $api', (dc) => {
  let image: string;
  const used = { read: 0, write: 0, send: 0 };
  const open = async (readOnly: boolean): Promise<BlockDriver> => {
    const d = await openImage(image, { readOnly, format: dc.format, log });
    return dc.api === 'promises' ? d : viaNow(d, used);
  };

  afterAll(() => {
    // The fast paths were taken (every driver here has them).
    if (dc.api !== 'promises') {
      expect(used.read).toBeGreaterThan(0);
      expect(used.write).toBeGreaterThan(0);
      // (512-byte clusters: an L2 table maps 32 KiB, and no read of 64 KiB or more lies inside one)
      if (!dc.name.includes('512-byte')) expect(used.send).toBeGreaterThan(0);
    }
  });

  beforeAll(() => {
    image = path.join(scratch.dir, `img-${n++}`);
    dc.build(image);
  });

  it('refuses malformed requests with EINVAL, reads past the end with EINVAL and writes past it with ENOSPC, writing nothing', async () => {
    const before = fs.readFileSync(image);
    const d = await open(false);
    const buf = Buffer.alloc(8192, 0x77);
    try {
      expect(d.virtualSize).toBe(SIZE);
      const bad: Array<[string, number, number]> = [
        ['negative offset', -512, 512],
        ['fractional offset', 0.5, 512],
        ['NaN offset', NaN, 512],
        ['null offset', null as unknown as number, 512],
        ['unsafe offset', 2 ** 55, 512],
        ['negative length', 0, -1],
        ['fractional length', 0, 1.5],
      ];
      for (const [what, off, len] of bad) {
        expect(await errnoOf(d.read(buf, 0, len, off)), `read, ${what}`).toBe('EINVAL');
        expect(await errnoOf(d.write(buf, 0, len, off)), `write, ${what}`).toBe('EINVAL');
      }
      expect(await errnoOf(d.read(buf, 0, 1024, SIZE - 512)), 'read crossing the end').toBe('EINVAL');
      expect(await errnoOf(d.read(buf, 0, 512, SIZE)), 'read at the end').toBe('EINVAL');
      expect(await errnoOf(d.write(buf, 0, 1024, SIZE - 512)), 'write crossing the end').toBe('ENOSPC');
      expect(await errnoOf(d.write(buf, 0, 512, SIZE)), 'write at the end').toBe('ENOSPC');
      // zero length: nothing, anywhere in [0, size]
      for (const off of [0, 4096, SIZE]) {
        expect(await errnoOf(d.read(buf, 0, 0, off)), `empty read at ${off}`).toBeNull();
        expect(await errnoOf(d.write(buf, 0, 0, off)), `empty write at ${off}`).toBeNull();
      }
      expect(buf.every((b) => b === 0x77)).toBe(true);
      // the last byte of the disk is readable and writable
      const last = Buffer.alloc(512, 0x99);
      expect(await errnoOf(d.write(last, 0, 512, SIZE - 512))).toBeNull();
      const back = Buffer.alloc(512);
      await d.read(back, 0, 512, SIZE - 512);
      expect(back).toEqual(last);
      await d.write(before.subarray(0, 0), 0, 0, 0);
    } finally {
      await d.close();
    }
    if (dc.format === 'raw') {
      // Nothing but the one valid write reached the file (a negative offset once wrote at 0).
      const after = fs.readFileSync(image);
      expect(after.subarray(0, SIZE - 512).equals(before.subarray(0, SIZE - 512))).toBe(true);
    }
  });

  it('a read-only driver refuses every write with EROFS, before looking at the range', async () => {
    const d = await open(true);
    try {
      expect(d.readOnly).toBe(true);
      for (const [off, len] of [[0, 512], [-512, 512], [SIZE, 512], [0, 0]] as const) {
        expect(await errnoOf(d.write(Buffer.alloc(512), 0, len, off)), `write at ${off}`).toBe('EROFS');
      }
      expect(await errnoOf(d.flush())).toBeNull();
    } finally {
      await d.close();
    }
  });

  it('close is idempotent; read, write and flush after close reject with EBADF', async () => {
    for (const readOnly of [true, false]) {
      const d = await open(readOnly);
      await d.close();
      await d.close();
      const buf = Buffer.alloc(512);
      expect(await errnoOf(d.read(buf, 0, 512, 0)), 'read').toBe('EBADF');
      expect(await errnoOf(d.write(buf, 0, 512, 0)), 'write').toBe('EBADF');
      expect(await errnoOf(d.flush()), 'flush').toBe('EBADF');
    }
  });

  it('uses the caller\'s buffer only until its promise settles, also when it rejects', async () => {
    // Every file I/O is slowed down and counted: when a request settles, none of its I/O may be outstanding.
    const proto = ImageFile.prototype;
    const orig = { read: proto.read, write: proto.write, writeZeroes: proto.writeZeroes };
    let outstanding = 0;
    const slow = <T>(p: Promise<T>): Promise<T> => {
      outstanding++;
      const settle = (): Promise<void> => new Promise<void>((r) => setTimeout(r, 5)).then(() => void outstanding--);
      return p.then(
        (v) => settle().then(() => v),
        (e: unknown) => settle().then(() => Promise.reject(e)),
      );
    };
    proto.read = function (this: ImageFile, ...a: Parameters<ImageFile['read']>) {
      return slow(orig.read.apply(this, a));
    };
    proto.write = function (this: ImageFile, ...a: Parameters<ImageFile['write']>) {
      return slow(orig.write.apply(this, a));
    };
    proto.writeZeroes = function (this: ImageFile, ...a: Parameters<ImageFile['writeZeroes']>) {
      return slow(orig.writeZeroes.apply(this, a));
    };
    let step = 0;
    const settled = async (p: Promise<unknown>): Promise<string | null> => {
      step++;
      const e = await errnoOf(p);
      expect(outstanding, `file I/O still outstanding when the request settled (${step})`).toBe(0);
      return e;
    };
    const d = await open(false);
    try {
      const data = patternBytes(192 * KiB, 9);
      expect(await settled(d.write(Buffer.from(data), 0, data.length, 2048 * KiB + 512))).toBeNull(); // several new clusters
      const back = Buffer.alloc(data.length);
      expect(await settled(d.read(back, 0, back.length, 2048 * KiB + 512))).toBeNull();
      expect(back.equals(data)).toBe(true);
      // The in-place part of a request fails (data_write) while its part in new
      // clusters is written elsewhere in the file (raw: one write, failing).
      instrumentation.setFaults([{ point: 'data_write', errno: 'EIO', times: 1 }]);
      const doomed = patternBytes(256 * KiB, 3);
      expect(await settled(d.write(doomed, 0, doomed.length, 128 * KiB - 4096))).toBe('EIO');
      instrumentation.clearFaults();
      // A read crossing data, holes and (qcow2) several L2 lookups.
      const all = Buffer.alloc(SIZE);
      expect(await settled(d.read(all, 0, SIZE, 0))).toBeNull();
      expect(await settled(d.flush())).toBeNull();
    } finally {
      Object.assign(proto, orig);
      instrumentation.clearFaults();
      await d.close();
    }
  });

  // ---- sparse images (issue 13) ----

  /** The image's qemu-img check: 0, or 3 (leaked clusters) where the format keeps no free-space record (QED). */
  const expectCheckClean = (): void => {
    const r = qemuCheck(image, dc.format);
    if (dc.format === 'raw') return;
    expect([0, ...(dc.format === 'qed' ? [3] : [])], r.output).toContain(r.code);
  };

  /** Extents cover [off, off + len) exactly, in order, merged; zero extents read as zeros. */
  const expectCoverage = async (d: BlockDriver, ext: BlockExtent[], off: number, len: number): Promise<void> => {
    let at = off;
    for (const [i, e] of ext.entries()) {
      expect(e.guestOffset, `extent ${i} starts where the last ended`).toBe(at);
      expect(e.length).toBeGreaterThan(0);
      expect(e.depth).toBe(0); // no backing file here
      if (e.data) expect(e.present).toBe(true);
      at += e.length;
      const prev = ext[i - 1];
      if (prev) {
        const same = prev.data === e.data && prev.zero === e.zero && prev.present === e.present && prev.depth === e.depth;
        const hostContinues = prev.hostOffset === undefined ? e.hostOffset === undefined : e.hostOffset === prev.hostOffset + prev.length;
        expect(same && hostContinues, `extents ${i - 1} and ${i} are not merged: ${JSON.stringify([prev, e])}`).toBe(false);
      }
      if (e.zero) {
        const b = Buffer.alloc(e.length);
        await d.read(b, 0, e.length, e.guestOffset);
        expect(b.every((x) => x === 0), `zero extent at ${e.guestOffset} reads zeros`).toBe(true);
      }
    }
    expect(at).toBe(off + len);
  };

  it('blockStatus covers exactly the range asked, merged, data where written; EINVAL out of range; EBADF after close', async () => {
    const d = await open(false);
    try {
      await d.write(patternBytes(64 * KiB, 5), 0, 64 * KiB, 1024 * KiB);
      for (const [off, len] of [[0, SIZE], [512, 4096], [1024 * KiB + 512, 1536], [SIZE - 512, 512], [3 * KiB, 2 * 1024 * KiB]]) {
        await expectCoverage(d, await d.blockStatus(off, len), off, len);
      }
      const written = await d.blockStatus(1024 * KiB, 64 * KiB);
      expect(written.every((e) => e.data && !e.zero && e.present), JSON.stringify(written)).toBe(true);
      expect(await d.blockStatus(4096, 0)).toEqual([]);
      expect(await d.blockStatus(SIZE, 0)).toEqual([]);
      for (const [off, len] of [[SIZE, 512], [SIZE - 512, 1024], [-512, 512], [0.5, 512], [0, -1], [NaN, 512]]) {
        expect(await errnoOf(d.blockStatus(off, len)), `blockStatus(${off}, ${len})`).toBe('EINVAL');
      }
    } finally {
      await d.close();
    }
    expect(await errnoOf(d.blockStatus(0, 512))).toBe('EBADF');
    const ro = await open(true);
    try {
      await expectCoverage(ro, await ro.blockStatus(0, SIZE), 0, SIZE);
    } finally {
      await ro.close();
    }
  });

  it('writeZeroes makes the range read zeros (unmap or not, whole and partial clusters), neighbours kept, durable', async () => {
    const d = await open(false);
    const expected = Buffer.alloc(SIZE);
    try {
      await d.write(patternBytes(256 * KiB, 7), 0, 256 * KiB, 2048 * KiB);
      await d.read(expected, 0, SIZE, 0);
      const ranges: Array<[number, number, boolean]> = [
        [2048 * KiB + 512, 1024, false], // inside one cluster
        [2048 * KiB + 60 * KiB, 136 * KiB, true], // partial, whole clusters, partial
        [2048 * KiB + 200 * KiB, 56 * KiB, false],
        [0, 128 * KiB, true], // existing data (qemu-io's, for the images)
        [3072 * KiB, 256 * KiB, true], // nothing there
        [SIZE - 4096, 4096, false], // the last bytes
      ];
      for (const [off, len, unmap] of ranges) {
        expect(await errnoOf(d.writeZeroes(off, len, { unmap })), `writeZeroes(${off}, ${len}, unmap ${unmap})`).toBeNull();
        expected.fill(0, off, off + len);
      }
      const back = Buffer.alloc(SIZE);
      await d.read(back, 0, SIZE, 0);
      expect(back.equals(expected)).toBe(true);
      await expectCoverage(d, await d.blockStatus(0, SIZE), 0, SIZE);
      // zero length: nothing, anywhere in [0, size]
      for (const off of [0, 4096, SIZE]) expect(await errnoOf(d.writeZeroes(off, 0, { unmap: true }))).toBeNull();
      expect(await errnoOf(d.writeZeroes(SIZE - 512, 1024, { unmap: true })), 'crossing the end').toBe('ENOSPC');
      expect(await errnoOf(d.writeZeroes(SIZE, 512, { unmap: false })), 'at the end').toBe('ENOSPC');
      expect(await errnoOf(d.writeZeroes(-512, 512, { unmap: false }))).toBe('EINVAL');
      expect(await errnoOf(d.writeZeroes(0, 1.5, { unmap: false }))).toBe('EINVAL');
    } finally {
      await d.close();
    }
    expect(await errnoOf(d.writeZeroes(0, 512, { unmap: true }))).toBe('EBADF');
    expectCheckClean();
    const again = await open(true);
    try {
      const back = Buffer.alloc(SIZE);
      await again.read(back, 0, SIZE, 0);
      expect(back.equals(expected)).toBe(true);
      for (const [off, len] of [[0, 512], [-1, 512], [SIZE, 512], [0, 0]]) {
        expect(await errnoOf(again.writeZeroes(off, len, { unmap: true })), `read-only, at ${off}`).toBe('EROFS');
      }
    } finally {
      await again.close();
    }
  });

  it('resize grows (new part reads zeros, durable), shrinks only with no data past the new end (EPERM), refuses bad sizes (EINVAL) and read-only (EROFS)', async () => {
    const d = await open(false);
    const grown = SIZE + 1024 * KiB;
    try {
      expect(await errnoOf(d.resize(grown))).toBeNull();
      expect(d.virtualSize).toBe(grown);
      expect(d.info().virtualSize).toBe(grown);
      const tail = Buffer.alloc(1024 * KiB, 0x55);
      await d.read(tail, 0, tail.length, SIZE);
      expect(tail.every((x) => x === 0)).toBe(true);
      const st = await d.blockStatus(SIZE, 1024 * KiB);
      expect(st.every((e) => !e.data && e.zero), JSON.stringify(st)).toBe(true);
      // the new part is writable
      await d.write(Buffer.alloc(4096, 0x66), 0, 4096, grown - 4096);
      expect(await errnoOf(d.resize(SIZE)), 'shrinking over data').toBe('EPERM');
      expect(d.virtualSize).toBe(grown);
      // after discarding the data past the new end, the shrink is allowed
      await d.writeZeroes(SIZE, grown - SIZE, { unmap: true });
      expect(await errnoOf(d.resize(SIZE))).toBeNull();
      expect(d.virtualSize).toBe(SIZE);
      expect(await errnoOf(d.read(Buffer.alloc(512), 0, 512, SIZE))).toBe('EINVAL');
      expect(await errnoOf(d.resize(grown))).toBeNull();
      const again = Buffer.alloc(4096, 0x55);
      await d.read(again, 0, 4096, grown - 4096);
      expect(again.every((x) => x === 0), 'shrunk and regrown: zeros, not the old data').toBe(true);
      for (const bad of [-512, 1000, 0.5, NaN, 2 ** 60]) expect(await errnoOf(d.resize(bad)), `resize(${bad})`).toBe('EINVAL');
      expect(await errnoOf(d.resize(grown))).toBeNull(); // same size: nothing
    } finally {
      await d.close();
    }
    expect(await errnoOf(d.resize(SIZE))).toBe('EBADF');
    expectCheckClean();
    const ro = await open(true);
    try {
      expect(ro.virtualSize).toBe(grown);
      expect(await errnoOf(ro.resize(grown + 1024 * KiB))).toBe('EROFS');
      expect(ro.virtualSize).toBe(grown);
    } finally {
      await ro.close();
    }
  });

  /**
   * allocatedBytes() once the driver's count is exact: it may be an estimate
   * until a background count is done (the contract), so flush and ask again
   * until two answers agree.
   */
  const settledAllocated = async (d: BlockDriver): Promise<number> => {
    let last = d.allocatedBytes();
    for (let i = 0; i < 100; i++) {
      await d.flush();
      await new Promise((r) => setImmediate(r));
      const now = d.allocatedBytes();
      if (now === last) return now;
      last = now;
    }
    throw new Error(`allocatedBytes() never settled (last ${last})`);
  };

  it('allocatedBytes grows with new data and does not grow when data is discarded', async () => {
    const d = await open(false);
    try {
      const a0 = await settledAllocated(d);
      expect(Number.isSafeInteger(a0) && a0 >= 0).toBe(true);
      await d.write(patternBytes(512 * KiB, 11), 0, 512 * KiB, 1536 * KiB);
      const a1 = await settledAllocated(d);
      if (dc.format !== 'raw') expect(a1).toBeGreaterThanOrEqual(a0 + 512 * KiB); // raw: the file was full already
      expect(a1).toBeGreaterThanOrEqual(a0);
      await d.writeZeroes(1536 * KiB, 512 * KiB, { unmap: true });
      const a2 = await settledAllocated(d);
      expect(a2).toBeLessThanOrEqual(a1);
      expect(a2).toBeLessThanOrEqual(a1 - 512 * KiB); // the discarded clusters (raw: the punched hole) count no more
    } finally {
      await d.close();
    }
  });
});
