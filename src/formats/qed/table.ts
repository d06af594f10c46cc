/**
 * QED L1/L2 mapping: guest offset -> host extent, and linking newly written
 * clusters into the tables.
 *
 * The L1 table lives in memory (it is at most one table); an entry changes
 * only when a new L2 table is linked, and reaches the disk at the next flush
 * (below). L2 tables go through the shared write-back TableCache, keyed by
 * their host offset.
 *
 * Entry values (docs/interop/qed_spec.rst): 0 unallocated, 1 zero cluster
 * (data entries only), otherwise the cluster-aligned host offset. A value
 * that is unaligned, inside the header area, or at/after the end of the file
 * is corrupt (so is an L2 table offset overlapping the L1 table): the request
 * touching it fails with EIO, nothing else does.
 *
 * Write ordering kept here:
 *  - a new L2 table is written (with its first entries) and synced before the
 *    L1 entry pointing at it is written: the table goes into the cache dirty
 *    and the in-memory L1 entry points at it at once; the cache's flush
 *    writes it (after syncing the data its entries point at), syncs, then
 *    writes the L1 entries of new tables and syncs again
 *    (TableStore.synced: writeL1Entries). So a new table costs no sync of
 *    its own (one would wait for all the data written since the last), and a
 *    crash before that flush loses only unsynced writes: the disk's L1 still
 *    says unallocated there. Only entries of tables written before that
 *    sync are written (pointer-table.ts);
 *  - an L2 entry is set only after the data it points at was written (the
 *    caller links after its data write completed), and the cache syncs the
 *    file before writing a dirty L2 table (dependOnSync), so data is durable
 *    before the table entry pointing at it.
 * Callers hold the driver's metadata lock around link(). Every L2 table is
 * read inside a borrow (TableCache: with, modify, scan), never across an
 * await.
 */
import { TableCache } from '../../../cache/table-cache.js';
import { CorruptionError } from '../../errors.js';
import { PendingPointers } from '../pointer-table.js';
import { hexOffset } from '../u64.js';
import type { ImageFile } from '../../io/file.js';
import type { AppendAllocator } from './alloc.js';
import { QED_ZERO_CLUSTER, readEntry, writeEntry, type QedGeometry } from './header.js';

export type ExtentKind = 'data' | 'unalloc' | 'zero';

export interface Extent {
  kind: ExtentKind;
  /** host offset of the first byte (kind 'data' only; else 0) */
  host: number;
  bytes: number;
}

export interface FreeRun {
  /** guest cluster index of the first cluster */
  firstCluster: number;
  clusters: number;
  firstKind: 'unalloc' | 'zero';
  lastKind: 'unalloc' | 'zero';
  /** bytes of the request [guestOffset, guestOffset + bytes) inside the run */
  bytes: number;
}

/** A data cluster offset is usable: aligned, after the header, starting inside the file. */
export function validClusterOffset(g: QedGeometry, off: number, fileSize: number): boolean {
  return off % g.clusterSize === 0 && off >= g.headerEnd && off < fileSize;
}

/** A table offset is usable: its first and last cluster are valid cluster offsets. */
export function validTableOffset(g: QedGeometry, off: number, fileSize: number): boolean {
  return validClusterOffset(g, off, fileSize) && validClusterOffset(g, off + g.tableBytes - g.clusterSize, fileSize);
}

const hex = hexOffset;

export class QedTables {
  readonly l2: TableCache;
  /** L1 entries of new tables the disk's L1 table does not have yet, and those tables until written. */
  private readonly newL1 = new PendingPointers();

  constructor(
    private readonly file: ImageFile,
    private readonly geo: QedGeometry,
    /** the L1 table, in memory: the on-disk copy, plus the entries in newL1 */
    readonly l1: Buffer,
    private readonly l1Offset: number,
    private readonly space: AppendAllocator,
    l2CacheBytes: number,
  ) {
    const tableBytes = geo.tableBytes;
    this.l2 = new TableCache({
      name: 'qed-l2',
      tableBytes,
      maxBytes: l2CacheBytes,
      store: {
        read: async (key, into) => {
          await file.readZeroFill(into, 0, tableBytes, key);
        },
        write: async (key, data) => {
          await file.write(this.newL1.isNew(key) ? 'qed_l2_alloc' : 'qed_l2_update', data, 0, data.length, key);
          this.space.wrote(key + tableBytes);
          this.newL1.written(key);
        },
        sync: () => file.flush(),
        synced: () => this.writeL1Entries(),
      },
    });
  }

  /**
   * After a flush's sync (TableStore.synced): the L1 entries of the new
   * tables written before it, then a sync (pointer-table.ts). Only flushes
   * and write-backs write tables, under the flush lock this runs under, so a
   * table written by now was written before that sync. A table linked while
   * the flush ran waits for the next one.
   */
  private async writeL1Entries(): Promise<void> {
    await this.newL1.writeReady(
      this.l1,
      (span, first) => this.file.write('qed_l1_update', span, 0, span.length, this.l1Offset + first * 8),
      () => this.file.flush(),
    );
  }

  /** L1 entries not on disk yet (their tables are linked at the next flush). */
  get pendingL1(): number {
    return this.newL1.size;
  }

  /** The L2 table offset for an L1 index: 0 when unallocated; throws when corrupt. */
  private l2Offset(l1Index: number, guestOffset: number): number {
    const off = readEntry(this.l1, l1Index);
    if (off === 0 || this.newL1.isNew(off)) return off; // a new table of ours: in the cache until written
    const tb = this.geo.tableBytes;
    const onL1 = off < this.l1Offset + tb && this.l1Offset < off + tb; // a table over the L1 table: writes would destroy it
    if (onL1 || !validTableOffset(this.geo, off, this.space.fileEnd)) {
      throw new CorruptionError(
        `${this.file.path}: corrupt QED L1 entry ${l1Index} (L2 table offset ${hex(off)}) for guest offset ${hex(guestOffset)}`,
      );
    }
    return off;
  }

  private corruptData(entry: number, guestOffset: number): CorruptionError {
    const why = entry >= this.space.fileEnd ? 'past the end of the file' : 'not a valid cluster offset';
    return new CorruptionError(`${this.file.path}: QED data cluster ${hex(entry)} for guest offset ${hex(guestOffset)} is ${why}`);
  }

  private isDataEntry(e: number): boolean {
    return validClusterOffset(this.geo, e, this.space.fileEnd);
  }

  /**
   * The longest extent of one kind starting at `guestOffset`, at most `maxBytes`,
   * inside one L2 table; data extents are host-contiguous.
   */
  async map(guestOffset: number, maxBytes: number): Promise<Extent> {
    const l2off = this.l2Offset(Math.floor(guestOffset / this.geo.l2Span), guestOffset);
    if (l2off === 0) return { kind: 'unalloc', host: 0, bytes: this.spanLimit(guestOffset, maxBytes) };
    return this.l2.with(l2off, (table) => this.extentIn(table, guestOffset, maxBytes));
  }

  /** map() answered from the cache alone, synchronously: null when the L2 table is not cached. */
  mapNow(guestOffset: number, maxBytes: number): Extent | null {
    const l2off = this.l2Offset(Math.floor(guestOffset / this.geo.l2Span), guestOffset);
    if (l2off === 0) return { kind: 'unalloc', host: 0, bytes: this.spanLimit(guestOffset, maxBytes) };
    const table = this.l2.peek(l2off);
    return table === undefined ? null : this.extentIn(table, guestOffset, maxBytes);
  }

  /** maxBytes from guestOffset, cut at the end of the span of its L2 table. */
  private spanLimit(guestOffset: number, maxBytes: number): number {
    return Math.min(maxBytes, this.geo.l2Span - (guestOffset % this.geo.l2Span));
  }

  /** map() inside its borrow of the L2 table. */
  private extentIn(table: Buffer, guestOffset: number, maxBytes: number): Extent {
    const inSpan = guestOffset % this.geo.l2Span;
    const limit = this.spanLimit(guestOffset, maxBytes);
    const cs = this.geo.clusterSize;
    let idx = Math.floor(inSpan / cs);
    const within = inSpan - idx * cs;
    const first = readEntry(table, idx);
    let bytes = Math.min(limit, cs - within);
    if (first === 0 || first === QED_ZERO_CLUSTER) {
      while (bytes < limit && readEntry(table, idx + 1) === first) {
        idx++;
        bytes += Math.min(cs, limit - bytes);
      }
      return { kind: first === 0 ? 'unalloc' : 'zero', host: 0, bytes };
    }
    if (!this.isDataEntry(first)) throw this.corruptData(first, guestOffset);
    let next = first + cs;
    while (bytes < limit) {
      const e = readEntry(table, idx + 1);
      if (e !== next || !this.isDataEntry(e)) break;
      idx++;
      next += cs;
      bytes += Math.min(cs, limit - bytes);
    }
    return { kind: 'data', host: first + within, bytes };
  }

  /**
   * For an allocating write at `guestOffset` (caller holds the metadata lock): the
   * run of unallocated or zero clusters from guestOffset's cluster, inside one L2
   * table and the request, skipping none and stopping before a cluster that
   * `busy` reports in flight. Null when the first cluster is now allocated.
   */
  async allocScan(guestOffset: number, maxBytes: number, busy: (clusterIndex: number) => boolean): Promise<FreeRun | null> {
    const g = this.geo;
    const cs = g.clusterSize;
    const firstCluster = Math.floor(guestOffset / cs);
    const l1Index = Math.floor(firstCluster / g.tableEntries);
    const idx0 = firstCluster - l1Index * g.tableEntries;
    const within = guestOffset - firstCluster * cs;
    const limitClusters = Math.min(g.tableEntries - idx0, Math.ceil((within + maxBytes) / cs));
    const l2off = this.l2Offset(l1Index, guestOffset);
    const scan = (table: Buffer | null): FreeRun | null => {
      const kindAt = (i: number): 'unalloc' | 'zero' | null => {
        const e = table ? readEntry(table, idx0 + i) : 0;
        if (e === 0) return 'unalloc';
        if (e === QED_ZERO_CLUSTER) return 'zero';
        return null;
      };
      const firstKind = kindAt(0);
      if (firstKind === null) {
        const e = readEntry(table!, idx0);
        if (!this.isDataEntry(e)) throw this.corruptData(e, guestOffset);
        return null;
      }
      let n = 1;
      let lastKind = firstKind;
      while (n < limitClusters && !busy(firstCluster + n)) {
        const k = kindAt(n);
        if (k === null) break;
        lastKind = k;
        n++;
      }
      const bytes = Math.min(maxBytes, n * cs - within);
      return { firstCluster, clusters: n, firstKind, lastKind, bytes };
    };
    return l2off === 0 ? scan(null) : this.l2.with(l2off, scan);
  }

  /**
   * Point guest clusters [firstCluster, +count) at host clusters from `host`
   * (whose data is already written). Caller holds the metadata lock.
   */
  link(firstCluster: number, count: number, host: number): Promise<void> {
    const cs = this.geo.clusterSize;
    return this.setEntries(firstCluster, count, (i) => host + i * cs);
  }

  /**
   * The raw L2 entries of guest clusters [firstCluster, +count), inside one
   * L2 table (0 where the table is unallocated). A data entry that is not a
   * valid cluster offset throws (EIO), as map() does. Caller holds the
   * metadata lock, so the entries stay what they are until it changes them.
   */
  /**
   * Synchronous, from memory only: does `pred` hold for the entry of every
   * guest cluster in [firstCluster, +count) (inside one L2 table)? Entries
   * of a missing L2 table are 0. undefined when the table is not cached or
   * its offset is bad: the caller asks entries() instead.
   */
  everyCachedEntry(firstCluster: number, count: number, pred: (entry: number, cluster: number) => boolean): boolean | undefined {
    const g = this.geo;
    const l1Index = Math.floor(firstCluster / g.tableEntries);
    const off = readEntry(this.l1, l1Index);
    let table: Buffer | undefined;
    if (off !== 0) {
      try {
        table = this.l2.peek(this.l2Offset(l1Index, firstCluster * g.clusterSize));
      } catch {
        return undefined;
      }
      if (table === undefined) return undefined;
    }
    const idx0 = firstCluster - l1Index * g.tableEntries;
    for (let i = 0; i < count; i++) {
      if (!pred(table ? readEntry(table, idx0 + i) : 0, firstCluster + i)) return false;
    }
    return true;
  }

  async entries(firstCluster: number, count: number): Promise<number[]> {
    const g = this.geo;
    const l1Index = Math.floor(firstCluster / g.tableEntries);
    const idx0 = firstCluster - l1Index * g.tableEntries;
    const l2off = this.l2Offset(l1Index, firstCluster * g.clusterSize);
    if (l2off === 0) return new Array<number>(count).fill(0);
    return this.l2.with(l2off, (table) => {
      const out: number[] = [];
      for (let i = 0; i < count; i++) {
        const e = readEntry(table, idx0 + i);
        if (e !== 0 && e !== QED_ZERO_CLUSTER && !this.isDataEntry(e)) throw this.corruptData(e, (firstCluster + i) * g.clusterSize);
        out.push(e);
      }
      return out;
    });
  }

  /**
   * Set the L2 entries of guest clusters [firstCluster, +count) (inside one
   * L2 table) to entryAt(i): host offsets of written clusters (link), or
   * QED_ZERO_CLUSTER / 0 for clusters that no longer hold data (discard,
   * write-zeroes). Caller holds the metadata lock. With no L2 table yet, one
   * is allocated with the entries, and the disk's L1 entry points at it
   * after the next flush made it durable (setting only 0s then needs no
   * table and writes nothing).
   * A cluster whose entry leaves a host offset is leaked: nothing points at
   * it, and the append-only allocator never hands it out again.
   */
  async setEntries(firstCluster: number, count: number, entryAt: (i: number) => number): Promise<void> {
    const g = this.geo;
    const cs = g.clusterSize;
    const l1Index = Math.floor(firstCluster / g.tableEntries);
    const idx0 = firstCluster - l1Index * g.tableEntries;
    const l2off = this.l2Offset(l1Index, firstCluster * cs);
    if (l2off !== 0) {
      await this.l2.modify(l2off, (table) => {
        for (let i = 0; i < count; i++) writeEntry(table, idx0 + i, entryAt(i));
      });
      this.l2.dependOnSync();
      return;
    }
    // New L2 table: dirty in the cache (pinned until written), the disk's L1 entry after the next flush.
    const table = Buffer.alloc(g.tableBytes);
    let any = false;
    for (let i = 0; i < count; i++) {
      const e = entryAt(i);
      writeEntry(table, idx0 + i, e);
      any ||= e !== 0;
    }
    if (!any) return;
    const off = this.space.alloc(g.tableBytes / cs);
    this.newL1.note(this.l1, l1Index, off);
    this.l2.install(off, table, true);
    this.l2.dependOnSync();
    writeEntry(this.l1, l1Index, off);
  }

  /** Data clusters mapped by the L2 table of `l1Index` (0 when unallocated). Caller holds the metadata lock. */
  async countData(l1Index: number): Promise<number> {
    const l2off = this.l2Offset(l1Index, l1Index * this.geo.l2Span);
    if (l2off === 0) return 0;
    return this.l2.with(l2off, (table) => {
      let n = 0;
      for (let i = 0; i < this.geo.tableEntries; i++) {
        const e = readEntry(table, i);
        if (e !== 0 && e !== QED_ZERO_CLUSTER) n++;
      }
      return n;
    });
  }

  /** Write dirty L2 tables (data synced first) and sync the file. */
  flush(): Promise<void> {
    return this.l2.flush();
  }
}
