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
 */
import { bitmapRanges } from './bitmaps.js';
import { AUTOCLEAR_BITMAPS, hasBit } from './header.js';
import { compressedClusters, decodeCompressed, entryOffset, L2E_COMPRESSED } from './layout.js';
import type { Qcow2State } from './state.js';

export interface ScanProblem {
  kind: 'corruption';
  message: string;
}

export interface RefScan {
  /** expected refcount per cluster index, for clusters below `clusters` */
  counts: Uint32Array;
  clusters: number;
  problems: ScanProblem[];
  /** active L2 tables: offset -> L1 index */
  activeL2: Map<number, number>;
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
      bad(`${what} at ${offset} lies past the end of the file`);
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

  const activeL2 = new Map<number, number>();
  const l1s: Array<{ l1: Buffer; offset: number; active: boolean }> = [
    { l1: s.l1, offset: s.header.l1TableOffset, active: true },
  ];
  for (const snap of s.snapshots) {
    const l1 = Buffer.alloc(snap.l1Size * 8);
    await s.file.read(l1, 0, l1.length, snap.l1TableOffset);
    l1s.push({ l1, offset: snap.l1TableOffset, active: false });
  }
  const table = Buffer.alloc(cs);
  for (const { l1, offset, active } of l1s) {
    add(offset, l1.length, 'L1 table');
    for (let i = 0; i < l1.length / 8; i++) {
      const l2 = entryOffset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
      if (l2 === 0) continue;
      if (l2 % cs !== 0) {
        bad(`L1 entry ${i} points at unaligned offset ${l2}`);
        continue;
      }
      add(l2, cs, 'L2 table');
      if (l2 >= s.fileSize) continue;
      if (active) activeL2.set(l2, i);
      const cached = s.l2Cache.peek(l2);
      if (cached) cached.copy(table);
      else await s.file.readZeroFill(table, 0, cs, l2);
      countL2(s, table, add, bad);
    }
  }
  return { counts, clusters: fileClusters, problems, activeL2 };
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
    if (hi === 0 && lo === 0) continue;
    if (hi & L2E_COMPRESSED) {
      const d = decodeCompressed(g, hi, lo);
      const [first, last] = compressedClusters(g, d);
      add(first, last - first + g.clusterSize, 'compressed cluster');
      continue;
    }
    const host = entryOffset(hi, lo);
    if (host === 0 || g.hasDataFile) continue;
    if (host % g.clusterSize !== 0) {
      bad(`L2 entry points at unaligned offset ${host}`);
      continue;
    }
    add(host, g.clusterSize, 'data cluster');
  }
}
