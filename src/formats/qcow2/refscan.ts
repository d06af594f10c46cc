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
 */
import { bitmapRanges } from './bitmaps.js';
import { hexOffset, INVALID_OFFSET } from '../u64.js';
import type { Qcow2State } from './state.js';
import { AUTOCLEAR_BITMAPS, badClusterOffset, clusterType, compressedClusters, decodeCompressed, entryOffset, hasBit, hasHostCluster, L1E_RESERVED_HI, L1E_RESERVED_LO, L2E_ALLOC_BITMAP, L2E_COMPRESSED, L2E_COPIED, L2E_RESERVED_HI, L2E_RESERVED_LO, L2E_ZERO, L2E_ZERO_BITMAP, SNAPSHOT_V3_MIN_EXTRA } from './spec.js';

export interface ScanProblem {
  kind: 'corruption';
  message: string;
}

export interface RefScan {
  /** expected refcount per cluster index, for clusters below `clusters` */
  counts: Uint32Array;
  clusters: number;
  problems: ScanProblem[];
}


export async function scanReferences(
  s: Qcow2State,
  refTable: { offset: number; clusters: number; blocks: number[] },
): Promise<RefScan> {
  const cs = s.g.clusterSize;
  const fileClusters = Math.ceil(s.fileSize / cs);
  const counts = new Uint32Array(fileClusters + 1);
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
    for (let c = first; c <= last; c++) counts[c]++;
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
  const table = Buffer.alloc(cs);
  for (const { l1, offset, active } of l1s) {
    add(offset, l1.length, 'L1 table');
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
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
      countL2(s, table, add, bad);
    }
  }
  return { counts, clusters: fileClusters, problems };
}

function countL2(
  s: Qcow2State,
  table: Buffer,
  add: (offset: number, length: number, what: string) => void,
  bad: (m: string) => void,
): void {
  const g = s.g;
  for (let j = 0; j < g.l2Entries; j++) {
    const at = j * g.l2EntryBytes;
    const hi = table.readUInt32BE(at);
    const lo = table.readUInt32BE(at + 4);
    const zero = g.extL2 ? table.readUInt32BE(at + L2E_ZERO_BITMAP) : 0;
    const alloc = g.extL2 ? table.readUInt32BE(at + L2E_ALLOC_BITMAP) : 0;
    if (hi === 0 && lo === 0 && zero === 0 && alloc === 0) continue;
    if (hi & L2E_COMPRESSED) {
      if (hi & L2E_COPIED) bad(`compressed L2 entry ${j}: the COPIED flag must never be set`);
      if (g.hasDataFile) {
        bad(`compressed L2 entry ${j} in an image with an external data file`);
        continue;
      }
      if (zero !== 0 || alloc !== 0) {
        bad(`compressed L2 entry ${j} has a non-zero subcluster bitmap`);
        continue;
      }
      const d = decodeCompressed(g, hi, lo);
      if (d.hostOffset === INVALID_OFFSET) {
        bad(`compressed L2 entry ${j}: data offset is at or above 2^52`);
        continue;
      }
      const [first, last] = compressedClusters(g, d);
      add(first, last - first + g.clusterSize, 'compressed cluster');
      continue;
    }
    if (hi & L2E_RESERVED_HI || lo & L2E_RESERVED_LO) bad(`L2 entry ${j} has reserved bits set`);
    const host = entryOffset(hi, lo);
    if (!hasHostCluster(clusterType(g, hi, lo))) {
      // Unallocated, or (v3 without extended L2) zero without a cluster.
      if (alloc !== 0) bad(`L2 entry ${j}: unallocated cluster has subclusters marked allocated`);
      continue;
    }
    if ((alloc & zero) !== 0) bad(`L2 entry ${j}: subclusters both allocated and zero`);
    const badOffset = badClusterOffset(g, host);
    if (badOffset) {
      const preallocated = g.extL2 ? alloc === 0 : (lo & L2E_ZERO) !== 0;
      bad(`L2 entry ${j}: ${preallocated ? 'preallocated' : 'data'} cluster offset ${badOffset}`);
      continue;
    }
    if (g.hasDataFile) continue;
    add(host, g.clusterSize, 'data cluster');
  }
}
