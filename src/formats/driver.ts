/**
 * The one interface every image format implements. A driver is an object,
 * formats do not inherit from each other. Offsets and lengths are bytes;
 * `guestOffset` is an address in the virtual disk, `hostOffset` one in the
 * image file.
 */
import type { WorkHooks } from '../progress.js';
import { QmountError, ReadOnlyError } from '../errors.js';
import type { Logger } from '../log.js';
import type { FdSink } from '../io/file.js';

export type FormatName = 'qcow2' | 'qed' | 'raw';

/** Default L2 cache: 32 MiB maps 256 GiB of guest space with 64 KiB clusters (8-byte entries). */
export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;
/** Default refcount block cache (qcow2). */
export const DEFAULT_REFCOUNT_CACHE_BYTES = 4 * 1024 * 1024;

/**
 * `qmount check` (src/formats/check.ts dispatches to each format's check).
 * Counts follow qemu-img check: `corruptions` and `leaks` are what remains
 * after any repair; `fixedCorruptions`/`fixedLeaks` say what the repair fixed.
 */
export type RepairMode = 'none' | 'leaks' | 'all';

/** qemu-img check's BlockFragInfo, (qcow2: for the active L1 table only, as QEMU counts). */
export interface FragInfo {
  /** virtual size in clusters */
  totalClusters: number;
  /** normal, preallocated-zero and compressed entries */
  allocatedClusters: number;
  /** entries whose host cluster does not follow the previous one's in the same L2 table; every compressed one */
  fragmentedClusters: number;
  compressedClusters: number;
}

export interface CheckReport {
  format: FormatName;
  corruptions: number;
  leaks: number;
  fixedCorruptions: number;
  fixedLeaks: number;
  messages: string[];
  imageEndOffset?: number;
  /** qemu-img's cluster counts (qcow2 only) */
  frag?: FragInfo;
}


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
  /** guest instructions executed (record/replay); undefined when the entry does not record it (QEMU: -1) */
  icount?: number;
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
 * (test/e2e/driver-contract.test.ts runs it over every driver):
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
export type { FdSink };

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

  /**
   * Optional fast paths: read() / write() of the same request, done before
   * returning when nothing in it has to wait (its mapping is cached, its
   * I/O runs inline on the event loop). true: the request is complete, with
   * the effect read()/write() resolving would have had (and the buffer is
   * free again); false: nothing was done, the caller uses read()/write().
   * Throws what read()/write() would reject with. A request answered this
   * way costs no promise: most reads and rewrites of allocated clusters in
   * the steady state of a mount.
   */
  readNow?(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean;
  writeNow?(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean;

  /**
   * Optional: when guest bytes [guestOffset, +length) are one contiguous
   * range of one host file, mapped by cached metadata and all present in the
   * file, let `sink` read them from there, now (sink.send before returning),
   * and return true: the read is answered without passing through a buffer
   * of ours. false: nothing was done (use read()). Throws like read(). The
   * mapping is only valid until the caller yields, which is why the sink
   * reads at once.
   */
  sendNow?(length: number, guestOffset: number, sink: FdSink): boolean;

  /** Make every completed write durable, metadata in its safe order. */
  flush(): Promise<void>;

  /** Flush, mark the image cleanly closed, close files (backing chain too). */
  close(): Promise<void>;

  info(): ImageInfo;

  // ---- sparse images (issue 13). Each is covered by the contract suite. ----

  /**
   * Allocation status of guest bytes [guestOffset, guestOffset + length),
   * which must lie within virtualSize (EINVAL otherwise, as for read).
   * Returns extents in guest order covering exactly that range; adjacent
   * extents of equal status are merged. The chain is followed: a range this
   * image leaves to its backing file gets the backing file's status with
   * depth + 1. Granularity is the cluster (subcluster with extended L2).
   */
  blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]>;

  /**
   * Make guest bytes [guestOffset, +length) read as zeros (never old data,
   * never backing data). `unmap`: host clusters that then hold nothing may
   * be freed and punched out of the image file (discard, fstrim, punch-hole
   * and zero-range on disk.raw all end up here; FUSE's PUNCH_HOLE is
   * unmap: true). Partial clusters are zeroed in place. Same range and
   * read-only rules as write (EROFS, ENOSPC past the end, EINVAL).
   */
  writeZeroes(guestOffset: number, length: number, opts: { unmap: boolean }): Promise<void>;

  /**
   * Change virtualSize. Growing: the new part reads as zeros. Shrinking is
   * refused (EPERM) unless nothing is allocated at or past the new end: no
   * blockStatus extent there has data (zero clusters and discarded ranges
   * do not count; after writeZeroes({unmap: true}) of the tail the shrink is
   * allowed).
   * EROFS on a read-only driver; EINVAL for a size that is not a
   * non-negative multiple of 512 or is beyond what the format can map.
   */
  resize(newSize: number): Promise<void>;

  /**
   * Bytes of guest data stored in the chain (what st_blocks reports): the
   * guest bytes whose status is data in this image or one below. May be an
   * estimate rounded to clusters; kept current by the driver, cheap to call.
   */
  allocatedBytes(): number;
}

/**
 * One extent of blockStatus(): the fields of `qemu-img map --output=json`.
 * - data: the bytes are stored (in the layer at `depth`); false for zero and
 *   unallocated extents.
 * - zero: reads return zeros (zero clusters, unallocated with no backing
 *   data below, or past the backing file's end).
 * - present: some layer of the chain defines these bytes (false: nobody
 *   does, they read as zeros).
 * - depth: 0 for this image, 1 for its backing file, ...
 * - hostOffset: where the data sits in the file of that layer (data only,
 *   and not for compressed extents; raw also gives it for holes, as
 *   qemu-img map prints the offset of every raw extent).
 * qemu-img 7.2 prints for a raw hole {data:false, zero:true, present:true},
 * for an unallocated range with no backing data below, and for the part of
 * an overlay past its backing file's end, {data:false, zero:true,
 * present:false} at depth 0.
 */
export interface BlockExtent {
  guestOffset: number;
  length: number;
  data: boolean;
  zero: boolean;
  present: boolean;
  depth: number;
  hostOffset?: number;
  compressed?: boolean;
}

/**
 * Append `e` to `out`, merged into the last extent when it continues it with
 * the same status (and, for extents with a host offset, the host bytes
 * continue too): how blockStatus results are kept merged.
 */
export function pushExtent(out: BlockExtent[], e: BlockExtent): void {
  if (e.length === 0) return;
  const last = out[out.length - 1];
  if (
    last !== undefined &&
    last.guestOffset + last.length === e.guestOffset &&
    last.data === e.data &&
    last.zero === e.zero &&
    last.present === e.present &&
    last.depth === e.depth &&
    last.compressed === e.compressed &&
    (last.hostOffset === undefined ? e.hostOffset === undefined : e.hostOffset === last.hostOffset + last.length)
  ) {
    last.length += e.length;
    return;
  }
  out.push({ ...e });
}

/**
 * Status of guest bytes an overlay leaves to its backing file: the backing
 * file's extents one layer deeper; past its end (or with no backing file)
 * {zero, not present} at depth 0, as qemu-img map prints it.
 */
export async function backingStatus(backing: BlockDriver | null, guestOffset: number, length: number, out: BlockExtent[]): Promise<void> {
  const avail = backing ? Math.max(0, Math.min(length, backing.virtualSize - guestOffset)) : 0;
  if (avail > 0) {
    for (const e of await backing!.blockStatus(guestOffset, avail)) pushExtent(out, { ...e, depth: e.depth + 1 });
  }
  if (avail < length) {
    pushExtent(out, { guestOffset: guestOffset + avail, length: length - avail, data: false, zero: true, present: false, depth: 0 });
  }
}

/**
 * Throws the contract's errno for a resize a driver must refuse before doing
 * anything (see BlockDriver.resize): EBADF after close, EROFS, EINVAL for a
 * size that is not a non-negative multiple of 512 or above `maxSize`.
 */
export function checkResize(
  d: { readonly filename: string; readonly readOnly: boolean },
  newSize: number,
  closed: boolean,
  maxSize: number,
): void {
  if (closed) throw new QmountError('EBADF', `${d.filename}: resize after close`);
  if (d.readOnly) throw new ReadOnlyError();
  if (!(Number.isSafeInteger(newSize) && newSize >= 0 && newSize % 512 === 0)) {
    throw new QmountError('EINVAL', `${d.filename}: cannot resize to ${String(newSize)} bytes: the size must be a multiple of 512`);
  }
  if (newSize > maxSize) {
    throw new QmountError('EINVAL', `${d.filename}: cannot resize to ${newSize} bytes: this image can map at most ${maxSize}`);
  }
}

/**
 * Requests between their range check and their completion, for resize():
 * a driver sets its new virtualSize (so requests checked from then on see
 * it), then drain()s, and only then changes the image; so no request checked
 * against the old size is still running when the image shrinks.
 */
export class RequestsInFlight {
  private count = 0;
  private waiters: Array<() => void> = [];

  /** Count `p` until it settles. */
  async track<T>(p: Promise<T>): Promise<T> {
    this.count++;
    try {
      return await p;
    } finally {
      if (--this.count === 0) for (const wake of this.waiters.splice(0)) wake();
    }
  }

  /** Resolves once no tracked request is running. */
  async drain(): Promise<void> {
    while (this.count > 0) await new Promise<void>((r) => this.waiters.push(r));
  }
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
  /** Progress and interruption of long work during the open (qcow2: the refcount rebuild of a dirty image). */
  hooks?: WorkHooks;
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
