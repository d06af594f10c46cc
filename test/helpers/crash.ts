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
 * Completion times come from wrapping ImageFile's write/flush/truncate here
 * (the recorder only sees requests as they are issued); file.ts is not
 * changed for the tests.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { errnoOf } from '../../src/errors.js';
import { ImageFile } from '../../src/io/file.js';
import { instrumentation, type FaultRule } from '../../src/io/instrument.js';
import type { IoPoint } from '../../src/io/points.js';
import { convertToRaw, patternBytes, qemuCheck, qemuImg, qemuIo } from './qemu.js';
import { rng } from './workload.js';

/** Engine warnings (unclean images found) are expected here by the thousand. */
export const quietLog = pino({ level: 'silent' });

const KiB = 1024;
const MiB = 1024 * 1024;
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
  kind: 'write' | 'flush' | 'truncate';
  point: IoPoint;
  path: string;
  /** write: file offset; truncate: the new size */
  offset: number;
  length: number;
  data?: Buffer;
  issued: number;
  /** Infinity until it completed (and forever if it failed) */
  done: number;
}

/** A logical clock: every issue and completion gets the next tick. */
export interface Clock {
  tick(): number;
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
    for (const name of ['write', 'flush', 'truncate']) {
      const orig = proto[name];
      saved.push([name, orig]);
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

export class SimpleClock implements Clock {
  private seq = 0;
  tick(): number {
    return ++this.seq;
  }
}

// ---- guest workloads ------------------------------------------------------

export interface GuestWriteOp {
  offset: number;
  data: Buffer;
}

export type Op =
  | { kind: 'write'; w: GuestWriteOp }
  | { kind: 'group'; ws: GuestWriteOp[] } // issued concurrently, disjoint ranges
  | { kind: 'flush' };

export interface GuestWrite extends GuestWriteOp {
  issued: number;
  done: number;
  errno?: string;
}

export interface GuestFlush {
  issued: number;
  done: number;
  errno?: string;
}

export interface GenOptions {
  count: number;
  /** guest range the writes fall in */
  start: number;
  end: number;
  maxLength: number;
  /** about this many writes between flushes */
  flushEvery: number;
  /** some writes start on a multiple of this (a cluster) */
  align: number;
  /** some pairs of writes are issued concurrently */
  groups?: boolean;
}

/** Deterministic random writes: odd sizes skewed small, some aligned, some all-zero, flushes in between. */
export function genOps(seed: number, o: GenOptions): Op[] {
  const r = rng(seed);
  const ops: Op[] = [];
  let sinceFlush = 0;
  const one = (i: number): GuestWriteOp => {
    const len = Math.max(1, Math.min(o.end - o.start, 1 + Math.floor(r() ** 2 * o.maxLength)));
    let off = o.start + Math.floor(r() * (o.end - o.start - len + 1));
    if (r() < 0.3) off = Math.max(o.start, off - (off % o.align));
    const data = r() < 0.1 ? Buffer.alloc(len) : patternBytes(len, seed * 7919 + i);
    return { offset: off, data };
  };
  for (let i = 0; i < o.count; i++) {
    const a = one(i);
    if (o.groups && r() < 0.25) {
      let b = one(i + 100_000);
      for (let t = 0; t < 20 && b.offset < a.offset + a.data.length && a.offset < b.offset + b.data.length; t++) b = one(i + 100_000 + t + 1);
      if (b.offset < a.offset + a.data.length && a.offset < b.offset + b.data.length) ops.push({ kind: 'write', w: a });
      else ops.push({ kind: 'group', ws: [a, b] });
    } else {
      ops.push({ kind: 'write', w: a });
    }
    if (++sinceFlush >= o.flushEvery && r() < 0.6) {
      ops.push({ kind: 'flush' });
      sinceFlush = 0;
    }
  }
  return ops;
}

export interface RunResult {
  writes: GuestWrite[];
  flushes: GuestFlush[];
}

/**
 * Run ops against a driver, updating `model` (the guest disk) with every
 * write that succeeded. Failed requests are recorded with their errno, never
 * thrown: the caller judges them.
 */
export async function runOps(d: BlockDriver, ops: Op[], model: Buffer, clock: Clock): Promise<RunResult> {
  const writes: GuestWrite[] = [];
  const flushes: GuestFlush[] = [];
  const write = async (w: GuestWriteOp): Promise<void> => {
    const rec: GuestWrite = { ...w, issued: clock.tick(), done: Infinity };
    writes.push(rec);
    try {
      await d.write(w.data, 0, w.data.length, w.offset);
      rec.done = clock.tick();
      w.data.copy(model, w.offset);
    } catch (err) {
      rec.errno = errnoOf(err);
    }
  };
  for (const op of ops) {
    if (op.kind === 'write') await write(op.w);
    else if (op.kind === 'group') await Promise.all(op.ws.map(write));
    else {
      const f: GuestFlush = { issued: clock.tick(), done: Infinity };
      flushes.push(f);
      try {
        await d.flush();
        f.done = clock.tick();
      } catch (err) {
        f.errno = errnoOf(err);
      }
    }
  }
  return { writes, flushes };
}

/** Read the whole guest disk through a driver, 1 MiB at a time. */
export async function readAll(d: BlockDriver): Promise<Buffer> {
  const out = Buffer.alloc(d.virtualSize);
  for (let off = 0; off < d.virtualSize; off += MiB) {
    await d.read(out, off, Math.min(MiB, d.virtualSize - off), off);
  }
  return out;
}

/**
 * Judge guest content against what was flushed: bytes outside `later`
 * equal `base`; a byte inside may also hold what one of the later writes
 * carried there. Returns a description of the first wrong byte, or null.
 */
export function guestMismatch(actual: Buffer, base: Buffer, later: GuestWriteOp[]): string | null {
  const ranges = later.map((w) => [w.offset, w.offset + w.data.length] as [number, number]).sort((a, b) => a[0] - b[0]);
  const merged: Array<[number, number]> = [];
  for (const rg of ranges) {
    const last = merged[merged.length - 1];
    if (last && rg[0] <= last[1]) last[1] = Math.max(last[1], rg[1]);
    else merged.push([rg[0], rg[1]]);
  }
  const firstDiff = (a: number, b: number): number => {
    for (let i = a; i < b; i++) if (actual[i] !== base[i]) return i;
    return -1;
  };
  let pos = 0;
  for (const [a, b] of [...merged, [actual.length, actual.length] as [number, number]]) {
    if (pos < a && !actual.subarray(pos, a).equals(base.subarray(pos, a))) {
      const i = firstDiff(pos, a);
      return `flushed byte at guest offset ${i} reads ${actual[i]}, expected ${base[i]} (no later write touched it)`;
    }
    for (let i = a; i < b; i++) {
      if (actual[i] === base[i]) continue;
      if (!later.some((w) => i >= w.offset && i < w.offset + w.data.length && w.data[i - w.offset] === actual[i])) {
        return `byte at guest offset ${i} reads ${actual[i]}: neither its flushed value ${base[i]} nor one a later write carried`;
      }
    }
    pos = b;
  }
  return null;
}

// ---- scenarios --------------------------------------------------------------

export interface Built {
  image: string;
  format: 'qcow2' | 'qed';
  /** files the engine may write (image, external data file), real paths */
  written: string[];
  /** files that must never change (backing files) */
  frozen: string[];
}

export interface Scenario {
  name: string;
  note: string;
  build(dir: string): Built;
  ops: Op[];
  /** extra per-state judgement (e.g. a snapshot's content); returns a problem or null */
  extraCheck?(b: Built, dir: string): string | null;
  /** after recording: the workload reached what it is meant to exercise */
  exercised?(b: Built, points: IoPoint[]): string | null;
}

function qcow2(dir: string, name: string, size: number, opts: string[], backing?: [string, string]): string {
  const p = path.join(dir, name);
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  if (backing) args.push('-b', backing[0], '-F', backing[1]);
  qemuImg(...args, p, String(size));
  return p;
}

function be32(file: string, at: number): number {
  const b = Buffer.alloc(4);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, 4, at);
  } finally {
    fs.closeSync(fd);
  }
  return b.readUInt32BE(0);
}

/** qcow2 dirty bit (incompatible bit 0) or QED need-check bit (features bit 1). */
export function flaggedUnclean(image: string, format: 'qcow2' | 'qed'): boolean {
  const b = Buffer.alloc(80);
  const fd = fs.openSync(image, 'r');
  try {
    fs.readSync(fd, b, 0, 80, 0);
  } finally {
    fs.closeSync(fd);
  }
  if (format === 'qed') return (b.readBigUInt64LE(16) & 2n) !== 0n;
  if (b.readUInt32BE(4) < 3) return false;
  return (b.readBigUInt64BE(72) & 1n) !== 0n;
}

const needs = (points: IoPoint[], want: IoPoint[]): string | null => {
  const missing = want.filter((p) => !points.includes(p));
  return missing.length ? `the workload never reached ${missing.join(', ')}` : null;
};

/** Compressible source data: text lines with a varying number, so clusters differ. */
function textData(len: number, seed: number): Buffer {
  const parts: string[] = [];
  let n = 0;
  for (let i = 0; n < len; i++) {
    const s = `line ${seed}:${i} of qmount compressible text ${(i * 7919) % 1000}\n`;
    parts.push(s);
    n += s.length;
  }
  return Buffer.from(parts.join('')).subarray(0, len);
}

export const SCENARIOS: Scenario[] = [
  {
    name: 'refblock-alloc',
    note: '4 KiB clusters, 16-bit refcounts: the image is filled to just below 8 MiB (what one refcount block covers), the workload allocates past it',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 24 * MiB, ['cluster_size=4096']);
      qemuIo(image, 'qcow2', [`write -P 0x11 0 ${7900 * KiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(101, { count: 30, start: 7 * MiB, end: 24 * MiB, maxLength: 160 * KiB, flushEvery: 6, align: 4096 }),
    exercised: (_b, pts) => needs(pts, ['refblock_alloc', 'reftable_update', 'l2_alloc', 'l1_update']),
  },
  {
    name: 'reftable-grow',
    note: '512-byte clusters: the image is filled to just below 8 MiB (what a one-cluster refcount table covers), the workload grows the table',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 10 * MiB, ['cluster_size=512']);
      qemuIo(image, 'qcow2', [`write -P 0x22 0 ${7600 * KiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(202, { count: 36, start: 7400 * KiB, end: 10 * MiB, maxLength: 40 * KiB, flushEvery: 7, align: 512 }),
    exercised: (b, pts) => needs(pts, ['reftable_grow', 'header_update', 'refblock_alloc']) ?? (be32(b.image, 56) > 1 ? null : 'the refcount table did not grow'),
  },
  {
    name: 'l2-alloc',
    note: '4 KiB clusters (an L2 table maps 2 MiB), empty 32 MiB disk, writes everywhere, some issued concurrently',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 32 * MiB, ['cluster_size=4096']);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(303, { count: 36, start: 0, end: 32 * MiB, maxLength: 24 * KiB, flushEvery: 6, align: 4096, groups: true }),
    exercised: (_b, pts) => needs(pts, ['l2_alloc', 'l1_update', 'l2_update', 'refblock_update']),
  },
  {
    name: 'snapshot-cow',
    note: '64 KiB clusters, data then an internal snapshot (qemu-img snapshot -c): the L2 table and clusters are shared and copied on write',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, []);
      qemuIo(image, 'qcow2', [`write -P 0x33 0 ${6 * MiB}`, `write -P 0x34 ${7 * MiB} 70000`]);
      qemuImg('snapshot', '-c', 's1', image);
      convertToRaw(image, path.join(dir, 's1.raw'));
      return { image, format: 'qcow2', written: [image], frozen: [path.join(dir, 's1.raw')] };
    },
    ops: genOps(404, { count: 30, start: 0, end: 8 * MiB, maxLength: 100 * KiB, flushEvery: 5, align: 65536 }),
    extraCheck(b, dir) {
      const out = path.join(dir, 's1-now.raw');
      try {
        qemuImg('convert', '-l', 'snapshot.name=s1', '-O', 'raw', b.image, out);
        const same = fs.readFileSync(out).equals(fs.readFileSync(path.join(dir, 's1.raw')));
        return same ? null : 'snapshot s1 content changed';
      } catch (err) {
        return `snapshot s1 unreadable: ${(err as Error).message.split('\n')[0]}`;
      } finally {
        fs.rmSync(out, { force: true });
      }
    },
    exercised: (_b, pts) => needs(pts, ['l2_alloc', 'l1_update', 'cow_write', 'refblock_update']),
  },
  {
    name: 'compressed-overwrite',
    note: '64 KiB clusters from qemu-img convert -c (several compressed clusters share a host cluster), overwritten in part',
    build(dir) {
      const src = path.join(dir, 'src.raw');
      const bytes = Buffer.alloc(8 * MiB);
      textData(6 * MiB, 5).copy(bytes);
      fs.writeFileSync(src, bytes);
      const image = path.join(dir, 'img.qcow2');
      qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, image);
      fs.rmSync(src);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(505, { count: 30, start: 0, end: 7 * MiB, maxLength: 80 * KiB, flushEvery: 5, align: 65536 }),
    exercised: (_b, pts) => needs(pts, ['cow_write', 'l2_update', 'refblock_update']),
  },
  {
    name: 'backing-cow',
    note: '64 KiB clusters over a qcow2 backing file: partial-cluster writes copy head and tail from the backing file',
    build(dir) {
      const base = qcow2(dir, 'base.qcow2', 8 * MiB, []);
      qemuIo(base, 'qcow2', [`write -P 0x44 0 ${5 * MiB}`, `write -P 0x45 ${6 * MiB} ${MiB}`]);
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, [], ['base.qcow2', 'qcow2']);
      return { image, format: 'qcow2', written: [image], frozen: [base] };
    },
    ops: genOps(606, { count: 30, start: 0, end: 8 * MiB, maxLength: 30 * KiB, flushEvery: 5, align: 65536, groups: true }),
    exercised: (_b, pts) => needs(pts, ['cow_write', 'l2_alloc', 'l1_update']),
  },
  {
    name: 'lazy-refcounts',
    note: 'lazy_refcounts=on, 4 KiB clusters, with data: refcounts are written lazily behind the dirty bit',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 16 * MiB, ['cluster_size=4096', 'lazy_refcounts=on']);
      qemuIo(image, 'qcow2', [`write -P 0x55 0 ${3 * MiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(707, { count: 30, start: 0, end: 16 * MiB, maxLength: 60 * KiB, flushEvery: 6, align: 4096, groups: true }),
    exercised: (_b, pts) => needs(pts, ['header_update', 'l2_alloc', 'cow_write']),
  },
  {
    name: 'lazy-reftable-grow',
    note: 'lazy_refcounts=on with 512-byte clusters filled to just below what the refcount table covers: table growth behind the dirty bit, and repairs that must grow it',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 10 * MiB, ['cluster_size=512', 'lazy_refcounts=on']);
      qemuIo(image, 'qcow2', [`write -P 0x23 0 ${7600 * KiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(1010, { count: 36, start: 7400 * KiB, end: 10 * MiB, maxLength: 40 * KiB, flushEvery: 7, align: 512, groups: true }),
    exercised: (b, pts) => needs(pts, ['reftable_grow', 'header_update', 'refblock_alloc']) ?? (be32(b.image, 56) > 1 ? null : 'the refcount table did not grow'),
  },
  {
    name: 'external-data-file',
    note: 'data_file=data.raw, 4 KiB clusters: data goes to the data file, metadata to the image; flushes sync both',
    build(dir) {
      // An absolute name: qemu-img create resolves a relative one against its working directory.
      const data = path.join(dir, 'data.raw');
      const image = qcow2(dir, 'img.qcow2', 16 * MiB, ['cluster_size=4096', `data_file=${data}`]);
      return { image, format: 'qcow2', written: [image, data], frozen: [] };
    },
    ops: genOps(808, { count: 30, start: 0, end: 16 * MiB, maxLength: 40 * KiB, flushEvery: 5, align: 4096 }),
    exercised: (_b, pts) => needs(pts, ['data_write', 'l2_alloc', 'l1_update']),
  },
  {
    name: 'qed-need-check',
    note: 'QED, 4 KiB clusters over a raw backing file: appending allocation behind the need-check bit',
    build(dir) {
      const base = path.join(dir, 'base.raw');
      fs.writeFileSync(base, patternBytes(4 * MiB, 9));
      const image = path.join(dir, 'img.qed');
      qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', image, String(24 * MiB));
      qemuIo(image, 'qed', [`write -P 0x66 ${MiB} ${MiB}`]);
      return { image, format: 'qed', written: [image], frozen: [base] };
    },
    ops: genOps(909, { count: 30, start: 0, end: 24 * MiB, maxLength: 40 * KiB, flushEvery: 6, align: 4096, groups: true }),
    exercised: (_b, pts) => needs(pts, ['header_update', 'cow_write', 'qed_l2_alloc', 'qed_l1_update', 'qed_l2_update']),
  },
];

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
  const initialGuest = fs.readFileSync(initialRaw);
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
      for (const [a, b] of pieces ?? [[x.offset, x.offset + x.length]]) {
        fs.writeSync(fd, x.data!, a - x.offset, b - a, a);
      }
    }
  } finally {
    for (const fd of fds.values()) fs.closeSync(fd);
  }
}

// ---- judging a state --------------------------------------------------------

/**
 * What the guest must see after a crash at time `at`: the content as of the
 * last flush that completed before it (`initial` plus every write completed
 * before that flush was issued), and the writes that may or may not have
 * landed (every other write issued before `at`). `cache` keeps the bases.
 */
export function expectation(
  initial: Buffer,
  writes: GuestWrite[],
  flushes: GuestFlush[],
  at: number,
  cache: Map<number, Buffer> = new Map(),
): { base: Buffer; later: GuestWriteOp[] } {
  let flushIssued = 0;
  for (const f of flushes) if (f.done < at && f.issued > flushIssued) flushIssued = f.issued;
  let base = cache.get(flushIssued);
  if (!base) {
    base = Buffer.from(initial);
    for (const w of writes) if (w.done < flushIssued) w.data.copy(base, w.offset);
    cache.set(flushIssued, base);
  }
  const later = writes.filter((w) => w.issued < at && !(w.done < flushIssued));
  return { base, later };
}

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
