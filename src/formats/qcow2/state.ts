/**
 * Everything an open qcow2 image holds in memory. The read path, the write
 * path, refcounts and check all work on one Qcow2State; the driver object
 * (driver.ts) is the BlockDriver face over it.
 */
import { LRUCache } from 'lru-cache';
import { TableCache, type Sync } from '../../../cache/table-cache.js';
import { Mutex } from '../../../cache/mutex.js';
import { CorruptionError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import type { Logger } from '../../log.js';
import type { BlockDriver } from '../driver.js';
import type { Qcow2Header } from './header.js';
import { tableDataBytes } from './map.js';
import { PendingPointers } from '../pointer-table.js';
import { OverlapIndex } from './overlap.js';
import type { Qcow2Snapshot } from './snapshot.js';
import { badClusterOffset, entryOffset, type Geometry, L1E_COPIED } from './spec.js';

export class Qcow2State {
  /** Current file size in bytes: the end of allocated space as far as reads are concerned. */
  fileSize: number;
  /**
   * The file size when the image was opened. qmount never creates shared or
   * compressed clusters, so every such cluster an entry names must lie below
   * it; one above was handed out by this mount's allocator (the refcounts
   * said free) and belongs to someone else now.
   */
  readonly fileSizeAtOpen: number;
  dataFileSize = 0;
  /** The active L1 table, big-endian entries as on disk. */
  l1: Buffer;
  readonly l2Cache: TableCache;
  /** Decompressed clusters by host offset of their compressed data. Cleared when clusters are freed. */
  readonly decompressed = new LRUCache<number, Buffer>({ max: 16 });
  /**
   * The metadata lock. Held across every lookup-allocate-link sequence of a
   * write and across refcount changes; data I/O of reads never takes it.
   */
  readonly meta = new Mutex();
  snapshots: Qcow2Snapshot[];
  /** bytes the snapshot table occupies */
  snapshotTableBytes = 0;
  /** Set once a corruption was found on write: writes then fail with EIO, reads go on. */
  corrupt = false;
  /** Called when an overlap is found; the writer sets the corrupt bit on disk. */
  onCorrupt: ((what: string) => void) | null = null;
  /** The overlap check's index of metadata (overlap.ts): consulted before writes. */
  readonly overlap = new OverlapIndex();
  /**
   * L1 entries newer in memory than on disk, and their new L2 tables until
   * written (they live dirty in l2Cache): commit.ts, step 3.
   */
  readonly newL1 = new PendingPointers();
  /** Guest bytes of data this image maps (allocatedBytes); see DataBytes. */
  readonly dataBytes = new DataBytes(this);

  constructor(
    readonly file: ImageFile,
    readonly dataFile: ImageFile | null,
    readonly header: Qcow2Header,
    readonly g: Geometry,
    l1: Buffer,
    snapshots: Qcow2Snapshot[],
    readonly backing: BlockDriver | null,
    fileSize: number,
    l2CacheBytes: number,
    readonly log: Logger,
  ) {
    this.fileSize = fileSize;
    this.fileSizeAtOpen = fileSize;
    this.l1 = l1;
    this.snapshots = snapshots;
    this.l2Cache = new TableCache({
      name: 'l2',
      tableBytes: g.clusterSize,
      maxBytes: l2CacheBytes,
      store: {
        read: async (offset, into) => {
          const n = await file.read(into, 0, g.clusterSize, offset);
          if (n < g.clusterSize) into.fill(0, n);
        },
        write: async (offset, data) => {
          // The first write of a new table is 'l2_alloc' (fault injection and the crash harness tell them apart).
          await file.write(this.newL1.isNew(offset) ? 'l2_alloc' : 'l2_update', data, 0, data.length, offset);
          this.newL1.written(offset);
        },
        sync: () => this.syncAll(),
      },
    });
  }

  get virtualSize(): number {
    return this.header.size;
  }

  get compressionType(): number {
    return this.header.compressionType;
  }

  get l1Entries(): number {
    return this.header.l1Size;
  }

  /** fdatasync the image and the external data file. */
  async syncAll(): Promise<void> {
    if (this.dataFile && !this.dataFile.readOnly) await this.dataFile.flush();
    await this.file.flush();
  }

  /** L2 table offset for an L1 index (0: unallocated). */
  l2OffsetOf(l1Index: number): number {
    const at = l1Index * 8;
    return entryOffset(this.l1.readUInt32BE(at), this.l1.readUInt32BE(at + 4));
  }

  /** The L2 table of L1 entry `l1Index` if it is in the cache now (no I/O): the fast paths' lookup. */
  cachedL2(l1Index: number): Buffer | undefined {
    const l2Offset = this.l2OffsetOf(l1Index);
    return l2Offset === 0 ? undefined : this.l2Cache.peek(l2Offset);
  }

  l1Copied(l1Index: number): boolean {
    return (this.l1.readUInt32BE(l1Index * 8) & L1E_COPIED) !== 0;
  }

  /** Why an L1 entry's L2 table offset (host, bytes) cannot be used (null when it can). */
  badL2Offset(l2Offset: number): string | null {
    const bad = badClusterOffset(this.g, l2Offset);
    if (bad) return bad;
    if (l2Offset < this.g.clusterSize) return 'is in the header cluster';
    if (l2Offset >= this.fileSize) return `0x${l2Offset.toString(16)} lies past the end of the file`;
    return null;
  }

  /** Throws when an L2 table offset cannot be used. */
  private checkL2Offset(l2Offset: number): void {
    const bad = this.badL2Offset(l2Offset);
    if (bad) throw new CorruptionError(`L2 table offset ${bad}`);
  }

  /** The L2 table at `offset`, validated and loaded through the cache: read it synchronously, never change it (TableCache, borrowing). */
  async l2Table(l2Offset: number): Promise<Buffer> {
    this.checkL2Offset(l2Offset);
    return this.l2Cache.get(l2Offset);
  }

  /** Borrow the L2 table at `offset` (validated) for reading inside the synchronous `use`. */
  async l2With<T>(l2Offset: number, use: (table: Buffer) => Sync<T>): Promise<T> {
    this.checkL2Offset(l2Offset);
    return this.l2Cache.with(l2Offset, use);
  }

  /** Change the L2 table at `offset` (validated) inside the synchronous `change`; marked dirty after. Under the metadata lock. */
  async l2Modify<T>(l2Offset: number, change: (table: Buffer) => Sync<T>): Promise<T> {
    this.checkL2Offset(l2Offset);
    return this.l2Cache.modify(l2Offset, change);
  }

  /** A write reached host offset `hostEnd`: the file is at least that long now. */
  noteFileEnd(hostEnd: number): void {
    if (hostEnd > this.fileSize) this.fileSize = hostEnd;
  }

  /** A guest-data write reached host offset `hostEnd` in `file`: the image file or the external data file. */
  noteDataEnd(file: ImageFile, hostEnd: number): void {
    if (file === this.file) this.noteFileEnd(hostEnd);
    else if (hostEnd > this.dataFileSize) this.dataFileSize = hostEnd;
  }

  /**
   * Throws (and reports corruption) if [hostOffset, hostOffset +
   * lengthBytes) of the image file overlaps metadata. Called before every data write and before a newly
   * allocated cluster is written: refcounts that lie about a metadata cluster
   * must not lead to overwriting it.
   */
  checkOverlap(hostOffset: number, lengthBytes: number, what: string): void {
    const hit = this.overlap.find(hostOffset, lengthBytes);
    if (hit) this.corruptionFound(`metadata overlap: ${what} at ${hostOffset} overlaps ${hit}`);
  }

  /**
   * A write found metadata it must not act on (an overlap, a mapping that
   * points nowhere valid): the request fails with EIO, later writes are
   * refused, and the corrupt bit goes to disk (onCorrupt) so no later writer
   * trusts the image. Nothing is written for the request.
   */
  corruptionFound(msg: string): never {
    this.corrupt = true;
    this.onCorrupt?.(msg);
    throw new CorruptionError(`${msg}; image marked corrupt`);
  }
}

/**
 * What allocatedBytes() counts for one qcow2 image: the guest bytes its L2
 * entries map to data of its own - whole clusters for normal and compressed
 * clusters, allocated subclusters with extended L2; zero and unallocated
 * clusters count nothing. Counted by one scan of the L2 tables, started by
 * the first call (one L1 entry at a time under the metadata lock, so no
 * mapping changes under it), then kept current by every change of an L2
 * entry (note()). Until the scan is done, value() is an upper estimate: the
 * image file's size. The scan reads the tables beside the L2 cache
 * (TableCache.scan: a cached copy, dirty ones included, else the file), so
 * counting a big image does not evict the working set.
 */
export class DataBytes {
  private bytes = 0;
  /** L1 indexes below this one are counted in `bytes` */
  private countedL1 = 0;
  private scan: Promise<void> | null = null;
  /** the scan has counted every L1 entry (later ones, from a resize, start empty) */
  private done = false;

  constructor(private readonly s: Qcow2State) {}

  /** Bytes of data this image maps: exact once counted, else an estimate (and the count starts). */
  value(): number {
    if (this.done) return this.bytes;
    void this.start();
    return this.done ? this.bytes : Math.min(this.s.virtualSize, this.s.fileSize);
  }

  /** Start the scan (idempotent); the promise settles when it ends (an error only leaves the estimate). */
  start(): Promise<void> {
    this.scan ??= this.run().catch((err: unknown) => {
      this.s.log.warn({ err: (err as Error).message }, 'could not count the allocated clusters (st_blocks stays an estimate)');
    });
    return this.scan;
  }

  /** An L2 entry of guest cluster `clusterIndex` changed the data it maps by `delta` bytes (under the metadata lock). */
  note(clusterIndex: number, delta: number): void {
    if (delta !== 0 && (this.done || Math.floor(clusterIndex / this.s.g.l2Entries) < this.countedL1)) this.bytes += delta;
  }

  private async run(): Promise<void> {
    const s = this.s;
    while (this.countedL1 < s.l1Entries) {
      await s.meta.run(async () => {
        const l1i = this.countedL1;
        if (l1i >= s.l1Entries) return;
        const off = s.l2OffsetOf(l1i);
        if (off !== 0 && s.badL2Offset(off) === null) this.bytes += await s.l2Cache.scan(off, (table) => tableDataBytes(s.g, table, s.g.l2Entries));
        this.countedL1 = l1i + 1;
      });
    }
    this.done = true;
  }
}
