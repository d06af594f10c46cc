/**
 * Crash-point enumeration (engine level, no FUSE): see test/helpers/crash.ts
 * for the model.
 *
 * For each workload below, every write, truncate and flush the engine issues
 * is recorded with its bytes; then the image is rebuilt as it could be after
 * a power loss at a crash point (just before one recorded write, or after
 * close): everything flushed before, plus all, none, or random subsets of the
 * unflushed writes (some of them torn at sector boundaries). Each state must
 * pass qemu-img check (exit 0 or 3; errors only behind the qcow2 dirty bit /
 * QED need-check bit, and then a read-write open repairs them to 0 or 3),
 * read back whole through the engine without an error, and hold exactly the
 * guest data that was flushed (bytes written after the last flush may be old
 * or new).
 *
 * Also: crashes during recovery (the repairing open of a dirty or
 * need-check state is recorded and enumerated in turn), crashes after an
 * injected I/O error, and a check that the judge rejects states the engine's
 * write order forbids (so a pass means something).
 *
 * Runs:
 *   npm test / npx vitest run test/safety/crash-points.test.ts
 *       reduced (under a minute): per workload ~10 crash points (before and
 *       after the first and one later occurrence of every write point, plus
 *       random ones), each with all, none and 2 random subsets of the
 *       unflushed writes; 2 recoveries per unclean kind; 5 error-then-crash
 *       cases.
 *   QMOUNT_CRASH_FULL=1 npx vitest run test/safety/crash-points.test.ts
 *       full (about 20 minutes on 2 cores): every recorded write is a crash
 *       point, each with all, none and 3 random subsets; 8 recoveries per
 *       unclean kind; all 10 error-then-crash cases. The same variable makes
 *       faults.test.ts inject both errnos at both occurrences.
 *   QMOUNT_CRASH_SEED=N changes the random choices (default 1).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  checkState, context, crashStates, fastScratch, flaggedUnclean, initialModel, materialize, readImage, recordRun, recordWorkload, SCENARIOS,
  type CrashState,
} from '../helpers/crash.js';
import type { IoPoint } from '../../src/io/points.js';
import { convertToRaw, qemuCheck, qemuCompare } from '../helpers/qemu.js';
import { rng } from '../helpers/workload.js';

const FULL = process.env.QMOUNT_CRASH_FULL === '1';
const SEED = Number(process.env.QMOUNT_CRASH_SEED ?? 1);
const cleanups: Array<() => void> = [];
afterAll(() => cleanups.forEach((c) => c()));

describe(`crash points (${FULL ? 'full' : 'reduced'} run)`, () => {
  it.each(SCENARIOS.map((s) => [s.name, s] as const))('%s', async (_name, sc) => {
    const { dir, cleanup } = fastScratch(`crash-${sc.name}`);
    cleanups.push(cleanup);
    const rec = await recordWorkload(sc, dir);
    const points = rec.ios.map((r) => r.point);
    // Every recorded request was seen to complete (an unwrapped ImageFile method would show here).
    expect(rec.ios.filter((r) => r.done === Infinity).map((r) => `${r.kind} ${r.point}`)).toEqual([]);
    expect(sc.exercised?.(rec.built, points) ?? null, sc.note).toBeNull();

    // The uncrashed run is the reference: clean, and the guest sees the model.
    const finalRaw = path.join(dir, 'final.raw');
    fs.writeFileSync(finalRaw, rec.finalGuest);
    const c = qemuCheck(rec.built.image, rec.built.format);
    expect(c.code, c.output).toBe(0);
    expect(qemuCompare(rec.built.image, finalRaw, rec.built.format, 'raw').same).toBe(true);
    fs.rmSync(finalRaw);

    const states = crashStates(rec, { full: FULL, sample: 10, subsets: 2, seed: SEED * 1000 + SCENARIOS.indexOf(sc) });
    const cache = new Map<number, Buffer>();
    const failures: string[] = [];
    for (const st of states) {
      materialize(rec, st);
      const problems = await checkState(rec, st, cache);
      if (problems.length) failures.push(`${st.label}: ${problems.join('; ')} [preceding: ${context(rec, st)}]`);
    }
    const writes = rec.ios.filter((r) => r.kind !== 'flush').length;
    const crashPoints = new Set(states.map((s) => s.index)).size;
    console.log(`${sc.name}: ${writes} writes, ${rec.ios.length - writes} flushes recorded; ${crashPoints} crash points, ${states.length} states checked`);
    expect(failures.slice(0, 5), `${failures.length} of ${states.length} crash states failed`).toEqual([]);
  }, FULL ? 3_600_000 : 120_000);
});

// Recovery can crash too: the repairing read-write open of an image left
// with its dirty (lazy refcounts) or need-check (QED) bit is recorded like a
// workload, and every write of it is a crash point. Each state must still be
// repairable by the next open, and the guest must always see exactly what the
// read-only open saw before recovery started.
describe('crash points during recovery of an unclean image', () => {
  it.each(['lazy-refcounts', 'lazy-reftable-grow', 'qed-need-check'])('%s', async (name) => {
    const sc = SCENARIOS.find((s) => s.name === name)!;
    const { dir, cleanup } = fastScratch(`crash-recovery-${name}`);
    cleanups.push(cleanup);
    const rec = await recordWorkload(sc, dir);
    // Unclean states that qemu-img check finds errors or leaks in: work for the recovery.
    const r = rng(SEED * 77 + 5);
    const candidates = crashStates(rec, { full: true, sample: 0, subsets: 2, seed: SEED }).filter((st) => st.pendingCount > 0);
    // Errors (exit 2) first, then leaks (3), then clean-but-flagged.
    const byCode = new Map<number, CrashState[]>([[2, []], [3, []], [0, []]]);
    const want = FULL ? 8 : 2;
    for (let tries = 0; tries < 60 && candidates.length > 0 && byCode.get(2)!.length < want; tries++) {
      const st = candidates.splice(Math.floor(r() * candidates.length), 1)[0];
      materialize(rec, st);
      if (!flaggedUnclean(rec.built.image, rec.built.format)) continue;
      byCode.get(qemuCheck(rec.built.image, rec.built.format).code)?.push(st);
    }
    const picked = [...byCode.get(2)!, ...byCode.get(3)!, ...byCode.get(0)!].slice(0, want);
    expect(picked.length).toBeGreaterThan(0);
    const failures: string[] = [];
    let recoveryWrites = 0;
    let checked = 0;
    for (const start of picked) {
      materialize(rec, start);
      const seen = await readImage(rec.built);
      const rrec = await recordRun(sc, dir, rec.built, seen, []);
      recoveryWrites += rrec.ios.filter((r) => r.kind !== 'flush').length;
      const cache = new Map<number, Buffer>();
      for (const st of crashStates(rrec, { full: FULL, sample: 8, subsets: 2, seed: SEED })) {
        materialize(rrec, st);
        const problems = await checkState(rrec, st, cache);
        checked++;
        if (problems.length) failures.push(`recovery from [${start.label}], crash ${st.label}: ${problems.join('; ')} [preceding: ${context(rrec, st)}]`);
      }
    }
    console.log(`${name}: ${picked.length} recoveries (${picked.map((p) => p.label).join(' / ')}), ${recoveryWrites} recovery writes, ${checked} states checked`);
    expect(recoveryWrites).toBeGreaterThan(0);
    expect(failures.slice(0, 5), `${failures.length} of ${checked} states failed`).toEqual([]);
  }, FULL ? 3_600_000 : 120_000);
});

// A failed write then a crash: after an injected EIO the driver goes on with
// memory that may disagree with the disk; every later crash state must still
// be good. The failed request's bytes may read old or new.
const FAULT_THEN_CRASH: Array<[string, IoPoint, number]> = [
  ['l2-alloc', 'l1_update', 2],
  ['l2-alloc', 'flush', 3],
  ['refblock-alloc', 'reftable_update', 0],
  ['reftable-grow', 'header_update', 0],
  ['reftable-grow', 'reftable_grow', 1],
  ['snapshot-cow', 'l2_update', 1],
  ['compressed-overwrite', 'refblock_update', 2],
  ['lazy-refcounts', 'header_update', 0],
  ['qed-need-check', 'qed_l1_update', 0],
  ['qed-need-check', 'qed_l2_update', 0],
  // qcow2 sparse operations (the reduced run takes the even ones)
  ['resize-grow', 'l1_switch', 0],
  ['zero-v2', 'zero_write', 0],
  ['zero-snapshot', 'l2_update', 1],
  ['resize-grow', 'header_resize', 0],
];

describe('an I/O error, then a crash', () => {
  it.each(FULL ? FAULT_THEN_CRASH : FAULT_THEN_CRASH.filter((_c, i) => i % 2 === 0))('%s: EIO at %s (skip %i)', async (name, point, skip) => {
    const sc = SCENARIOS.find((s) => s.name === name)!;
    const { dir, cleanup } = fastScratch(`crash-fault-${name}`);
    cleanups.push(cleanup);
    const built = sc.build(dir);
    const initialRaw = convertToRaw(built.image, path.join(dir, 'initial.raw'));
    const initial = initialModel(sc, fs.readFileSync(initialRaw));
    fs.rmSync(initialRaw);
    const rec = await recordRun(sc, dir, built, initial, sc.ops, [{ point, errno: 'EIO', skip, times: 1 }]);
    const failedRequests = rec.guestWrites.filter((w) => w.errno).length + rec.guestFlushes.filter((f) => f.errno).length;
    expect(failedRequests).toBeGreaterThan(0);
    const cache = new Map<number, Buffer>();
    const failures: string[] = [];
    const states = crashStates(rec, { full: FULL, sample: 8, subsets: 2, seed: SEED * 31 + skip });
    for (const st of states) {
      materialize(rec, st);
      const problems = await checkState(rec, st, cache);
      if (problems.length) failures.push(`${st.label}: ${problems.join('; ')} [preceding: ${context(rec, st)}]`);
    }
    expect(failures.slice(0, 5), `${failures.length} of ${states.length} crash states failed`).toEqual([]);
  }, FULL ? 3_600_000 : 120_000);
});

// The judge must be able to say no: states the engine's write order never
// produces are rejected, through each of its two main checks.
describe('the crash judge rejects states the write order forbids', () => {
  it('an L1 entry without its new L2 table (flushed data lost), and L2 entries without their refcounts (qemu-img check errors)', async () => {
    const { dir, cleanup } = fastScratch('crash-judge');
    cleanups.push(cleanup);
    const rec = await recordWorkload(SCENARIOS.find((s) => s.name === 'l2-alloc')!, dir);
    const writes = rec.ios.filter((r) => r.kind !== 'flush');
    const cache = new Map<number, Buffer>();
    const judge = async (label: string, keep: (id: number) => boolean): Promise<string[]> => {
      const st: CrashState = { at: Infinity, index: rec.ios.length, label, landed: writes.filter((r) => keep(r.id)).map((r) => ({ rec: r })), pendingCount: 0 };
      materialize(rec, st);
      return checkState(rec, st, cache);
    };
    // Sanity: with every write, the state is good.
    expect(await judge('everything landed', () => true)).toEqual([]);

    const firstL2 = writes.find((r) => r.point === 'l2_alloc')!;
    // The table and every later write-back of it lost, while the L1 entry landed.
    const noL2 = await judge('first new L2 table lost', (id) => rec.ios[id].offset !== firstL2.offset);
    expect(noL2.join('; ')).toMatch(/flushed byte at guest offset/);

    const noRefcounts = await judge('refcount updates lost', (id) => rec.ios[id].point !== 'refblock_update');
    expect(noRefcounts.join('; ')).toMatch(/qemu-img check exit 2/);
  });
});
