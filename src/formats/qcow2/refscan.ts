/**
 * Reference scan: walks every structure that references host clusters and
 * counts the references, the way `qemu-img check` does. Used to repair a
 * dirty (lazy-refcounts) image on read-write open and by `qmount check`.
 *
 * Counting rules (those of QEMU, so results agree):
 *  - header cluster, active L1 table, refcount table, every refcount block,
 *    snapshot table: one each;
 *  - every L1 table (active and each snapshot's): each L2 table it points at
 *    gets one reference, and every entry of that L2 table counts one more
 *    reference to its data cluster(s) - so a table shared by k L1 tables
 *    counts its clusters k times;
 *  - a compressed entry references every host cluster its sectors touch;
 *  - with an external data file, data clusters are not counted;
 *  - consistent persistent bitmaps: directory, tables and data clusters.
 *
 * Entries that break a rule are corruptions, as in qemu-img check: reserved
 * bits set in an L1 or L2 entry, unaligned or unrepresentable offsets (see
 * ../u64.ts), and with extended L2 a subcluster both allocated and zero, an
 * allocation bit in an unallocated cluster, or any bitmap bit in a
 * compressed entry (iotest 271); a COPIED flag on a compressed entry; a
 * compressed entry in an image with an external data file; a version 3
 * snapshot table entry with less than 16 bytes of extra data. Clusters of an
 * entry that breaks a rule are not counted when they cannot be located.
 *
 * Sized for 1 TiB images with every cluster allocated (16M clusters): the
 * expected counts take one byte per cluster (ExpectedCounts), the active
 * tables' COPIED flags two bits per cluster, and each L2 table is read once,
 * one at a time, and decoded in a tight loop. The scan also gathers
 * qemu-img's fragmentation figures for the active table.
 */
import os from 'node:os';
import { bitmapRanges } from './bitmaps.js';
import { checkpoint, type WorkHooks } from '../../progress.js';
import { hexOffset, INVALID_OFFSET } from '../u64.js';
import type { FragInfo } from '../driver.js';
import type { Qcow2State } from './state.js';
import { AUTOCLEAR_BITMAPS, badClusterOffset, clusterType, compressedClusters, decodeCompressed, entryOffset, hasBit, hasHostCluster, L1E_RESERVED_HI, L1E_RESERVED_LO, L2E_ALLOC_BITMAP, L2E_COMPRESSED, L2E_COPIED, L2E_RESERVED_HI, L2E_RESERVED_LO, L2E_ZERO, L2E_ZERO_BITMAP, SNAPSHOT_V3_MIN_EXTRA } from './spec.js';

const LITTLE_ENDIAN = os.endianness() === 'LE';

export interface ScanProblem {
  kind: 'corruption';
  message: string;
}

/**
 * Expected refcount per cluster index: one byte each, values of 255 and
 * more kept in a map (only clusters shared by that many tables or
 * snapshots; never more than a few).
 */
export class ExpectedCounts {
  private readonly small: Uint8Array;
  private readonly big = new Map<number, number>();

  constructor(readonly clusters: number) {
    this.small = new Uint8Array(clusters);
  }

  inc(c: number): void {
    const v = this.small[c]!;
    if (v < 255) this.small[c] = v + 1;
    else this.big.set(c, (this.big.get(c) ?? 255) + 1);
  }

  get(c: number): number {
    const v = this.small[c]!;
    return v < 255 ? v : (this.big.get(c) ?? 255);
  }

  /** Index of the first cluster in [from, to) with a non-zero count, or `to`. */
  nextNonZero(from: number, to: number): number {
    const a = this.small;
    let c = from;
    while (c < to && a[c] === 0) c++;
    return c;
  }
}

/** A bit per cluster. */
class ClusterBits {
  readonly bits: Uint8Array;
  constructor(clusters: number) {
    this.bits = new Uint8Array((clusters >>> 3) + 1);
  }
  set(c: number): void {
    this.bits[c >>> 3]! |= 1 << (c & 7);
  }
  has(c: number): boolean {
    return (this.bits[c >>> 3]! & (1 << (c & 7))) !== 0;
  }
}

export interface RefScan {
  /** expected refcount per cluster index, for clusters below `clusters` */
  counts: ExpectedCounts;
  clusters: number;
  problems: ScanProblem[];
  frag: FragInfo;
  /**
   * Data clusters the active L2 tables reference with the COPIED flag set
   * (`copied`) and without it (`notCopied`): the COPIED check needs to
   * re-read the tables only if one of these disagrees with a refcount.
   * Undefined with an external data file (its clusters are not counted) or
   * extended L2 entries (checked by re-reading the tables).
   */
  copied?: { set: ClusterBits; clear: ClusterBits };
  /** L2 tables the scan reads (its progress units, one cluster each). */
  l2Tables: number;
}

export async function scanReferences(
  s: Qcow2State,
  refTable: { offset: number; clusters: number; blocks: number[] },
  hooks?: WorkHooks,
  /** Told after each L2 table: tables read so far, of how many. */
  onTable?: (read: number, total: number) => void,
): Promise<RefScan> {
  const cs = s.g.clusterSize;
  const fileClusters = Math.ceil(s.fileSize / cs);
  const counts = new ExpectedCounts(fileClusters + 1);
  const problems: ScanProblem[] = [];
  const bad = (message: string): void => {
    if (problems.length < 1000) problems.push({ kind: 'corruption', message });
  };
  const add = (offset: number, length: number, what: string): void => {
    if (length <= 0) return;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    if (last >= fileClusters) {
      bad(`${what} at ${hexOffset(offset)} lies past the end of the file`);
      return;
    }
    for (let c = first; c <= last; c++) counts.inc(c);
  };

  add(0, cs, 'header');
  add(refTable.offset, refTable.clusters * cs, 'refcount table');
  for (const b of refTable.blocks) add(b, cs, 'refcount block');
  if (s.header.nbSnapshots > 0) add(s.header.snapshotsOffset, s.snapshotTableBytes, 'snapshot table');
  if (hasBit(s.header.autoclear, AUTOCLEAR_BITMAPS)) {
    try {
      const { ranges } = await bitmapRanges(s.file, s.header, s.fileSize);
      for (const r of ranges) add(r.offset, r.length, 'bitmap data');
    } catch (err) {
      bad((err as Error).message);
    }
  }

  const l1s: Array<{ l1: Buffer; offset: number; active: boolean }> = [
    { l1: s.l1, offset: s.header.l1TableOffset, active: true },
  ];
  for (const [i, snap] of s.snapshots.entries()) {
    // v3 snapshots carry at least vm_state_size_large and disk_size (iotest 261).
    if (s.g.v3 && snap.extraDataBytes < SNAPSHOT_V3_MIN_EXTRA) bad(`snapshot table entry ${i} is incomplete (${snap.extraDataBytes} bytes of extra data, version 3 needs ${SNAPSHOT_V3_MIN_EXTRA})`);
    const l1 = Buffer.alloc(snap.l1Size * 8);
    await s.file.read(l1, 0, l1.length, snap.l1TableOffset);
    l1s.push({ l1, offset: snap.l1TableOffset, active: false });
  }
  let l2Tables = 0;
  for (const { l1 } of l1s) {
    for (let i = 0; i < l1.length; i += 8) if (l1.readUInt32BE(i) !== 0 || l1.readUInt32BE(i + 4) !== 0) l2Tables++;
  }

  const frag: FragInfo = {
    totalClusters: Math.ceil(s.virtualSize / cs),
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
  const copied = s.g.hasDataFile || s.g.extL2 ? undefined : { set: new ClusterBits(fileClusters + 1), clear: new ClusterBits(fileClusters + 1) };
  const table = Buffer.alloc(cs);
  let read = 0;
  for (const { l1, offset, active } of l1s) {
    add(offset, l1.length, 'L1 table');
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      await checkpoint(hooks, 'reference scan');
      onTable?.(++read, l2Tables);
      const which = active ? 'L1' : 'snapshot L1';
      if (hi & L1E_RESERVED_HI || lo & L1E_RESERVED_LO) bad(`${which} entry ${i} has reserved bits set`);
      const l2 = entryOffset(hi, lo);
      if (l2 === 0) continue;
      const badOffset = badClusterOffset(s.g, l2);
      if (badOffset) {
        bad(`${which} entry ${i}: L2 table offset ${badOffset}`);
        continue;
      }
      add(l2, cs, 'L2 table');
      if (l2 >= s.fileSize) continue;
      const cached = s.l2Cache.peek(l2);
      if (cached) cached.copy(table);
      else await s.file.readZeroFill(table, 0, cs, l2);
      if (s.g.extL2 || s.g.hasDataFile) countL2(s, table, add, bad, active ? frag : undefined);
      else countPlainL2(s, table, counts, fileClusters, add, bad, active ? frag : undefined, active ? copied : undefined);
    }
  }
  return { counts, clusters: fileClusters, problems, frag, copied, l2Tables };
}

/**
 * countL2 for the common layout (8-byte entries, no external data file) in
 * one loop without per-entry helper calls. An entry the fast test does not
 * clear as plain (compressed, reserved bits, offset at or above 2^48 or
 * unaligned) goes through countEntry, which applies every rule.
 */
function countPlainL2(
  s: Qcow2State,
  t: Buffer,
  counts: ExpectedCounts,
  fileClusters: number,
  add: (offset: number, length: number, what: string) => void,
  bad: (m: string) => void,
  frag: FragInfo | undefined,
  copied: { set: ClusterBits; clear: ClusterBits } | undefined,
): void {
  const g = s.g;
  const cs = g.clusterSize;
  const hiSlow = L2E_COMPRESSED | L2E_RESERVED_HI | 0x00ff0000;
  const loSlow = L2E_RESERVED_LO | ((cs - 1) & ~0x1ff);
  const bits = g.clusterBits;
  const hiScale = 2 ** (32 - bits);
  // Entries as native 32-bit words: on a little-endian host swap the copy
  // in place (the caller's scratch buffer), then read it as a Uint32Array.
  if (LITTLE_ENDIAN) t.swap32();
  const w = new Uint32Array(t.buffer, t.byteOffset, t.length >>> 2);
  const one = Buffer.alloc(8);
  let nextContiguous = 0;
  for (let j = 0; j < g.l2Entries; j++) {
    const hi = w[2 * j]!;
    const lo = w[2 * j + 1]!;
    if (hi === 0 && lo === 0) continue;
    let host: number | undefined;
    if ((hi & hiSlow) === 0 && (lo & loSlow) === 0) {
      const c = (hi & 0xffff) * hiScale + (lo >>> bits);
      if (c === 0) continue; // unallocated or (v3) plain zero
      host = c * cs;
      if (frag) frag.allocatedClusters++;
      if (c < fileClusters) counts.inc(c);
      else add(host, cs, 'data cluster'); // reports it
    } else {
      one.writeUInt32BE(hi, 0); // countEntry reads the on-disk byte order
      one.writeUInt32BE(lo, 4);
      host = countEntry(s, one, 0, j, add, bad, frag);
      if (host === undefined) continue;
    }
    if (frag) {
      if (nextContiguous !== 0 && host !== nextContiguous) frag.fragmentedClusters++;
      nextContiguous = host + cs;
    }
    const c = host / cs;
    if (copied && c < fileClusters) {
      if (hi & L2E_COPIED) copied.set.set(c);
      else copied.clear.set(c);
    }
  }
}

function countL2(
  s: Qcow2State,
  table: Buffer,
  add: (offset: number, length: number, what: string) => void,
  bad: (m: string) => void,
  frag: FragInfo | undefined,
): void {
  const g = s.g;
  let nextContiguous = 0;
  for (let j = 0; j < g.l2Entries; j++) {
    const host = countEntry(s, table, j * g.l2EntryBytes, j, add, bad, frag);
    if (host === undefined || !frag) continue;
    if (nextContiguous !== 0 && host !== nextContiguous) frag.fragmentedClusters++;
    nextContiguous = host + g.clusterSize;
  }
}

/**
 * Count one L2 entry's references; returns the host offset of a normal or
 * preallocated cluster (for the fragmentation count), else undefined.
 */
function countEntry(
  s: Qcow2State,
  table: Buffer,
  at: number,
  j: number,
  add: (offset: number, length: number, what: string) => void,
  bad: (m: string) => void,
  frag: FragInfo | undefined,
): number | undefined {
  const g = s.g;
  const hi = table.readUInt32BE(at);
  const lo = table.readUInt32BE(at + 4);
  const zero = g.extL2 ? table.readUInt32BE(at + L2E_ZERO_BITMAP) : 0;
  const alloc = g.extL2 ? table.readUInt32BE(at + L2E_ALLOC_BITMAP) : 0;
  if (hi === 0 && lo === 0 && zero === 0 && alloc === 0) return undefined;
  if (hi & L2E_COMPRESSED) {
    if (hi & L2E_COPIED) bad(`compressed L2 entry ${j}: the COPIED flag must never be set`);
    if (g.hasDataFile) {
      bad(`compressed L2 entry ${j} in an image with an external data file`);
      return undefined;
    }
    if (zero !== 0 || alloc !== 0) {
      bad(`compressed L2 entry ${j} has a non-zero subcluster bitmap`);
      return undefined;
    }
    const d = decodeCompressed(g, hi, lo);
    if (d.hostOffset === INVALID_OFFSET) {
      bad(`compressed L2 entry ${j}: data offset is at or above 2^52`);
      return undefined;
    }
    const [first, last] = compressedClusters(g, d);
    add(first, last - first + g.clusterSize, 'compressed cluster');
    if (frag) {
      frag.allocatedClusters++;
      frag.compressedClusters++;
      frag.fragmentedClusters++; // compressed clusters are fragmented by nature (QEMU counts them so)
    }
    return undefined;
  }
  if (hi & L2E_RESERVED_HI || lo & L2E_RESERVED_LO) bad(`L2 entry ${j} has reserved bits set`);
  const host = entryOffset(hi, lo);
  if (!hasHostCluster(clusterType(g, hi, lo))) {
    // Unallocated, or (v3 without extended L2) zero without a cluster.
    if (alloc !== 0) bad(`L2 entry ${j}: unallocated cluster has subclusters marked allocated`);
    return undefined;
  }
  if ((alloc & zero) !== 0) bad(`L2 entry ${j}: subclusters both allocated and zero`);
  const badOffset = badClusterOffset(g, host);
  if (badOffset) {
    const preallocated = g.extL2 ? alloc === 0 : (lo & L2E_ZERO) !== 0;
    bad(`L2 entry ${j}: ${preallocated ? 'preallocated' : 'data'} cluster offset ${badOffset}`);
    return undefined;
  }
  if (frag) frag.allocatedClusters++;
  if (g.hasDataFile) return host;
  add(host, g.clusterSize, 'data cluster');
  return host;
}
