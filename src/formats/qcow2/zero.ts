/**
 * Write-zeroes and discard for qcow2 (BlockDriver.writeZeroes): make a guest
 * range read as zeros - never old data, never backing data.
 *
 * What a whole cluster (extended L2: whole subclusters) becomes, decided
 * from its current L2 entry under the metadata lock (zeroEntry, pure):
 *  - v3: the zero flag. With `unmap` the host cluster's reference is dropped
 *    (entry: zero flag, no offset); without it an own cluster is kept behind
 *    the flag (QEMU's "zero, allocated"), so a later write needs no
 *    allocation. A compressed cluster always loses its reference (its
 *    sectors can be shared with other compressed entries: each entry holds
 *    one reference on every host cluster its sectors touch).
 *  - extended L2: zero bits set and allocation bits cleared for the whole
 *    subclusters; a cluster left with no allocated subcluster loses its host
 *    cluster with `unmap`. Compressed clusters: whole only (a part of one is
 *    written as zeros).
 *  - v2 without a backing file: unallocated (entry 0, reference dropped),
 *    except an own cluster without `unmap`, which gets zeros written in place.
 *  - v2 with a backing file, and images with an external data file: zeros
 *    are written (the normal write path allocates or writes in place), so
 *    backing data can never show through and a raw data file stays the guest
 *    disk.
 * Clusters that already read as zeros change nothing (no L2 table is
 * allocated for them). Partial clusters and subclusters are zeroed in place
 * through the normal write path, unless they already read as zeros.
 *
 * Shared L2 tables are copied first (l2-table.ts); a cluster
 * shared with a snapshot (no COPIED flag) only loses this entry's reference.
 * Dropped references go to the commit queue: released after the cleared
 * entry is durable (commit.ts, step 4); the freed clusters are punched and
 * reused only after that and once no direct write is in flight on them
 * (direct.ts, refcount.ts invariant 3).
 */
import { CorruptionError } from '../../errors.js';
import { classify, entryDataBytes, ExtentKind, readL2Entry, type L2Entry, type Piece } from './map.js';
import { l2ForWrite } from './l2-table.js';
import { badOldMapping, droppedReference } from './plan.js';
import {
  ALL_SUBCLUSTERS, ClusterType, clusterType, entryOffset, type Geometry, L2E_ALLOC_BITMAP, L2E_COPIED, L2E_ZERO, L2E_ZERO_BITMAP,
} from './spec.js';
import type { Qcow2Writer } from './write.js';

/** Source of zeros for the normal write path (never written to). */
const ZERO_BUF = Buffer.alloc(1024 * 1024);

/** What one cluster's entry becomes. */
export interface ZeroDecision {
  /** keep the entry as it is */
  skip: boolean;
  hi: number;
  lo: number;
  alloc: number;
  zero: number;
  /** the old entry's reference to drop */
  drop: boolean;
  /** write zeros in place into the own host cluster instead (v2 without unmap) */
  inPlace: boolean;
  /** write zeros through the normal write path instead (a part of a compressed cluster) */
  viaWrite: boolean;
}

/** A decision to fill in (zeroEntry's `d`). */
export function newZeroDecision(): ZeroDecision {
  return { skip: false, hi: 0, lo: 0, alloc: 0, zero: 0, drop: false, inPlace: false, viaWrite: false };
}

/** The entry cleared: no host cluster; the old one's reference dropped if it had one. */
function clearEntry(d: ZeroDecision, t: ClusterType): void {
  d.hi = 0;
  d.lo = 0;
  d.alloc = 0;
  d.drop = t !== ClusterType.Unallocated && t !== ClusterType.ZeroPlain;
}

/**
 * Pure: the new entry of a cluster whose subclusters `mask` (all of them
 * without extended L2) must read as zeros. `backed`: the image names a
 * backing file (an unallocated cluster would show its data). Fills and
 * returns `d` (a fresh decision unless the caller passes one to reuse).
 */
export function zeroEntry(g: Geometry, old: L2Entry, mask: number, unmap: boolean, backed: boolean, d: ZeroDecision = newZeroDecision()): ZeroDecision {
  d.skip = false;
  d.hi = old.hi;
  d.lo = old.lo;
  d.alloc = old.alloc;
  d.zero = old.zero;
  d.drop = false;
  d.inPlace = false;
  d.viaWrite = false;
  const t = clusterType(g, old.hi, old.lo);
  const all = (mask >>> 0) === ALL_SUBCLUSTERS || !g.extL2;
  if (g.extL2) {
    if (t === ClusterType.Compressed) {
      if (!all) {
        d.viaWrite = true;
        return d;
      }
      clearEntry(d, t);
      d.zero = ALL_SUBCLUSTERS;
      return d;
    }
    const alloc = (old.alloc & ~mask) >>> 0;
    // Unallocated subclusters read as zeros without a backing file: there only allocated ones need the zero bit.
    const zero = (old.zero | (backed ? mask : old.alloc & mask)) >>> 0;
    if (alloc === old.alloc && zero === old.zero) {
      d.skip = true;
      return d;
    }
    if (alloc === 0 && unmap && t === ClusterType.Normal) clearEntry(d, t); // nothing allocated is left: the host cluster goes
    else d.alloc = alloc;
    d.zero = zero;
    return d;
  }
  const readsZero = t === ClusterType.ZeroPlain || t === ClusterType.ZeroAlloc || (t === ClusterType.Unallocated && !backed);
  if (g.v3) {
    if (t === ClusterType.ZeroPlain || (t === ClusterType.Unallocated && !backed) || (readsZero && !unmap)) {
      d.skip = true;
      return d;
    }
    if (!unmap && t === ClusterType.Normal) {
      d.lo = (old.lo | L2E_ZERO) >>> 0; // zero, allocated: the host cluster stays (COPIED as it was)
      return d;
    }
    clearEntry(d, t);
    d.lo = L2E_ZERO;
    return d;
  }
  // v2 (only without a backing file: zeroRange writes zeros otherwise).
  if (t === ClusterType.Unallocated) {
    d.skip = true;
    return d;
  }
  if (!unmap && t === ClusterType.Normal && (old.hi & L2E_COPIED) !== 0) {
    d.skip = true;
    d.inPlace = true;
    return d;
  }
  clearEntry(d, t);
  return d;
}

/** Subclusters [from, to) of a cluster (bytes within it) as an allocation/zero bitmap mask. */
function unitMask(g: Geometry, from: number, to: number): number {
  return g.extL2 ? (2 ** (to / g.subclusterSize) - 2 ** (from / g.subclusterSize)) >>> 0 : ALL_SUBCLUSTERS;
}

const scratchEntry: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
const scratchDecision = newZeroDecision();

/**
 * Lock-free, synchronous: do the whole units [start, end) of one L2 table's
 * span all read as zeros already, so that zeroing them changes nothing
 * (zeroEntry skips every cluster)? Only from what is in memory: the L1
 * table and a cached L2 table; anything else (a table not cached, a bad
 * offset) answers false and the caller takes the locked path. Safe without
 * the lock because nothing is changed: an entry seen here was linked by a
 * write already answered, or belongs to a request still in flight, and
 * requests in flight on one range have no order between them.
 */
function spanReadsZero(w: Qcow2Writer, start: number, end: number, unmap: boolean, backed: boolean): boolean {
  const s = w.s;
  const g = s.g;
  const cs = g.clusterSize;
  const firstClusterIndex = Math.floor(start / cs);
  const lastClusterIndex = Math.floor((end - 1) / cs);
  const l2Offset = s.l2OffsetOf(Math.floor(firstClusterIndex / g.l2Entries));
  if (l2Offset === 0) return !backed; // every entry unallocated: zeros unless a backing file shows through
  if (s.badL2Offset(l2Offset) !== null) return false;
  const table = s.l2Cache.peek(l2Offset);
  if (table === undefined) return false;
  for (let clusterIndex = firstClusterIndex; clusterIndex <= lastClusterIndex; clusterIndex++) {
    readL2Entry(g, table, clusterIndex % g.l2Entries, scratchEntry);
    const from = Math.max(start, clusterIndex * cs) - clusterIndex * cs;
    const to = Math.min(end, (clusterIndex + 1) * cs) - clusterIndex * cs;
    const d = zeroEntry(g, scratchEntry, unitMask(g, from, to), unmap, backed, scratchDecision);
    if (!d.skip || d.inPlace) return false;
  }
  return true;
}

interface Planned {
  clusterIndex: number;
  d: ZeroDecision;
  old: L2Entry;
}

/** The request was checked by the driver (checkRequest in ../driver.ts). */
export async function writeZeroes(w: Qcow2Writer, guestOffset: number, length: number, unmap: boolean): Promise<void> {
  const s = w.s;
  const g = s.g;
  if (length === 0) return;
  if (s.corrupt) throw new CorruptionError('image is marked corrupt; writes are refused');
  const backed = s.header.backingFile !== undefined;
  const end = guestOffset + length;
  if (g.hasDataFile || (!g.v3 && backed)) {
    await writeZeroBytes(w, guestOffset, length);
    return;
  }
  const unit = g.subclusterSize;
  const alignedStart = Math.ceil(guestOffset / unit) * unit;
  const alignedEnd = Math.floor(end / unit) * unit;
  if (alignedStart >= alignedEnd) {
    await zeroPartial(w, guestOffset, length, backed);
    return;
  }
  if (alignedStart > guestOffset) await zeroPartial(w, guestOffset, alignedStart - guestOffset, backed);
  // One critical section per L2 table's span (none where the span reads as zeros already).
  for (let pos = alignedStart; pos < alignedEnd; ) {
    const spanEnd = Math.min(alignedEnd, (Math.floor(pos / g.l2Span) + 1) * g.l2Span);
    if (!spanReadsZero(w, pos, spanEnd, unmap, backed)) await zeroUnits(w, pos, spanEnd, unmap, backed);
    pos = spanEnd;
  }
  if (end > alignedEnd) await zeroPartial(w, alignedEnd, end - alignedEnd, backed);
}

/** Zeros through the normal write path (allocating where needed). */
async function writeZeroBytes(w: Qcow2Writer, guestOffset: number, length: number): Promise<void> {
  for (let done = 0; done < length; ) {
    const n = Math.min(ZERO_BUF.length, length - done);
    await w.write(ZERO_BUF, 0, n, guestOffset + done);
    done += n;
  }
}

/** Parts of units (they may cross a cluster boundary): zeros written where they do not read as zeros already. */
async function zeroPartial(w: Qcow2Writer, guestOffset: number, length: number, backed: boolean): Promise<void> {
  const cs = w.s.g.clusterSize;
  for (let pos = guestOffset; pos < guestOffset + length; ) {
    const next = Math.min(guestOffset + length, (Math.floor(pos / cs) + 1) * cs);
    await zeroInCluster(w, pos, next - pos, backed);
    pos = next;
  }
}

/** A part of one cluster: zeros written, unless it reads as zeros already (zero flag, or unallocated with no backing file). */
async function zeroInCluster(w: Qcow2Writer, guestOffset: number, length: number, backed: boolean): Promise<void> {
  if (length === 0) return;
  const s = w.s;
  const g = s.g;
  const cs = g.clusterSize;
  const clusterIndex = Math.floor(guestOffset / cs);
  const l1i = Math.floor(clusterIndex / g.l2Entries);
  const l2Offset = s.l2OffsetOf(l1i);
  let zero = !backed && l2Offset === 0;
  if (l2Offset !== 0 && s.badL2Offset(l2Offset) === null) {
    const e: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
    await s.l2With(l2Offset, (table) => readL2Entry(g, table, clusterIndex % g.l2Entries, e));
    const piece: Piece = { kind: ExtentKind.Zero, hostOffset: 0, length: 0 };
    zero = true;
    const inCluster = guestOffset - clusterIndex * cs;
    for (let at = inCluster; at < inCluster + length && zero; at += piece.length) {
      classify(g, e, clusterIndex * cs, at, inCluster + length - at, piece);
      zero = piece.kind === ExtentKind.Zero || (piece.kind === ExtentKind.Backing && !backed);
    }
  }
  // A racing write may change the cluster after this look: concurrent requests on one range have no order.
  if (!zero) await writeZeroBytes(w, guestOffset, length);
}

/** Whole units [start, end) inside one L2 table's span. */
async function zeroUnits(w: Qcow2Writer, start: number, end: number, unmap: boolean, backed: boolean): Promise<void> {
  const s = w.s;
  const g = s.g;
  const cs = g.clusterSize;
  const firstClusterIndex = Math.floor(start / cs);
  const lastClusterIndex = Math.floor((end - 1) / cs);
  const l1i = Math.floor(firstClusterIndex / g.l2Entries);
  let later: Array<() => Promise<void>> = [];
  for (;;) {
    // Wrapped: a promise returned bare would be awaited inside the critical section (a deadlock).
    const r = await s.meta.run(async (): Promise<{ wait: Promise<void> | null }> => {
      const busy = w.inflight.waitFor(firstClusterIndex, lastClusterIndex);
      if (busy) return { wait: busy };
      await w.prepareFirstWrite();
      if (s.corrupt) throw new CorruptionError('image is marked corrupt; writes are refused');
      later = await zeroLocked(w, l1i, firstClusterIndex, lastClusterIndex, start, end, unmap, backed);
      return { wait: null };
    });
    if (!r.wait) break;
    await r.wait;
  }
  for (const f of later) await f();
}

/** Under the lock: decide every cluster, then change the table in one synchronous step. Returns the zero writes to do after. */
async function zeroLocked(
  w: Qcow2Writer, l1i: number, firstClusterIndex: number, lastClusterIndex: number, start: number, end: number, unmap: boolean, backed: boolean,
): Promise<Array<() => Promise<void>>> {
  const s = w.s;
  const g = s.g;
  const cs = g.clusterSize;
  const l2off = s.l2OffsetOf(l1i);
  const bad = l2off ? s.badL2Offset(l2off) : null;
  if (bad) s.corruptionFound(`zeroing guest offset ${start} needs L1 entry ${l1i}, whose L2 table offset ${bad}`);
  // The entries, read in one borrow: the loop below awaits (checkReleasable), and under the lock they stay what they are.
  const olds: L2Entry[] = [];
  const decode = (table: Buffer | null): void => {
    for (let clusterIndex = firstClusterIndex; clusterIndex <= lastClusterIndex; clusterIndex++) {
      const old: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
      if (table) readL2Entry(g, table, clusterIndex % g.l2Entries, old);
      olds.push(old);
    }
  };
  if (l2off) await s.l2With(l2off, decode);
  else decode(null);
  const planned: Planned[] = [];
  const later: Array<() => Promise<void>> = [];
  const inPlace: number[] = [];
  // Counted as direct writes only once nothing here can throw any more.
  const result = (): Array<() => Promise<void>> => [...later, ...inPlace.map((host) => w.zeroInPlace(host, cs))];
  for (let clusterIndex = firstClusterIndex; clusterIndex <= lastClusterIndex; clusterIndex++) {
    const old = olds[clusterIndex - firstClusterIndex];
    const from = Math.max(start, clusterIndex * cs) - clusterIndex * cs;
    const to = Math.min(end, (clusterIndex + 1) * cs) - clusterIndex * cs;
    const d = zeroEntry(g, old, unitMask(g, from, to), unmap, backed);
    if (d.viaWrite) {
      later.push(() => writeZeroBytes(w, clusterIndex * cs + from, to - from));
      continue;
    }
    if (d.skip && !d.inPlace) continue;
    const badOld = badOldMapping(g, s.fileSizeAtOpen, old, clusterIndex * cs);
    if (badOld) s.corruptionFound(`zeroing guest offset ${clusterIndex * cs} needs its L2 entry, whose ${badOld}`);
    if (d.inPlace) {
      const host = entryOffset(old.hi, old.lo);
      s.checkOverlap(host, cs, 'zero write');
      inPlace.push(host);
      continue;
    }
    if (d.drop) {
      const dropped = droppedReference(g, old);
      if (dropped) await w.checkReleasable('zeroing', clusterIndex * g.clusterSize, dropped);
    }
    planned.push({ clusterIndex, d, old });
  }
  if (planned.length === 0) return result();
  // Entries cannot change while the lock is held; the table may be copied (shared) or allocated here.
  const offset = await l2ForWrite(w, l1i);
  await s.l2Modify(offset, (t) => {
    for (const { clusterIndex, d } of planned) {
      const at = (clusterIndex % g.l2Entries) * g.l2EntryBytes;
      t.writeUInt32BE(d.hi, at);
      t.writeUInt32BE(d.lo, at + 4);
      if (g.extL2) {
        t.writeUInt32BE(d.zero, at + L2E_ZERO_BITMAP);
        t.writeUInt32BE(d.alloc, at + L2E_ALLOC_BITMAP);
      }
    }
  });
  for (const { clusterIndex, d, old } of planned) {
    s.dataBytes.note(clusterIndex, entryDataBytes(g, { hi: d.hi, lo: d.lo, alloc: d.alloc, zero: d.zero }) - entryDataBytes(g, old));
    if (d.drop) {
      const dropped = droppedReference(g, old);
      if (dropped) w.commit.queueRelease(dropped[0], dropped[1]);
    }
  }
  s.log.debug({ l1Index: l1i, clusters: planned.length, unmap }, 'clusters zeroed');
  await w.flushIfPressed();
  return result();
}
