/**
 * Write planning for qcow2, pure: from a cluster's current L2 entry, how a
 * write into it goes - in place ("direct"), or as a rewrite into the same or
 * a new host cluster with the segments to write and the new subcluster
 * bitmaps. No I/O and no state: the writer (write.ts) calls these under the
 * metadata lock (and directHost also on its lock-free fast path), and unit
 * tests call them on in-memory entries.
 */
import type { L2Entry } from './map.js';
import {
  ALL_SUBCLUSTERS,
  badClusterOffset,
  badCompressed,
  clusterType,
  ClusterType,
  compressedExtent,
  decodeCompressed,
  entryOffset,
  type Geometry,
  hasHostCluster,
  L2E_COMPRESSED,
  L2E_COPIED,
} from './spec.js';

/** One guest cluster touched by a write. Offsets in bytes within the cluster unless named otherwise. */
export interface ClusterOp {
  /** guest cluster index */
  clusterIndex: number;
  writeStart: number;
  writeEnd: number;
  /** offset into the caller's buffer of writeStart */
  bufAt: number;
  rewrite: boolean;
  /** host offset (bytes) of the target cluster (in the data file when there is one) */
  hostOffset: number;
  /** host cluster newly allocated by this request */
  fresh: boolean;
  old: L2Entry;
  /** rewrite: segments of the cluster to write, each [start, end) */
  segments: Array<[number, number]>;
  newAlloc: number;
  newZero: number;
}

/**
 * Where a write of [writeStart, writeEnd) into guest cluster `clusterIndex` can go
 * in place, or -1. In place ("direct") means: the cluster has a host
 * cluster of its own (COPIED: refcount 1; with a data file, any allocated
 * cluster), no zero flag, and with extended L2 every touched subcluster is
 * allocated. Such a write changes no metadata. The one rule for both the
 * planned path and the unlocked fast path in write().
 */
export function directHost(g: Geometry, clusterIndex: number, writeStart: number, writeEnd: number, old: L2Entry): number {
  if (clusterType(g, old.hi, old.lo) !== ClusterType.Normal) return -1; // compressed, zero or unallocated
  const host = entryOffset(old.hi, old.lo);
  if (host !== 0 && badClusterOffset(g, host) !== null) return -1; // planCluster's caller reports it (badOldMapping)
  const copied = (old.hi & L2E_COPIED) !== 0;
  if (g.extL2) {
    const sc = g.subclusterSize;
    const firstSc = Math.floor(writeStart / sc);
    const lastSc = Math.floor((writeEnd - 1) / sc);
    const touched = (2 ** (lastSc + 1) - 2 ** firstSc) >>> 0;
    if ((old.alloc & touched) !== touched) return -1;
    if ((old.alloc & old.zero) !== 0) return -1; // badOldMapping reports it
  }
  // With a data file, every cluster with a host cluster is its own (refcount 1, host offset = guest offset).
  if (g.hasDataFile) return host === 0 || host === clusterIndex * g.clusterSize ? clusterIndex * g.clusterSize : -1;
  return copied ? host : -1;
}

/** How one cluster is written, from its current L2 entry. */
export function planCluster(g: Geometry, clusterIndex: number, writeStart: number, writeEnd: number, bufAt: number, old: L2Entry): ClusterOp {
  const cs = g.clusterSize;
  const op: ClusterOp = {
    clusterIndex, writeStart, writeEnd, bufAt, rewrite: true, hostOffset: 0, fresh: true, old, segments: [[0, cs]], newAlloc: 0, newZero: 0,
  };
  const direct = directHost(g, clusterIndex, writeStart, writeEnd, old);
  if (direct >= 0) {
    op.rewrite = false;
    op.fresh = false;
    op.hostOffset = direct;
    return op;
  }
  const sc = g.subclusterSize;
  const firstSc = Math.floor(writeStart / sc);
  const lastSc = Math.floor((writeEnd - 1) / sc);
  const touched = g.extL2 ? ((2 ** (lastSc + 1) - 2 ** firstSc) >>> 0) : 0;
  const type = clusterType(g, old.hi, old.lo);
  const copied = (old.hi & L2E_COPIED) !== 0;

  if (type === ClusterType.Compressed) {
    op.newAlloc = g.extL2 ? ALL_SUBCLUSTERS : 0;
    return op;
  }
  if (g.hasDataFile) {
    // Host offset is the guest offset; nothing is refcounted or allocated.
    op.hostOffset = clusterIndex * cs;
    op.fresh = false;
    if (g.extL2) subclusterSegments(g, op, touched, type === ClusterType.Normal ? old.alloc : 0);
    return op;
  }
  const host = entryOffset(old.hi, old.lo);
  if (hasHostCluster(type) && copied) {
    // Our own cluster with a zero flag or unallocated subclusters: rewritten in place.
    op.hostOffset = host;
    op.fresh = false;
    if (g.extL2) subclusterSegments(g, op, touched, old.alloc);
    return op;
  }
  // Unallocated, zero without a private cluster, or shared: a new cluster.
  if (g.extL2) {
    op.newAlloc = (old.alloc | touched) >>> 0;
    op.newZero = (old.zero & ~touched) >>> 0;
    if (type === ClusterType.Unallocated || old.alloc === 0) op.segments = [[firstSc * sc, (lastSc + 1) * sc]];
  }
  return op;
}

/**
 * Why the current mapping of a cluster cannot be written through or
 * replaced (null when it can): the host cluster it names is written in
 * place or has its reference dropped, so it must be a real cluster of this
 * file. A direct write may still grow the file over a cluster past its end.
 * `fileSize`: the size at open (Qcow2State.fileSizeAtOpen), below which every
 * shared or compressed cluster lies. `clusterOffset`: the cluster's guest
 * offset (an external data file's host offset must equal it). Extended L2
 * bitmaps that break the format's rules count too.
 */
export function badOldMapping(g: Geometry, fileSize: number, old: L2Entry, clusterOffset: number): string | null {
  if (g.extL2) {
    // Bitmaps QEMU calls corrupt on first access (iotest 271).
    if ((old.alloc & old.zero) !== 0) return 'subclusters are both allocated and zero';
    const type = clusterType(g, old.hi, old.lo);
    if (type === ClusterType.Compressed && (old.alloc | old.zero) !== 0) return 'compressed cluster has a subcluster bitmap';
    if (type === ClusterType.Unallocated && old.alloc !== 0) return 'unallocated cluster has subclusters marked allocated';
  }
  if (g.hasDataFile) {
    const host = entryOffset(old.hi, old.lo);
    if (old.hi & L2E_COMPRESSED) return 'compressed cluster in an image with an external data file';
    return host === 0 || host === clusterOffset ? null : `data-file host offset ${host} does not match the guest offset`;
  }
  if (old.hi & L2E_COMPRESSED) {
    const bad = badCompressed(g, decodeCompressed(g, old.hi, old.lo), fileSize);
    return bad ? `compressed cluster: ${bad}` : null;
  }
  const host = entryOffset(old.hi, old.lo);
  if (host === 0) return null;
  const bad = badClusterOffset(g, host);
  if (bad) return `data cluster offset ${bad}`;
  if ((old.hi & L2E_COPIED) === 0 && host >= fileSize) return `shared data cluster 0x${host.toString(16)} lies past the end of the file`;
  return null;
}

/**
 * Extended L2, target cluster kept: touched subclusters that are already
 * allocated get only the guest bytes (no read-modify-write, so a
 * concurrent direct write elsewhere in them is never overwritten with
 * stale data); unallocated or zero ones are written whole.
 */
function subclusterSegments(g: Geometry, op: ClusterOp, touched: number, allocated: number): void {
  const sc = g.subclusterSize;
  const segs: Array<[number, number]> = [];
  for (let j = 0; j < 32; j++) {
    if (!((touched >>> j) & 1)) continue;
    const seg: [number, number] = (allocated >>> j) & 1
      ? [Math.max(op.writeStart, j * sc), Math.min(op.writeEnd, (j + 1) * sc)]
      : [j * sc, (j + 1) * sc];
    const last = segs[segs.length - 1];
    if (last && last[1] === seg[0]) last[1] = seg[1];
    else segs.push(seg);
  }
  op.segments = segs;
  op.newAlloc = (op.old.alloc | touched) >>> 0;
  op.newZero = (op.old.zero & ~touched) >>> 0;
}

/**
 * The host bytes whose reference a rewrite into a new cluster drops (the
 * old mapping: a shared cluster, or a compressed cluster's sectors), as
 * [start, bytes]; null when the old mapping holds no reference.
 */
export function droppedReference(g: Geometry, old: L2Entry): [number, number] | null {
  if (old.hi & L2E_COMPRESSED) {
    const { start, bytes } = compressedExtent(decodeCompressed(g, old.hi, old.lo));
    return [start, bytes];
  }
  const host = entryOffset(old.hi, old.lo);
  return host === 0 ? null : [host, g.clusterSize];
}
