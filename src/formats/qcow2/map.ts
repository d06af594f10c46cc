/**
 * Guest-to-host mapping for reads: walks L1 -> L2 and turns a guest range
 * into extents, coalescing neighbours so a sequential read of contiguous
 * host clusters becomes one I/O.
 *
 * The mapping is computed synchronously after the L2 table is in memory and
 * acted on after; a write that re-points an entry meanwhile makes this read
 * return the old content (allowed), never a mix inside one extent, because
 * freed host clusters are not reused while reads are in flight (see
 * Refcounts.quarantine).
 */
import { CorruptionError } from '../../errors.js';
import { badClusterOffset, ClusterType, clusterType, entryOffset, type Geometry, L2E_ALLOC_BITMAP, L2E_ZERO_BITMAP } from './spec.js';

export const enum ExtentKind {
  Data = 0, // host bytes in the image file
  ExternalData = 1, // host bytes in the external data file
  Backing = 2, // unallocated: backing file or zeros
  Zero = 3,
  Compressed = 4,
}

export interface L2Entry {
  hi: number;
  lo: number;
  /** extended L2: allocation bits (subcluster i = bit i) */
  alloc: number;
  /** extended L2: zero bits */
  zero: number;
}

export function readL2Entry(g: Geometry, table: Buffer, index: number, out: L2Entry): void {
  const at = index * g.l2EntryBytes;
  out.hi = table.readUInt32BE(at);
  out.lo = table.readUInt32BE(at + 4);
  if (g.extL2) {
    out.zero = table.readUInt32BE(at + L2E_ZERO_BITMAP);
    out.alloc = table.readUInt32BE(at + L2E_ALLOC_BITMAP);
  } else {
    out.zero = 0;
    out.alloc = 0;
  }
}

/**
 * The kind of guest bytes at `inCluster` (byte offset within the cluster)
 * and how many bytes from there share that kind and host contiguity.
 * Returns the host offset of `inCluster` for data kinds.
 */
export interface Piece {
  kind: ExtentKind;
  hostOffset: number;
  /** bytes */
  length: number;
}

/**
 * `clusterOffset`: the guest offset of the cluster. With an external data
 * file the host offset must equal it (QEMU too calls anything else corrupt:
 * writes go to the guest offset, so reads elsewhere would lose them).
 */
export function classify(g: Geometry, e: L2Entry, clusterOffset: number, inCluster: number, maxLen: number, piece: Piece): void {
  const type = clusterType(g, e.hi, e.lo);
  if (type === ClusterType.Compressed) {
    piece.kind = ExtentKind.Compressed;
    piece.hostOffset = 0;
    piece.length = Math.min(maxLen, g.clusterSize - inCluster);
    return;
  }
  const host = entryOffset(e.hi, e.lo);
  if (host !== 0) {
    // QEMU too fails the request (and calls the image corrupt) on such an entry.
    const bad = badClusterOffset(g, host);
    if (bad) throw new CorruptionError(`L2 entry's data cluster offset ${bad}`);
    if (g.hasDataFile && host !== clusterOffset) {
      throw new CorruptionError(`external data file: host cluster offset ${host} does not match guest cluster offset ${clusterOffset}`);
    }
  }
  const dataKind = g.hasDataFile ? ExtentKind.ExternalData : ExtentKind.Data;
  if (!g.extL2) {
    piece.length = Math.min(maxLen, g.clusterSize - inCluster);
    if (type === ClusterType.ZeroPlain || type === ClusterType.ZeroAlloc) {
      piece.kind = ExtentKind.Zero;
    } else if (type === ClusterType.Unallocated) {
      piece.kind = ExtentKind.Backing;
    } else {
      piece.kind = dataKind;
      piece.hostOffset = host + inCluster;
    }
    return;
  }
  // Extended L2: runs of subclusters with the same status.
  const sc = g.subclusterSize;
  let i = Math.floor(inCluster / sc);
  const kindOf = (j: number): ExtentKind =>
    (e.alloc >>> j) & 1 ? dataKind : (e.zero >>> j) & 1 ? ExtentKind.Zero : ExtentKind.Backing;
  const k = kindOf(i);
  if ((e.alloc & e.zero) !== 0) throw new CorruptionError('extended L2 entry has subclusters both allocated and zero');
  if (k === dataKind && type === ClusterType.Unallocated) throw new CorruptionError('extended L2 entry allocates subclusters of an unallocated cluster');
  let end = (i + 1) * sc;
  while (end < g.clusterSize && end - inCluster < maxLen && kindOf(++i) === k) end += sc;
  piece.kind = k;
  piece.hostOffset = k === dataKind ? host + inCluster : 0;
  piece.length = Math.min(maxLen, end - inCluster);
}

/**
 * Guest bytes an L2 entry maps to data of this image (for allocatedBytes):
 * the whole cluster for a normal or compressed cluster, the allocated
 * subclusters with extended L2, nothing for zero or unallocated clusters.
 */
export function entryDataBytes(g: Geometry, e: L2Entry): number {
  const t = clusterType(g, e.hi, e.lo);
  if (t === ClusterType.Compressed) return g.clusterSize;
  if (t !== ClusterType.Normal) return 0;
  if (!g.extL2) return g.clusterSize;
  let bits = e.alloc >>> 0;
  let n = 0;
  while (bits !== 0) {
    bits &= bits - 1;
    n++;
  }
  return n * g.subclusterSize;
}

/** Guest bytes of data this image maps in the L2 table `table` (one L1 entry's span, cut at `limitEntries`). */
export function tableDataBytes(g: Geometry, table: Buffer, limitEntries: number): number {
  const e: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
  let sum = 0;
  for (let i = 0; i < limitEntries; i++) {
    readL2Entry(g, table, i, e);
    if (e.hi === 0 && e.lo === 0) continue;
    sum += entryDataBytes(g, e);
  }
  return sum;
}
