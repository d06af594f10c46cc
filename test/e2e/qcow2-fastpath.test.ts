/**
 * The qcow2 engine's fast paths, each shown to be taken and to be right:
 *  - a write into a cluster the image owns (COPIED, no zero flag) goes in
 *    place without the metadata lock: it completes while another request
 *    holds the lock; writes that need metadata (unallocated, shared with a
 *    snapshot, zero flag) still wait for it;
 *  - the head and tail of a new cluster that read as zeros are not written
 *    as data: past the end of the file they stay a hole (a crash may leave
 *    the last cluster ending past the end of the file, which qemu accepts;
 *    a clean close grows the file to whole clusters);
 *  - a zero-flagged cluster that keeps its host cluster gets real zeros
 *    around the new data (its old bytes never show through);
 *  - single-cluster reads of data and zero clusters equal qemu's view;
 *  - readNow / writeNow (answered before returning) take exactly the cases
 *    above whose mapping is cached and decline the rest, doing nothing;
 *  - a new refcount block costs no sync when allocated: its table entry is
 *    written by the next flush, after the block is durable.
 * Every image is judged by qemu-img check and compare against a raw model.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/formats/open.js';
import { instrumentation, type IoEvent } from '../../src/io/instrument.js';
import type { BlockDriver } from '../../src/formats/driver.js';
import type { Qcow2State } from '../../src/formats/qcow2/state.js';
import { qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir, writeAt } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function stateOf(d: BlockDriver): Qcow2State {
  return (d as unknown as { s: Qcow2State }).s;
}

/**
 * Resolves to true if p settles within `ms`. While the test holds the
 * metadata lock, a write that needs it can never settle, however long we
 * wait; one that does not need it settles as soon as its I/O is done (the
 * thread pool when the machine is busy), so the wait is generous.
 */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)));
  const done = await Promise.race([p.then(() => true, () => true), timeout]);
  clearTimeout(timer);
  return done;
}

/** Hold the metadata lock until the returned function is called. */
function holdMetaLock(d: BlockDriver): () => Promise<void> {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const held = stateOf(d).meta.run(() => gate);
  return async () => {
    release();
    await held;
  };
}

describe('qcow2 fast paths', () => {
  let s: { dir: string; cleanup: () => void };
  beforeAll(() => (s = scratchDir('qfast')));
  afterAll(() => s.cleanup());

  it('in-place writes into owned clusters skip the metadata lock; writes that need metadata wait', async () => {
    const image = path.join(s.dir, 'lock.qcow2');
    const model = path.join(s.dir, 'lock.raw');
    qemuImg('create', '-q', '-f', 'qcow2', image, String(8 * MiB));
    qemuIo(image, 'qcow2', ['write -P 0x11 0 2M']);
    qemuImg('snapshot', '-c', 'snap', image);
    qemuIo(image, 'qcow2', ['write -P 0x22 1M 1M']); // [1M, 2M) owned again, [0, 1M) shared with the snapshot
    qemuImg('convert', '-O', 'raw', image, model);

    const d = await openImage(image, { readOnly: false });
    const write = (off: number, len: number, byte: number): Promise<void> => {
      const b = Buffer.alloc(len, byte);
      writeAt(model, off, b);
      return d.write(b, 0, len, off);
    };
    await write(1 * MiB + 512, 512, 0x33); // the first write prepares the image under the lock

    const unlock = holdMetaLock(d);
    const owned = write(1 * MiB + 64 * KiB + 4 * KiB, 4 * KiB, 0x44);
    const shared = write(128 * KiB, 4 * KiB, 0x55);
    const unallocated = write(4 * MiB, 4 * KiB, 0x66);
    const crossing = write(2 * MiB - 2 * KiB, 4 * KiB, 0x77); // two clusters: planned
    expect(await settlesWithin(owned, 10_000)).toBe(true);
    expect(await settlesWithin(shared, 100)).toBe(false);
    expect(await settlesWithin(unallocated, 100)).toBe(false);
    expect(await settlesWithin(crossing, 100)).toBe(false);
    await unlock();
    await Promise.all([owned, shared, unallocated, crossing]);

    // Once linked, the new clusters are owned: in place from now on.
    const unlock2 = holdMetaLock(d);
    const again = write(4 * MiB + 8 * KiB, 1 * KiB, 0x88);
    const sharedAgain = write(128 * KiB + 512, 512, 0x99);
    expect(await settlesWithin(again, 10_000)).toBe(true);
    expect(await settlesWithin(sharedAgain, 10_000)).toBe(true);
    await unlock2();
    await Promise.all([again, sharedAgain]);

    const got = Buffer.alloc(8 * MiB);
    await d.read(got, 0, got.length, 0);
    await d.close();
    expect(got.equals(fs.readFileSync(model))).toBe(true);
    const check = qemuCheck(image);
    expect(check.code, check.output).toBe(0);
    expect(qemuCompare(image, model, 'qcow2', 'raw').same).toBe(true);
    // The snapshot still holds the old bytes.
    const snapRaw = path.join(s.dir, 'lock-snap.raw');
    qemuImg('convert', '-O', 'raw', '-l', 'snapshot.name=snap', image, snapRaw);
    expect(fs.readFileSync(snapRaw).subarray(0, 2 * MiB).equals(Buffer.alloc(2 * MiB, 0x11))).toBe(true);
  });

  it('a small write into a new cluster at the end of the file leaves the rest of the cluster a hole', async () => {
    const image = path.join(s.dir, 'hole.qcow2');
    const model = path.join(s.dir, 'hole.raw');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=1M', image, String(64 * MiB));
    qemuImg('create', '-q', '-f', 'raw', model, String(64 * MiB));
    const d = await openImage(image, { readOnly: false });
    const before = fs.statSync(image).blocks * 512;
    // 8 writes of 4 KiB, each in the middle of its own 1 MiB cluster.
    for (let i = 0; i < 8; i++) {
      const b = Buffer.alloc(4 * KiB, i + 1);
      const off = i * 4 * MiB + 300 * KiB;
      writeAt(model, off, b);
      await d.write(b, 0, b.length, off);
    }
    // As a crash would leave it (flushed, not closed): the last cluster ends
    // past the end of the file, and qemu still reads the image right.
    await d.flush();
    const crashCopy = path.join(s.dir, 'hole-crash.qcow2');
    fs.copyFileSync(image, crashCopy);
    expect(fs.statSync(crashCopy).size % MiB).not.toBe(0);
    const crashCheck = qemuCheck(crashCopy);
    expect(crashCheck.code, crashCheck.output).toBe(0);
    expect(qemuCompare(crashCopy, model, 'qcow2', 'raw').same).toBe(true);
    await d.close();
    // A clean close leaves whole clusters, as qemu does.
    expect(fs.statSync(image).size % MiB).toBe(0);
    const grown = fs.statSync(image).blocks * 512 - before;
    // One new L2 table (1 MiB, written whole) and 8 x 4 KiB of data; writing
    // the zero fill would have added 8 MiB.
    expect(grown).toBeLessThan(2 * MiB);
    expect(fs.statSync(image).size).toBeGreaterThanOrEqual(9 * MiB);
    const check = qemuCheck(image);
    expect(check.code, check.output).toBe(0);
    expect(qemuCompare(image, model, 'qcow2', 'raw').same).toBe(true);
  });

  it('a zero-flagged cluster that keeps its host cluster is rewritten with real zeros around the data', async () => {
    const image = path.join(s.dir, 'zflag.qcow2');
    const model = path.join(s.dir, 'zflag.raw');
    qemuImg('create', '-q', '-f', 'qcow2', image, String(4 * MiB));
    qemuIo(image, 'qcow2', ['write -P 0xaa 0 1M']);
    // Zero writes without unmapping keep the host clusters and set the zero flag.
    qemuIo(image, 'qcow2', ['write -z 0 256k']);
    const map = JSON.parse(qemuImg('map', '--output=json', image)) as Array<{ start: number; zero: boolean; data: boolean; offset?: number }>;
    expect(map.some((m) => m.start === 0 && m.zero && m.offset !== undefined)).toBe(true);
    qemuImg('convert', '-O', 'raw', image, model);

    const d = await openImage(image, { readOnly: false });
    const b = Buffer.alloc(4 * KiB, 0x5c);
    writeAt(model, 70 * KiB, b);
    await d.write(b, 0, b.length, 70 * KiB);
    const got = Buffer.alloc(256 * KiB);
    await d.read(got, 0, got.length, 0);
    await d.close();
    expect(got.equals(fs.readFileSync(model).subarray(0, 256 * KiB))).toBe(true);
    const check = qemuCheck(image);
    expect(check.code, check.output).toBe(0);
    expect(qemuCompare(image, model, 'qcow2', 'raw').same).toBe(true);
  });

  it('single-cluster reads (data, zero flag, unallocated, backing) equal qemu', async () => {
    const base = path.join(s.dir, 'rbase.raw');
    const image = path.join(s.dir, 'r.qcow2');
    const raw = path.join(s.dir, 'r.raw');
    qemuImg('create', '-q', '-f', 'raw', base, String(2 * MiB));
    qemuIo(base, 'raw', ['write -P 0x3c 0 2M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', image, String(2 * MiB));
    qemuIo(image, 'qcow2', ['write -P 0x12 0 512k', 'write -z 512k 256k']);
    qemuImg('convert', '-O', 'raw', image, raw);
    const want = fs.readFileSync(raw);
    const d = await openImage(image, { readOnly: true });
    for (const [off, len] of [[0, 4096], [60 * KiB, 4 * KiB], [512 * KiB + 100, 1000], [900 * KiB, 64 * KiB], [448 * KiB, 128 * KiB]]) {
      const got = Buffer.alloc(len, 0xee);
      await d.read(got, 0, len, off);
      expect(got.equals(want.subarray(off, off + len)), `read at ${off}`).toBe(true);
    }
    await d.close();
  });

  it('readNow / writeNow answer cached single-cluster data, zeros and owned rewrites at once; everything else declines', async () => {
    const base = path.join(s.dir, 'nbase.raw');
    const image = path.join(s.dir, 'now.qcow2');
    const model = path.join(s.dir, 'now.raw');
    qemuImg('create', '-q', '-f', 'raw', base, String(4 * MiB));
    qemuIo(base, 'raw', ['write -P 0x3c 0 4M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', image, String(4 * MiB));
    // [0, 512k) data, [512k, 768k) zero flag, [1M, 2M) data shared with a snapshot, the rest left to the backing file.
    qemuIo(image, 'qcow2', ['write -P 0x12 0 512k', 'write -z 512k 256k', 'write -P 0x13 1M 1M']);
    qemuImg('snapshot', '-c', 'snap', image);
    qemuIo(image, 'qcow2', ['write -P 0x14 0 128k']); // owned again after the snapshot
    qemuImg('convert', '-O', 'raw', image, model);
    const want = fs.readFileSync(model);
    const d = await openImage(image, { readOnly: false });
    const readNow = d.readNow!.bind(d);
    const writeNow = d.writeNow!.bind(d);
    const buf = Buffer.alloc(64 * KiB, 0xee);
    // Nothing is cached yet: declined, the buffer untouched.
    expect(readNow(buf, 0, 4096, 0)).toBe(false);
    expect(buf.every((b) => b === 0xee)).toBe(true);
    await d.read(buf, 0, 4096, 0); // loads the L2 table
    for (const [off, len] of [[4096, 4096], [64 * KiB, 64 * KiB], [600 * KiB, 8 * KiB], [1 * MiB, 4096]] as const) {
      buf.fill(0xee);
      expect(readNow(buf, 0, len, off), `readNow at ${off}`).toBe(true);
      expect(buf.subarray(0, len).equals(want.subarray(off, off + len)), `data at ${off}`).toBe(true);
    }
    // Backing data and a range across two clusters take the general path.
    expect(readNow(buf, 0, 4096, 3 * MiB)).toBe(false);
    expect(readNow(buf, 0, 8192, 60 * KiB)).toBe(false);
    // Writes: declined until the image is prepared by a first write; then owned clusters go at once.
    const put = (off: number, len: number, byte: number): boolean => {
      const b = Buffer.alloc(len, byte);
      const done = writeNow(b, 0, len, off);
      if (done) writeAt(model, off, b);
      return done;
    };
    expect(put(4096, 4096, 0x21)).toBe(false);
    await d.write(Buffer.alloc(512, 0x22), 0, 512, 0);
    writeAt(model, 0, Buffer.alloc(512, 0x22));
    expect(put(4096, 4096, 0x23), 'owned cluster').toBe(true);
    expect(put(64 * KiB + 512, 1000, 0x24), 'owned cluster, unaligned').toBe(true);
    expect(put(300 * KiB, 4096, 0x25), 'data shared with the snapshot').toBe(false);
    expect(put(1 * MiB, 4096, 0x26), 'data shared with the snapshot').toBe(false);
    expect(put(600 * KiB, 4096, 0x27), 'zero cluster').toBe(false);
    expect(put(3 * MiB, 4096, 0x28), 'left to the backing file').toBe(false);
    expect(put(60 * KiB, 8192, 0x29), 'across two clusters').toBe(false);
    await d.close();
    const check = qemuCheck(image);
    expect(check.code, check.output).toBe(0);
    expect(qemuCompare(image, model, 'qcow2', 'raw').same).toBe(true);
  });

  it('a new refcount block is not synced when allocated; the next flush writes it, syncs, then its table entry, before any L2 table', async () => {
    // 4 KiB clusters, 16-bit refcounts: one block counts 8 MiB of the file; the image is filled to just below that.
    const image = path.join(s.dir, 'refblock.qcow2');
    const model = path.join(s.dir, 'refblock.raw');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', image, String(24 * MiB));
    qemuIo(image, 'qcow2', [`write -P 0x11 0 ${7900 * KiB}`]);
    qemuImg('convert', '-O', 'raw', image, model);
    const d = await openImage(image, { readOnly: false });
    const events: IoEvent[] = [];
    instrumentation.record((ev) => {
      if (ev.path === image) events.push(ev);
    });
    try {
      for (let i = 0; i < 4; i++) {
        const b = Buffer.alloc(MiB, 0x30 + i);
        writeAt(model, 8 * MiB + i * MiB, b);
        await d.write(b, 0, b.length, 8 * MiB + i * MiB);
      }
      // The file now reaches past what the first block counts, yet nothing was synced.
      expect(fs.statSync(image).size).toBeGreaterThan(8 * MiB);
      expect(events.filter((e) => e.kind === 'flush')).toEqual([]);
      // A crash now: the new clusters are unreferenced and uncounted on disk, the image is clean.
      const crashCopy = path.join(s.dir, 'refblock-crash.qcow2');
      fs.copyFileSync(image, crashCopy);
      const crashCheck = qemuCheck(crashCopy);
      expect(crashCheck.code, crashCheck.output).toBe(0);
      await d.flush();
    } finally {
      instrumentation.record(null);
    }
    const at = (pred: (e: IoEvent) => boolean) => events.findIndex(pred);
    const block = at((e) => e.point === 'refblock_alloc');
    const entry = at((e) => e.point === 'reftable_update');
    const firstL2 = at((e) => e.point === 'l2_update' || e.point === 'l2_alloc');
    const syncAfter = (i: number) => events.findIndex((e, j) => j > i && e.kind === 'flush');
    expect(block).toBeGreaterThanOrEqual(0);
    expect(syncAfter(block)).toBeGreaterThan(block);
    expect(syncAfter(block)).toBeLessThan(entry);
    expect(syncAfter(entry)).toBeGreaterThan(entry);
    expect(syncAfter(entry)).toBeLessThan(firstL2);
    await d.close();
    const check = qemuCheck(image);
    expect(check.code, check.output).toBe(0);
    expect(qemuCompare(image, model, 'qcow2', 'raw').same).toBe(true);
  });
});
