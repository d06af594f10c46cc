/**
 * Guest workloads for the safety tests: generated write/flush sequences, a
 * runner that stamps every request on a logical clock and keeps a model of
 * the guest disk, and the judgement of guest content after a crash or a
 * failed request (flushed bytes exact, later bytes old or new).
 */
import type { BlockDriver } from '../../src/formats/driver.js';
import { errnoOf } from '../../src/errors.js';
import { patternBytes } from './qemu.js';
import { rng } from './workload.js';

const MiB = 1024 * 1024;

/** A logical clock: every issue and completion gets the next tick. */
export interface Clock {
  tick(): number;
}

export class SimpleClock implements Clock {
  private seq = 0;
  tick(): number {
    return ++this.seq;
  }
}

export interface GuestWriteOp {
  offset: number;
  data: Buffer;
}

export type Op =
  | { kind: 'write'; w: GuestWriteOp }
  | { kind: 'group'; ws: GuestWriteOp[] } // issued concurrently, disjoint ranges
  | { kind: 'flush' }
  // driver.writeZeroes: judged like a write of zeros (w.data is all zeros)
  | { kind: 'zero'; w: GuestWriteOp; unmap: boolean }
  // driver.resize (growing): the model is sized for the largest size from the start (Scenario.guestSize)
  | { kind: 'resize'; size: number };

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
  /** this share of the requests are writeZeroes (half of them with unmap); some run beside a write */
  zeroes?: number;
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
    if (o.zeroes !== undefined && r() < o.zeroes) {
      // Zeroings favour whole clusters (what discard and fstrim send).
      if (r() < 0.6) {
        const start = a.offset - (a.offset % o.align);
        const len = Math.max(o.align, a.data.length - (a.data.length % o.align));
        a.offset = start;
        a.data = Buffer.alloc(Math.min(len, o.end - start));
      } else {
        a.data = Buffer.alloc(a.data.length);
      }
      ops.push({ kind: 'zero', w: a, unmap: r() < 0.5 });
    } else if (o.groups && r() < 0.25) {
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
  // A request past the end of the disk is not issued (the disk did not grow: a resize failed).
  const fits = (w: GuestWriteOp): boolean => w.offset + w.data.length <= d.virtualSize;
  const write = async (w: GuestWriteOp): Promise<void> => {
    if (!fits(w)) return;
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
  const zero = async (w: GuestWriteOp, unmap: boolean): Promise<void> => {
    if (!fits(w)) return;
    const rec: GuestWrite = { ...w, issued: clock.tick(), done: Infinity };
    writes.push(rec);
    try {
      await d.writeZeroes(w.offset, w.data.length, { unmap });
      rec.done = clock.tick();
      model.fill(0, w.offset, w.offset + w.data.length);
    } catch (err) {
      rec.errno = errnoOf(err);
    }
  };
  for (const op of ops) {
    if (op.kind === 'write') await write(op.w);
    else if (op.kind === 'group') await Promise.all(op.ws.map(write));
    else if (op.kind === 'zero') await zero(op.w, op.unmap);
    else if (op.kind === 'resize') {
      // A resize is durable when it returns: judged as a flush (the model already spans the new size).
      const f: GuestFlush = { issued: clock.tick(), done: Infinity };
      flushes.push(f);
      try {
        await d.resize(op.size);
        f.done = clock.tick();
      } catch (err) {
        f.errno = errnoOf(err);
      }
    } else {
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
export function guestMismatch(actual: Buffer, base0: Buffer, later: GuestWriteOp[]): string | null {
  // A disk that grew (a resize): `base0` spans the largest size. A shorter disk (the grow not durable
  // yet) must not miss flushed data past its end.
  let base = base0;
  if (actual.length > base.length) return `the disk reads ${actual.length} bytes, more than the ${base.length} it may have`;
  if (actual.length < base.length) {
    const lost = base.subarray(actual.length).findIndex((b) => b !== 0);
    if (lost >= 0) return `the disk reads ${actual.length} bytes: flushed data at guest offset ${actual.length + lost} is past its end`;
    base = base.subarray(0, actual.length);
  }
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
