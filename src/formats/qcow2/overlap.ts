/**
 * The overlap check's index of metadata (QEMU's "cached" overlap-check
 * mode): which host bytes hold the header, the active L1 table, the refcount
 * table, the snapshot table and the snapshots' L1 tables, and which clusters
 * hold L2 tables of the active L1 and refcount blocks.
 *
 * Invariant: the index describes the metadata as it is now. It is built
 * once, when a mount starts writing (build()), and only the code that moves
 * metadata changes it, through the typed events below, in the same critical
 * section as the move. A stale entry is a bug either way: one that stays
 * after its metadata moved calls a healthy reuse of the freed cluster an
 * overlap and marks a healthy image corrupt; a missing one lets a write
 * with lying refcounts destroy metadata.
 *
 * Only consulted before writes (Qcow2State.checkOverlap).
 */
import { L1E_BYTES } from './spec.js';

interface Range {
  start: number;
  end: number;
  what: string;
}

export interface MetadataLayout {
  clusterSize: number;
  l1TableOffset: number;
  l1Bytes: number;
  refcountTableOffset: number;
  refcountTableBytes: number;
  snapshotTableOffset: number;
  snapshotTableBytes: number;
  snapshots: ReadonlyArray<{ name: string; l1TableOffset: number; l1Size: number }>;
  /** host offsets of the L2 tables the active L1 points at */
  l2Tables: Iterable<number>;
  /** host offsets of the refcount blocks the refcount table points at */
  refBlocks: Iterable<number>;
}

export class OverlapIndex {
  /** Fixed ranges; the refcount table's is replaced when the table moves. */
  private ranges: Range[] = [];
  private refcountTable: Range = { start: 0, end: 0, what: 'refcount table' };
  private l1Table: Range = { start: 0, end: 0, what: 'active L1 table' };
  private readonly l2Tables = new Set<number>();
  private readonly refBlocks = new Set<number>();
  private clusterSize = 0;

  build(m: MetadataLayout): void {
    this.clusterSize = m.clusterSize;
    this.refcountTable = { start: m.refcountTableOffset, end: m.refcountTableOffset + m.refcountTableBytes, what: 'refcount table' };
    this.ranges = [{ start: 0, end: m.clusterSize, what: 'header' }];
    this.l1Table = { start: m.l1TableOffset, end: m.l1TableOffset + Math.max(m.l1Bytes, 1), what: 'active L1 table' };
    if (m.snapshotTableBytes > 0) {
      this.ranges.push({ start: m.snapshotTableOffset, end: m.snapshotTableOffset + m.snapshotTableBytes, what: 'snapshot table' });
    }
    for (const snap of m.snapshots) {
      const bytes = Math.max(snap.l1Size * L1E_BYTES, 1);
      this.ranges.push({ start: snap.l1TableOffset, end: snap.l1TableOffset + bytes, what: `L1 table of snapshot ${snap.name}` });
    }
    this.l2Tables.clear();
    for (const off of m.l2Tables) if (off) this.l2Tables.add(off);
    this.refBlocks.clear();
    for (const off of m.refBlocks) if (off) this.refBlocks.add(off);
  }

  /** A new L2 table of the active L1 at `offset`. */
  l2Allocated(offset: number): void {
    this.l2Tables.add(offset);
  }

  /** The table at `offset` is no longer an L2 table of the active L1 (copied away, or freed); once released it may be reused. */
  l2Dropped(offset: number): void {
    this.l2Tables.delete(offset);
  }

  refblockAdded(offset: number): void {
    this.refBlocks.add(offset);
  }

  /** The refcount table now lives at [offset, offset + bytes); its old clusters are released and may be reused. */
  refcountTableMoved(offset: number, bytes: number): void {
    this.refcountTable = { start: offset, end: offset + bytes, what: 'refcount table' };
  }

  /** The active L1 table now lives at [offset, offset + bytes) (resize); its old clusters are released and may be reused. */
  l1TableMoved(offset: number, bytes: number): void {
    this.l1Table = { start: offset, end: offset + Math.max(bytes, 1), what: 'active L1 table' };
  }

  /** What metadata [offset, offset + length) overlaps, or null. */
  find(offset: number, length: number): string | null {
    const end = offset + length;
    for (const r of this.ranges) if (offset < r.end && r.start < end) return `the ${r.what}`;
    for (const r of [this.l1Table, this.refcountTable]) if (offset < r.end && r.start < end) return `the ${r.what}`;
    const cs = this.clusterSize;
    if (cs === 0) return null; // not built: a read-only open, or before the first write
    for (let c = offset - (offset % cs); c < end; c += cs) {
      if (this.l2Tables.has(c)) return `an L2 table at ${c}`;
      if (this.refBlocks.has(c)) return `a refcount block at ${c}`;
    }
    return null;
  }
}
