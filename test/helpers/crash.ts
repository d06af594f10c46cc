/**
 * Crash-point harness (engine level, no FUSE).
 *
 * 1. `recordWorkload` runs a workload of guest writes and flushes through
 *    the engine (openImage, read-write) and records every write, truncate and
 *    flush the engine issues to the image files (src/io/instrument.ts), each
 *    with the moment it was issued and the moment it completed on one logical
 *    clock shared with the guest requests.
 * 2. `crashStates` enumerates what the files may hold if the machine had lost
 *    power at a crash point p (just before one recorded write was issued, or
 *    after close). Per file: every write that completed before a flush of
 *    that file was issued, where that flush completed before p, is durable;
 *    every other write issued before p may or may not have landed, in any
 *    combination, and a write longer than a sector may have landed only in
 *    part (whole 512-byte sectors: the atomic unit QEMU's formats assume).
 * 3. `checkState` writes one such state into the image files and judges it:
 *    qemu-img check, a read of the whole disk through the engine, the guest
 *    bytes that were flushed, and - when the image carries its dirty or
 *    need-check bit - a read-write open that must repair it.
 *
 * Guest flushes define what must survive: everything a guest write put on
 * the disk before a completed driver.flush() (or close) reads back exactly;
 * bytes a later write touched read as either their flushed value or a value
 * one of those later writes carried.
 *
 * Completion times come from wrapping ImageFile's write/writeZeroes/flush/
 * truncate here (the recorder only sees requests as they are issued); file.ts
 * is not changed for the tests.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { ImageFile } from '../../src/io/file.js';
import { instrumentation, type FaultRule } from '../../src/io/instrument.js';
import type { IoPoint } from '../../src/io/points.js';
import { flaggedUnclean, initialModel, type Built, type Scenario } from './crash-scenarios.js';
import { expectation, readAll, runOps, guestMismatch, type Clock, type GuestFlush, type GuestWrite, type GuestWriteOp, type Op, type RunResult } from './crash-workload.js';
import { convertToRaw, qemuCheck } from './qemu.js';
import { rng } from './workload.js';

export * from './crash-scenarios.js';
export * from './crash-workload.js';

/** Engine warnings (unclean images found) are expected here by the thousand. */
export const quietLog = pino({ level: 'silent' });

const SECTOR = 512;

/**
 * A scratch directory on tmpfs when there is one: the engine-level tests model
 * durability themselves, so real fdatasyncs only cost time there.
 */
export function fastScratch(tag: string): { dir: string; cleanup: () => void } {
  let root = os.tmpdir();
  try {
    fs.accessSync('/dev/shm', fs.constants.W_OK);
    root = '/dev/shm';
  } catch {
    // no tmpfs: the ordinary temporary directory
  }
  const dir = fs.realpathSync(fs.mkdtempSync(path.join(root, `qmount-${tag}-${process.pid}-`)));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

// ---- I/O tracking ---------------------------------------------------------

export interface IoRecord {
  id: number;
  kind: 'write' | 'flush' | 'truncate' | 'punch';
  point: IoPoint;
  path: string;
  /** write, punch: file offset; truncate: the new size */
  offset: number;
  length: number;
  data?: Buffer;
  issued: number;
  /** Infinity until it completed (and forever if it failed) */
  done: number;
}

export class IoTracker implements Clock {
  private seq = 0;
  readonly ios: IoRecord[] = [];
  private undo: (() => void) | null = null;

  /** Track only these files (real paths, as ImageFile sees them). */
  constructor(private readonly paths: Set<string>) {}

  tick(): number {
    return ++this.seq;
  }

  start(): void {
    if (this.undo) return;
    instrumentation.record((ev) => {
      if (!this.paths.has(ev.path)) return;
      this.ios.push({
        id: this.ios.length, kind: ev.kind, point: ev.point, path: ev.path, offset: ev.offset, length: ev.length,
        data: ev.data, issued: this.tick(), done: Infinity,
      });
    });
    const proto = ImageFile.prototype as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    const saved: Array<[string, (...args: unknown[]) => Promise<unknown>]> = [];
    // Every ImageFile method that records an event (writeZeroes and zeroRange record a 'write' of zeros).
    for (const name of ['write', 'writeZeroes', 'zeroRange', 'punchHole', 'flush', 'truncate']) {
      const orig = proto[name];
      if (typeof orig !== 'function') continue;
      saved.push([name, orig]);
      // eslint-disable-next-line @typescript-eslint/no-this-alias -- the patched method's own `this` is the ImageFile
      const tracker = this;
      proto[name] = function (this: ImageFile, ...args: unknown[]): Promise<unknown> {
        const before = tracker.ios.length;
        // The recorder runs synchronously inside the call, before the first await.
        const p = orig.apply(this, args);
        const rec = tracker.ios.length > before ? tracker.ios[before] : undefined;
        if (!rec) return p;
        return p.then((v) => {
          rec.done = tracker.tick();
          return v;
        });
      };
    }
    this.undo = () => {
      for (const [name, fn] of saved) proto[name] = fn;
      instrumentation.record(null);
    };
  }

  stop(): void {
    this.undo?.();
    this.undo = null;
  }
}

// ---- recording ------------------------------------------------------------

export interface Recording {
  scenario: Scenario;
  dir: string;
  built: Built;
  /** original bytes of each written file */
  pristine: Map<string, Buffer>;
  frozenBytes: Map<string, Buffer>;
  initialGuest: Buffer;
  ios: IoRecord[];
  guestWrites: GuestWrite[];
  /** driver flushes, and close as the last one */
  guestFlushes: GuestFlush[];
  finalGuest: Buffer;
}

export async function recordWorkload(sc: Scenario, dir: string): Promise<Recording> {
  const built = sc.build(fs.realpathSync(dir));
  const initialRaw = convertToRaw(built.image, path.join(dir, 'initial.raw'));
  const initialGuest = initialModel(sc, fs.readFileSync(initialRaw));
  fs.rmSync(initialRaw);
  return recordRun(sc, dir, built, initialGuest, sc.ops);
}

/**
 * Record a read-write open, `ops`, and close of the image files as they are
 * now. `initialGuest` is what the guest saw before (for a crash state, what a
 * read-only open reads: recovery must keep it).
 */
export async function recordRun(
  sc: Scenario,
  dir: string,
  built: Built,
  initialGuest: Buffer,
  ops: Op[],
  faults?: FaultRule[],
): Promise<Recording> {
  const pristine = new Map(built.written.map((f) => [f, fs.readFileSync(f)] as const));
  const frozenBytes = new Map(built.frozen.map((f) => [f, fs.readFileSync(f)] as const));
  const tracker = new IoTracker(new Set(built.written));
  const model = Buffer.from(initialGuest);
  let run: RunResult;
  const closeFlush: GuestFlush = { issued: 0, done: Infinity };
  tracker.start();
  try {
    const d = await openImage(built.image, { readOnly: false, format: built.format, log: quietLog });
    try {
      if (faults) instrumentation.setFaults(faults);
      try {
        run = await runOps(d, ops, model, tracker);
      } finally {
        instrumentation.clearFaults();
      }
    } finally {
      closeFlush.issued = tracker.tick();
      await d.close();
      closeFlush.done = tracker.tick();
    }
  } finally {
    tracker.stop();
  }
  const failed = run.writes.filter((w) => w.errno).length + run.flushes.filter((f) => f.errno).length;
  if (failed && !faults) throw new Error(`${sc.name}: ${failed} requests failed while recording`);
  if (faults && instrumentation.injected.length === 0) throw new Error(`${sc.name}: the injected fault never fired`);
  return {
    scenario: sc, dir, built, pristine, frozenBytes, initialGuest, ios: tracker.ios,
    guestWrites: run.writes, guestFlushes: [...run.flushes, closeFlush], finalGuest: model,
  };
}

/** Read the whole guest disk of the image files as they are now, read-only. */
export async function readImage(b: Built): Promise<Buffer> {
  const d = await openImage(b.image, { readOnly: true, format: b.format, log: quietLog });
  try {
    return await readAll(d);
  } finally {
    await d.close();
  }
}

// ---- crash states ---------------------------------------------------------

export interface Landed {
  rec: IoRecord;
  /** sector-aligned file ranges of a torn write that landed; undefined: all of it */
  pieces?: Array<[number, number]>;
}

export interface CrashState {
  /** the clock value of the crash: everything issued before it may have landed */
  at: number;
  /** index of the write the crash comes before (ios.length: after close) */
  index: number;
  label: string;
  landed: Landed[];
  pendingCount: number;
}

/** Writes (and truncates) durable at `at`: completed before a flush of their file that completed before `at`. */
function durableAt(ios: IoRecord[], at: number): Set<number> {
  const lastFlush = new Map<string, number>(); // path -> issue time of the last completed flush
  for (const r of ios) {
    if (r.kind === 'flush' && r.done < at) lastFlush.set(r.path, Math.max(lastFlush.get(r.path) ?? 0, r.issued));
  }
  const out = new Set<number>();
  for (const r of ios) {
    if (r.kind !== 'flush' && r.done < (lastFlush.get(r.path) ?? 0)) out.add(r.id);
  }
  return out;
}

function tear(rec: IoRecord, r: () => number): Array<[number, number]> {
  const pieces: Array<[number, number]> = [];
  const end = rec.offset + rec.length;
  for (let s = rec.offset; s < end; ) {
    const e = Math.min(end, (Math.floor(s / SECTOR) + 1) * SECTOR);
    if (r() < 0.5) {
      const last = pieces[pieces.length - 1];
      if (last && last[1] === s) last[1] = e;
      else pieces.push([s, e]);
    }
    s = e;
  }
  return pieces;
}

export interface EnumerateOptions {
  full: boolean;
  /** crash points in the reduced run */
  sample: number;
  /** random subsets per crash point */
  subsets: number;
  seed: number;
}

/** Crash points to try: all writes, or a sample favouring metadata points. */
function crashIndices(ios: IoRecord[], o: EnumerateOptions): number[] {
  const writes = ios.filter((r) => r.kind !== 'flush').map((r) => r.id);
  const all = [...writes, ios.length];
  if (o.full) return all;
  const r = rng(o.seed);
  const chosen = new Set<number>([ios.length]);
  // Just before and just after the first and one later occurrence of every point.
  const byPoint = new Map<IoPoint, number[]>();
  for (const id of writes) {
    const p = ios[id].point;
    if (!byPoint.has(p)) byPoint.set(p, []);
    byPoint.get(p)!.push(id);
  }
  const pos = (id: number): number => writes.indexOf(id);
  for (const ids of byPoint.values()) {
    for (const id of [ids[0], ids[Math.floor(r() * ids.length)]]) {
      chosen.add(id);
      chosen.add(all[pos(id) + 1]);
    }
  }
  let list = [...chosen];
  while (list.length > o.sample) list.splice(Math.floor(r() * list.length), 1);
  while (list.length < Math.min(o.sample, all.length)) {
    list = [...new Set([...list, all[Math.floor(r() * all.length)]])];
  }
  return list.sort((a, b) => a - b);
}

export function crashStates(rec: Recording, o: EnumerateOptions): CrashState[] {
  const ios = rec.ios;
  const states: CrashState[] = [];
  const r = rng(o.seed ^ 0x5bd1e995);
  for (const index of crashIndices(ios, o)) {
    const at = index < ios.length ? ios[index].issued : Infinity;
    const durable = durableAt(ios, at);
    const issued = ios.filter((x) => x.kind !== 'flush' && x.issued < at);
    const base = issued.filter((x) => durable.has(x.id)).map((x) => ({ rec: x }));
    const pending = issued.filter((x) => !durable.has(x.id));
    const where = index < ios.length ? `before write #${index} (${ios[index].point})` : 'after close';
    states.push({ at, index, label: `${where}, all ${pending.length} unflushed writes landed`, landed: [...base, ...pending.map((x) => ({ rec: x }))], pendingCount: pending.length });
    if (pending.length === 0) continue;
    states.push({ at, index, label: `${where}, none of ${pending.length} unflushed writes landed`, landed: base, pendingCount: pending.length });
    const subsets = o.full ? o.subsets + 1 : o.subsets;
    for (let k = 0; k < subsets && pending.length > 1; k++) {
      const pick: Landed[] = [];
      for (const x of pending) {
        if (r() < 0.5) continue;
        pick.push(x.kind === 'write' && x.length > SECTOR && r() < 0.3 ? { rec: x, pieces: tear(x, r) } : { rec: x });
      }
      const desc = pick.map((l) => `#${l.rec.id}${l.pieces ? '(torn)' : ''}`).join(' ');
      states.push({ at, index, label: `${where}, unflushed writes landed: [${desc}] of ${pending.length}`, landed: [...base, ...pick], pendingCount: pending.length });
    }
  }
  return states;
}

/** Put the crash state into the image files (restored from their pristine copies). */
export function materialize(rec: Recording, st: CrashState): void {
  const fds = new Map<string, number>();
  try {
    for (const [f, bytes] of rec.pristine) {
      fs.writeFileSync(f, bytes);
      fds.set(f, fs.openSync(f, 'r+'));
    }
    for (const { rec: x, pieces } of [...st.landed].sort((a, b) => a.rec.issued - b.rec.issued)) {
      const fd = fds.get(x.path)!;
      if (x.kind === 'truncate') {
        fs.ftruncateSync(fd, x.offset);
        continue;
      }
      if (x.kind === 'punch') {
        // A punched range reads as zeros and keeps the file size (KEEP_SIZE): zeros written up to the end of the file.
        const end = Math.min(x.offset + x.length, fs.fstatSync(fd).size);
        if (end > x.offset) fs.writeSync(fd, Buffer.alloc(end - x.offset), 0, end - x.offset, x.offset);
        continue;
      }
      for (const [a, b] of pieces ?? [[x.offset, x.offset + x.length]]) {
        fs.writeSync(fd, x.data!, a - x.offset, b - a, a);
      }
    }
  } finally {
    for (const fd of fds.values()) fs.closeSync(fd);
  }
}

// ---- judging a state --------------------------------------------------------

export function expectationAt(rec: Recording, at: number, cache: Map<number, Buffer>): { base: Buffer; later: GuestWriteOp[] } {
  return expectation(rec.initialGuest, rec.guestWrites, rec.guestFlushes, at, cache);
}

/**
 * Judge the state now in the image files. Returns problems (empty: good).
 * The checks, in order:
 *  - qemu-img check: exit 0 or 3 (leaks); errors (2) only behind the dirty
 *    or need-check bit; never 1 (check could not run);
 *  - a read-only engine open reads the whole disk without error, and the
 *    flushed guest data is there;
 *  - scenario extras (snapshot content);
 *  - with the bit set: a read-write engine open + close repairs the image
 *    (qemu-img check 0 or 3, bit cleared) and the data still reads back.
 */
export async function checkState(rec: Recording, st: CrashState, cache: Map<number, Buffer>): Promise<string[]> {
  const { image, format } = rec.built;
  const problems: string[] = [];
  const flagged = flaggedUnclean(image, format);
  const c = qemuCheck(image, format);
  const allowed = flagged ? [0, 2, 3] : [0, 3];
  if (!allowed.includes(c.code)) {
    problems.push(`qemu-img check exit ${c.code}${flagged ? ' (dirty bit set)' : ''}: ${firstLines(c.output)}`);
  }
  const want = expectationAt(rec, st.at, cache);
  const readBack = async (when: string): Promise<void> => {
    let d: BlockDriver | null = null;
    try {
      d = await openImage(image, { readOnly: true, format, log: quietLog });
      const got = await readAll(d);
      const bad = guestMismatch(got, want.base, want.later);
      if (bad) problems.push(`${when}: ${bad}`);
    } catch (err) {
      problems.push(`${when}: reading the disk failed: ${(err as Error).message}`);
    } finally {
      await d?.close().catch(() => {});
    }
  };
  await readBack('read-only open');
  const extra = rec.scenario.extraCheck?.(rec.built, rec.dir);
  if (extra) problems.push(extra);
  if (flagged) {
    try {
      const d = await openImage(image, { readOnly: false, format, log: quietLog });
      await d.close();
      const c2 = qemuCheck(image, format);
      if (c2.code !== 0 && c2.code !== 3) problems.push(`after the repairing read-write open: qemu-img check exit ${c2.code}: ${firstLines(c2.output)}`);
      if (flaggedUnclean(image, format)) problems.push('the read-write open left the dirty/need-check bit set');
      await readBack('after the repairing open');
    } catch (err) {
      problems.push(`the read-write open of the unclean image failed: ${(err as Error).message}`);
    }
  }
  for (const [f, bytes] of rec.frozenBytes) {
    if (!fs.readFileSync(f).equals(bytes)) problems.push(`${path.basename(f)} changed`);
  }
  return problems;
}

function firstLines(s: string): string {
  return s.split('\n').filter(Boolean).slice(0, 4).join(' | ');
}

/** The points of the writes issued shortly before a crash point, for failure messages. */
export function context(rec: Recording, st: CrashState): string {
  const from = Math.max(0, st.index - 6);
  return rec.ios
    .slice(from, st.index)
    .map((r) => `#${r.id} ${r.kind === 'flush' ? 'flush' : r.point}@${r.kind === 'flush' ? '' : r.offset}${r.done === Infinity ? '(incomplete)' : ''}`)
    .join(', ');
}
