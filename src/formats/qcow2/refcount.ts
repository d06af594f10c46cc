/**
 * qcow2 refcounts and cluster allocation.
 *
 * Invariants kept here (a crash at any instant may leak clusters, never
 * leave a cluster in use with refcount 0):
 *
 *  1. A new refcount block is written, and durable, before the on-disk
 *     refcount table points at it. If it is placed inside the range it
 *     describes it counts itself (self-describing); otherwise its own
 *     refcount is raised in another block (the recursion ends within two
 *     steps because each step moves the candidate cluster forward). The
 *     block goes into the cache dirty and the in-memory table entry points
 *     at it at once; the on-disk entry is written by the cache's next flush,
 *     after its sync (TableStore.synced: writeTableEntries), and synced
 *     again - so allocating a block costs no sync of its own (a sync there
 *     would wait for all the data written since the last one), and a crash
 *     before that flush only leaks the block. Only entries of blocks written
 *     before that sync are written (pointer-table.ts), so the table never
 *     names a block whose own count is not durable. Since an L2 table
 *     pointing at a cluster counted in the new block is written only after
 *     this flush (commit.ts, step 1), nothing on disk depends on the block
 *     before its entry is there.
 *  2. Growing the refcount table never passes through an inconsistent state:
 *     new blocks and the new table are written at the end of the image,
 *     describing themselves and each other, synced, then the header is
 *     switched in one write (offset + cluster count are adjacent fields),
 *     synced, and only then is the old table freed.
 *  3. A cluster whose refcount drops to 0 is quarantined: it is not handed
 *     out again (nor punched) until a flush has made the drop (and the L2
 *     change that caused it) durable, no read that might still target it is
 *     in flight, and no direct write on it is in flight (write.ts, the fast
 *     path's invariant). So an old pointer that survives a crash never meets new data,
 *     and a racing read never sees another request's data.
 *  4. A refcount that would overflow its width, or drop below zero, fails
 *     the request before anything is changed.
 *
 * Ordering against L2 tables (raise before link, unlink before drop) is
 * stated and kept in commit.ts.
 */
import { TableCache } from '../../../cache/table-cache.js';
import { PendingPointers } from '../pointer-table.js';
import { CorruptionError, QmountError } from '../../errors.js';
import { hexOffset, INVALID_OFFSET, MAX_DISK_BYTES, representable, u64BE } from '../u64.js';
import type { Qcow2State } from './state.js';
import { entryOffset, MAX_REFTABLE_BYTES, refcountTableFields, REFT_RESERVED_LO } from './spec.js';

export class Refcounts {
  /** The refcount table, big-endian u64 entries as on disk. */
  table: Buffer;
  tableOffset: number;
  tableClusters: number;
  readonly cache: TableCache;
  /** Host cluster index where the next free-cluster search starts. */
  freeHintIndex = 0;
  /** Host cluster indexes whose refcount reached 0 since the last release (invariant 3). */
  readonly quarantine = new Set<number>();
  /** Table entries of new blocks the disk's table does not have yet, and those blocks until written (invariant 1). */
  private readonly newEntries = new PendingPointers();
  private readonly entries: number; // refcounts per block
  private readonly cs: number;
  private readonly maxRefcount: number;

  constructor(
    private readonly s: Qcow2State,
    table: Buffer,
    cacheBytes: number,
  ) {
    this.table = table;
    this.tableOffset = s.header.refcountTableOffset;
    this.tableClusters = s.header.refcountTableClusters;
    this.entries = s.g.refblockEntries;
    this.cs = s.g.clusterSize;
    const bits = 2 ** s.g.refcountOrder;
    this.maxRefcount = bits === 64 ? MAX_DISK_BYTES - 1 : 2 ** bits - 1;
    this.cache = new TableCache({
      name: 'refblock',
      tableBytes: this.cs,
      maxBytes: cacheBytes,
      store: {
        read: async (offset, into) => {
          const n = await s.file.read(into, 0, this.cs, offset);
          if (n < this.cs) into.fill(0, n);
        },
        write: async (offset, data) => {
          await s.file.write(this.newEntries.isNew(offset) ? 'refblock_alloc' : 'refblock_update', data, 0, data.length, offset);
          this.newEntries.written(offset);
        },
        sync: () => s.syncAll(),
        synced: () => this.writeTableEntries(),
      },
    });
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** Host offset of the refcount block of table entry `tableIndex`, 0 if none; INVALID_OFFSET at or above 2^52 (../u64.ts). */
  blockOffset(tableIndex: number): number {
    if (tableIndex >= this.tableEntries) return 0;
    return entryOffset(this.table.readUInt32BE(tableIndex * 8), this.table.readUInt32BE(tableIndex * 8 + 4));
  }

  /** The refcount block of table entry `tableIndex` through the cache, null when the table has none (read it synchronously: TableCache, borrowing). */
  block(tableIndex: number): Promise<Buffer | null> {
    return this.loadBlock(tableIndex);
  }

  /**
   * Why refcount table entry `tableIndex` names no usable block (null when
   * it does, or names none): reserved bits set, an offset that is not a
   * cluster offset, or one outside the file.
   */
  blockProblem(tableIndex: number): string | null {
    if (tableIndex >= this.tableEntries) return null;
    if ((this.table.readUInt32BE(tableIndex * 8 + 4) & REFT_RESERVED_LO) !== 0) return 'has reserved bits set';
    const off = this.blockOffset(tableIndex);
    if (off === 0) return null;
    if (off === INVALID_OFFSET || off % this.cs !== 0) return `offset ${hexOffset(off)} is not a cluster offset`;
    if (off >= this.s.fileSize) return `offset ${hexOffset(off)} lies outside the image`;
    return null;
  }

  private async loadBlock(tableIndex: number): Promise<Buffer | null> {
    const off = this.blockOffset(tableIndex);
    if (off === 0) return null;
    if (off % this.cs !== 0 || off >= this.s.fileSize) this.badBlock(tableIndex, off);
    return this.cache.get(off);
  }

  /** A refcount table entry that names no usable block: nothing may be allocated or freed by it (QEMU too marks the image corrupt). */
  private badBlock(tableIndex: number, blockOffset: number): never {
    this.s.corruptionFound(`refcount table entry ${tableIndex} names refcount block ${hexOffset(blockOffset)}, which is unaligned or outside the file`);
  }

  /** Read entry `idx` of a refcount block. */
  readEntry(block: Buffer, idx: number): number {
    const order = this.s.g.refcountOrder;
    switch (order) {
      case 3:
        return block[idx];
      case 4:
        return block.readUInt16BE(idx * 2);
      case 5:
        return block.readUInt32BE(idx * 4);
      case 6:
        // INVALID_OFFSET (Infinity) at or above 2^52: above maxRefcount, so change() refuses it.
        return u64BE(block, idx * 8);
      default: {
        const bits = 1 << order;
        const perByte = 8 >> order;
        return (block[Math.floor(idx / perByte)] >> ((idx % perByte) * bits)) & ((1 << bits) - 1);
      }
    }
  }

  writeEntry(block: Buffer, idx: number, v: number): void {
    const order = this.s.g.refcountOrder;
    switch (order) {
      case 3:
        block[idx] = v;
        return;
      case 4:
        block.writeUInt16BE(v, idx * 2);
        return;
      case 5:
        block.writeUInt32BE(v, idx * 4);
        return;
      case 6:
        block.writeUInt32BE(Math.floor(v / 0x1_0000_0000), idx * 8);
        block.writeUInt32BE(v % 0x1_0000_0000, idx * 8 + 4);
        return;
      default: {
        const bits = 1 << order;
        const perByte = 8 >> order;
        const at = Math.floor(idx / perByte);
        const shift = (idx % perByte) * bits;
        const mask = ((1 << bits) - 1) << shift;
        block[at] = (block[at] & ~mask) | ((v << shift) & mask);
      }
    }
  }

  /** The refcount of host cluster `clusterIndex` when its block is cached (or absent: 0), without an await; undefined otherwise. */
  peek(clusterIndex: number): number | undefined {
    const off = this.blockOffset(Math.floor(clusterIndex / this.entries));
    if (off === 0) return 0;
    const block = this.cache.peek(off);
    return block ? this.readEntry(block, clusterIndex % this.entries) : undefined;
  }

  /** The refcount of host cluster `clusterIndex`. */
  async get(clusterIndex: number): Promise<number> {
    const block = await this.loadBlock(Math.floor(clusterIndex / this.entries));
    return block ? this.readEntry(block, clusterIndex % this.entries) : 0;
  }

  /**
   * Add `delta` to the refcount of host cluster `clusterIndex`; allocates
   * its refcount block if needed (never for a decrement: a cluster without
   * a block has refcount 0). Returns the new value.
   */
  async change(clusterIndex: number, delta: number): Promise<number> {
    const tableIndex = Math.floor(clusterIndex / this.entries);
    if (delta < 0 && this.blockOffset(tableIndex) === 0) {
      throw new CorruptionError(`refcount of cluster ${clusterIndex} would drop below zero (it has no refcount block)`);
    }
    const blockOff = await this.ensureBlock(tableIndex);
    const idx = clusterIndex % this.entries;
    return this.cache.modify(blockOff, (block) => {
      const n = this.readEntry(block, idx) + delta;
      if (n < 0) throw new CorruptionError(`refcount of cluster ${clusterIndex} would drop below zero`);
      if (n > this.maxRefcount) {
        throw new QmountError('EOVERFLOW', `refcount of cluster ${clusterIndex} would exceed ${this.maxRefcount} (refcount_bits=${2 ** this.s.g.refcountOrder})`);
      }
      this.writeEntry(block, idx, n);
      return this.stored(clusterIndex, n);
    });
  }

  /** Set the refcount of host cluster `clusterIndex` to `v` (repair: the stored value may be unreadable). */
  async set(clusterIndex: number, v: number): Promise<void> {
    const blockOff = await this.ensureBlock(Math.floor(clusterIndex / this.entries));
    await this.cache.modify(blockOff, (block) => {
      this.writeEntry(block, clusterIndex % this.entries, v);
      this.stored(clusterIndex, v);
    });
  }

  /** The refcount of host cluster `clusterIndex` became `v` (in the same synchronous step that changed its block). */
  private stored(clusterIndex: number, v: number): number {
    if (v === 0) {
      this.quarantine.add(clusterIndex);
      this.s.decompressed.clear();
    }
    return v;
  }

  /** Drop one reference from every host cluster overlapping [hostOffset, hostOffset + lengthBytes). */
  async release(hostOffset: number, lengthBytes: number): Promise<void> {
    if (!representable(hostOffset + lengthBytes)) throw new CorruptionError('refusing to release clusters at or above 2^52');
    const first = Math.floor(hostOffset / this.cs);
    const last = Math.floor((hostOffset + lengthBytes - 1) / this.cs);
    for (let ci = first; ci <= last; ci++) await this.change(ci, -1);
  }

  /**
   * Make quarantined clusters allocatable again (invariant 3: the caller has
   * flushed, no read is in flight). A cluster `busy` says a direct write is
   * still in flight on stays quarantined until a later flush (write.ts, the
   * fast path's invariant). The others are punched out of the image file
   * first (so its allocated size shrinks; a file system that cannot punch
   * keeps the bytes) and only then handed to the allocator: a punch never
   * meets a cluster that was reused.
   */
  async releaseQuarantine(busy: (clusterIndex: number) => boolean): Promise<void> {
    const ready = [...this.quarantine].filter((c) => !busy(c)).sort((a, b) => a - b);
    if (ready.length === 0) return;
    if (!this.s.file.readOnly) {
      const endCluster = Math.ceil(this.s.fileSize / this.cs);
      for (let i = 0; i < ready.length; ) {
        let j = i + 1;
        while (j < ready.length && ready[j] === ready[j - 1] + 1) j++;
        const first = ready[i];
        const last = Math.min(ready[j - 1] + 1, endCluster);
        if (last > first) {
          try {
            await this.s.file.punchHole('punch_hole', first * this.cs, (last - first) * this.cs);
          } catch (err) {
            // The clusters are free either way: an unpunched one only costs space.
            this.s.log.warn({ hostOffset: first * this.cs, err: (err as Error).message }, 'could not punch freed clusters out of the image file');
          }
        }
        i = j;
      }
    }
    for (const c of ready) {
      if (c < this.freeHintIndex) this.freeHintIndex = c;
      this.quarantine.delete(c);
    }
  }

  /**
   * The host cluster index of the first of `clusterCount` contiguous free
   * clusters at or after freeHintIndex (refcounts untouched). A cluster the overlap index knows as metadata is
   * never free, whatever its refcount says (a damaged refcount of 0 on the
   * header would otherwise hand it out).
   */
  async findFreeIndex(clusterCount: number): Promise<number> {
    let start = this.freeHintIndex;
    let run = 0;
    let c = start;
    while (run < clusterCount) {
      const i = Math.floor(c / this.entries);
      const block = i < this.tableEntries ? await this.loadBlock(i) : null;
      const blockEnd = (i + 1) * this.entries;
      for (; c < blockEnd && run < clusterCount; c++) {
        const free =
          (block === null || this.readEntry(block, c % this.entries) === 0) &&
          !this.quarantine.has(c) &&
          this.s.overlap.find(c * this.cs, this.cs) === null;
        if (free) {
          run++;
        } else {
          run = 0;
          start = c + 1;
        }
      }
    }
    return start;
  }

  /**
   * Allocate `clusterCount` contiguous host clusters with refcount 1 and
   * return the host offset (bytes) of the first. The search hint moves past them before any
   * refcount block is allocated, so a new block never lands inside them.
   */
  async allocateHostOffset(clusterCount: number): Promise<number> {
    const start = await this.findFreeIndex(clusterCount);
    this.freeHintIndex = start + clusterCount;
    for (let ci = start; ci < start + clusterCount; ci++) await this.change(ci, 1);
    return start * this.cs;
  }

  /** Host offset of the refcount block of table entry `tableIndex`, allocating it (or growing the table) first if needed. */
  private async ensureBlock(tableIndex: number): Promise<number> {
    if (tableIndex >= this.tableEntries) await this.growTable(tableIndex);
    const off = this.blockOffset(tableIndex);
    if (off !== 0) {
      if (off % this.cs !== 0 || off >= this.s.fileSize) this.badBlock(tableIndex, off);
      return off;
    }
    return this.allocBlock(tableIndex);
  }

  /** Invariant 1. */
  private async allocBlock(i: number): Promise<number> {
    const c = await this.findFreeIndex(1);
    this.freeHintIndex = Math.max(this.freeHintIndex, c + 1);
    const blockOff = c * this.cs;
    this.s.checkOverlap(blockOff, this.cs, 'refcount block');
    const block = Buffer.alloc(this.cs);
    if (Math.floor(c / this.entries) === i) this.writeEntry(block, c % this.entries, 1); // self-describing
    else await this.change(c, 1);
    this.newEntries.note(this.table, i, blockOff);
    this.cache.install(blockOff, block, true); // dirty: pinned until written
    this.s.noteFileEnd(blockOff + this.cs);
    this.table.writeBigUInt64BE(BigInt(blockOff), i * 8);
    this.s.overlap.refblockAdded(blockOff);
    return blockOff;
  }

  /**
   * Invariant 1, after a flush's sync (TableStore.synced): the table entries
   * of the new blocks written before it, then a sync. Only flushes write
   * blocks, under the flush lock this runs under, so a block written by now
   * was written before that sync.
   */
  private async writeTableEntries(): Promise<void> {
    await this.newEntries.writeReady(
      this.table,
      (span, first) => this.s.file.write('reftable_update', span, 0, span.length, this.tableOffset + first * 8),
      () => this.s.syncAll(),
    );
  }

  /** Invariant 2: grow the table so that it has an entry `needed`. */
  private async growTable(needed: number): Promise<void> {
    // The new table copies the in-memory one: every block it names must be durable first (invariant 1).
    if (this.newEntries.size > 0) await this.cache.flush();
    const E = this.entries;
    const cs = this.cs;
    const oldEntries = this.tableEntries;
    const endCluster = Math.ceil(this.s.fileSize / cs);
    const metaStart = Math.max(endCluster, this.freeHintIndex, oldEntries * E);
    let nBlocks = 1;
    let tableClusters = 0;
    let indices: number[] = [];
    for (let iter = 0; iter < 16; iter++) {
      const lastMeta = metaStart + nBlocks + Math.max(tableClusters, 1) - 1;
      const wantEntries = Math.max(needed + 1, Math.floor(lastMeta / E) + 1, Math.ceil(oldEntries * 1.5));
      const tc = Math.ceil((wantEntries * 8) / cs);
      const set = new Set<number>([needed]);
      for (let m = metaStart; m < metaStart + nBlocks + tc; m++) set.add(Math.floor(m / E));
      const sorted = [...set].sort((a, b) => a - b);
      if (sorted.length === nBlocks && tc === tableClusters) {
        indices = sorted;
        break;
      }
      nBlocks = sorted.length;
      tableClusters = tc;
      indices = sorted;
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) {
      throw new QmountError('EFBIG', 'the refcount table would exceed its maximum size');
    }
    const newEntries = (tableClusters * cs) / 8;
    const blocksBuf = Buffer.alloc(nBlocks * cs);
    const metaEnd = metaStart + nBlocks + tableClusters;
    for (let m = metaStart; m < metaEnd; m++) {
      const b = indices.indexOf(Math.floor(m / E));
      this.writeEntry(blocksBuf.subarray(b * cs, (b + 1) * cs), m % E, 1);
    }
    const newTable = Buffer.alloc(newEntries * 8);
    this.table.copy(newTable, 0);
    indices.forEach((idx, b) => newTable.writeBigUInt64BE(BigInt((metaStart + b) * cs), idx * 8));
    const newTableOffset = (metaStart + nBlocks) * cs;
    this.s.checkOverlap(metaStart * cs, (metaEnd - metaStart) * cs, 'refcount table');

    await this.s.file.write('reftable_grow', blocksBuf, 0, blocksBuf.length, metaStart * cs);
    await this.s.file.write('reftable_grow', newTable, 0, newTable.length, newTableOffset);
    this.s.noteFileEnd(metaEnd * cs);
    await this.s.syncAll();
    const [at, fields] = refcountTableFields(newTableOffset, tableClusters);
    await this.s.file.write('header_update', fields, 0, fields.length, at);
    await this.s.syncAll();

    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = newTable;
    this.tableOffset = newTableOffset;
    this.tableClusters = tableClusters;
    this.s.header.refcountTableOffset = newTableOffset;
    this.s.header.refcountTableClusters = tableClusters;
    this.s.overlap.refcountTableMoved(newTableOffset, tableClusters * cs);
    indices.forEach((_, b) => {
      const off = (metaStart + b) * cs;
      this.cache.install(off, Buffer.from(blocksBuf.subarray(b * cs, (b + 1) * cs)), false);
      this.s.overlap.refblockAdded(off);
    });
    this.s.log.info({ oldEntries, newEntries, newTableOffset }, 'refcount table grown');
    // The header switch is durable: the old table can go.
    await this.release(oldOffset, oldClusters * cs);
  }
}
