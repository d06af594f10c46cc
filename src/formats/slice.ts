/**
 * A BlockDriver showing bytes [start, start + length) of a parent driver: a
 * partition as its own disk (DIR/pN.raw). No format knowledge and no state
 * of its own beyond the bounds; the parent does all I/O.
 *
 * Contract (driver.ts) in slice terms: offsets are relative to `start`; the
 * range rules (EINVAL, ENOSPC for a write reaching past the end, EROFS) are
 * checked against the slice's own size before anything reaches the parent,
 * so no request can touch the parent outside the slice. The FUSE service
 * cuts a write crossing the end short (a block device's behaviour), so this
 * ENOSPC is seen only for writes at or past the end.
 * - resize: EPERM (the partition table sets the size).
 * - allocatedBytes: min(length, the parent's): an upper bound, cheap (exact
 *   numbers would need a blockStatus walk).
 * - close(): marks the slice closed (EBADF from then on); the parent is not
 *   closed (its owner does that).
 * - blockStatus: the parent's extents for the range, offsets made relative.
 */
import { QmountError } from '../errors.js';
import { checkRequest, type BlockDriver, type BlockExtent, type FdSink, type FormatName, type ImageInfo } from './driver.js';

export class SliceDriver implements BlockDriver {
  readonly format: FormatName;
  readonly filename: string;
  readonly readOnly: boolean;
  private closed = false;

  /** `start` and `length` in bytes; [start, start + length) must lie inside the parent. */
  constructor(
    readonly parent: BlockDriver,
    readonly start: number,
    readonly virtualSize: number,
    label: string,
  ) {
    if (!(Number.isSafeInteger(start) && Number.isSafeInteger(virtualSize) && start >= 0 && virtualSize >= 0 && start + virtualSize <= parent.virtualSize)) {
      throw new QmountError('EINVAL', `${parent.filename}: slice [${start}, +${virtualSize}) does not lie inside the ${parent.virtualSize}-byte disk`);
    }
    this.format = parent.format;
    this.filename = `${parent.filename} (${label})`;
    this.readOnly = parent.readOnly;
  }

  read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    try {
      checkRequest(this, 'read', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err as Error);
    }
    return length === 0 ? Promise.resolve() : this.parent.read(buf, bufOffset, length, this.start + guestOffset);
  }

  write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    try {
      checkRequest(this, 'write', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err as Error);
    }
    return length === 0 ? Promise.resolve() : this.parent.write(buf, bufOffset, length, this.start + guestOffset);
  }

  /** The parent's readNow / sendNow / writeNow, same checks as read / write (false: the parent has none, or declined). */
  readNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    return length === 0 || (this.parent.readNow?.(buf, bufOffset, length, this.start + guestOffset) ?? false);
  }

  sendNow(length: number, guestOffset: number, sink: FdSink): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    return length > 0 && (this.parent.sendNow?.(length, this.start + guestOffset, sink) ?? false);
  }

  writeNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    return length === 0 || (this.parent.writeNow?.(buf, bufOffset, length, this.start + guestOffset) ?? false);
  }

  flush(): Promise<void> {
    if (this.closed) return Promise.reject(new QmountError('EBADF', `${this.filename}: flush after close`));
    return this.parent.flush();
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  info(): ImageInfo {
    return { ...this.parent.info(), filename: this.filename, virtualSize: this.virtualSize, snapshots: undefined, backing: undefined };
  }

  async blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    if (length === 0) return [];
    const extents = await this.parent.blockStatus(this.start + guestOffset, length);
    return extents.map((e) => ({ ...e, guestOffset: e.guestOffset - this.start }));
  }

  async writeZeroes(guestOffset: number, length: number, opts: { unmap: boolean }): Promise<void> {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    if (length > 0) await this.parent.writeZeroes(this.start + guestOffset, length, opts);
  }

  resize(_newSize: number): Promise<void> {
    if (this.readOnly) return Promise.reject(new QmountError('EROFS', `${this.filename}: read-only`));
    return Promise.reject(new QmountError('EPERM', `${this.filename}: a partition's size is set by the partition table`));
  }

  allocatedBytes(): number {
    return Math.min(this.virtualSize, this.parent.allocatedBytes());
  }
}
