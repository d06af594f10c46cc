/**
 * Fault injection (src/io/instrument.ts): EIO and ENOSPC at every named write
 * point the crash-point workloads reach (test/helpers/crash.ts SCENARIOS),
 * at its first occurrence and at a later one, one fault per run.
 *
 * Each run proves:
 *  - the fault fired, and the request (write or flush) in progress when it
 *    fired rejected with exactly that errno; no other request failed;
 *  - the driver keeps working: later writes and a flush succeed, and a read
 *    of the whole disk equals a model that got only the successful writes
 *    (the failed write's bytes may read old or new, unless a later write
 *    covered them);
 *  - close succeeds; qemu-img check exits 0 or 3 (a failed allocation may
 *    leak) with no dirty bit left; QEMU reads the same content.
 * The default run injects EIO at one of the two occurrences and ENOSPC at the
 * other (alternating between workloads, so each point meets both errnos
 * across the workloads that reach it); QMOUNT_CRASH_FULL=1 runs both errnos
 * at both occurrences.
 * Then the QED repair writes of a need-check open (qed_check_repair), and
 * once through a real mount with QMOUNT_FAULTS: dd gets EIO (then ENOSPC),
 * the mount stays usable, unmount is clean, the image is clean.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { errnoOf } from '../../src/errors.js';
import { instrumentation, type FaultRule } from '../../src/io/instrument.js';
import { ALL_WRITE_POINTS, type IoPoint } from '../../src/io/points.js';
import {
  expectation, fastScratch, flaggedUnclean, guestMismatch, initialModel, quietLog, readAll, runOps, SCENARIOS, SimpleClock,
  type Built, type GuestWriteOp, type Op, type Scenario,
} from '../helpers/crash.js';
import { mountImage } from '../helpers/mount.js';
import { convertToRaw, patternBytes, qemuCheck, qemuImg, qemuIo } from '../helpers/qemu.js';

const FULL = process.env.QMOUNT_CRASH_FULL === '1';
const KiB = 1024;
const MiB = 1024 * 1024;
const cleanups: Array<() => void> = [];
afterAll(() => cleanups.forEach((c) => c()));
afterEach(() => {
  instrumentation.clearFaults();
  instrumentation.record(null);
});

/** Points no workload here can reach, and why. */
const UNREACHED: Partial<Record<IoPoint, string>> = {
  punch_hole: 'ImageFile.punchHole is not instrumented until the native file-ops addon lands (sparse-base)',
  snapshot_update: 'declared, but the engine never writes the snapshot table',
  truncate: 'only `qmount check --repair` of QED truncates (not the engine)',
  qed_check_repair: 'reached by the need-check repair test below',
};

const hitPoints = new Set<IoPoint>();

/** A failed write's range minus what successful writes issued after it covered. */
function stillAmbiguous(failed: { offset: number; data: Buffer; issued: number }, writes: Array<{ offset: number; data: Buffer; issued: number; errno?: string }>): GuestWriteOp[] {
  let pieces: Array<[number, number]> = [[failed.offset, failed.offset + failed.data.length]];
  for (const w of writes) {
    if (w.errno || w.issued <= failed.issued) continue;
    const a = w.offset;
    const b = w.offset + w.data.length;
    pieces = pieces.flatMap(([s, e]): Array<[number, number]> => {
      if (b <= s || e <= a) return [[s, e]];
      const out: Array<[number, number]> = [];
      if (s < a) out.push([s, a]);
      if (b < e) out.push([b, e]);
      return out;
    });
  }
  return pieces.map(([s, e]) => ({ offset: s, data: failed.data.subarray(s - failed.offset, e - failed.offset) }));
}

/** Writes after the fault: across the disk, one over the start of every failed write. */
function afterOps(size: number, failedAt: number[]): Op[] {
  const ops: Op[] = failedAt.map((off, i) => ({ kind: 'write', w: { offset: Math.max(0, Math.min(off, size - 3000)), data: patternBytes(3000, 900 + i) } }));
  for (let i = 0; i < 4; i++) {
    const off = Math.floor(((i * 2 + 1) * size) / 9) + 333;
    ops.push({ kind: 'write', w: { offset: off, data: patternBytes(20 * KiB + i, 950 + i) } });
  }
  ops.push({ kind: 'flush' });
  return ops;
}

interface Case {
  point: IoPoint;
  file: string;
  skip: number;
  errno: 'EIO' | 'ENOSPC';
}

async function runCase(sc: Scenario, b: Built, pristine: Map<string, Buffer>, initial: Buffer, c: Case, dir: string): Promise<string[]> {
  const problems: string[] = [];
  for (const [f, bytes] of pristine) fs.writeFileSync(f, bytes);
  const clock = new SimpleClock();
  const model = Buffer.from(initial);
  let d: BlockDriver | null = await openImage(b.image, { readOnly: false, format: b.format, log: quietLog });
  try {
    let firedAt = 0;
    const rule: FaultRule = { point: c.point, errno: c.errno, skip: c.skip, times: 1, pathSuffix: `/${c.file}` };
    instrumentation.setFaults([rule], () => (firedAt = clock.tick()));
    const run = await runOps(d, sc.ops, model, clock);
    instrumentation.clearFaults();
    if (instrumentation.injected.length !== 1) return [`the fault fired ${instrumentation.injected.length} times during the workload`];

    const requests = [...run.writes, ...run.flushes];
    const failed = requests.filter((r) => r.errno);
    const active = (r: { issued: number; done: number }): boolean => r.issued < firedAt && !(r.done < firedAt);
    if (failed.length === 0) problems.push('no request failed although the fault fired');
    for (const r of failed) {
      if (r.errno !== c.errno) problems.push(`a request failed with ${r.errno}, not ${c.errno}`);
      if (!active(r)) problems.push(`a request ${r.issued > firedAt ? 'issued after' : 'finished before'} the fault failed (${r.errno})`);
    }

    const failedWrites = run.writes.filter((w) => w.errno);
    const more = await runOps(d, afterOps(d.virtualSize, failedWrites.map((w) => w.offset)), model, clock);
    const moreFailed = [...more.writes, ...more.flushes].filter((r) => r.errno);
    if (moreFailed.length) problems.push(`${moreFailed.length} requests after the fault failed (${moreFailed[0].errno})`);
    const all = [...run.writes, ...more.writes];
    const ambiguous = failedWrites.flatMap((w) => stillAmbiguous(w, all));
    const bad = guestMismatch(await readAll(d), model, ambiguous);
    if (bad) problems.push(`engine read after the fault: ${bad}`);

    const closing = d;
    d = null;
    try {
      await closing.close();
    } catch (err) {
      problems.push(`close failed: ${errnoOf(err)} ${(err as Error).message}`);
      return problems;
    }
    const chk = qemuCheck(b.image, b.format);
    if (chk.code !== 0 && chk.code !== 3) problems.push(`qemu-img check exit ${chk.code}: ${chk.output.split('\n').slice(0, 3).join(' | ')}`);
    if (flaggedUnclean(b.image, b.format)) problems.push('dirty/need-check bit left set after a clean close');
    const raw = convertToRaw(b.image, path.join(dir, 'after.raw'));
    const qbad = guestMismatch(fs.readFileSync(raw), model, ambiguous);
    fs.rmSync(raw);
    if (qbad) problems.push(`QEMU's reading: ${qbad}`);
    return problems;
  } finally {
    instrumentation.clearFaults();
    await d?.close().catch(() => {});
  }
}

describe('EIO and ENOSPC at every write point of the crash workloads', () => {
  it.each(SCENARIOS.map((s) => [s.name, s] as const))('%s', async (_name, sc) => {
    const { dir, cleanup } = fastScratch(`faults-${sc.name}`);
    cleanups.push(cleanup);
    const b = sc.build(fs.realpathSync(dir));
    const pristine = new Map(b.written.map((f) => [f, fs.readFileSync(f)] as const));
    const initialRaw = convertToRaw(b.image, path.join(dir, 'initial.raw'));
    const initial = initialModel(sc, fs.readFileSync(initialRaw));
    fs.rmSync(initialRaw);

    // Discovery: which points (per file) the workload reaches, how often.
    const counts = new Map<string, number>();
    const d = await openImage(b.image, { readOnly: false, format: b.format, log: quietLog });
    instrumentation.record((ev) => {
      if (!b.written.includes(ev.path)) return;
      const key = `${ev.point} ${path.basename(ev.path)}`;
      counts.set(key, (counts.get(key) ?? 0) + 1);
    });
    await runOps(d, sc.ops, Buffer.from(initial), new SimpleClock());
    instrumentation.record(null);
    await d.close();

    const cases: Case[] = [];
    for (const [key, n] of counts) {
      const [point, file] = key.split(' ') as [IoPoint, string];
      hitPoints.add(point);
      const skips = n > 1 ? [0, Math.max(1, Math.floor((n * 2) / 3))] : [0];
      // Reduced run: first occurrence with one errno, the later one with the
      // other, swapped between neighbouring workloads; full run: both with both.
      const swap = SCENARIOS.indexOf(sc) % 2 === 1;
      skips.forEach((skip, k) => {
        const errnos = FULL ? (['EIO', 'ENOSPC'] as const) : [(k === 0) !== swap ? 'EIO' as const : 'ENOSPC' as const];
        for (const errno of errnos) cases.push({ point, file, skip, errno });
      });
    }
    const failures: string[] = [];
    for (const c of cases) {
      const problems = await runCase(sc, b, pristine, initial, c, dir);
      if (problems.length) failures.push(`${c.errno} at ${c.point} in ${c.file} (skip ${c.skip}): ${problems.join('; ')}`);
    }
    console.log(`${sc.name}: ${cases.length} fault runs over ${[...counts.keys()].join(', ')}`);
    expect(failures.slice(0, 6), `${failures.length} of ${cases.length} fault runs failed`).toEqual([]);
  });

  it('together the workloads reach every write point the engine issues', () => {
    const missing = ALL_WRITE_POINTS.filter((p) => !hitPoints.has(p) && !(p in UNREACHED));
    expect(missing).toEqual([]);
    expect(hitPoints.has('flush')).toBe(true);
  });
});

// A failure while closing must be reported, never swallowed: close() rejects
// with the errno. The image is then what a crash would leave (what was flushed
// before is intact) and the next read-write open + close makes it clean.
describe('EIO and ENOSPC while closing', () => {
  it.each(SCENARIOS.map((s) => [s.name, s] as const))('%s', async (_name, sc) => {
    const { dir, cleanup } = fastScratch(`faults-close-${sc.name}`);
    cleanups.push(cleanup);
    const b = sc.build(fs.realpathSync(dir));
    const pristine = new Map(b.written.map((f) => [f, fs.readFileSync(f)] as const));
    const initialRaw = convertToRaw(b.image, path.join(dir, 'initial.raw'));
    const initial = initialModel(sc, fs.readFileSync(initialRaw));
    fs.rmSync(initialRaw);

    // Discovery: the points close() reaches, and how often each was seen before.
    const seen = new Map<string, number>();
    const inClose: string[] = [];
    let closing = false;
    const d0 = await openImage(b.image, { readOnly: false, format: b.format, log: quietLog });
    instrumentation.record((ev) => {
      if (!b.written.includes(ev.path)) return;
      const key = `${ev.point} ${path.basename(ev.path)}`;
      if (closing && !inClose.includes(key)) inClose.push(key);
      if (!closing) seen.set(key, (seen.get(key) ?? 0) + 1);
    });
    await runOps(d0, sc.ops, Buffer.from(initial), new SimpleClock());
    closing = true;
    await d0.close();
    instrumentation.record(null);
    expect(inClose.length).toBeGreaterThan(0);

    const failures: string[] = [];
    for (const [i, key] of inClose.entries()) {
      const [point, file] = key.split(' ') as [IoPoint, string];
      const errno = i % 2 === 0 ? 'EIO' : 'ENOSPC';
      for (const [f, bytes] of pristine) fs.writeFileSync(f, bytes);
      const clock = new SimpleClock();
      const model = Buffer.from(initial);
      const d = await openImage(b.image, { readOnly: false, format: b.format, log: quietLog });
      instrumentation.setFaults([{ point, errno, skip: seen.get(key) ?? 0, times: 1, pathSuffix: `/${file}` }]);
      const run = await runOps(d, sc.ops, model, clock);
      const err = await d.close().then(() => null, (e: unknown) => e);
      instrumentation.clearFaults();
      const problems: string[] = [];
      if (run.writes.some((w) => w.errno) || run.flushes.some((f) => f.errno)) problems.push('a request before close failed');
      if (instrumentation.injected.length !== 1) problems.push(`the fault fired ${instrumentation.injected.length} times`);
      if (err === null) problems.push('close() succeeded although a write of it failed');
      else if (errnoOf(err) !== errno) problems.push(`close() rejected with ${errnoOf(err)}, not ${errno}`);
      // What a crash at this point guarantees: flushed data; later writes old or new.
      const want = expectation(initial, run.writes, run.flushes, Infinity);
      try {
        const again = await openImage(b.image, { readOnly: false, format: b.format, log: quietLog });
        try {
          const bad = guestMismatch(await readAll(again), want.base, want.later);
          if (bad) problems.push(`after reopening: ${bad}`);
        } finally {
          await again.close();
        }
        const c = qemuCheck(b.image, b.format);
        if (c.code !== 0 && c.code !== 3) problems.push(`qemu-img check exit ${c.code}: ${c.output.split('\n').slice(0, 3).join(' | ')}`);
        if (flaggedUnclean(b.image, b.format)) problems.push('dirty/need-check bit left set');
      } catch (e) {
        problems.push(`reopening failed: ${(e as Error).message}`);
      }
      if (problems.length) failures.push(`${errno} at ${key} during close: ${problems.join('; ')}`);
    }
    console.log(`${sc.name}: close reaches ${inClose.join(', ')}`);
    expect(failures).toEqual([]);
  });
});

describe('QED need-check repair under faults (qed_check_repair)', () => {
  const cs = 4096;

  /** A need-check QED image with an L2 entry and an L1 entry pointing past the end of the file. */
  function damaged(dir: string): { img: string; want: Buffer } {
    const img = path.join(dir, 'nc.qed');
    qemuImg('create', '-q', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(32 * MiB));
    // L2 tables map 8 MiB each: data in regions 0 and 1, region 1 then lost.
    qemuIo(img, 'qed', [`write -P 0x21 0 ${64 * KiB}`, `write -P 0x22 ${8 * MiB} ${16 * KiB}`]);
    const want = fs.readFileSync(convertToRaw(img, path.join(dir, 'want.raw')));
    const fd = fs.openSync(img, 'r+');
    try {
      const hdr = Buffer.alloc(64);
      fs.readSync(fd, hdr, 0, 64, 0);
      const l1Off = Number(hdr.readBigUInt64LE(40));
      const l1 = Buffer.alloc(16);
      fs.readSync(fd, l1, 0, 16, l1Off);
      const l2Off = Number(l1.readBigUInt64LE(0));
      const past = BigInt(fs.fstatSync(fd).size + 100 * cs);
      const e = Buffer.alloc(8);
      e.writeBigUInt64LE(past);
      fs.writeSync(fd, e, 0, 8, l2Off + 3 * 8); // guest cluster 3 of region 0
      e.writeBigUInt64LE(past + BigInt(cs * 16));
      fs.writeSync(fd, e, 0, 8, l1Off + 8); // region 1's L2 table
      hdr.writeBigUInt64LE(hdr.readBigUInt64LE(16) | 2n, 16);
      fs.writeSync(fd, hdr, 0, 64, 0);
    } finally {
      fs.closeSync(fd);
    }
    // What the repair leaves: cluster 3 and region 1 read as zeros.
    want.fill(0, 3 * cs, 4 * cs);
    want.fill(0, 8 * MiB, 16 * MiB);
    return { img, want };
  }

  it.each([
    ['EIO', 0],
    ['ENOSPC', 0],
    ['EIO', 1],
    ['ENOSPC', 1],
  ] as const)('%s at repair write #%i: the open fails, the bit stays set, the next open repairs', async (errno, skip) => {
    const { dir, cleanup } = fastScratch('faults-qed-repair');
    cleanups.push(cleanup);
    const { img, want } = damaged(dir);
    expect(qemuCheck(img, 'qed').code).toBe(2);
    instrumentation.setFaults([{ point: 'qed_check_repair', errno, skip, times: 1 }]);
    const err = await openImage(img, { readOnly: false, log: quietLog }).then(
      (d) => d.close().then(() => null),
      (e: unknown) => e,
    );
    expect(instrumentation.injected.map((f) => f.point)).toEqual(['qed_check_repair']);
    instrumentation.clearFaults();
    expect(err && errnoOf(err)).toBe(errno);
    expect(flaggedUnclean(img, 'qed')).toBe(true);

    const d = await openImage(img, { readOnly: false, log: quietLog });
    try {
      expect((await readAll(d)).equals(want)).toBe(true);
      await d.write(Buffer.alloc(5000, 0x5a), 0, 5000, 8 * MiB + 100);
      want.fill(0x5a, 8 * MiB + 100, 8 * MiB + 5100);
    } finally {
      await d.close();
    }
    const c = qemuCheck(img, 'qed');
    expect([0, 3], c.output).toContain(c.code);
    expect(flaggedUnclean(img, 'qed')).toBe(false);
    expect(fs.readFileSync(convertToRaw(img, path.join(dir, 'after.raw'))).equals(want)).toBe(true);
  });
});

describe('QMOUNT_FAULTS through a real mount', () => {
  it('dd gets EIO, then ENOSPC; the mount stays usable; unmount and image are clean', async () => {
    const { dir, cleanup } = fastScratch('faults-mount');
    cleanups.push(cleanup);
    const img = path.join(dir, 'm.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, String(16 * MiB));
    qemuIo(img, 'qcow2', [`write -P 0x31 0 ${MiB}`]);
    const model = fs.readFileSync(convertToRaw(img, path.join(dir, 'model.raw')));
    const rules: FaultRule[] = [
      { point: 'cow_write', errno: 'EIO', times: 1 }, // the first allocating write
      { point: 'data_write', errno: 'ENOSPC', times: 1 }, // the first write into an allocated cluster
    ];
    const m = await mountImage(img, { env: { QMOUNT_FAULTS: JSON.stringify(rules) } });
    const src = path.join(dir, 'src.bin');
    const data = patternBytes(4 * KiB, 77);
    fs.writeFileSync(src, data);
    // 4 KiB writes inside 64 KiB clusters: into an unallocated cluster it is a
    // copy-on-write (cow_write), into an allocated one a plain data_write.
    const dd = (offset: number): { code: number; err: string } => {
      const r = spawnSync('dd', [`if=${src}`, `of=${m.rawPath}`, 'bs=4K', 'count=1', `seek=${offset / 4096}`, 'conv=notrunc,fsync', 'status=none'], { encoding: 'utf8' });
      return { code: r.status ?? -1, err: r.stderr };
    };
    try {
      const first = dd(4 * MiB + 4096);
      expect(first.code).not.toBe(0);
      expect(first.err).toMatch(/Input\/output error/);
      const again = dd(4 * MiB + 4096);
      expect(again.code, again.err).toBe(0);
      data.copy(model, 4 * MiB + 4096);
      const inPlace = dd(4096);
      expect(inPlace.code).not.toBe(0);
      expect(inPlace.err).toMatch(/No space left on device/);
      const ok = dd(8192);
      expect(ok.code, ok.err).toBe(0);
      data.copy(model, 8192);
      // The failed range at 4 KiB may hold old or new bytes; everything else is the model.
      const failedRange = [{ offset: 4096, data }];
      const got = fs.readFileSync(m.rawPath);
      expect(guestMismatch(got, model, failedRange)).toBeNull();
      await m.unmount();
      expect((await m.exited).code).toBe(0);
      const c = qemuCheck(img, 'qcow2');
      expect([0, 3], c.output).toContain(c.code);
      const after = fs.readFileSync(convertToRaw(img, path.join(dir, 'after.raw')));
      expect(guestMismatch(after, model, failedRange)).toBeNull();
    } finally {
      await m.unmount();
    }
  });
});
