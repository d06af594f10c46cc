/**
 * The qcow2 write path.
 *
 * Concurrency. FUSE delivers requests concurrently and every await lets
 * another request run, so the rules are:
 *
 *  - `s.meta` (the metadata mutex) is held across every decision about how
 *    to write (lookup), every allocation, every link (L2/L1 update), every
 *    refcount change and every cache flush. Data I/O never holds it.
 *  - `inflight` holds the guest clusters whose mapping a request is about to
 *    change (a "rewrite": allocation, copy-on-write, materialising a zero
 *    cluster or unallocated subclusters). A cluster is registered in the same
 *    critical section that decided to rewrite it and removed in the one that
 *    links the new mapping (or undoes the attempt). A write that touches an
 *    in-flight cluster waits for it and then decides again from scratch: two
 *    writes never allocate one cluster twice, and no write lands in a cluster
 *    that is being replaced.
 *  - A "direct" write (cluster allocated with refcount 1 - the COPIED flag -,
 *    no zero flag, every touched subcluster allocated) goes in place and
 *    changes no metadata.
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
 * Metadata ordering is declared to the caches (cache/table-cache.ts):
 * refcount raised before an L2 entry points at the cluster
 * (l2.dependOn(refblocks)), and new data durable before the L2 entry points
 * at it (l2.dependOnSync()). References dropped by a link (the old cluster
 * of a copy-on-write, a replaced L2 table) are not released at once but
 * queued in `pendingReleases` and released by the next flush, after the L2
 * tables and L1 entries that stopped pointing at them are durable: "pointer
 * cleared before refcount drops" without a flush per request, and a crash in
 * between only leaks. With lazy_refcounts the dirty bit stands in for the
 * refcount ordering.
 */
import { CorruptionError } from '../../errors.js';
import type { DriverOpenOptions } from '../driver.js';
import { bitmapRanges } from './bitmaps.js';
import { serializeHeader } from './header.js';
import { classify, ExtentKind, readL2Entry, type L2Entry, type Piece } from './map.js';
import { readGuest, track } from './read.js';
import { Refcounts } from './refcount.js';
import { repairRefcounts } from './repair.js';
import { settleAll } from '../../io/file.js';
import type { Qcow2State } from './state.js';
import { ALL_SUBCLUSTERS, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, badClusterOffset, badCompressed, clusterType, ClusterType, COMPAT_LAZY_REFCOUNTS, compressedExtent, decodeCompressed, entryOffset, EXT_BITMAPS, hasBit, hasHostCluster, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, incompatibleField, L2E_ALLOC_BITMAP, L2E_COMPRESSED, L2E_COPIED, L2E_ZERO_BITMAP, writeEntry } from './spec.js';

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/** One guest cluster touched by a write. Offsets in bytes within the cluster unless named otherwise. */
interface ClusterOp {
  /** guest cluster index */
  gc: number;
  writeStart: number;
  writeEnd: number;
  /** offset into the caller's buffer of writeStart */
  bufAt: number;
  rewrite: boolean;
  /** host byte offset of the target cluster (in the data file when there is one) */
  host: number;
  /** host cluster newly allocated by this request */
  fresh: boolean;
  old: L2Entry;
  /** rewrite: segments of the cluster to write, each [start, end) */
  segments: Array<[number, number]>;
  newAlloc: number;
  newZero: number;
}

export class Qcow2Writer {
  private refcounts!: Refcounts;
  private readonly inflight = new Map<number, Deferred>();
  private activeReads = 0;
  private prepared = false;
  private lazy = false;
  /** we set the dirty bit on disk and must clear it on clean close */
  private dirtySet = false;
  /** L1 indexes whose in-memory entry is newer than the disk's (l2ForWrite, writeL1). */
  private readonly dirtyL1 = new Set<number>();
  /** References to drop at the next flush: [hostOffset, bytes] (see the ordering note above). */
  private pendingReleases: Array<[number, number]> = [];
  /** directWrite's L2 entry (used synchronously only). */
  private readonly scratch: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
  /** readsAsZero's piece (used synchronously only). */
  private readonly piece: Piece = { kind: ExtentKind.Zero, hostOffset: 0, length: 0 };
  /** Past this many queued releases a link flushes. */
  private static readonly MAX_PENDING_RELEASES = 4096;

  constructor(
    private readonly s: Qcow2State,
    private readonly opts: DriverOpenOptions,
  ) {}

  // ---- open / close -------------------------------------------------------

  async openForWrite(): Promise<void> {
    const s = this.s;
    const h = s.header;
    const table = Buffer.alloc(h.refcountTableClusters * s.g.clusterSize);
    await s.file.read(table, 0, table.length, h.refcountTableOffset);
    this.refcounts = new Refcounts(s, table, this.opts.refcountCacheBytes);
    this.lazy = hasBit(h.compatible, COMPAT_LAZY_REFCOUNTS);
    this.rebuildMetadataIndex();
    s.onCorrupt = (msg) => this.markCorrupt(msg);
    if (hasBit(h.incompatible, INCOMPAT_DIRTY)) {
      await this.s.meta.run(async () => {
        await repairRefcounts(s, this.refcounts);
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

  private async flushLocked(): Promise<void> {
    await this.refcounts.cache.flush();
    await this.s.l2Cache.flush(); // ends with a sync: every L2 change so far is durable
    await this.writeL1(); // then the L1 entries pointing at new tables, synced
    if (this.pendingReleases.length > 0) {
      const releases = this.pendingReleases;
      this.pendingReleases = [];
      for (const [off, len] of releases) await this.refcounts.release(off, len);
    }
    await this.refcounts.cache.flush();
    if (this.activeReads === 0) this.refcounts.releaseQuarantine();
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
   * The last cluster may end past the end of the file (writeData skips zero
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
  private async prepareFirstWrite(): Promise<void> {
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
    let done = 0;
    while (done < length) {
      const pos = guestOffset + done;
      const chunkEnd = Math.min(guestOffset + length, Math.floor(pos / maxChunk) * maxChunk + maxChunk);
      await this.writeChunk(buf, bufOffset + done, chunkEnd - pos, pos);
      done = chunkEnd - guestOffset;
    }
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
    const s = this.s;
    const g = s.g;
    if (!this.prepared) return null;
    const cs = g.clusterSize;
    const gc = Math.floor(guestOffset / cs);
    const writeStart = guestOffset - gc * cs;
    if (writeStart + length > cs || this.inflight.has(gc)) return null;
    const l2Offset = s.l2OffsetOf(Math.floor(gc / g.l2Entries));
    const table = l2Offset === 0 ? undefined : s.l2Cache.peek(l2Offset);
    if (!table) return null;
    readL2Entry(g, table, gc % g.l2Entries, this.scratch);
    const host = this.directHost(gc, writeStart, writeStart + length, this.scratch);
    if (host < 0) return null;
    const at = host + writeStart;
    const file = s.dataFile ?? s.file;
    if (!g.hasDataFile) s.checkOverlap(at, length, 'data write');
    return file.write('data_write', buf, bufOffset, length, at).then(() => s.noteDataEnd(file, at + length));
  }

  private async writeChunk(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    const s = this.s;
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
    try {
      await this.writeData(buf, ops);
    } catch (err) {
      await s.meta.run(() => this.undo(rewrites));
      throw err;
    }
    if (rewrites.length > 0) await s.meta.run(() => this.link(rewrites));
  }

  /** Phase 1 (under the lock): decide, register in-flight clusters, allocate. */
  private async plan(bufOffset: number, length: number, guestOffset: number): Promise<{ ops: ClusterOp[] } | { wait: Promise<void> }> {
    const s = this.s;
    const g = s.g;
    const cs = g.clusterSize;
    const end = guestOffset + length;
    const firstGc = Math.floor(guestOffset / cs);
    const lastGc = Math.floor((end - 1) / cs);
    for (let gc = firstGc; gc <= lastGc; gc++) {
      const d = this.inflight.get(gc);
      if (d) return { wait: d.promise };
    }
    await this.prepareFirstWrite();
    if (s.corrupt) throw new CorruptionError('image is marked corrupt; writes are refused');

    const ops: ClusterOp[] = [];
    let table: Buffer | null = null;
    let tableL1 = -1;
    for (let gc = firstGc; gc <= lastGc; gc++) {
      const clusterStart = gc * cs;
      const writeStart = Math.max(guestOffset, clusterStart) - clusterStart;
      const writeEnd = Math.min(end, clusterStart + cs) - clusterStart;
      const old: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
      const l1i = Math.floor(gc / g.l2Entries);
      if (l1i !== tableL1) {
        const l2off = s.l2OffsetOf(l1i);
        const bad = l2off ? s.badL2Offset(l2off) : null;
        if (bad) s.corruptionFound(`a write to guest offset ${gc * cs} needs L1 entry ${l1i}, whose L2 table offset ${bad}`);
        table = l2off ? await s.l2Table(l2off) : null;
        tableL1 = l1i;
      }
      if (table) readL2Entry(g, table, gc % g.l2Entries, old);
      ops.push(this.classify(gc, writeStart, writeEnd, bufOffset + (clusterStart + writeStart - guestOffset), old));
    }
    const rewrites = ops.filter((o) => o.rewrite);
    for (const op of rewrites) this.inflight.set(op.gc, deferred());
    try {
      const fresh = rewrites.filter((o) => o.fresh);
      if (fresh.length > 0 && !g.hasDataFile) {
        const first = await this.refcounts.allocate(fresh.length);
        fresh.forEach((o, i) => (o.host = first + i * cs));
        s.checkOverlap(first, fresh.length * cs, 'new data cluster');
      }
      if (!g.hasDataFile) {
        for (const op of ops) if (!op.fresh) s.checkOverlap(op.host + op.writeStart, op.writeEnd - op.writeStart, 'data write');
      }
    } catch (err) {
      this.finish(rewrites);
      throw err;
    }
    return { ops };
  }

  /**
   * Where a write of [writeStart, writeEnd) into guest cluster `gc` can go
   * in place, or -1. In place ("direct") means: the cluster has a host
   * cluster of its own (COPIED: refcount 1; with a data file, any allocated
   * cluster), no zero flag, and with extended L2 every touched subcluster is
   * allocated. Such a write changes no metadata. The one rule for both the
   * planned path and the unlocked fast path in write().
   */
  private directHost(gc: number, writeStart: number, writeEnd: number, old: L2Entry): number {
    const g = this.s.g;
    if (clusterType(g, old.hi, old.lo) !== ClusterType.Normal) return -1; // compressed, zero or unallocated
    const host = entryOffset(old.hi, old.lo);
    if (host !== 0 && badClusterOffset(g, host) !== null) return -1; // classify() reports it
    const copied = (old.hi & L2E_COPIED) !== 0;
    if (g.extL2) {
      const sc = g.subclusterSize;
      const firstSc = Math.floor(writeStart / sc);
      const lastSc = Math.floor((writeEnd - 1) / sc);
      const touched = (2 ** (lastSc + 1) - 2 ** firstSc) >>> 0;
      if ((old.alloc & touched) !== touched) return -1;
    }
    // With a data file, every cluster with a host cluster is its own (refcount 1, host offset = guest offset).
    if (g.hasDataFile) return gc * g.clusterSize;
    return copied ? host : -1;
  }

  /** How one cluster is written, from its current L2 entry. */
  private classify(gc: number, writeStart: number, writeEnd: number, bufAt: number, old: L2Entry): ClusterOp {
    const g = this.s.g;
    const cs = g.clusterSize;
    const op: ClusterOp = {
      gc, writeStart, writeEnd, bufAt, rewrite: true, host: 0, fresh: true, old, segments: [[0, cs]], newAlloc: 0, newZero: 0,
    };
    if (!g.hasDataFile) {
      const bad = this.badOldMapping(old);
      if (bad) this.s.corruptionFound(`a write to guest offset ${gc * cs} needs its L2 entry, whose ${bad}`);
    }
    const direct = this.directHost(gc, writeStart, writeEnd, old);
    if (direct >= 0) {
      op.rewrite = false;
      op.fresh = false;
      op.host = direct;
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
      op.host = gc * cs;
      op.fresh = false;
      if (g.extL2) this.subclusterSegments(op, touched, type === ClusterType.Normal ? old.alloc : 0);
      return op;
    }
    const host = entryOffset(old.hi, old.lo);
    if (hasHostCluster(type) && copied) {
      // Our own cluster with a zero flag or unallocated subclusters: rewritten in place.
      op.host = host;
      op.fresh = false;
      if (g.extL2) this.subclusterSegments(op, touched, old.alloc);
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
   */
  private badOldMapping(old: L2Entry): string | null {
    const s = this.s;
    if (old.hi & L2E_COMPRESSED) {
      const bad = badCompressed(s.g, decodeCompressed(s.g, old.hi, old.lo), s.fileSize);
      return bad ? `compressed cluster: ${bad}` : null;
    }
    const host = entryOffset(old.hi, old.lo);
    if (host === 0) return null;
    const bad = badClusterOffset(s.g, host);
    if (bad) return `data cluster offset ${bad}`;
    if ((old.hi & L2E_COPIED) === 0 && host >= s.fileSize) return `shared data cluster 0x${host.toString(16)} lies past the end of the file`;
    return null;
  }

  /**
   * Extended L2, target cluster kept: touched subclusters that are already
   * allocated get only the guest bytes (no read-modify-write, so a
   * concurrent direct write elsewhere in them is never overwritten with
   * stale data); unallocated or zero ones are written whole.
   */
  private subclusterSegments(op: ClusterOp, touched: number, allocated: number): void {
    const sc = this.s.g.subclusterSize;
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

  /** Phase 2 (no lock): direct writes in place, rewrites as whole segments with their COW head and tail. */
  private async writeData(buf: Buffer, ops: ClusterOp[]): Promise<void> {
    const s = this.s;
    const cs = s.g.clusterSize;
    const file = s.dataFile ?? s.file;
    const ios: Promise<unknown>[] = [];
    // Coalesce: consecutive pieces contiguous on the host become one write.
    let runHost = -1;
    let runLen = 0;
    let runCow = false;
    let parts: Array<{ src: Buffer; at: number; len: number }> = [];
    const flushRun = (): void => {
      if (runLen === 0) return;
      const host = runHost;
      const len = runLen;
      const point = runCow ? 'cow_write' : 'data_write';
      let data: Buffer;
      if (parts.length === 1) {
        data = parts[0].src.subarray(parts[0].at, parts[0].at + parts[0].len);
      } else {
        data = Buffer.allocUnsafe(len);
        let o = 0;
        for (const p of parts) {
          p.src.copy(data, o, p.at, p.at + p.len);
          o += p.len;
        }
      }
      track(ios, file.write(point, data, 0, len, host).then(() => s.noteDataEnd(file, host + len)));
      runHost = -1;
      runLen = 0;
      runCow = false;
      parts = [];
    };
    /** `cow`: part of a segment with a head or tail to fill (IoPoint 'cow_write'). */
    const add = (host: number, src: Buffer, at: number, len: number, cow: boolean): void => {
      if (len <= 0) return;
      if (runLen > 0 && runHost + runLen !== host) flushRun();
      if (runLen === 0) runHost = host;
      if (cow) runCow = true;
      // Consecutive slices of one buffer stay one part: written without a copy.
      const last = parts[parts.length - 1];
      if (last && last.src === src && last.at + last.len === at) last.len += len;
      else parts.push({ src, at, len });
      runLen += len;
    };

    // A head or tail that the old mapping reads as zeros. Where nothing was
    // ever written (a new cluster past the end of the file) it already reads
    // as zeros and costs nothing: the data write or a later one grows the
    // file over it, and a cluster that ends past the end of the file reads
    // as zeros there (qemu too); close() grows the file to whole clusters.
    // Elsewhere (a reused cluster, a zero-flagged one kept in place) zeros
    // are written, without a buffer (ImageFile.writeZeroes).
    const zeroes = (host: number, len: number): void => {
      if (file.neverWritten(host)) {
        s.noteDataEnd(file, host + len);
        return;
      }
      flushRun();
      track(ios, file.writeZeroes('cow_write', host, len).then(() => s.noteDataEnd(file, host + len)));
    };

    // [from, to) of a rewritten cluster, outside the guest data: what the old mapping shows there.
    const fill = async (op: ClusterOp, from: number, to: number): Promise<void> => {
      if (to <= from) return;
      if (this.readsAsZero(op.old, from, to)) {
        zeroes(op.host + from, to - from);
        return;
      }
      const old = Buffer.allocUnsafe(to - from);
      await readGuest(s, old, 0, old.length, op.gc * cs + from);
      add(op.host + from, old, 0, old.length, true);
    };

    try {
      for (const op of ops) {
        if (!op.rewrite) {
          add(op.host + op.writeStart, buf, op.bufAt, op.writeEnd - op.writeStart, false);
          continue;
        }
        for (const [start, end] of op.segments) {
          // Head [start, dataStart) and tail [dataEnd, end) come from the old mapping.
          const dataStart = Math.min(Math.max(start, op.writeStart), end);
          const dataEnd = Math.max(Math.min(end, op.writeEnd), dataStart);
          await fill(op, start, dataStart);
          add(op.host + dataStart, buf, op.bufAt + (dataStart - op.writeStart), dataEnd - dataStart, dataStart > start || end > dataEnd);
          await fill(op, dataEnd, end);
        }
      }
      flushRun();
    } catch (err) {
      await Promise.allSettled(ios);
      throw err;
    }
    await settleAll(ios);
  }

  /** Does the guest see zeros in [start, end) of a cluster mapped by `old` (no I/O)? */
  private readsAsZero(old: L2Entry, start: number, end: number): boolean {
    const s = this.s;
    for (let at = start; at < end; at += this.piece.length) {
      classify(s.g, old, at, end - at, this.piece);
      const k = this.piece.kind;
      if (!(k === ExtentKind.Zero || (k === ExtentKind.Backing && s.backing === null))) return false;
    }
    return true;
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
        const l1i = Math.floor(op.gc / g.l2Entries);
        const { table, offset } = await this.l2ForWrite(l1i);
        if (op.fresh && !this.lazy && !g.hasDataFile) await s.l2Cache.dependOn(this.refcounts.cache);
        s.l2Cache.dependOnSync();
        const at = (op.gc % g.l2Entries) * g.l2EntryBytes;
        writeEntry(table, at, L2E_COPIED, op.host, 0);
        if (g.extL2) {
          table.writeUInt32BE(op.newZero, at + L2E_ZERO_BITMAP);
          table.writeUInt32BE(op.newAlloc, at + L2E_ALLOC_BITMAP);
        }
        s.l2Cache.markDirty(offset, table);
        if (op.fresh && !g.hasDataFile) {
          const old = op.old;
          if (old.hi & L2E_COMPRESSED) {
            const { start, bytes } = compressedExtent(decodeCompressed(g, old.hi, old.lo));
            releases.push([start, bytes]);
          } else {
            const oldHost = entryOffset(old.hi, old.lo);
            if (oldHost !== 0) releases.push([oldHost, g.clusterSize]);
          }
        }
        this.finish([op]);
      }
      for (const r of releases) this.pendingReleases.push(r);
      if (
        s.l2Cache.underPressure ||
        this.refcounts.cache.underPressure ||
        this.pendingReleases.length > Qcow2Writer.MAX_PENDING_RELEASES
      ) {
        await this.flushLocked();
      }
    } catch (err) {
      await this.undo(ops.slice(i));
      throw err;
    }
  }

  /** Give back what a failed request allocated and release its in-flight clusters. */
  private async undo(ops: ClusterOp[]): Promise<void> {
    try {
      if (!this.s.g.hasDataFile) {
        for (const op of ops) if (op.fresh && op.host !== 0) await this.refcounts.release(op.host, this.s.g.clusterSize);
      }
    } catch (err) {
      this.s.log.warn({ err: (err as Error).message }, 'could not release clusters of a failed write (leaked)');
    } finally {
      this.finish(ops);
    }
  }

  private finish(ops: ClusterOp[]): void {
    for (const op of ops) {
      const d = this.inflight.get(op.gc);
      if (d) {
        this.inflight.delete(op.gc);
        d.resolve();
      }
    }
  }

  /**
   * The L2 table for L1 index `l1i`, ready to be modified: allocated if
   * missing, copied if shared with a snapshot (no COPIED flag). The new
   * table goes into the cache dirty and the in-memory L1 entry points at it
   * at once (reads and writes find it there); the on-disk L1 entry is
   * written by the next flush, after the table and the refcount of its
   * cluster are durable (writeL1). Until then the old mapping stays on disk,
   * so a crash only leaks. The old table's reference is queued and dropped
   * by that flush after the L1 entry that replaced it is durable.
   */
  private async l2ForWrite(l1i: number): Promise<{ table: Buffer; offset: number }> {
    const s = this.s;
    const cs = s.g.clusterSize;
    const old = s.l2OffsetOf(l1i);
    if (old !== 0 && s.l1Copied(l1i)) return { table: await s.l2Table(old), offset: old };
    const table = old !== 0 ? Buffer.from(await s.l2Table(old)) : Buffer.alloc(cs);
    const offset = await this.refcounts.allocate(1);
    s.checkOverlap(offset, cs, 'new L2 table');
    if (!this.lazy) await s.l2Cache.dependOn(this.refcounts.cache);
    s.unwrittenL2.add(offset);
    s.l2Cache.install(offset, table, true);
    s.noteFileEnd(offset + cs); // the table is cached and pinned until written: reads never go past the file for it
    writeEntry(s.l1, l1i * 8, L2E_COPIED, offset, 0);
    this.dirtyL1.add(l1i);
    s.overlap.l2Allocated(offset);
    if (old !== 0) {
      // No longer a table of the active L1: once released it may be reused like any free cluster.
      s.overlap.l2Dropped(old);
      this.pendingReleases.push([old, cs]);
    }
    s.log.debug({ l1i, offset, copiedFrom: old }, 'L2 table allocated');
    return { table, offset };
  }

  /**
   * Write the L1 entries changed since the last flush (caller: flushLocked,
   * after the L2 cache flush made every table they point at durable), then
   * sync. One write covers the span of changed entries: the entries between
   * them are unchanged in memory, so rewriting them is harmless.
   */
  private async writeL1(): Promise<void> {
    if (this.dirtyL1.size === 0) return;
    const s = this.s;
    const dirty = [...this.dirtyL1];
    const first = Math.min(...dirty);
    const last = Math.max(...dirty);
    const span = Buffer.from(s.l1.subarray(first * 8, (last + 1) * 8));
    await s.file.write('l1_update', span, 0, span.length, s.header.l1TableOffset + first * 8);
    await s.syncAll();
    for (const i of dirty) this.dirtyL1.delete(i);
  }

}

