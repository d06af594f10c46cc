/**
 * Salvage (`--salvage`, read-only): a damaged image still serves every
 * readable byte, and the bytes that cannot be read come back as zeros and
 * are listed in a damage report.
 *
 * Rule (the one place it is kept): a read that fails with EIO (a
 * CorruptionError from the engine - a table entry past the end of the file
 * or misaligned, a data cluster past the end, a compressed cluster that does
 * not decompress, a missing backing file - or an I/O error of the disk) is
 * retried one granule (cluster, or subcluster with extended L2) at a time;
 * each granule that still fails reads as zeros and is recorded with the
 * error's reason. Granules that read are returned exactly as without
 * salvage. Any other errno (EINVAL, EBADF, ...) is passed on. Without
 * salvage nothing here is used and damaged reads fail with EIO: zeros are
 * never returned silently.
 *
 * A missing backing file is represented by MissingBacking: a driver whose
 * every read fails with EIO, so that the ranges it would have supplied are
 * damage like any other (and never zeros without --salvage).
 */
import { CorruptionError, errnoOf, oneLine, QmountError } from '../errors.js';
import { checkRequest, type BlockDriver, type BlockExtent, type FormatName, type ImageInfo } from './driver.js';

export interface DamagedRange {
  /** guest bytes [start, start + length) */
  start: number;
  length: number;
  /** why they cannot be read (the engine's message) */
  reason: string;
}

/** Damaged guest ranges, merged when adjacent with the same reason. Kept sorted by start. */
export class DamageReport {
  private list: DamagedRange[] = [];
  /** Called once for each range that was not known before (the log line). */
  onNew: ((r: DamagedRange) => void) | null = null;

  /** Index of the first range starting after `start` (binary search: scans add thousands of ranges in order). */
  private indexAfter(start: number): number {
    let lo = 0;
    let hi = this.list.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.list[mid]!.start > start) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  /** Does the range starting last at or before `start` already cover [start, start + length)? */
  covers(start: number, length: number): boolean {
    const p = this.list[this.indexAfter(start) - 1];
    return p !== undefined && p.start + p.length >= start + length;
  }

  add(start: number, length: number, reason: string): void {
    if (length <= 0 || this.covers(start, length)) return;
    const r = { start, length, reason };
    let i = this.indexAfter(start);
    this.list.splice(i, 0, r);
    // Merge with neighbours of the same reason that touch.
    const prev = this.list[i - 1];
    if (prev && prev.reason === reason && prev.start + prev.length >= start) {
      prev.length = Math.max(prev.length, start + length - prev.start);
      this.list.splice(i, 1);
      i--;
    }
    const cur = this.list[i]!;
    const next = this.list[i + 1];
    if (next && next.reason === reason && cur.start + cur.length >= next.start) {
      cur.length = Math.max(cur.length, next.start + next.length - cur.start);
      this.list.splice(i + 1, 1);
    }
    this.onNew?.(r);
  }

  ranges(): DamagedRange[] {
    return this.list.map((r) => ({ ...r }));
  }

  /** Damaged bytes in total. */
  bytes(): number {
    return this.list.reduce((n, r) => n + r.length, 0);
  }

  /** The JSON a mount shows as DIR/damage.json and `qmount info --salvage --output json` prints. */
  toJSON(image: string): { image: string; 'damaged-bytes': number; ranges: DamagedRange[] } {
    return { image, 'damaged-bytes': this.bytes(), ranges: this.ranges() };
  }
}

/** Is this failure damage that salvage turns into zeros? */
export function isDamage(err: unknown): boolean {
  return errnoOf(err) === 'EIO';
}

/**
 * The salvage wrapper around an opened (read-only) driver. `granule`: the
 * smallest unit the driver maps (cluster or subcluster bytes).
 */
export class SalvageDriver implements BlockDriver {
  readonly readOnly = true;
  private closed = false;

  constructor(
    readonly inner: BlockDriver,
    readonly report: DamageReport,
    readonly granule: number,
  ) {
    if (!inner.readOnly) throw new QmountError('EINVAL', 'salvage needs a read-only open');
  }

  get format(): BlockDriver['format'] {
    return this.inner.format;
  }

  get filename(): string {
    return this.inner.filename;
  }

  get virtualSize(): number {
    return this.inner.virtualSize;
  }

  async read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    try {
      await this.inner.read(buf, bufOffset, length, guestOffset);
      return;
    } catch (err) {
      if (!isDamage(err)) throw err;
    }
    // One granule at a time: what reads is served, what does not is zeros and recorded.
    const g = this.granule;
    let pos = guestOffset;
    const end = guestOffset + length;
    while (pos < end) {
      const next = Math.min(end, (Math.floor(pos / g) + 1) * g);
      const at = bufOffset + (pos - guestOffset);
      try {
        await this.inner.read(buf, at, next - pos, pos);
      } catch (err) {
        if (!isDamage(err)) throw err;
        buf.fill(0, at, at + (next - pos));
        const start = Math.floor(pos / g) * g;
        this.report.add(start, Math.min(this.virtualSize, start + g) - start, oneLine(err));
      }
      pos = next;
    }
  }

  write(): Promise<void> {
    return Promise.reject(new QmountError('EROFS', 'a salvage mount is read-only'));
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.inner.close();
  }

  info(): ImageInfo {
    return this.inner.info();
  }

  blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    return this.inner.blockStatus(guestOffset, length);
  }

  writeZeroes(): Promise<void> {
    return Promise.reject(new QmountError('EROFS', 'a salvage mount is read-only'));
  }

  resize(): Promise<void> {
    return Promise.reject(new QmountError('EROFS', 'a salvage mount is read-only'));
  }

  allocatedBytes(): number {
    return this.inner.allocatedBytes();
  }
}

/**
 * Find the damage of a driver that has no metadata scan of its own by
 * reading the whole disk through the salvage wrapper (`chunk` bytes a read).
 * Reads every byte: for formats other than qcow2 (qcow2/salvage.ts scans
 * tables instead).
 */
export async function scanByReading(d: SalvageDriver, chunk = 4 * 1024 * 1024): Promise<void> {
  const buf = Buffer.allocUnsafe(chunk);
  for (let pos = 0; pos < d.virtualSize; pos += chunk) {
    await d.read(buf, 0, Math.min(chunk, d.virtualSize - pos), pos);
  }
}

/**
 * A backing file that does not exist. Every read fails with EIO naming it,
 * so the overlay's ranges that would come from it are damage: EIO without
 * --salvage, zeros in the report with it. It claims to be endless so that no
 * overlay read is cut short to zeros at "its" end (its size is unknown).
 */
export class MissingBacking implements BlockDriver {
  readonly format: FormatName;
  readonly readOnly = true;
  readonly virtualSize = Number.MAX_SAFE_INTEGER;

  /** `format`: the backing format the overlay names (raw when it names none: unknown). */
  constructor(
    readonly filename: string,
    readonly name: string,
    format: FormatName | undefined,
  ) {
    this.format = format ?? 'raw';
  }

  read(): Promise<void> {
    return Promise.reject(new CorruptionError(`backing file ${this.name} is missing`));
  }

  write(): Promise<void> {
    return Promise.reject(new QmountError('EROFS', `backing file ${this.name} is missing`));
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}

  info(): ImageInfo {
    return { format: this.format, filename: this.filename, virtualSize: 0, features: ['missing'] };
  }

  /** Unknown bytes count as data (SEEK_DATA finds them, cp reads them and meets the EIO), never as a hole. */
  blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    return Promise.resolve(length > 0 ? [{ guestOffset, length, data: true, zero: false, present: true, depth: 0 }] : []);
  }

  writeZeroes(): Promise<void> {
    return this.write();
  }

  resize(): Promise<void> {
    return this.write();
  }

  allocatedBytes(): number {
    return 0;
  }
}
