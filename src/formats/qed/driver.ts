/**
 * QED driver: reads, writes, the need-check bit.
 *
 * Concurrency design. FUSE delivers requests concurrently and every await
 * lets another request run, so the rules are:
 *
 *  1. `metaLock` (FIFO mutex) serialises every change of metadata: the
 *     lookup + allocate step of an allocating write, linking new clusters
 *     into L1/L2, setting and clearing the need-check bit. Data I/O of an
 *     allocating write (backing read, cluster write) runs outside it.
 *  2. In-flight tracking (../inflight.ts, the invariant is written there):
 *     between "allocate" and "link" a guest cluster is in `inflight`. A
 *     write that finds its first cluster in flight waits for it and starts
 *     over (the cluster is then allocated, so it becomes a plain data write);
 *     an allocation run stops before any cluster in flight, so no
 *     copy-on-write fill can overwrite another write's data.
 *  3. Reads and writes into allocated clusters take no lock: an L2 entry is
 *     set only after its cluster's data is written, so a read racing an
 *     allocation sees either the old mapping (backing/zeros: old content) or
 *     the new one (new content), never an unwritten cluster. A data pointer
 *     changes only by a discard (zero.ts), to 0 or the zero value, and the
 *     host cluster it pointed at is never handed out again while mounted
 *     (append-only allocator): a request that mapped it before reaches only
 *     that cluster (old data or zeros), never another guest cluster's data.
 *  4. The need-check bit is set and durable (header write + sync) under the
 *     lock, in the allocation step, before the first cluster write or table
 *     change of a dirty period. It is cleared only under the lock, with no
 *     allocation between its allocate and link steps (`activeAllocs` === 0)
 *     and every dirty L2 table written and synced: on clean close, and by an
 *     idle timer a few seconds after the last allocating write.
 *  5. resize() sets virtualSize first, waits for the requests checked
 *     against the old size (RequestsInFlight), zero-fills a grown range the
 *     backing file would show through (zero.ts) and syncs, and writes the
 *     header's image_size last (one 64-byte sector, under the lock, with the
 *     need-check bit as it is on disk): a crash before it leaves the old size
 *     with at most some extra zero entries past it.
 */
import { FormatError, QmountError } from '../../errors.js';
import { settleAll, type ImageFile } from '../../io/file.js';
import type { Logger } from '../../log.js';
import { Mutex } from '../../../cache/mutex.js';
import {
  backingStatus,
  checkRequest,
  checkResize,
  pushExtent,
  readFromBacking,
  RequestsInFlight,
  type BlockDriver,
  type BlockExtent,
  type DriverOpenOptions,
  type FdSink,
  type ImageInfo,
} from '../driver.js';
import { InflightClusters } from '../inflight.js';
import { AppendAllocator, DataClusterCount } from './alloc.js';
import { clearNeedCheck, readQedMeta, scanQed } from './check.js';
import {
  QED_AUTOCLEAR_FEATURE_MASK,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_F_NEED_CHECK,
  QED_HEADER_BYTES,
  decodeBackingName,
  featureNames,
  geometryOf,
  maxImageSize,
  serializeHeader,
  type QedGeometry,
  type QedHeader,
} from './header.js';
import { QedTables, type FreeRun } from './table.js';
import { zeroRange, type ZeroContext } from './zero.js';

/** Tunables (tests shorten the idle delay). */
export const qedTuning = {
  /** Idle time after the last allocating write before the need-check bit is cleared. */
  needCheckIdleMs: 5000,
};

/** Errors that do not name the image get its name from openImage (open.ts). */
export async function openQed(file: ImageFile, opts: DriverOpenOptions): Promise<BlockDriver> {
  const log = opts.log;
  const { header, l1, fileSize } = await readQedMeta(file);
  const geo = geometryOf(header);

  let backingName: string | undefined;
  if (header.features & QED_F_BACKING_FILE) {
    const raw = Buffer.alloc(header.backingFilenameSize);
    const n = await file.read(raw, 0, raw.length, header.backingFilenameOffset);
    if (n < raw.length) throw new FormatError('QED backing file name lies past the end of the file');
    backingName = decodeBackingName(raw) || undefined;
  }

  if (!opts.readOnly) {
    if (header.features & QED_F_NEED_CHECK) {
      // First look without writing: an image with clusters referenced twice is refused untouched.
      let r = await scanQed(file, header, l1, fileSize, false, log);
      if (r.unfixable > 0) {
        throw new FormatError(
          `QED image was not closed cleanly and has ${r.unfixable} corruptions no repair can fix (${r.firstUnfixable}); open it read-only to recover data`,
          'EIO',
        );
      }
      if (r.corruptions > 0) r = await scanQed(file, header, l1, fileSize, true, log);
      if (r.corruptions > 0) throw new FormatError(`QED image repair left ${r.corruptions} corruptions`, 'EIO');
      log.warn({ fixed: r.fixedCorruptions, leaks: r.leaks }, 'QED image was not closed cleanly: checked and repaired');
    }
    // Unknown autoclear bits describe data this implementation would not keep up to date:
    // cleared on disk (with the need-check bit, after the repairs were synced) before any write.
    const autoclear = header.autoclearFeatures & QED_AUTOCLEAR_FEATURE_MASK;
    if (header.features & QED_F_NEED_CHECK || autoclear !== header.autoclearFeatures) {
      header.autoclearFeatures = autoclear;
      await clearNeedCheck(file, header);
    }
  } else if (header.features & QED_F_NEED_CHECK) {
    log.warn('QED image was not closed cleanly; opened read-only without a consistency check');
  }

  const noProbe = (header.features & QED_F_BACKING_FORMAT_NO_PROBE) !== 0n;
  let backing: BlockDriver | null = null;
  if (backingName !== undefined && opts.openBacking) {
    backing = await opts.openBacking(backingName, noProbe ? 'raw' : undefined);
  }
  const space = new AppendAllocator(fileSize, geo.clusterSize);
  const tables = new QedTables(file, geo, l1, header.l1TableOffset, space, opts.l2CacheBytes);
  return new QedDriver(file, header, geo, tables, space, backing, backingName, noProbe, opts.readOnly, log);
}

interface AllocPlan {
  run: FreeRun;
  /** host offset of the first new cluster */
  hostOffset: number;
}

class QedDriver implements BlockDriver {
  readonly format = 'qed' as const;
  virtualSize: number;
  private readonly requests = new RequestsInFlight();
  private readonly count: DataClusterCount;
  private readonly zero: ZeroContext;
  private readonly metaLock = new Mutex();
  /** guest clusters of allocating writes between their allocate and link steps (../inflight.ts) */
  private readonly inflight = new InflightClusters();
  /** allocating writes between their allocate and link steps */
  private activeAllocs = 0;
  private needCheckOnDisk: boolean;
  private idleTimer: NodeJS.Timeout | null = null;
  private closed = false;

  constructor(
    private readonly file: ImageFile,
    private readonly header: QedHeader,
    private readonly geo: QedGeometry,
    private readonly tables: QedTables,
    private readonly space: AppendAllocator,
    private readonly backing: BlockDriver | null,
    private readonly backingName: string | undefined,
    private readonly noProbe: boolean,
    readonly readOnly: boolean,
    private readonly log: Logger,
  ) {
    this.virtualSize = header.imageSize;
    this.needCheckOnDisk = (header.features & QED_F_NEED_CHECK) !== 0n;
    this.count = new DataClusterCount(geo.tableEntries, geo.tableEntries, (i) => tables.countData(i), (fn) => this.metaLock.run(fn));
    this.count.ready().catch((err: unknown) => log.warn({ err: (err as Error).message }, 'counting data clusters failed: allocated size is an estimate'));
    this.zero = {
      file,
      geo,
      tables,
      backing,
      metaLock: this.metaLock,
      inflight: this.inflight,
      count: this.count,
      markNeedCheckLocked: () => this.markNeedCheckLocked(),
      changedMetadata: () => this.armIdleTimer(),
      write: (buf, bufOffset, length, guestOffset) => this.writeChecked(buf, bufOffset, length, guestOffset),
      wrote: (end) => space.wrote(end),
    };
  }

  get filename(): string {
    return this.file.path;
  }

  async read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    let done = 0;
    while (done < length) {
      const extentGuestOffset = guestOffset + done;
      const at = bufOffset + done;
      const ext = await this.tables.map(extentGuestOffset, length - done);
      if (ext.kind === 'data') {
        // A cluster straddling the end of the file reads zeros past it.
        await this.file.readZeroFill(buf, at, ext.bytes, ext.host);
      } else if (ext.kind === 'zero' || !this.backing) {
        buf.fill(0, at, at + ext.bytes);
      } else {
        await readFromBacking(this.backing, buf, at, ext.bytes, extentGuestOffset);
      }
      done += ext.bytes;
    }
  }

  async write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    await this.requests.track(this.writeChecked(buf, bufOffset, length, guestOffset));
  }

  /** read() of a range one cached extent covers, done before returning (BlockDriver.readNow). */
  readNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    const ext = length === 0 ? null : this.tables.mapNow(guestOffset, length);
    if (ext === null || ext.bytes < length) return false;
    if (ext.kind === 'data') return this.file.readZeroFillNow(buf, bufOffset, length, ext.host) >= 0;
    if (ext.kind === 'unalloc' && this.backing) return false;
    buf.fill(0, bufOffset, bufOffset + length);
    return true;
  }

  /** BlockDriver.sendNow: a range one cached data extent covers, sent from the file. */
  sendNow(length: number, guestOffset: number, sink: FdSink): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    const ext = length === 0 ? null : this.tables.mapNow(guestOffset, length);
    return ext !== null && ext.kind === 'data' && ext.bytes >= length && this.file.sendNow(ext.host, length, sink);
  }

  /**
   * write() into allocated clusters one cached extent covers, done before
   * returning (BlockDriver.writeNow): the in-place write of writeChecked,
   * which needs neither the metadata lock nor, being over before anything
   * else runs, the request count resize() drains.
   */
  writeNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    if (length === 0) return true;
    const ext = this.tables.mapNow(guestOffset, length);
    if (ext === null || ext.kind !== 'data' || ext.bytes < length) return false;
    if (!this.file.writeNow('data_write', buf, bufOffset, length, ext.host)) return false;
    this.space.wrote(ext.host + length);
    return true;
  }

  /** write() after its range check. */
  private async writeChecked(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const extentGuestOffset = guestOffset + done;
      const at = bufOffset + done;
      const ext = await this.tables.map(extentGuestOffset, length - done);
      if (ext.kind === 'data') {
        await this.file.write('data_write', buf, at, ext.bytes, ext.host);
        this.space.wrote(ext.host + ext.bytes);
        done += ext.bytes;
      } else {
        done += await this.allocatingWrite(buf, at, length - done, extentGuestOffset);
      }
    }
  }

  /**
   * Write guest [guestOffset, guestOffset + remBytes) starting in an
   * unallocated or zero cluster. Returns the bytes written: 0 when the
   * cluster turned out allocated or in flight (the caller maps again).
   */
  private async allocatingWrite(buf: Buffer, bufOffset: number, remBytes: number, guestOffset: number): Promise<number> {
    const cs = this.geo.clusterSize;
    // A promise returned from inside run() would be awaited under the lock: wrap it.
    const plan = await this.metaLock.run(async (): Promise<AllocPlan | { wait: Promise<void> } | null> => {
      const clusterIndex = Math.floor(guestOffset / cs);
      const busy = this.inflight.waitFor(clusterIndex, clusterIndex);
      if (busy) return { wait: busy };
      const run = await this.tables.allocScan(guestOffset, remBytes, (c) => this.inflight.has(c));
      if (!run) return null;
      await this.markNeedCheckLocked();
      const hostOffset = this.space.alloc(run.clusters);
      this.inflight.register(run.firstCluster, run.clusters);
      this.activeAllocs++;
      return { run, hostOffset };
    });
    if (plan === null) return 0;
    if ('wait' in plan) {
      await plan.wait;
      return 0;
    }
    const { run, hostOffset } = plan;
    try {
      await this.writeNewClusters(buf, bufOffset, guestOffset, run, hostOffset);
      await this.metaLock.run(async () => {
        await this.tables.link(run.firstCluster, run.clusters, hostOffset);
        this.count.changed(run.firstCluster, run.clusters);
      });
    } finally {
      this.activeAllocs--;
      this.inflight.settle(run.firstCluster, run.clusters);
      this.armIdleTimer();
    }
    if (this.tables.l2.underPressure) await this.tables.l2.writeBack();
    return run.bytes;
  }

  /** One write of the new clusters: fill before the data, the data, fill after it. */
  private async writeNewClusters(buf: Buffer, bufOffset: number, guestOffset: number, run: FreeRun, hostOffset: number): Promise<void> {
    const cs = this.geo.clusterSize;
    const runGuestStart = run.firstCluster * cs;
    const runGuestEnd = runGuestStart + run.clusters * cs;
    const head = guestOffset - runGuestStart;
    const tail = runGuestEnd - (guestOffset + run.bytes);
    const zeroHead = run.firstKind === 'zero' || !this.backing;
    const zeroTail = run.lastKind === 'zero' || !this.backing;
    if ((head === 0 || zeroHead) && (tail === 0 || zeroTail)) {
      // Fill that reads as zeros is written as zeros without a buffer; past
      // the end of the file that is only a resize (ImageFile.writeZeroes).
      const ios: Promise<void>[] = [this.file.write('cow_write', buf, bufOffset, run.bytes, hostOffset + head)];
      if (head > 0) ios.push(this.file.writeZeroes('cow_write', hostOffset, head));
      if (tail > 0) ios.push(this.file.writeZeroes('cow_write', hostOffset + head + run.bytes, tail));
      await settleAll(ios);
    } else {
      const out = Buffer.alloc(run.clusters * cs);
      if (head > 0) await this.fill(run.firstKind, out, 0, head, runGuestStart);
      buf.copy(out, head, bufOffset, bufOffset + run.bytes);
      if (tail > 0) await this.fill(run.lastKind, out, head + run.bytes, tail, guestOffset + run.bytes);
      await this.file.write('cow_write', out, 0, out.length, hostOffset);
    }
    this.space.wrote(hostOffset + run.clusters * cs);
  }

  /** Fill a zeroed buffer range with what the guest sees there before the write. */
  private async fill(kind: 'unalloc' | 'zero', out: Buffer, outOffset: number, lengthBytes: number, guestOffset: number): Promise<void> {
    if (kind === 'zero' || !this.backing) return;
    const inDisk = Math.max(0, Math.min(lengthBytes, this.virtualSize - guestOffset));
    if (inDisk > 0) await readFromBacking(this.backing, out, outOffset, inDisk, guestOffset);
  }

  /** Set the need-check bit durably (caller holds metaLock). */
  private async markNeedCheckLocked(): Promise<void> {
    if (this.needCheckOnDisk) return;
    const features = this.header.features | QED_F_NEED_CHECK;
    await this.file.write('header_update', serializeHeader({ ...this.header, features }), 0, QED_HEADER_BYTES, 0);
    await this.file.flush();
    this.header.features = features;
    this.needCheckOnDisk = true;
    this.log.debug('need-check bit set');
  }

  /** Clear the need-check bit if nothing is in flight; flushes first (caller holds metaLock). */
  private async clearNeedCheckLocked(): Promise<boolean> {
    if (!this.needCheckOnDisk) return true;
    if (this.activeAllocs > 0) return false;
    await this.tables.flush();
    // No link can run while we hold the lock, so nothing became dirty meanwhile.
    if (this.activeAllocs > 0 || this.tables.l2.dirtyCount > 0 || this.tables.pendingL1 > 0) return false;
    await clearNeedCheck(this.file, this.header);
    this.needCheckOnDisk = false;
    this.log.debug('need-check bit cleared');
    return true;
  }

  private armIdleTimer(): void {
    if (this.closed) return;
    if (this.idleTimer) {
      this.idleTimer.refresh();
      return;
    }
    this.idleTimer = setTimeout(() => {
      this.idleTimer = null;
      this.metaLock
        .run(async () => {
          if (this.closed) return;
          if (!(await this.clearNeedCheckLocked())) this.armIdleTimer();
        })
        .catch((err: unknown) => this.log.warn({ err: (err as Error).message }, 'clearing the need-check bit failed'));
    }, qedTuning.needCheckIdleMs);
    this.idleTimer.unref();
  }

  async flush(): Promise<void> {
    if (this.closed) throw new QmountError('EBADF', `${this.file.path}: flush after close`);
    await this.count.ready().catch(() => {}); // so allocatedBytes() is exact after a flush
    if (this.readOnly) return;
    await this.tables.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.count.stop();
    if (this.idleTimer) {
      clearTimeout(this.idleTimer);
      this.idleTimer = null;
    }
    try {
      if (!this.readOnly) {
        await this.metaLock.run(async () => {
          if (!(await this.clearNeedCheckLocked())) {
            this.log.warn({ activeAllocs: this.activeAllocs }, 'closing with writes in flight: need-check bit left set');
          }
        });
      }
    } finally {
      try {
        if (this.backing) await this.backing.close();
      } finally {
        await this.file.close();
      }
    }
  }

  async blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    const out: BlockExtent[] = [];
    let done = 0;
    while (done < length) {
      const extentGuestOffset = guestOffset + done;
      const ext = await this.tables.map(extentGuestOffset, length - done);
      if (ext.kind === 'data') {
        pushExtent(out, { guestOffset: extentGuestOffset, length: ext.bytes, data: true, zero: false, present: true, depth: 0, hostOffset: ext.host });
      } else if (ext.kind === 'zero') {
        pushExtent(out, { guestOffset: extentGuestOffset, length: ext.bytes, data: false, zero: true, present: true, depth: 0 });
      } else {
        await backingStatus(this.backing, extentGuestOffset, ext.bytes, out);
      }
      done += ext.bytes;
    }
    return out;
  }

  async writeZeroes(guestOffset: number, length: number, opts: { unmap: boolean }): Promise<void> {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    if (length === 0) return;
    await this.requests.track(zeroRange(this.zero, guestOffset, length, opts.unmap, this.virtualSize));
  }

  async resize(newSize: number): Promise<void> {
    checkResize(this, newSize, this.closed, maxImageSize(this.geo.clusterSize, this.header.tableSize));
    const oldSize = this.virtualSize;
    if (newSize === oldSize) return;
    if (newSize < oldSize) await this.refuseDataPast(newSize, oldSize);
    this.virtualSize = newSize;
    try {
      await this.requests.drain();
      if (newSize < oldSize) {
        await this.refuseDataPast(newSize, oldSize); // a write checked before may have allocated there
      } else if (this.backing && this.backing.virtualSize > oldSize) {
        // The grown part must read zeros, not the backing file's data: zero entries, durable before the header.
        const end = Math.min(newSize, this.backing.virtualSize);
        await zeroRange(this.zero, oldSize, end - oldSize, false, end);
        await this.tables.flush();
      }
      await this.metaLock.run(async () => {
        await this.file.write('header_resize', serializeHeader({ ...this.header, imageSize: newSize }), 0, QED_HEADER_BYTES, 0);
        await this.file.flush();
        this.header.imageSize = newSize;
      });
    } catch (err) {
      this.virtualSize = oldSize;
      throw err;
    }
    this.log.debug({ oldSize, newSize }, 'resized');
  }

  /** EPERM if this image (not its backing file) stores data in [newSize, oldSize). */
  private async refuseDataPast(newSize: number, oldSize: number): Promise<void> {
    let at = newSize;
    while (at < oldSize) {
      const ext = await this.tables.map(at, oldSize - at);
      if (ext.kind === 'data') {
        throw new QmountError('EPERM', `${this.file.path}: cannot shrink to ${newSize} bytes: data is stored at guest offset ${at} (discard it first)`);
      }
      at += ext.bytes;
    }
  }

  /**
   * Data clusters of this image (counted after open, then kept current; an
   * estimate from the file size until the count is done) plus what the
   * backing chain stores, at most the disk size.
   */
  allocatedBytes(): number {
    const own = this.count.done
      ? this.count.clusters * this.geo.clusterSize
      : Math.max(0, this.space.fileEnd - this.geo.headerEnd - this.geo.tableBytes);
    return Math.min(this.virtualSize, own + (this.backing?.allocatedBytes() ?? 0));
  }

  info(): ImageInfo {
    return {
      format: 'qed',
      filename: this.file.path,
      virtualSize: this.virtualSize,
      actualSize: this.space.fileEnd,
      clusterSize: this.geo.clusterSize,
      backingFile: this.backingName,
      backingPath: this.backing?.filename,
      backingFormat: this.backingName === undefined ? undefined : this.noProbe ? 'raw' : this.backing?.format,
      features: featureNames(this.header.features),
      backing: this.backing?.info(),
    };
  }
}
