/**
 * The qcow2 write path.
 *
 * Concurrency. FUSE delivers requests concurrently and every await lets
 * another request run, so the rules are:
 *
 *  - `s.meta` (the metadata mutex) is held across every decision about how
 *    to write (lookup), every allocation, every link (L2/L1 update), every
 *    refcount change and every cache flush. Data I/O never holds it.
 *  - `inflight` (../inflight.ts, its invariant is written there) holds the
 *    guest clusters of every "rewrite" (allocation, copy-on-write,
 *    materialising a zero cluster or unallocated subclusters): registered by
 *    plan(), settled by link() or undo().
 *  - A "direct" write (cluster allocated with refcount 1 - the COPIED flag -,
 *    no zero flag, every touched subcluster allocated) goes in place and
 *    changes no metadata. It is counted while in flight (direct.ts), so a
 *    discard that frees its cluster meanwhile never lets it be reused.
 *  - Reads take no lock: they see the mapping from before or after a link,
 *    so they return old or new content. Host clusters freed by a link are
 *    quarantined (refcount.ts, invariant 3), so a racing read never sees
 *    space reused by another request.
 *
 * Copy-on-write regions (QEMU's QCowL2Meta is the model). A rewritten
 * cluster is written as segments [start, end) of the cluster. Inside a
 * segment the guest data covers [max(start, writeStart), min(end, writeEnd));
 * the bytes before it (the head) and after it (the tail) are read from the
 * cluster's OLD mapping - backing file, zeros, compressed data or the shared
 * cluster - while the cluster is in flight, and leave in the same write as
 * the guest data. Head and tail are computed for every segment, and may be
 * empty; their offsets are relative to the cluster, never assumed.
 *
 * The order in which metadata reaches the disk is stated and kept in
 * commit.ts; this file declares its steps (dependOn, dependOnSync,
 * l1Changed, queueRelease) where a link makes them necessary.
 */
import { CorruptionError } from '../../errors.js';
import type { DriverOpenOptions } from '../driver.js';
import { bitmapRanges } from './bitmaps.js';
import { serializeHeader } from './header.js';
import { entryDataBytes, readL2Entry, type L2Entry } from './map.js';
import { readGuest } from './read.js';
import { InflightClusters } from '../inflight.js';
import { l2ForWrite } from './l2-table.js';
import { CommitQueue } from './commit.js';
import { writeClusters } from './data.js';
import { DirectWrites } from './direct.js';
import { badOldMapping, directHost, droppedReference, planCluster, type ClusterOp } from './plan.js';
import { Refcounts } from './refcount.js';
import { repairRefcounts } from './repair.js';
import type { Qcow2State } from './state.js';
import { AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_BITMAPS, hasBit, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, incompatibleField, L2E_ALLOC_BITMAP, L2E_COPIED, L2E_ZERO_BITMAP, writeEntry } from './spec.js';

export class Qcow2Writer {
  /** @internal zero.ts and resize.ts work beside the writer on the same state. */
  refcounts!: Refcounts;
  /** Guest clusters being rewritten (../inflight.ts). @internal zero.ts waits for them. */
  readonly inflight = new InflightClusters();
  private activeReads = 0;
  /** Direct writes in flight (direct.ts: the fast path's invariant). */
  private readonly directWrites: DirectWrites;
  private prepared = false;
  /** @internal */
  lazy = false;
  /** we set the dirty bit on disk and must clear it on clean close */
  private dirtySet = false;
  /** The commit ordering (commit.ts). @internal */
  commit!: CommitQueue;
  /** directWrite's L2 entry (used synchronously only). */
  private readonly scratch: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
  /** link's new entry (used synchronously only). */
  private readonly linked: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };

  constructor(
    readonly s: Qcow2State,
    private readonly opts: DriverOpenOptions,
  ) {
    this.directWrites = new DirectWrites(s);
  }

  // ---- open / close -------------------------------------------------------

  async openForWrite(): Promise<void> {
    const s = this.s;
    const h = s.header;
    const table = Buffer.alloc(h.refcountTableClusters * s.g.clusterSize);
    await s.file.read(table, 0, table.length, h.refcountTableOffset);
    this.refcounts = new Refcounts(s, table, this.opts.refcountCacheBytes);
    this.commit = new CommitQueue(s, this.refcounts);
    this.lazy = hasBit(h.compatible, COMPAT_LAZY_REFCOUNTS);
    this.rebuildMetadataIndex();
    s.onCorrupt = (msg) => this.markCorrupt(msg);
    if (hasBit(h.incompatible, INCOMPAT_DIRTY)) {
      await this.s.meta.run(async () => {
        await repairRefcounts(s, this.refcounts, this.opts.hooks);
        await this.flushLocked();
        await this.writeIncompatible(h.incompatible & ~BigInt(INCOMPAT_DIRTY));
      });
    }
  }

  /** The overlap check's view of metadata (overlap.ts), as the image is when writing starts. */
  private rebuildMetadataIndex(): void {
    const s = this.s;
    const cs = s.g.clusterSize;
    const rc = this.refcounts;
    s.overlap.build({
      clusterSize: cs,
      l1TableOffset: s.header.l1TableOffset,
      l1Bytes: s.l1.length,
      refcountTableOffset: rc.tableOffset,
      refcountTableBytes: rc.tableClusters * cs,
      snapshotTableOffset: s.header.snapshotsOffset,
      snapshotTableBytes: s.header.nbSnapshots > 0 ? s.snapshotTableBytes : 0,
      snapshots: s.snapshots,
      l2Tables: Array.from({ length: s.l1Entries }, (_, i) => s.l2OffsetOf(i)),
      refBlocks: Array.from({ length: rc.tableEntries }, (_, i) => rc.blockOffset(i)),
    });
  }

  async flush(): Promise<void> {
    await this.s.meta.run(() => this.flushLocked());
  }

  /** @internal Under the metadata lock. */
  flushLocked(): Promise<void> {
    return this.commit.flush({ reads: this.activeReads, directBusy: this.directWrites.busy });
  }

  /** @internal Under the metadata lock, after a change of metadata: write back when caches or queued releases grew large. */
  async flushIfPressed(): Promise<void> {
    if (this.s.l2Cache.underPressure || this.refcounts.cache.underPressure || this.commit.tooManyPending) await this.flushLocked();
  }

  async close(): Promise<void> {
    await this.s.meta.run(async () => {
      await this.flushLocked();
      await this.growToWholeClusters();
      if (this.dirtySet) {
        await this.writeIncompatible(this.s.header.incompatible & ~BigInt(INCOMPAT_DIRTY));
        this.dirtySet = false;
      }
    });
  }

  /**
   * The last cluster may end past the end of the file (data.ts skips zero
   * tails there); a clean close grows the file over it, as qemu leaves its
   * images. A file left short (a crash, or this failing) is valid as it is.
   */
  private async growToWholeClusters(): Promise<void> {
    const s = this.s;
    for (const [file, end] of [[s.file, s.fileSize], [s.dataFile, s.dataFileSize]] as const) {
      if (file && !file.readOnly && (await file.size()) < end) await file.truncate(end);
    }
  }

  private async writeIncompatible(v: bigint): Promise<void> {
    const [at, field] = incompatibleField(v);
    await this.s.file.write('header_update', field, 0, field.length, at);
    await this.s.syncAll();
    this.s.header.incompatible = v;
  }

  /** Overlap found: set the corrupt bit on disk (best effort) so no later writer trusts the image. */
  private markCorrupt(msg: string): void {
    this.s.log.error({ problem: msg }, 'marking the image corrupt');
    if (this.s.header.version !== 3) return;
    const v = this.s.header.incompatible | BigInt(INCOMPAT_CORRUPT);
    void this.writeIncompatible(v).catch(() => {});
  }

  // ---- first write -------------------------------------------------------

  /**
   * Before the first write of a mount (under the lock): retire persistent
   * bitmaps, clear autoclear bits we do not maintain, set the dirty bit for
   * lazy refcounts. Each change reaches the disk before any data does.
   */
  /** @internal */
  async prepareFirstWrite(): Promise<void> {
    if (this.prepared) return;
    const s = this.s;
    const h = s.header;
    const keep = hasBit(h.autoclear, AUTOCLEAR_DATA_FILE_RAW) && s.g.hasDataFile ? BigInt(AUTOCLEAR_DATA_FILE_RAW) : 0n;
    const hadBitmaps = h.extensions.some((e) => e.type === EXT_BITMAPS);
    if (h.version === 3 && (h.autoclear & ~keep) !== 0n) {
      let ranges: Array<{ offset: number; length: number }> = [];
      if (hadBitmaps && hasBit(h.autoclear, AUTOCLEAR_BITMAPS)) {
        const bm = await bitmapRanges(s.file, h, s.fileSize);
        ranges = bm.ranges;
        s.log.warn({ bitmaps: bm.names }, 'qmount does not maintain persistent bitmaps: removing them before the first write');
      }
      h.autoclear &= keep;
      if (hadBitmaps) h.extensions = h.extensions.filter((e) => e.type !== EXT_BITMAPS);
      const hdr = serializeHeader(h, s.g.clusterSize);
      const until = h.backingFileOffset || s.g.clusterSize;
      await s.file.write('header_update', hdr, 0, until, 0);
      await s.syncAll();
      for (const r of ranges) await this.refcounts.release(r.offset, r.length);
    }
    if (this.lazy && !hasBit(h.incompatible, INCOMPAT_DIRTY)) {
      await this.writeIncompatible(h.incompatible | BigInt(INCOMPAT_DIRTY));
      this.dirtySet = true;
    }
    this.prepared = true;
  }

  // ---- reads -------------------------------------------------------------

  async read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    this.activeReads++;
    try {
      await readGuest(this.s, buf, bufOffset, length, guestOffset);
    } finally {
      this.activeReads--;
    }
  }

  // ---- writes ------------------------------------------------------------

  /** The request was checked by the driver (checkRequest in ../driver.ts). */
  async write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    const s = this.s;
    if (length === 0) return;
    if (s.corrupt) throw new CorruptionError('image is marked corrupt; writes are refused');
    const direct = this.directWrite(buf, bufOffset, length, guestOffset);
    if (direct) return direct;
    const cs = s.g.clusterSize;
    // Split large writes so one request never holds many clusters in flight.
    const maxChunk = Math.max(cs, 4 * 1024 * 1024);
    let doneBytes = 0;
    while (doneBytes < length) {
      const chunkGuestOffset = guestOffset + doneBytes;
      const chunkGuestEnd = Math.min(guestOffset + length, Math.floor(chunkGuestOffset / maxChunk) * maxChunk + maxChunk);
      await this.writeChunk(buf, bufOffset + doneBytes, chunkGuestEnd - chunkGuestOffset, chunkGuestOffset);
      doneBytes = chunkGuestEnd - guestOffset;
    }
  }

  /**
   * @internal Zeros to be written in place into an own (COPIED) host
   * cluster, decided under the lock: counted as a direct write at once,
   * issued by the returned function once the lock is released.
   */
  zeroInPlace(hostOffset: number, length: number): () => Promise<void> {
    const file = this.s.dataFile ?? this.s.file;
    const hostCluster = this.directWrites.clusterOf(file, hostOffset);
    if (hostCluster >= 0) this.directWrites.begin(hostCluster);
    return () => this.directWrites.issue(file, 'zero_write', null, 0, length, hostOffset, true);
  }

  /**
   * The fast path: a write inside one cluster that is not in flight, whose
   * L2 table is cached and whose entry says "direct" (directHost) goes in
   * place without the metadata lock. The decision is synchronous - no await
   * between reading the entry and issuing the write - so it sees the same
   * state plan() would under the lock: a link or an in-flight registration
   * happens entirely before or after it. Returns null when the request needs
   * the planned path.
   */
  private directWrite(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> | null {
    const hostOffset = this.directTarget(length, guestOffset);
    if (hostOffset < 0) return null;
    return this.directWrites.issue(this.s.dataFile ?? this.s.file, 'data_write', buf, bufOffset, length, hostOffset);
  }

  /**
   * A direct write done before returning (BlockDriver.writeNow): true when
   * the request could go direct and its write ran inline. Nothing else runs
   * between its issue and its end, so it needs no count in DirectWrites (no
   * flush or mapping change can come between). The request was checked.
   */
  writeNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    const s = this.s;
    if (length === 0) return true;
    if (s.corrupt) return false; // write() refuses it
    const hostOffset = this.directTarget(length, guestOffset);
    if (hostOffset < 0) return false;
    const file = s.dataFile ?? s.file;
    if (!file.writeNow('data_write', buf, bufOffset, length, hostOffset)) return false;
    s.noteDataEnd(file, hostOffset + length);
    return true;
  }

  /**
   * Where a write of [guestOffset, +length) may go direct: in place, inside
   * one cluster whose L2 table is cached and whose entry says this image
   * owns it (directHost), not in flight, the image prepared for writes.
   * The host offset, or -1. Checks the target against the metadata (throws).
   */
  private directTarget(length: number, guestOffset: number): number {
    const s = this.s;
    const g = s.g;
    if (!this.prepared) return -1;
    const cs = g.clusterSize;
    const clusterIndex = Math.floor(guestOffset / cs);
    const writeStart = guestOffset - clusterIndex * cs;
    if (writeStart + length > cs || this.inflight.has(clusterIndex)) return -1;
    const table = s.cachedL2(Math.floor(clusterIndex / g.l2Entries));
    if (!table) return -1;
    readL2Entry(g, table, clusterIndex % g.l2Entries, this.scratch);
    const clusterHostOffset = directHost(g, clusterIndex, writeStart, writeStart + length, this.scratch);
    if (clusterHostOffset < 0) return -1;
    const hostOffset = clusterHostOffset + writeStart;
    if (!g.hasDataFile) s.checkOverlap(hostOffset, length, 'data write');
    return hostOffset;
  }

  private async writeChunk(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    const s = this.s;
    const g = s.g;
    let ops: ClusterOp[];
    for (;;) {
      const planned = await s.meta.run(() => this.plan(bufOffset, length, guestOffset));
      if ('wait' in planned) {
        await planned.wait;
        continue;
      }
      ops = planned.ops;
      break;
    }
    const rewrites = ops.filter((o) => o.rewrite);
    // The direct ops of a planned request are direct writes too, counted by plan() (direct.ts).
    const busy = g.hasDataFile ? [] : ops.filter((o) => !o.rewrite).map((o) => Math.floor(o.hostOffset / g.clusterSize));
    try {
      await writeClusters(this.s, buf, ops);
    } catch (err) {
      await s.meta.run(() => this.undo(rewrites));
      throw err;
    } finally {
      for (const c of busy) this.directWrites.end(c);
    }
    if (rewrites.length > 0) await s.meta.run(() => this.link(rewrites));
  }

  /** Phase 1 (under the lock): decide, register in-flight clusters, allocate. */
  private async plan(bufOffset: number, length: number, guestOffset: number): Promise<{ ops: ClusterOp[] } | { wait: Promise<void> }> {
    const s = this.s;
    const g = s.g;
    const cs = g.clusterSize;
    const guestEnd = guestOffset + length;
    const firstClusterIndex = Math.floor(guestOffset / cs);
    const lastClusterIndex = Math.floor((guestEnd - 1) / cs);
    const busy = this.inflight.waitFor(firstClusterIndex, lastClusterIndex);
    if (busy) return { wait: busy };
    await this.prepareFirstWrite();
    if (s.corrupt) throw new CorruptionError('image is marked corrupt; writes are refused');

    const ops: ClusterOp[] = [];
    // One L2 table at a time, its entries read inside one borrow (TableCache).
    const planSpan = (table: Buffer | null, from: number, to: number): void => {
      for (let clusterIndex = from; clusterIndex <= to; clusterIndex++) {
        const clusterGuestOffset = clusterIndex * cs;
        const writeStart = Math.max(guestOffset, clusterGuestOffset) - clusterGuestOffset;
        const writeEnd = Math.min(guestEnd, clusterGuestOffset + cs) - clusterGuestOffset;
        const old: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
        if (table) readL2Entry(g, table, clusterIndex % g.l2Entries, old);
        const bad = badOldMapping(g, s.fileSizeAtOpen, old, clusterGuestOffset);
        if (bad) s.corruptionFound(`a write to guest offset ${clusterGuestOffset} needs its L2 entry, whose ${bad}`);
        ops.push(planCluster(g, clusterIndex, writeStart, writeEnd, bufOffset + (clusterGuestOffset + writeStart - guestOffset), old));
      }
    };
    for (let clusterIndex = firstClusterIndex; clusterIndex <= lastClusterIndex; ) {
      const l1i = Math.floor(clusterIndex / g.l2Entries);
      const to = Math.min(lastClusterIndex, (l1i + 1) * g.l2Entries - 1);
      const l2off = s.l2OffsetOf(l1i);
      const bad = l2off ? s.badL2Offset(l2off) : null;
      if (bad) s.corruptionFound(`a write to guest offset ${clusterIndex * cs} needs L1 entry ${l1i}, whose L2 table offset ${bad}`);
      const from = clusterIndex;
      if (l2off) await s.l2With(l2off, (table) => planSpan(table, from, to));
      else planSpan(null, from, to);
      clusterIndex = to + 1;
    }
    if (!g.hasDataFile) {
      for (const op of ops) {
        const dropped = op.fresh ? droppedReference(g, op.old) : null;
        if (dropped) await this.checkReleasable('write', op.clusterIndex * g.clusterSize, dropped);
      }
    }
    const rewrites = ops.filter((o) => o.rewrite);
    for (const op of rewrites) this.inflight.register(op.clusterIndex);
    try {
      const fresh = rewrites.filter((o) => o.fresh);
      if (fresh.length > 0 && !g.hasDataFile) {
        const firstHostOffset = await this.refcounts.allocateHostOffset(fresh.length);
        fresh.forEach((o, i) => (o.hostOffset = firstHostOffset + i * cs));
        s.checkOverlap(firstHostOffset, fresh.length * cs, 'new data cluster');
      }
      if (!g.hasDataFile) {
        for (const op of ops) if (!op.fresh) s.checkOverlap(op.hostOffset + op.writeStart, op.writeEnd - op.writeStart, 'data write');
      }
    } catch (err) {
      this.finish(rewrites);
      throw err;
    }
    // Counted in this critical section, ended by writeChunk once the data settled (direct.ts).
    if (!g.hasDataFile) for (const op of ops) if (!op.rewrite) this.directWrites.begin(Math.floor(op.hostOffset / cs));
    return { ops };
  }

  /**
   * A reference about to be dropped (a rewrite into a new cluster, a
   * discard) must be a real one, or the drop corrupts the refcounts:
   *  - a referenced cluster whose refcount is already 0 means the refcounts
   *    lie: the allocator may hand it out (even to this very request), and
   *    the drop would leave a live COPIED cluster at refcount 0;
   *  - a data mapping into known metadata (overlap index) is damage: its
   *    drop would take the metadata's own reference, and the freed cluster
   *    would be punched out of the file and reused.
   * Such a request is refused and the image marked corrupt. Called under the
   * lock, after the L2 entries were read (messages are built only on failure).
   */
  async checkReleasable(op: 'write' | 'zeroing', guestOffset: number, [hostOffset, lengthBytes]: [number, number]): Promise<void> {
    const s = this.s;
    const cs = s.g.clusterSize;
    const what = (): string => `${op === 'write' ? 'a write to' : 'zeroing'} guest offset ${guestOffset}`;
    const hit = s.overlap.find(hostOffset, lengthBytes);
    if (hit) s.corruptionFound(`metadata overlap: ${what()} drops a data reference to ${hostOffset}, which overlaps ${hit}`);
    for (let ci = Math.floor(hostOffset / cs); ci <= Math.floor((hostOffset + lengthBytes - 1) / cs); ci++) {
      if ((await this.refcounts.get(ci)) === 0) {
        s.corruptionFound(`${what()} drops a reference to host cluster ${ci * cs}, whose refcount is 0`);
      }
    }
  }

  /** Phase 3 (under the lock): point L2 entries at the new data, then drop what they pointed at. */
  private async link(ops: ClusterOp[]): Promise<void> {
    const s = this.s;
    const g = s.g;
    const releases: Array<[number, number]> = [];
    let i = 0;
    try {
      for (; i < ops.length; i++) {
        const op = ops[i];
        const l1i = Math.floor(op.clusterIndex / g.l2Entries);
        const offset = await l2ForWrite(this, l1i);
        if (op.fresh && !this.lazy && !g.hasDataFile) await s.l2Cache.dependOn(this.refcounts.cache);
        s.l2Cache.dependOnSync();
        await s.l2Modify(offset, (table) => {
          const at = (op.clusterIndex % g.l2Entries) * g.l2EntryBytes;
          writeEntry(table, at, L2E_COPIED, op.hostOffset, 0);
          if (g.extL2) {
            table.writeUInt32BE(op.newZero, at + L2E_ZERO_BITMAP);
            table.writeUInt32BE(op.newAlloc, at + L2E_ALLOC_BITMAP);
          }
          readL2Entry(g, table, op.clusterIndex % g.l2Entries, this.linked);
        });
        s.dataBytes.note(op.clusterIndex, entryDataBytes(g, this.linked) - entryDataBytes(g, op.old));
        if (op.fresh && !g.hasDataFile) {
          const dropped = droppedReference(g, op.old);
          if (dropped) releases.push(dropped);
        }
        this.finish([op]);
      }
      for (const [off, len] of releases) this.commit.queueRelease(off, len);
      await this.flushIfPressed();
    } catch (err) {
      await this.undo(ops.slice(i));
      throw err;
    }
  }

  /** Give back what a failed request allocated and release its in-flight clusters. */
  private async undo(ops: ClusterOp[]): Promise<void> {
    try {
      if (!this.s.g.hasDataFile) {
        for (const op of ops) if (op.fresh && op.hostOffset !== 0) await this.refcounts.release(op.hostOffset, this.s.g.clusterSize);
      }
    } catch (err) {
      this.s.log.warn({ err: (err as Error).message }, 'could not release clusters of a failed write (leaked)');
    } finally {
      this.finish(ops);
    }
  }

  private finish(ops: ClusterOp[]): void {
    for (const op of ops) this.inflight.settle(op.clusterIndex);
  }
}
