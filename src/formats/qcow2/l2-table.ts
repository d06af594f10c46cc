/**
 * The L2 table a change of mapping writes into: a missing table allocated,
 * one shared with a snapshot copied (copy-on-write of the table), for the
 * write path's link step (write.ts) and for write-zeroes (zero.ts).
 */
import type { CommitQueue } from './commit.js';
import type { Refcounts } from './refcount.js';
import type { Qcow2State } from './state.js';
import { L2E_COPIED, writeEntry } from './spec.js';

/** What the allocation needs of the writer (Qcow2Writer). */
export interface L2Writer {
  readonly s: Qcow2State;
  readonly refcounts: Refcounts;
  readonly commit: CommitQueue;
  /** lazy refcounts: no refcount-before-table order */
  readonly lazy: boolean;
}

/**
 * The L2 table for L1 index `l1i`, ready to be modified: allocated if
 * missing, copied if shared with a snapshot (no COPIED flag). The new
 * table goes into the cache dirty and the in-memory L1 entry points at it
 * at once (reads and writes find it there); the on-disk L1 entry is
 * written by the next flush, after the table and the refcount of its
 * cluster are durable (commit.ts, step 3). Until then the old mapping stays on disk,
 * so a crash only leaks. The old table's reference is queued and dropped
 * by that flush after the L1 entry that replaced it is durable.
 * Returns the table's offset: the caller changes it with s.l2Modify.
 * Under the metadata lock.
 */
export async function l2ForWrite(w: L2Writer, l1i: number): Promise<number> {
  const s = w.s;
  const cs = s.g.clusterSize;
  const old = s.l2OffsetOf(l1i);
  if (old !== 0 && s.l1Copied(l1i)) return old;
  const table = old !== 0 ? await s.l2With(old, (t) => Buffer.from(t)) : Buffer.alloc(cs);
  const offset = await w.refcounts.allocateHostOffset(1);
  s.checkOverlap(offset, cs, 'new L2 table');
  if (!w.lazy) await s.l2Cache.dependOn(w.refcounts.cache);
  s.newL1.note(s.l1, l1i, offset); // step 3 of commit.ts
  s.l2Cache.install(offset, table, true);
  s.noteFileEnd(offset + cs); // the table is cached and pinned until written: reads never go past the file for it
  writeEntry(s.l1, l1i * 8, L2E_COPIED, offset, 0);
  s.overlap.l2Allocated(offset);
  if (old !== 0) {
    // No longer a table of the active L1: once released it may be reused like any free cluster.
    s.overlap.l2Dropped(old);
    w.commit.queueRelease(old, cs);
  }
  s.log.debug({ l1i, offset, copiedFrom: old }, 'L2 table allocated');
  return offset;
}
