/**
 * Commit ordering: the one statement of the order in which qcow2 metadata
 * reaches the disk, and the code that keeps it. A crash at any instant may
 * leak clusters; it never leaves a pointer to a cluster whose refcount is 0,
 * nor a pointer to data or a table that is not on disk yet.
 *
 *  1. Refcount raised before anything points at a cluster. A link that
 *     points an L2 entry at a new cluster declares l2.dependOn(refcounts):
 *     the table cache writes and syncs dirty refcount blocks before it writes
 *     any dirty L2 table (cache/table-cache.ts is the mechanism).
 *  2. Data durable before the entry pointing at it: every link declares
 *     l2.dependOnSync(), so the image (and data file) is synced before a
 *     dirty L2 table is written.
 *  3. A new L2 table durable before its L1 entry: the in-memory L1 entry
 *     points at it at once (reads and writes find it), the on-disk one is
 *     written by flush() after the L2 cache flush, then synced. Until then
 *     the old mapping stays on disk.
 *  4. Pointer cleared before its refcount drops: references a link drops
 *     (the old cluster of a copy-on-write, a replaced L2 table) are queued
 *     (queueRelease) and released by flush() after steps 1-3 made the tables
 *     that stopped pointing at them durable - one sync per flush, not one
 *     per request. The refcount blocks are then written again.
 *  5. Freed clusters are reused (and punched out of the file) only after
 *     that: quarantine (refcount.ts, invariant 3) ends at a flush with no
 *     read in flight, for the clusters no direct write is in flight on.
 *  6. Moving the active L1 table (resize grows it): runs right after a
 *     flush (every in-memory entry copied into the new table points at a
 *     durable L2 table, no L1 entry is dirty). The new table is written,
 *     then its refcount flushed (with a sync covering the table), then the
 *     header is switched in one write (l1_size and l1_table_offset are
 *     adjacent) and synced; only then is the old table released.
 *     resize.ts writes the header's size field after this step when growing.
 *  Refcount blocks and the refcount table themselves: refcount.ts,
 *  invariants 1 and 2 (a new block describes itself or is counted and
 *  flushed before the table points at it; a grown table is switched in by
 *  one header write between syncs).
 *  With lazy_refcounts the dirty bit stands in for 1 and 4 (set before the
 *  first write, refcounts rebuilt when an image is found dirty).
 *
 * flush() runs under the metadata lock; nothing else writes L1 entries of an
 * open image or releases the references queued here.
 */
import type { Refcounts } from './refcount.js';
import { L1E_BYTES, l1TableFields } from './spec.js';
import type { Qcow2State } from './state.js';

/** What may still touch a quarantined cluster (step 5). */
export interface InUse {
  reads: number;
  /** a direct write is in flight on host cluster `clusterIndex` */
  directBusy: (clusterIndex: number) => boolean;
}

export class CommitQueue {
  /** References to drop at the next flush: [hostOffset, bytes] (step 4). */
  private pendingReleases: Array<[number, number]> = [];
  /** Past this many queued releases a link flushes. */
  static readonly MAX_PENDING_RELEASES = 4096;

  constructor(
    private readonly s: Qcow2State,
    private readonly refcounts: Refcounts,
  ) {}

  /** Drop a reference to [hostOffset, hostOffset + bytes) once the pointer's removal is durable (step 4). */
  queueRelease(hostOffset: number, bytes: number): void {
    this.pendingReleases.push([hostOffset, bytes]);
  }

  get tooManyPending(): boolean {
    return this.pendingReleases.length > CommitQueue.MAX_PENDING_RELEASES;
  }

  /**
   * The whole sequence, steps 1 to 5. `inUse`: reads in flight (which may
   * still target quarantined clusters) and the host clusters direct writes
   * are in flight on.
   */
  async flush(inUse: InUse): Promise<void> {
    await this.refcounts.cache.flush(); // 1
    await this.s.l2Cache.flush(); // 2 and 1 again; ends with a sync: every L2 change so far is durable
    await this.writeL1(); // 3, synced
    // A table still unlinked on disk (none under the metadata lock) keeps the releases for the next flush.
    if (this.pendingReleases.length > 0 && this.s.newL1.size === 0) {
      const releases = this.pendingReleases;
      this.pendingReleases = [];
      for (const [off, len] of releases) await this.refcounts.release(off, len); // 4
    }
    await this.refcounts.cache.flush();
    if (inUse.reads === 0) await this.refcounts.releaseQuarantine(inUse.directBusy); // 5
  }

  /** Step 6: switch the active L1 table to a copy with `entries` entries (at least as many as now). Call right after flush(). */
  async moveL1(entries: number): Promise<void> {
    const s = this.s;
    const cs = s.g.clusterSize;
    if (this.s.newL1.size > 0 || this.pendingReleases.length > 0) throw new Error('moveL1 needs a flush first');
    const bytes = entries * L1E_BYTES;
    const newL1 = Buffer.alloc(bytes);
    s.l1.copy(newL1, 0, 0, Math.min(s.l1.length, bytes));
    const clusters = Math.max(1, Math.ceil(bytes / cs));
    const offset = await this.refcounts.allocateHostOffset(clusters);
    s.checkOverlap(offset, clusters * cs, 'new L1 table');
    // Whole clusters, as QEMU writes them: the tail of the last one reads as zeros.
    const image = Buffer.alloc(clusters * cs);
    newL1.copy(image);
    await s.file.write('l1_grow', image, 0, image.length, offset);
    s.noteFileEnd(offset + image.length);
    await this.refcounts.cache.flush(); // its refcount, and a sync that covers the table
    const [at, field] = l1TableFields(offset, entries);
    await s.file.write('l1_switch', field, 0, field.length, at);
    await s.syncAll();
    const oldOffset = s.header.l1TableOffset;
    const oldBytes = s.l1.length;
    s.l1 = newL1;
    s.header.l1TableOffset = offset;
    s.header.l1Size = entries;
    s.overlap.l1TableMoved(offset, bytes);
    s.log.info({ oldOffset, offset, entries }, 'L1 table moved');
    if (oldBytes > 0 && oldOffset !== 0) await this.refcounts.release(oldOffset, oldBytes);
  }

  /**
   * Write the L1 entries changed since the last flush, then sync
   * (pointer-table.ts). The L2 cache flush before wrote every new table.
   */
  private async writeL1(): Promise<void> {
    const s = this.s;
    await s.newL1.writeReady(
      s.l1,
      (span, first) => s.file.write('l1_update', span, 0, span.length, s.header.l1TableOffset + first * L1E_BYTES),
      () => s.syncAll(),
    );
  }
}
