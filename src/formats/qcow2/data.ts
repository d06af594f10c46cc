/**
 * Phase 2 of a qcow2 write (write.ts), without the metadata lock: the data
 * of every cluster of a request, direct writes in place and rewrites as
 * whole segments with their copy-on-write head and tail, coalesced into as
 * few writes as host contiguity allows. Returns once every write it started
 * has settled (the caller's buffer is free then, also on failure).
 */
import { settleAll } from '../../io/file.js';
import { classify, ExtentKind, type L2Entry, type Piece } from './map.js';
import type { ClusterOp } from './plan.js';
import { readGuest, track } from './read.js';
import type { Qcow2State } from './state.js';

/** readsAsZero's piece (used synchronously only). */
const piece: Piece = { kind: ExtentKind.Zero, hostOffset: 0, length: 0 };

/** Phase 2 (no lock): direct writes in place, rewrites as whole segments with their COW head and tail. */
export async function writeClusters(s: Qcow2State, buf: Buffer, ops: ClusterOp[]): Promise<void> {
  const cs = s.g.clusterSize;
  const file = s.dataFile ?? s.file;
  const ios: Promise<unknown>[] = [];
  // Coalesce: consecutive pieces contiguous on the host become one write.
  let runHost = -1;
  let runLen = 0;
  let runCow = false;
  let parts: Array<{ src: Buffer; at: number; len: number }> = [];
  const flushRun = (): void => {
    if (runLen === 0) return;
    const host = runHost;
    const len = runLen;
    const point = runCow ? 'cow_write' : 'data_write';
    let data: Buffer;
    if (parts.length === 1) {
      data = parts[0].src.subarray(parts[0].at, parts[0].at + parts[0].len);
    } else {
      data = Buffer.allocUnsafe(len);
      let o = 0;
      for (const p of parts) {
        p.src.copy(data, o, p.at, p.at + p.len);
        o += p.len;
      }
    }
    track(ios, file.write(point, data, 0, len, host).then(() => s.noteDataEnd(file, host + len)));
    runHost = -1;
    runLen = 0;
    runCow = false;
    parts = [];
  };
  /** `cow`: part of a segment with a head or tail to fill (IoPoint 'cow_write'). */
  const add = (host: number, src: Buffer, at: number, len: number, cow: boolean): void => {
    if (len <= 0) return;
    if (runLen > 0 && runHost + runLen !== host) flushRun();
    if (runLen === 0) runHost = host;
    if (cow) runCow = true;
    // Consecutive slices of one buffer stay one part: written without a copy.
    const last = parts[parts.length - 1];
    if (last && last.src === src && last.at + last.len === at) last.len += len;
    else parts.push({ src, at, len });
    runLen += len;
  };

  // A head or tail that the old mapping reads as zeros. Where nothing was
  // ever written (a new cluster past the end of the file) it already reads
  // as zeros and costs nothing: the data write or a later one grows the
  // file over it, and a cluster that ends past the end of the file reads
  // as zeros there (qemu too); close() grows the file to whole clusters.
  // Elsewhere (a reused cluster, a zero-flagged one kept in place) zeros
  // are written, without a buffer (ImageFile.writeZeroes).
  const zeroes = (host: number, len: number): void => {
    if (file.neverWritten(host)) {
      s.noteDataEnd(file, host + len);
      return;
    }
    flushRun();
    track(ios, file.writeZeroes('cow_write', host, len).then(() => s.noteDataEnd(file, host + len)));
  };

  // [from, to) of a rewritten cluster, outside the guest data: what the old mapping shows there.
  const fill = async (op: ClusterOp, from: number, to: number): Promise<void> => {
    if (to <= from) return;
    if (readsAsZero(s, op.old, op.clusterIndex * cs, from, to)) {
      zeroes(op.hostOffset + from, to - from);
      return;
    }
    const old = Buffer.allocUnsafe(to - from);
    // The last cluster may reach past the end of the disk: that part reads as zeros.
    const inDisk = Math.max(0, Math.min(old.length, s.virtualSize - (op.clusterIndex * cs + from)));
    if (inDisk > 0) await readGuest(s, old, 0, inDisk, op.clusterIndex * cs + from);
    old.fill(0, inDisk);
    add(op.hostOffset + from, old, 0, old.length, true);
  };

  try {
    for (const op of ops) {
      if (!op.rewrite) {
        add(op.hostOffset + op.writeStart, buf, op.bufAt, op.writeEnd - op.writeStart, false);
        continue;
      }
      for (const [start, end] of op.segments) {
        // Head [start, dataStart) and tail [dataEnd, end) come from the old mapping.
        const dataStart = Math.min(Math.max(start, op.writeStart), end);
        const dataEnd = Math.max(Math.min(end, op.writeEnd), dataStart);
        await fill(op, start, dataStart);
        add(op.hostOffset + dataStart, buf, op.bufAt + (dataStart - op.writeStart), dataEnd - dataStart, dataStart > start || end > dataEnd);
        await fill(op, dataEnd, end);
      }
    }
    flushRun();
  } catch (err) {
    await Promise.allSettled(ios);
    throw err;
  }
  await settleAll(ios);
}

/** Does the guest see zeros in [start, end) of a cluster mapped by `old` (no I/O)? */
function readsAsZero(s: Qcow2State, old: L2Entry, clusterOffset: number, start: number, end: number): boolean {
  for (let at = start; at < end; at += piece.length) {
    classify(s.g, old, clusterOffset, at, end - at, piece);
    const k = piece.kind;
    if (!(k === ExtentKind.Zero || (k === ExtentKind.Backing && s.backing === null))) return false;
  }
  return true;
}
