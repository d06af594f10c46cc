/**
 * QED writes at engine level: random writes against a raw model, then QEMU
 * checks the image (`qemu-img check` exit 0: no leaks, no corruption) and
 * compares it with the model; the need-check bit read from disk at each
 * step; the write order of an allocation; fault points.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { errnoOf } from '../../src/errors.js';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { qedTuning } from '../../src/formats/qed/driver.js';
import { instrumentation, type IoEvent } from '../../src/io/instrument.js';
import { convertToRaw, patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';
import { compareAll, randomWrites, type Target } from '../helpers/workload.js';

let dir: string;
let cleanup: () => void;
const open: BlockDriver[] = [];

beforeEach(() => {
  ({ dir, cleanup } = scratchDir('qed-write'));
});
afterEach(async () => {
  instrumentation.clearFaults();
  instrumentation.record(null);
  qedTuning.needCheckIdleMs = 5000;
  for (const d of open.splice(0)) await d.close().catch(() => {});
  cleanup();
});

const p = (name: string): string => path.join(dir, name);
const MiB = 1024 * 1024;

async function openRW(image: string, extra: { l2CacheBytes?: number } = {}): Promise<BlockDriver> {
  const d = await openImage(image, { readOnly: false, ...extra });
  open.push(d);
  return d;
}

async function closeDriver(d: BlockDriver): Promise<void> {
  open.splice(open.indexOf(d), 1);
  await d.close();
}

/** The errno name a promise rejects with (the FUSE adapter maps errors with errnoOf). */
async function failure(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return errnoOf(err);
  }
  return 'resolved';
}

function engineTarget(d: BlockDriver): Target {
  return {
    size: d.virtualSize,
    write: (buf, off) => d.write(buf, 0, buf.length, off),
    read: (buf, off) => d.read(buf, 0, buf.length, off),
  };
}

/** The need-check bit as it is on disk now. */
function needCheckOnDisk(img: string): boolean {
  const fd = fs.openSync(img, 'r');
  try {
    const b = Buffer.alloc(8);
    fs.readSync(fd, b, 0, 8, 16);
    return (b.readBigUInt64LE(0) & 2n) !== 0n;
  } finally {
    fs.closeSync(fd);
  }
}

function expectCleanAndSame(img: string, model: string): void {
  const check = qemuCheck(img, 'qed');
  expect(check.code, check.output).toBe(0);
  const cmp = qemuCompare(img, model, 'qed', 'raw');
  expect(cmp.same, cmp.output).toBe(true);
  expect(needCheckOnDisk(img)).toBe(false);
}

// qemu-img 7.2 reports one leaked cluster on any QED image of 4095 clusters or more (its
// own images too), so with 4 KiB clusters the disks stay below that and `check` must say 0.
describe.each([4096, 65536])('QED random writes, cluster size %i', (cs) => {
  const scale = cs === 4096 ? 1 : 4;
  it('no backing file', async () => {
    const img = p('a.qed');
    const size = 12 * scale * MiB + 512;
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(size));
    qemuIo(img, 'qed', [`write -P 0x11 ${cs} ${3 * cs}`, `write -z ${8 * cs} ${2 * cs}`]);
    const model = convertToRaw(img, p('model.raw'));
    const d = await openRW(img);
    const t = engineTarget(d);
    await randomWrites(t, model, { count: 250, maxLength: 3 * MiB, seed: cs + 1, zeroFraction: 0.15, verifyEvery: 25 });
    await compareAll(t, model);
    await closeDriver(d);
    expectCleanAndSame(img, model);
  });

  it('raw backing file shorter than the overlay, zero clusters over backing data', async () => {
    const base = p('base.raw');
    fs.writeFileSync(base, patternBytes(7 * scale * MiB + 4096 + 512, 5));
    const img = p('ov.qed');
    const size = 12 * scale * MiB;
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, '-b', base, '-F', 'raw', img, String(size));
    qemuIo(img, 'qed', [`write -z ${4 * cs} ${4 * cs}`, `write -P 0x22 ${20 * cs + 17} ${cs}`]);
    const model = convertToRaw(img, p('model.raw'));
    const d = await openRW(img);
    const t = engineTarget(d);
    // Partial writes into zero clusters and into unallocated clusters over backing data.
    await t.write(Buffer.alloc(10, 0x33), 4 * cs + 100);
    await t.write(Buffer.alloc(10, 0x34), 30 * cs + 100);
    const mfd = fs.openSync(model, 'r+');
    fs.writeSync(mfd, Buffer.alloc(10, 0x33), 0, 10, 4 * cs + 100);
    fs.writeSync(mfd, Buffer.alloc(10, 0x34), 0, 10, 30 * cs + 100);
    fs.closeSync(mfd);
    await compareAll(t, model);
    await randomWrites(t, model, { count: 200, maxLength: 2 * MiB, seed: cs + 2, zeroFraction: 0.1, verifyEvery: 20 });
    await compareAll(t, model);
    await closeDriver(d);
    expectCleanAndSame(img, model);
  });

  it('qcow2 backing file', async () => {
    const base = p('base.qcow2');
    qemuImg('create', '-f', 'qcow2', base, String(8 * MiB));
    qemuIo(base, 'qcow2', [`write -P 0x44 0 ${8 * MiB}`, `write -z ${MiB} ${MiB}`]);
    const img = p('ovq.qed');
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, '-b', base, '-F', 'qcow2', img, String(12 * MiB));
    const model = convertToRaw(img, p('model.raw'));
    const d = await openRW(img);
    const t = engineTarget(d);
    await randomWrites(t, model, { count: 150, maxLength: MiB, seed: cs + 3, verifyEvery: 15 });
    await compareAll(t, model);
    await closeDriver(d);
    expectCleanAndSame(img, model);
  });
});

describe('QED need-check bit', () => {
  const cs = 4096;

  it('is clear after open, set before the first allocating write, kept across flush, cleared on close', async () => {
    const img = p('nc.qed');
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(4 * MiB));
    qemuIo(img, 'qed', [`write -P 0x55 0 ${cs}`]);
    const d = await openRW(img);
    expect(needCheckOnDisk(img)).toBe(false);
    // A write into an allocated cluster changes no metadata: the bit stays clear.
    await d.write(Buffer.alloc(100, 1), 0, 100, 10);
    await d.flush();
    expect(needCheckOnDisk(img)).toBe(false);
    expect(d.info().features).not.toContain('need_check');
    await d.write(Buffer.alloc(100, 2), 0, 100, 5 * cs);
    expect(needCheckOnDisk(img)).toBe(true);
    expect(d.info().features).toContain('need_check');
    await d.flush();
    expect(needCheckOnDisk(img)).toBe(true);
    await closeDriver(d);
    expect(needCheckOnDisk(img)).toBe(false);
    expect(qemuCheck(img, 'qed').code).toBe(0);
  });

  it('readNow / writeNow: cached data in place (the bit stays clear), zeros answered; backing data and allocations decline', async () => {
    const base = p('now-base.raw');
    const img = p('now.qed');
    const model = p('now.raw');
    fs.writeFileSync(base, patternBytes(4 * MiB, 5));
    qemuImg('create', '-q', '-f', 'qed', '-o', `cluster_size=${cs}`, '-b', base, '-F', 'raw', img, String(4 * MiB));
    qemuIo(img, 'qed', [`write -P 0x55 0 ${4 * cs}`, `write -z ${8 * cs} ${2 * cs}`]);
    convertToRaw(img, model);
    const want = fs.readFileSync(model);
    const d = await openRW(img);
    const buf = Buffer.alloc(2 * cs, 0xee);
    await d.read(buf, 0, 512, 0); // the L2 table is cached (the open's count of data clusters may have loaded it already)
    for (const [off, len] of [[100, 2 * cs], [8 * cs, cs]]) {
      buf.fill(0xee);
      expect(d.readNow!(buf, 0, len, off), `readNow at ${off}`).toBe(true);
      expect(buf.subarray(0, len).equals(want.subarray(off, off + len))).toBe(true);
    }
    expect(d.readNow!(buf, 0, 512, 20 * cs), 'backing data').toBe(false);
    const rewrite = Buffer.alloc(3000, 0x66);
    expect(d.writeNow!(rewrite, 0, rewrite.length, cs + 7)).toBe(true);
    rewrite.copy(want, cs + 7);
    expect(d.writeNow!(rewrite, 0, 100, 8 * cs), 'zero cluster').toBe(false);
    expect(d.writeNow!(rewrite, 0, 100, 20 * cs), 'unallocated').toBe(false);
    expect(d.writeNow!(rewrite, 0, 2 * cs, 3 * cs), 'runs into an unallocated cluster').toBe(false);
    await d.flush();
    expect(needCheckOnDisk(img)).toBe(false);
    await closeDriver(d);
    fs.writeFileSync(model, want);
    expectCleanAndSame(img, model);
  });

  it('is set and synced before any cluster or table write, with or without a backing file', async () => {
    for (const withBacking of [false, true]) {
      const img = p(`order-${withBacking}.qed`);
      const args = ['create', '-f', 'qed', '-o', `cluster_size=${cs}`];
      if (withBacking) {
        fs.writeFileSync(p('b.raw'), patternBytes(MiB, 3));
        args.push('-b', p('b.raw'), '-F', 'raw');
      }
      qemuImg(...args, img, String(4 * MiB));
      const d = await openRW(img);
      const events: IoEvent[] = [];
      instrumentation.record((ev) => {
        if (ev.path === img) events.push(ev);
      });
      await d.write(Buffer.alloc(300, 7), 0, 300, 2 * cs + 5);
      const beforeFlush = events.length;
      await d.flush();
      instrumentation.record(null);
      const points = events.map((e) => e.point);
      const cow = events.filter((e) => e.point === 'cow_write');
      // The new cluster's writes (one with the backing fill; without a backing
      // file the data, and zeros before and after it) come between the synced
      // bit and the table writes. The new table waits in the cache for the
      // flush: the data is synced, the table written and synced, then the L1
      // entry pointing at it written and synced.
      expect(cow.length).toBe(withBacking ? 1 : 3);
      expect(points.slice(0, beforeFlush)).toEqual(['header_update', 'flush', ...cow.map(() => 'cow_write')]);
      expect(points.slice(beforeFlush)).toEqual(['flush', 'qed_l2_alloc', 'flush', 'qed_l1_update', 'flush']);
      expect(events[0].data!.readBigUInt64LE(16) & 2n).toBe(2n);
      // Together they cover exactly one cluster with the fill and the data.
      const host = Math.min(...cow.map((e) => e.offset));
      expect(cow.reduce((n, e) => n + e.length, 0)).toBe(cs);
      const got = Buffer.alloc(cs, 0xee);
      for (const e of cow) e.data!.copy(got, e.offset - host);
      const want = Buffer.alloc(cs);
      if (withBacking) patternBytes(MiB, 3).copy(want, 0, 2 * cs, 3 * cs);
      want.fill(7, 5, 305);
      expect(got.equals(want)).toBe(true);
      await closeDriver(d);
      expect(needCheckOnDisk(img)).toBe(false);
    }
  });

  it('is cleared after an idle period once everything is flushed, and set again by the next allocation', async () => {
    qedTuning.needCheckIdleMs = 150;
    const img = p('idle.qed');
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(4 * MiB));
    const d = await openRW(img);
    await d.write(Buffer.alloc(cs, 9), 0, cs, 0);
    await d.write(Buffer.alloc(10, 9), 0, 10, 3 * cs); // an L2 entry now dirty in the cache
    expect(needCheckOnDisk(img)).toBe(true);
    await new Promise((r) => setTimeout(r, 700));
    expect(needCheckOnDisk(img)).toBe(false);
    // Everything the bit protected is on disk: QEMU sees both writes.
    // -U: the driver still holds the image open for writing (and locked, like QEMU).
    const raw = fs.readFileSync(convertToRaw(img, p('idle.raw'), ['-U']));
    expect(raw.subarray(3 * cs, 3 * cs + 10).every((b) => b === 9)).toBe(true);
    await d.write(Buffer.alloc(10, 8), 0, 10, 7 * cs);
    expect(needCheckOnDisk(img)).toBe(true);
    await closeDriver(d);
    expect(needCheckOnDisk(img)).toBe(false);
    expect(qemuCheck(img, 'qed').code).toBe(0);
  });

  it('allocates after the file size rounded up to a cluster, keeping stray tail bytes', async () => {
    const img = p('tail.qed');
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(4 * MiB));
    const size0 = fs.statSync(img).size;
    fs.appendFileSync(img, Buffer.alloc(100, 0xcd));
    const d = await openRW(img);
    const events: IoEvent[] = [];
    instrumentation.record((ev) => {
      if (ev.path === img) events.push(ev);
    });
    await d.write(Buffer.alloc(cs, 0x42), 0, cs, 0);
    await d.write(Buffer.alloc(cs, 0x43), 0, cs, 2 * MiB); // same L2 table (it maps 8 MiB)
    await d.flush(); // writes the new table
    instrumentation.record(null);
    const cow = events.filter((e) => e.point === 'cow_write').map((e) => e.offset);
    const l2 = events.filter((e) => e.point === 'qed_l2_alloc').map((e) => e.offset);
    expect(cow).toEqual([size0 + cs, size0 + cs + cs + 4 * cs]);
    expect(l2).toEqual([size0 + 2 * cs]);
    await closeDriver(d);
    const raw = fs.readFileSync(img);
    expect(raw.subarray(size0, size0 + 100).every((b) => b === 0xcd)).toBe(true);
    const back = fs.readFileSync(convertToRaw(img, p('tail.raw')));
    expect(back.subarray(0, cs).every((b) => b === 0x42)).toBe(true);
    expect(back.subarray(2 * MiB, 2 * MiB + cs).every((b) => b === 0x43)).toBe(true);
    const check = qemuCheck(img, 'qed');
    expect(check.code, check.output).toBe(3); // the partial cluster of stray bytes is unreferenced
  });

  it('a read-only open writes nothing and refuses writes', async () => {
    const img = p('ro.qed');
    qemuImg('create', '-f', 'qed', img, String(4 * MiB));
    const d = await openImage(img, { readOnly: true });
    open.push(d);
    await expect(d.write(Buffer.alloc(1), 0, 1, 0)).rejects.toMatchObject({ errno: 'EROFS' });
    await d.flush();
    await closeDriver(d);
  });

  it('refuses writes past the end of the disk', async () => {
    const img = p('end.qed');
    qemuImg('create', '-f', 'qed', img, String(MiB));
    const d = await openRW(img);
    await expect(d.write(Buffer.alloc(10), 0, 10, MiB - 5)).rejects.toMatchObject({ errno: 'ENOSPC' });
  });
});

describe('QED fault points', () => {
  const cs = 4096;

  /** Make an image with a fresh L2 region and one populated region, plus its model. */
  function setup(): { img: string; model: string } {
    const img = p('f.qed');
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(16 * MiB));
    qemuIo(img, 'qed', [`write -P 0x66 0 ${4 * cs}`]);
    return { img, model: convertToRaw(img, p('f.raw')) };
  }

  it.each([
    ['header_update', 20 * cs],
    ['cow_write', 20 * cs],
    ['cow_write', 9 * MiB], // in an unallocated L2 range
  ] as const)('a failure at %s fails that write only; the image stays consistent', async (point, off) => {
    const { img, model } = setup();
    const d = await openRW(img);
    instrumentation.setFaults([{ point, errno: 'EIO', times: 1, pathSuffix: 'f.qed' }]);
    expect(await failure(d.write(Buffer.alloc(100, 0x77), 0, 100, off + 3))).toBe('EIO');
    instrumentation.clearFaults();
    const got = Buffer.alloc(100);
    await d.read(got, 0, 100, off + 3);
    expect(got.every((b) => b === 0)).toBe(true);
    // The same write succeeds afterwards, and so do others.
    const t = engineTarget(d);
    await t.write(Buffer.alloc(100, 0x78), off + 3);
    await t.write(Buffer.alloc(5000, 0x79), 2 * cs - 7);
    const mfd = fs.openSync(model, 'r+');
    fs.writeSync(mfd, Buffer.alloc(100, 0x78), 0, 100, off + 3);
    fs.writeSync(mfd, Buffer.alloc(5000, 0x79), 0, 5000, 2 * cs - 7);
    fs.closeSync(mfd);
    await compareAll(t, model);
    await closeDriver(d);
    const check = qemuCheck(img, 'qed');
    expect([0, 3], check.output).toContain(check.code); // a failed append may leak
    expect(qemuCompare(img, model, 'qed', 'raw').same).toBe(true);
    expect(needCheckOnDisk(img)).toBe(false);
  });

  // A new L2 table and its L1 entry are written by the next flush (table.ts).
  it.each(['qed_l2_alloc', 'qed_l1_update'] as const)('a failure at %s fails the flush; the data stays readable and the next flush links it', async (point) => {
    const { img, model } = setup();
    const d = await openRW(img);
    const off = 9 * MiB + 3; // in an unallocated L2 range
    await d.write(Buffer.alloc(100, 0x77), 0, 100, off);
    instrumentation.setFaults([{ point, errno: 'EIO', times: 1, pathSuffix: 'f.qed' }]);
    expect(await failure(d.flush())).toBe('EIO');
    instrumentation.clearFaults();
    expect(instrumentation.injected.map((f) => f.point)).toEqual([point]);
    const got = Buffer.alloc(100);
    await d.read(got, 0, 100, off);
    expect(got.every((b) => b === 0x77)).toBe(true);
    // A crash now: the disk's L1 does not point at the new table yet (or at one that is not durable).
    const crashCopy = p('f-crash.qed');
    fs.copyFileSync(img, crashCopy);
    const crashCheck = qemuCheck(crashCopy, 'qed');
    expect([0, 3], crashCheck.output).toContain(crashCheck.code);
    await d.flush();
    const mfd = fs.openSync(model, 'r+');
    fs.writeSync(mfd, Buffer.alloc(100, 0x77), 0, 100, off);
    fs.closeSync(mfd);
    // Flushed: what a crash leaves now has the write.
    fs.copyFileSync(img, crashCopy);
    expect(qemuCompare(crashCopy, model, 'qed', 'raw').same).toBe(true);
    await closeDriver(d);
    const check = qemuCheck(img, 'qed');
    expect([0, 3], check.output).toContain(check.code);
    expect(qemuCompare(img, model, 'qed', 'raw').same).toBe(true);
  });

  it('a new table linked while a flush runs waits for the next flush; the tables that flush wrote are linked by it', async () => {
    const img = p('race.qed');
    qemuImg('create', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(32 * MiB));
    const model = convertToRaw(img, p('race.raw'));
    const d = await openRW(img);
    const a = 9 * MiB + 3; // L1 entry 1: a new L2 table
    const b = 17 * MiB + 5; // L1 entry 2: another
    await d.write(Buffer.alloc(100, 0x41), 0, 100, a);
    // Hold the flush's sync (the one after it wrote A's table) until B's write, and so its link, is done.
    let tableWritten = false;
    let writeB: Promise<unknown> | null = null;
    instrumentation.record((ev) => {
      if (ev.point === 'qed_l2_alloc') tableWritten = true;
    });
    const file = (d as unknown as { file: { flush(): Promise<void> } }).file;
    const sync = file.flush.bind(file);
    file.flush = async () => {
      if (tableWritten && !writeB) {
        writeB = d.write(Buffer.alloc(100, 0x42), 0, 100, b);
        await writeB;
      }
      return sync();
    };
    await d.flush();
    expect(writeB).not.toBeNull();
    // A crash now: A (written before the flush) is there, B (linked during it) is not yet, and the image is sound.
    const crashCopy = p('race-crash.qed');
    fs.copyFileSync(img, crashCopy);
    const mfd = fs.openSync(model, 'r+');
    fs.writeSync(mfd, Buffer.alloc(100, 0x41), 0, 100, a);
    const crashCheck = qemuCheck(crashCopy, 'qed');
    expect([0, 3], crashCheck.output).toContain(crashCheck.code);
    expect(qemuCompare(crashCopy, model, 'qed', 'raw').same).toBe(true);
    await d.flush();
    fs.writeSync(mfd, Buffer.alloc(100, 0x42), 0, 100, b);
    fs.closeSync(mfd);
    fs.copyFileSync(img, crashCopy);
    expect(qemuCompare(crashCopy, model, 'qed', 'raw').same).toBe(true);
    await closeDriver(d);
    expectCleanAndSame(img, model);
  });

  it('a failed L2 write-back fails the flush, keeps the table dirty, and the next flush writes it', async () => {
    const { img, model } = setup();
    const d = await openRW(img);
    await d.write(Buffer.alloc(10, 0x5a), 0, 10, 6 * cs); // links into the existing L2 (dirty in cache)
    instrumentation.setFaults([{ point: 'qed_l2_update', errno: 'EIO', times: 1, pathSuffix: 'f.qed' }]);
    expect(await failure(d.flush())).toBe('EIO');
    instrumentation.clearFaults();
    await d.flush();
    const mfd = fs.openSync(model, 'r+');
    fs.writeSync(mfd, Buffer.alloc(10, 0x5a), 0, 10, 6 * cs);
    fs.closeSync(mfd);
    // Before close, with the bit still set, QEMU already sees the flushed write.
    expect(needCheckOnDisk(img)).toBe(true);
    expect(qemuCompare(img, model, 'qed', 'raw', true).same).toBe(true);
    await closeDriver(d);
    expectCleanAndSame(img, model);
  });
});
