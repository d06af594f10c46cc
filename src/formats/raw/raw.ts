/**
 * Raw images: guest offset == file offset. Serves as backing file and as a
 * format of its own.
 *
 * Sparse files:
 *  - block status comes from the file's holes (lseek SEEK_DATA/SEEK_HOLE):
 *    data extents {data, present}, holes {zero, present}, both with the host
 *    offset, which is what qemu-img map prints for a raw file. Without
 *    native/fileops the whole file is data.
 *  - writeZeroes with unmap punches a hole (fallocate PUNCH_HOLE); without
 *    unmap, or where punching is unsupported, it zeroes the range
 *    (ZERO_RANGE, else a write of zeros). The file size never changes.
 *  - resize: growing is ftruncate (the new part is a hole). Shrinking is
 *    allowed only when the part cut off holds no data (all holes), EPERM
 *    otherwise; punch it first (fallocate -p / -d) to shrink.
 *  - allocatedBytes: st_blocks * 512 of the file, cached; every change of the
 *    file marks the cache stale, the next call (or flush) refreshes it with
 *    one fstat in the background; flush waits for it.
 *
 * Resize against requests in flight: `requests` counts write and writeZeroes
 * calls between their range check and their completion. resize() sets the
 * new virtualSize first (so requests checked after it see the new end), then
 * waits until nothing checked before it is still running, then changes the
 * file. A write checked against the old size can therefore never land past a
 * new, smaller end.
 */
import { QmountError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import { MAX_DISK_BYTES } from '../u64.js';
import { checkRequest, checkResize, pushExtent, RequestsInFlight, type BlockDriver, type BlockExtent, type FdSink, type DriverOpenOptions, type ImageInfo } from '../driver.js';

export async function openRaw(file: ImageFile, opts: DriverOpenOptions): Promise<BlockDriver> {
  const size = await file.size();
  const d = new RawDriver(file, size, opts.readOnly);
  await d.refreshAllocated();
  return d;
}

class RawDriver implements BlockDriver {
  readonly format = 'raw' as const;
  private closed = false;
  /** write/writeZeroes calls checked and not yet settled */
  private readonly requests = new RequestsInFlight();
  /** st_blocks * 512 as last seen; `stale` once the file may have changed since */
  private allocated = 0;
  private stale = false;
  private refreshing: Promise<void> | null = null;
  /** Holes are known (native/fileops works on this file); false after an ENOTSUP. */
  private seekable = true;

  constructor(
    private readonly file: ImageFile,
    public virtualSize: number,
    readonly readOnly: boolean,
  ) {}

  get filename(): string {
    return this.file.path;
  }

  async read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    if (length === 0) return;
    await this.file.readZeroFill(buf, bufOffset, length, guestOffset);
  }

  async write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    if (length === 0) return;
    await this.tracked(this.file.write('data_write', buf, bufOffset, length, guestOffset));
  }

  readNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    return length === 0 || this.file.readZeroFillNow(buf, bufOffset, length, guestOffset) >= 0;
  }

  sendNow(length: number, guestOffset: number, sink: FdSink): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    return length > 0 && this.file.sendNow(guestOffset, length, sink);
  }

  /** write() done before returning: over before anything else runs, so not counted in `requests`; the allocation may have changed. */
  writeNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    if (length === 0) return true;
    if (!this.file.writeNow('data_write', buf, bufOffset, length, guestOffset)) return false;
    this.stale = true;
    return true;
  }

  async writeZeroes(guestOffset: number, length: number, opts: { unmap: boolean }): Promise<void> {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    if (length === 0) return;
    await this.tracked(this.zeroRange(guestOffset, length, opts.unmap));
  }

  private async zeroRange(guestOffset: number, length: number, unmap: boolean): Promise<void> {
    if (unmap && (await this.file.punchHole('punch_hole', guestOffset, length))) return;
    if (await this.file.zeroRange('zero_write', guestOffset, length)) return;
    await this.file.writeZeroes('zero_write', guestOffset, length);
  }

  /** Count `p` in `pending` until it settles (the caller checked its range synchronously before). */
  private async tracked(p: Promise<void>): Promise<void> {
    this.stale = true;
    try {
      await this.requests.track(p);
    } finally {
      this.stale = true; // also when a refresh ran while it was in flight
    }
  }

  async blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    const out: BlockExtent[] = [];
    const end = guestOffset + length;
    const data = (from: number, to: number): void =>
      pushExtent(out, { guestOffset: from, length: to - from, data: true, zero: false, present: true, depth: 0, hostOffset: from });
    const hole = (from: number, to: number): void =>
      pushExtent(out, { guestOffset: from, length: to - from, data: false, zero: true, present: true, depth: 0, hostOffset: from });
    let at = guestOffset;
    while (at < end) {
      let nextData: number | null;
      try {
        nextData = this.seekable ? await this.file.seekData(at) : at;
      } catch (err) {
        if (!(err instanceof QmountError && (err.errno === 'ENOTSUP' || err.errno === 'EINVAL'))) throw err;
        this.seekable = false; // no addon, or a file that cannot seek holes: everything is data
        nextData = at;
      }
      // ENXIO: no data from here to the end of the file (bytes past it read as zeros too).
      const dataAt = nextData === null ? end : Math.min(nextData, end);
      if (dataAt > at) hole(at, dataAt);
      if (dataAt >= end) break;
      const holeAt = this.seekable ? await this.file.seekHole(dataAt) : null;
      const dataEnd = holeAt === null ? end : Math.min(holeAt, end);
      data(dataAt, dataEnd);
      at = dataEnd;
    }
    return out;
  }

  async resize(newSize: number): Promise<void> {
    checkResize(this, newSize, this.closed, MAX_DISK_BYTES - 512);
    const oldSize = this.virtualSize;
    if (newSize === oldSize) return;
    if (newSize < oldSize) await this.refuseDataPast(newSize);
    this.virtualSize = newSize;
    try {
      await this.requests.drain();
      if (newSize < oldSize) await this.refuseDataPast(newSize); // a write checked before may have landed there
      await this.file.truncate(newSize);
    } catch (err) {
      this.virtualSize = oldSize;
      throw err;
    }
    this.stale = true;
  }

  /** EPERM if the file holds data at or after `newSize` (shrinking would lose it). */
  private async refuseDataPast(newSize: number): Promise<void> {
    const tail = await this.blockStatus(newSize, this.virtualSize - newSize);
    const firstData = tail.find((e) => e.data);
    if (firstData) {
      throw new QmountError(
        'EPERM',
        `${this.file.path}: cannot shrink to ${newSize} bytes: data is stored at ${firstData.guestOffset} (discard it first, e.g. fallocate --punch-hole)`,
      );
    }
  }

  allocatedBytes(): number {
    if (this.stale && !this.refreshing && !this.closed) {
      this.refreshAllocated().catch(() => {
        // A failed fstat keeps the old value; the next call tries again.
      });
    }
    return this.allocated;
  }

  /** Read st_blocks now (one at a time; a call during a refresh waits for it and refreshes again if stale). */
  async refreshAllocated(): Promise<void> {
    while (this.refreshing) await this.refreshing.catch(() => {});
    this.stale = false;
    const p = this.file.allocatedBytes().then(
      (n) => {
        this.allocated = n;
      },
      (err: unknown) => {
        this.stale = true;
        throw err;
      },
    );
    this.refreshing = p.finally(() => {
      this.refreshing = null;
    });
    await this.refreshing;
  }

  async flush(): Promise<void> {
    if (this.closed) throw new QmountError('EBADF', `${this.file.path}: flush after close`);
    await this.file.flush();
    if (this.stale) await this.refreshAllocated();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) await this.file.flush();
    } finally {
      while (this.refreshing) await this.refreshing.catch(() => {});
      await this.file.close();
    }
  }

  info(): ImageInfo {
    return { format: 'raw', filename: this.file.path, virtualSize: this.virtualSize, features: [] };
  }
}
