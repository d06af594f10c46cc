/**
 * The one interface every image format implements. A driver is an object,
 * formats do not inherit from each other. Offsets and lengths are bytes;
 * `guestOffset` is an address in the virtual disk, `hostOffset` one in the
 * image file.
 */
import { QmountError, ReadOnlyError } from '../errors.js';
import type { Logger } from '../log.js';

export type FormatName = 'qcow2' | 'qed' | 'raw';

export interface SnapshotInfo {
  id: string;
  name: string;
  /** bytes */
  vmStateSize: number;
  /** seconds since the epoch, and the nanoseconds after them */
  dateSec: number;
  dateNsec: number;
  /** bytes; undefined for v2 snapshots that do not record it */
  guestSize?: number;
  /** guest run time: whole seconds, and the nanoseconds after them (0..999999999) */
  vmClockSec: number;
  vmClockNsec: number;
}

export interface ImageInfo {
  format: FormatName;
  filename: string;
  /** bytes */
  virtualSize: number;
  /** bytes of the image file itself */
  actualSize?: number;
  /** bytes */
  clusterSize?: number;
  version?: number;
  backingFile?: string;
  /** the backing file as resolved and opened (absolute path) */
  backingPath?: string;
  backingFormat?: string;
  /** human names of set feature bits, e.g. "lazy_refcounts", "dirty" */
  features: string[];
  snapshots?: SnapshotInfo[];
  refcountBits?: number;
  compressionType?: string;
  dataFile?: string;
  extendedL2?: boolean;
  /** the whole chain below this image */
  backing?: ImageInfo;
}

/**
 * The contract every driver keeps, one errno per case
 * (test/unit/driver-contract.test.ts runs it over every driver):
 *
 *  - `guestOffset` and `length` are non-negative safe integers, else EINVAL.
 *  - read: the whole range lies in [0, virtualSize], else EINVAL (callers
 *    clamp: the FUSE layer cuts a read at the end of the disk).
 *  - write: a read-only driver refuses every write with EROFS, checked
 *    first; a range reaching past virtualSize is ENOSPC, as on a block
 *    device, and nothing of it is written.
 *  - length 0 does nothing, anywhere in [0, virtualSize].
 *  - Buffer lifetime: the driver uses `buf` only until the promise it
 *    returned settles, also when it rejects (it waits for every I/O it
 *    started). The FUSE bindings hand over their own request memory and
 *    reuse it as soon as the request is answered.
 *  - close() is idempotent; once it was called, read, write and flush reject
 *    with EBADF (nothing reaches a file descriptor the process may reuse).
 *
 * checkRequest() is the one implementation of the range rules.
 */
export interface BlockDriver {
  readonly format: FormatName;
  readonly filename: string;
  /** guest-visible size in bytes */
  readonly virtualSize: number;
  readonly readOnly: boolean;

  /**
   * Read guest bytes [guestOffset, guestOffset + length) into
   * buf[bufOffset ..]. The range must lie within virtualSize. Throws a
   * QmountError (EIO for unreadable or corrupt clusters); the buffer content
   * is then unspecified for this request only.
   */
  read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void>;

  /** Write guest bytes. Throws ReadOnlyError on a read-only driver. */
  write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void>;

  /** Make every completed write durable, metadata in its safe order. */
  flush(): Promise<void>;

  /** Flush, mark the image cleanly closed, close files (backing chain too). */
  close(): Promise<void>;

  info(): ImageInfo;
}

/** Throws the contract's errno for a request a driver must refuse before doing anything (see BlockDriver). */
export function checkRequest(
  d: { readonly filename: string; readonly virtualSize: number; readonly readOnly: boolean },
  op: 'read' | 'write',
  guestOffset: number,
  length: number,
  closed: boolean,
): void {
  if (closed) throw new QmountError('EBADF', `${d.filename}: ${op} after close`);
  if (op === 'write' && d.readOnly) throw new ReadOnlyError();
  if (!(Number.isSafeInteger(guestOffset) && Number.isSafeInteger(length) && guestOffset >= 0 && length >= 0)) {
    throw new QmountError('EINVAL', `${d.filename}: ${op} of ${String(length)} bytes at guest offset ${String(guestOffset)} is not a valid request`);
  }
  if (guestOffset + length > d.virtualSize) {
    throw new QmountError(op === 'write' ? 'ENOSPC' : 'EINVAL', `${d.filename}: ${op} [${guestOffset}, +${length}) reaches past the end of the ${d.virtualSize}-byte disk`);
  }
}

/** How a driver opens the image it is backed by (keeps formats free of the registry). */
export type OpenBacking = (path: string, format: FormatName | undefined) => Promise<BlockDriver>;

export interface DriverOpenOptions {
  readOnly: boolean;
  /** Bytes for the L2 table cache (qcow2, QED). */
  l2CacheBytes: number;
  /** Bytes for the refcount block cache (qcow2). */
  refcountCacheBytes: number;
  /** Open backing files (undefined: do not follow backing files; unallocated reads as zeros). */
  openBacking?: OpenBacking;
  log: Logger;
}

/**
 * Read guest bytes of a backing image for an overlay whose guest range may
 * reach past the backing image's end: that part reads as zeros.
 */
export async function readFromBacking(
  backing: BlockDriver | null,
  buf: Buffer,
  bufOffset: number,
  length: number,
  guestOffset: number,
): Promise<void> {
  const avail = backing ? Math.max(0, Math.min(length, backing.virtualSize - guestOffset)) : 0;
  if (avail > 0) await backing!.read(buf, bufOffset, avail, guestOffset);
  if (avail < length) buf.fill(0, bufOffset + avail, bufOffset + length);
}
