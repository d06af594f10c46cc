/**
 * Positional file I/O. Knows byte offsets and lengths, nothing of formats.
 *
 * - Every write and flush names an IoPoint (see points.ts) so tests can
 *   inject faults there and the crash harness can record it.
 * - A file opened read-only refuses writes with EROFS before touching the
 *   kernel: an image opened with -r is never written, whatever a bug above does.
 * - Reads past end of file return short counts; callers decide whether that is
 *   zeros (data) or corruption (metadata).
 * - Every position and length is checked before any syscall (checkRange):
 *   a non-negative safe integer, and their sum too. Node's fs would take an
 *   unsafe or missing position as "the current file position" (offset 0
 *   here, the header), and throws RangeErrors for negative ones.
 * - Errors (faults, EROFS, bad ranges, the kernel's) always come as rejected
 *   promises, never as exceptions thrown by the call itself.
 */
import fs from 'node:fs';
import { errnoOf, QmountError, ReadOnlyError } from '../errors.js';
import { fallocate, fallocateSync, fileOpsAvailable, seek } from './fileops.js';
import { instrumentation } from './instrument.js';
import type { IoPoint } from './points.js';
import { InlinePolicy, ioCounters, ioTuning } from './policy.js';

export { InlinePolicy, ioCounters, ioTuning } from './policy.js';

/**
 * A failed system call (or an injected fault) as a typed error: the errno
 * name for the layers above, Node's `code` and message kept.
 */
export class IoError extends QmountError {
  code = '';
}

function sysError(err: unknown): unknown {
  if (err instanceof QmountError) return err;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code !== 'string') return err;
  const e = new IoError(errnoOf(err), (err as Error).message, { cause: err });
  e.code = code;
  return e;
}

function preadOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(sysError(err)) : resolve(n)));
  });
}

function pwriteOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(sysError(err)) : resolve(n)));
  });
}

/**
 * Wait for every I/O of a batch, then reject with the first error, if any.
 * Promise.all would reject at the first error while the others still run -
 * and they may still be reading the caller's buffer (BlockDriver's
 * buffer-lifetime rule, src/formats/driver.ts).
 */
export async function settleAll(ios: Promise<unknown>[]): Promise<void> {
  if (ios.length === 1) {
    await ios[0];
    return;
  }
  for (const r of await Promise.allSettled(ios)) if (r.status === 'rejected') throw r.reason;
}

/** A position or length that no file I/O may use (see checkRange). */
export class IoRangeError extends QmountError {}

/**
 * Throws IoRangeError unless `position` and `length` are non-negative safe
 * integers whose sum is one too: EINVAL for negative, fractional or
 * non-number values, EFBIG for values past Number.MAX_SAFE_INTEGER.
 */
/** Who reads a range of a file by its descriptor (ImageFile.sendNow): the fuse3 binding's splice of a read reply. */
export interface FdSink {
  /**
   * Read [position, +length) of `fd` and send it on, before returning: true.
   * false: nothing was sent (the sink cannot take it, or reading the file
   * failed: the caller's ordinary read meets that error again and reports it).
   */
  send(fd: number, position: number, length: number): boolean;
}

export function checkRange(path: string, op: string, position: number, length: number, closed = false): void {
  // After close the descriptor number may already belong to another file.
  if (closed) throw new QmountError('EBADF', `${path}: refusing to ${op} after close`);
  if (Number.isSafeInteger(position) && Number.isSafeInteger(length) && position >= 0 && length >= 0 && Number.isSafeInteger(position + length)) {
    return;
  }
  // Whole, non-negative numbers that are only too big (Number.isInteger is false for non-numbers and Infinity).
  const tooLarge = Number.isInteger(position) && Number.isInteger(length) && position >= 0 && length >= 0;
  throw new IoRangeError(tooLarge ? 'EFBIG' : 'EINVAL', `${path}: refusing to ${op} ${String(length)} bytes at position ${String(position)}`);
}

export interface OpenOptions {
  readOnly: boolean;
}

/** Source of zeros for writeZeroes (never written to). */
const ZEROES = Buffer.alloc(1024 * 1024);

export class ImageFile {
  private closed = false;
  /** Replaceable by tests (fake clock). */
  policy = new InlinePolicy();
  /**
   * No byte at or after this offset was ever written through this object
   * since open, nor existed at open: they read as zeros. Raised before a
   * write or resize is issued (not when it completes), so it is never below
   * the end of anything that may have reached the file; too high only costs
   * writeZeroes a real write.
   */
  private zeroFrom: number;
  /**
   * Skipping syncs that have nothing to do: `changesDone` counts the calls
   * that change the file (writes, zeroing, fallocate, truncate) once they
   * settled, `changesInFlight` those issued and not settled, `syncedThrough`
   * the value of changesDone when the last successful fdatasync began. A
   * flush with no change in flight and none settled since that sync began
   * makes nothing more durable, so it issues no system call (the commit
   * sequence of qcow2 flushes its caches one after another, most of them
   * with nothing new to sync). A failed sync leaves syncedThrough alone.
   */
  private changesDone = 0;
  private changesInFlight = 0;
  private syncedThrough = 0;
  /**
   * Bytes [0, sizeFloor) surely exist in the file: its size at open, raised
   * when a write or a growth reaching further has completed, lowered before
   * a truncate that may shrink it. A read below it never comes back short
   * (what sendNow needs; zeroFrom is the opposite bound).
   */
  private sizeFloor: number;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly readOnly: boolean,
    sizeAtOpen: number,
  ) {
    this.zeroFrom = sizeAtOpen;
    this.sizeFloor = sizeAtOpen;
  }

  static async open(path: string, opts: OpenOptions): Promise<ImageFile> {
    const fd = await new Promise<number>((resolve, reject) => {
      fs.open(path, opts.readOnly ? 'r' : 'r+', (err, f) => (err ? reject(err) : resolve(f)));
    });
    let size: number;
    try {
      const st = await new Promise<fs.Stats>((resolve, reject) => fs.fstat(fd, (err, s) => (err ? reject(err) : resolve(s))));
      // A block device has no holes (and fstat says size 0): nothing is known to be zero there.
      size = st.isFile() ? st.size : Infinity;
    } catch (err) {
      fs.close(fd, () => {});
      throw err;
    }
    return new ImageFile(path, fd, opts.readOnly, size);
  }

  /**
   * True when nothing was ever written at or after `position` through this
   * object, and the file did not reach there at open: those bytes read as
   * zeros without being written (a hole, or past the end of the file).
   */
  neverWritten(position: number): boolean {
    return position >= this.zeroFrom;
  }

  /** The OS file descriptor (for locking). */
  get descriptor(): number {
    return this.fd;
  }

  /** How this file's calls ran (inline or on the thread pool); see InlinePolicy. */
  get ioStats(): Readonly<InlinePolicy['stats']> {
    return this.policy.stats;
  }

  /**
   * Read up to `length` bytes at `position` into buf[bufOffset..]. Loops over
   * short reads; returns fewer than `length` only at end of file.
   */
  read(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    try {
      checkRange(this.path, 'read', position, length, this.closed);
    } catch (err) {
      return Promise.reject(sysError(err));
    }
    if (!this.policy.allowed()) return this.readPooled(buf, bufOffset, length, position);
    try {
      return Promise.resolve(this.readInline(buf, bufOffset, length, position));
    } catch (err) {
      return Promise.reject(sysError(err));
    }
  }

  /**
   * The synchronous form of readZeroFill, for callers that answer a request
   * before returning (BlockDriver.readNow): when InlinePolicy lets this call
   * run inline, reads, zero-fills past end of file and returns the bytes
   * really read; else does nothing and returns -1 (the caller uses the
   * promise form). Throws what readZeroFill rejects with.
   */
  readZeroFillNow(buf: Buffer, bufOffset: number, length: number, position: number): number {
    try {
      checkRange(this.path, 'read', position, length, this.closed);
      if (!this.policy.allowed()) return -1;
      const n = this.readInline(buf, bufOffset, length, position);
      if (n < length) buf.fill(0, bufOffset + n, bufOffset + length);
      return n;
    } catch (err) {
      throw sysError(err);
    }
  }

  /**
   * Let `sink` read [position, +length) of this file itself, now (FUSE's
   * splice of a read reply: the bytes go from the page cache to /dev/fuse
   * without passing through a buffer of ours): when InlinePolicy lets a read
   * run inline and the range lies below sizeFloor, so the sink's read is
   * never short. Timed like an inline read. false: nothing sent (declined
   * here, or by the sink).
   */
  sendNow(position: number, length: number, sink: FdSink): boolean {
    if (this.closed || !this.policy.allowed() || position + length > this.sizeFloor) return false;
    const start = this.policy.now();
    const sent = sink.send(this.fd, position, length);
    this.policy.done(start, length);
    return sent;
  }

  /** pread on the event loop, looping over short reads; timed for InlinePolicy. Throws. */
  private readInline(buf: Buffer, bufOffset: number, length: number, position: number): number {
    const start = this.policy.now();
    let done = 0;
    while (done < length) {
      const n = fs.readSync(this.fd, buf, bufOffset + done, length - done, position + done);
      if (n === 0) break;
      done += n;
    }
    this.policy.done(start, done);
    return done;
  }

  private async readPooled(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    this.policy.stats.pooled++;
    ioCounters.pooled++;
    let done = 0;
    while (done < length) {
      const n = await preadOnce(this.fd, buf, bufOffset + done, length - done, position + done);
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  /** Read exactly; bytes past end of file are zero-filled. Returns bytes really read. */
  readZeroFill(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    return this.read(buf, bufOffset, length, position).then((n) => {
      if (n < length) buf.fill(0, bufOffset + n, bufOffset + length);
      return n;
    });
  }

  write(point: IoPoint, buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    try {
      this.checkWrite(point, buf, bufOffset, length, position);
      return this.writeRaw(buf, bufOffset, length, position);
    } catch (err) {
      return Promise.reject(sysError(err));
    }
  }

  /**
   * The synchronous form of write, for callers that answer a request before
   * returning (BlockDriver.writeNow): when the write would run inline
   * (below ioTuning.poolWritesFrom, InlinePolicy allowing), writes and
   * returns true; else does nothing and returns false (the caller uses
   * write). Throws what write rejects with, the same checks first.
   */
  writeNow(point: IoPoint, buf: Buffer, bufOffset: number, length: number, position: number): boolean {
    if (!this.writesInline(length)) return false;
    try {
      this.checkWrite(point, buf, bufOffset, length, position);
      this.writeInline(buf, bufOffset, length, position);
      return true;
    } catch (err) {
      throw sysError(err);
    }
  }

  /** What every write is checked against first (throws): read-only, the range, fault injection. */
  private checkWrite(point: IoPoint, buf: Buffer, bufOffset: number, length: number, position: number): void {
    if (this.readOnly) throw new ReadOnlyError(`refusing to write ${this.path}: opened read-only`);
    checkRange(this.path, 'write', position, length, this.closed);
    if (instrumentation.active) {
      instrumentation.check('write', point, this.path, position, length, buf.subarray(bufOffset, bufOffset + length));
    }
  }

  private async writePooled(buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    this.policy.stats.pooled++;
    ioCounters.pooled++;
    let done = 0;
    while (done < length) {
      done += await pwriteOnce(this.fd, buf, bufOffset + done, length - done, position + done);
    }
    this.grown(position + length);
  }

  /** The file now surely reaches `end` (a write or growth to there completed). */
  private grown(end: number): void {
    if (end > this.sizeFloor) this.sizeFloor = end;
  }

  /**
   * Make [position, position + length) read as zeros, as a write of zeros
   * would (also for fault injection and the crash recorder). Bytes from
   * zeroFrom on are zeros already: a range reaching past it costs one byte
   * written at its end (the file grows, the rest is a hole) instead of the
   * whole range; only the part below zeroFrom is really written.
   */
  writeZeroes(point: IoPoint, position: number, length: number): Promise<void> {
    try {
      if (this.readOnly) throw new ReadOnlyError(`refusing to write ${this.path}: opened read-only`);
      checkRange(this.path, 'write zeroes of', position, length, this.closed);
      if (length === 0) return Promise.resolve();
      if (instrumentation.active) instrumentation.check('write', point, this.path, position, length, Buffer.alloc(length));
      const end = position + length;
      const real = Math.min(end, this.zeroFrom) - position;
      const ios: Promise<void>[] = [];
      for (let done = 0; done < real; done += ZEROES.length) {
        const n = Math.min(ZEROES.length, real - done);
        ios.push(this.writeRaw(ZEROES, 0, n, position + done));
      }
      if (end > this.zeroFrom) ios.push(this.extend(end));
      return settleAll(ios);
    } catch (err) {
      return Promise.reject(sysError(err));
    }
  }

  /**
   * Grow the file to `end` (> zeroFrom), the new part a hole. Inline, an
   * ftruncate: it cannot shrink the file, because every write issued so far
   * ends at or below zeroFrom, and no later write can be issued before it
   * returns. On the thread pool it could run after a later write that grew
   * the file further, so there it is a one-byte write at end - 1 instead.
   */
  private extend(end: number): Promise<void> {
    if (!this.policy.allowed()) return this.writeRaw(ZEROES, 0, 1, end - 1);
    try {
      const start = this.policy.now();
      fs.ftruncateSync(this.fd, end);
      this.policy.done(start, 0);
      this.zeroFrom = end;
      this.grown(end);
      return Promise.resolve();
    } catch (err) {
      return Promise.reject(sysError(err));
    } finally {
      this.changesDone++;
    }
  }

  /** A change of the file issued asynchronously: counted in flight until it settles (see changesDone). */
  private changing<T>(p: Promise<T>): Promise<T> {
    this.changesInFlight++;
    const settled = (): void => {
      this.changesInFlight--;
      this.changesDone++;
    };
    return p.then(
      (v) => {
        settled();
        return v;
      },
      (err: unknown) => {
        settled();
        throw err;
      },
    );
  }

  /** write() without the read-only and instrumentation checks (the caller made them). */
  private writeRaw(buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    if (!this.writesInline(length)) {
      if (position + length > this.zeroFrom) this.zeroFrom = position + length;
      return this.changing(this.writePooled(buf, bufOffset, length, position));
    }
    try {
      this.writeInline(buf, bufOffset, length, position);
      return Promise.resolve();
    } catch (err) {
      return Promise.reject(sysError(err));
    }
  }

  /** Does a write of `length` bytes run inline now (below ioTuning.poolWritesFrom, InlinePolicy allowing)? */
  private writesInline(length: number): boolean {
    return length < ioTuning.poolWritesFrom && this.policy.allowed();
  }

  /** pwrite on the event loop, looping over short writes; timed for InlinePolicy, counted as a change. Throws. */
  private writeInline(buf: Buffer, bufOffset: number, length: number, position: number): void {
    if (position + length > this.zeroFrom) this.zeroFrom = position + length;
    try {
      const start = this.policy.now();
      let done = 0;
      while (done < length) done += fs.writeSync(this.fd, buf, bufOffset + done, length - done, position + done);
      this.policy.done(start, length);
      this.grown(position + length);
    } finally {
      this.changesDone++;
    }
  }

  /**
   * Deallocate host bytes [position, +length) of the file (fallocate
   * PUNCH_HOLE|KEEP_SIZE): they read as zeros afterwards, the file size stays
   * (a range past the end of the file punches nothing there). Resolves false,
   * having done nothing, when the platform or file system cannot punch holes
   * (native/fileops not built, EOPNOTSUPP: remembered for this file); callers
   * then keep the bytes or write zeros, as their rules need. Instrumented as
   * an event of kind 'punch' (fault injection, crash recording) when it is
   * attempted. Inline or on the thread pool as InlinePolicy says, like a
   * write: a punch of a few clusters takes ~12 µs inline on ext4, ~95 µs
   * through the thread pool (measured, 64 KiB punches); a slow one (a large
   * range, a journal wait) counts against the inline budget like a slow write.
   */
  punchHole(point: IoPoint, position: number, length: number): Promise<boolean> {
    return this.fallocateZeros('punch', point, position, length);
  }

  /**
   * Make [position, +length) read as zeros with fallocate ZERO_RANGE|KEEP_SIZE
   * (the space stays allocated; the range must lie inside the file for the
   * size to stay what a write of zeros would leave). Resolves false, having
   * done nothing, where ZERO_RANGE is unsupported (then use writeZeroes).
   * Instrumented as a 'write' of zeros, which is what it is to a reader.
   */
  zeroRange(point: IoPoint, position: number, length: number): Promise<boolean> {
    return this.fallocateZeros('zero', point, position, length);
  }

  /** EOPNOTSUPP answers per mode: asked once per file, not at every call. */
  private unsupported = { punch: false, zero: false };

  private async fallocateZeros(mode: 'punch' | 'zero', point: IoPoint, position: number, length: number): Promise<boolean> {
    try {
      if (this.readOnly) throw new ReadOnlyError(`refusing to ${mode === 'punch' ? 'punch' : 'zero'} ${this.path}: opened read-only`);
      checkRange(this.path, mode === 'punch' ? 'punch hole in' : 'zero range of', position, length, this.closed);
      if (length === 0) return true;
      if (this.unsupported[mode] || !fileOpsAvailable()) return false;
      if (instrumentation.active) {
        if (mode === 'punch') instrumentation.check('punch', point, this.path, position, length);
        else instrumentation.check('write', point, this.path, position, length, Buffer.alloc(length));
      }
      if (!this.policy.allowed()) {
        this.policy.stats.pooled++;
        ioCounters.pooled++;
        await this.changing(fallocate(this.fd, mode, position, length));
        return true;
      }
      const start = this.policy.now();
      try {
        fallocateSync(this.fd, mode, position, length);
      } finally {
        this.changesDone++;
      }
      this.policy.done(start, 0);
      return true;
    } catch (err) {
      const code = (err as { code?: unknown } | null)?.code;
      if (code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS') {
        this.unsupported[mode] = true;
        return false;
      }
      throw sysError(err);
    }
  }

  /**
   * SEEK_DATA / SEEK_HOLE (lseek(2)): the first offset at or after
   * `position` that holds data (seekData) or is in a hole (seekHole; the end
   * of the file counts as a hole). Null for ENXIO: no data at or after
   * `position` / `position` at or past the end of the file. A file system
   * without hole tracking reports everything as data (the kernel's generic
   * implementation). Rejects with ENOTSUP when native/fileops is not built.
   */
  seekData(position: number): Promise<number | null> {
    return this.seek(position, 'data');
  }

  seekHole(position: number): Promise<number | null> {
    return this.seek(position, 'hole');
  }

  private seek(position: number, what: 'data' | 'hole'): Promise<number | null> {
    try {
      checkRange(this.path, `seek ${what} from`, position, 0, this.closed);
      return Promise.resolve(seek(this.fd, position, what));
    } catch (err) {
      return Promise.reject(sysError(err));
    }
  }

  /** Bytes the file occupies on disk (st_blocks * 512). */
  async allocatedBytes(): Promise<number> {
    if (this.closed) throw new QmountError('EBADF', `${this.path}: refusing to stat after close`);
    const st = await new Promise<fs.Stats>((resolve, reject) => fs.fstat(this.fd, (err, s) => (err ? reject(sysError(err)) : resolve(s))));
    return st.blocks * 512;
  }

  /**
   * fdatasync: everything written before is durable when this resolves. No
   * system call when nothing changed since the last sync began (see
   * changesDone); tests' fault injection and crash recording see every call.
   */
  async flush(): Promise<void> {
    if (this.closed) throw new QmountError('EBADF', `${this.path}: refusing to flush after close`);
    if (this.readOnly) return;
    try {
      if (instrumentation.active) instrumentation.check('flush', 'flush', this.path, 0, 0);
    } catch (err) {
      throw sysError(err);
    }
    if (this.changesInFlight === 0 && this.changesDone === this.syncedThrough) {
      ioCounters.syncsSkipped++;
      return;
    }
    const through = this.changesDone;
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(sysError(err)) : resolve())));
    ioCounters.syncs++;
    if (through > this.syncedThrough) this.syncedThrough = through;
  }

  async size(): Promise<number> {
    const st = await new Promise<fs.Stats>((resolve, reject) =>
      fs.fstat(this.fd, (err, s) => (err ? reject(err) : resolve(s))),
    );
    return st.size;
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`refusing to resize ${this.path}: opened read-only`);
    checkRange(this.path, 'truncate to', size, 0, this.closed);
    try {
      if (instrumentation.active) instrumentation.check('truncate', 'truncate', this.path, size, 0);
    } catch (err) {
      throw sysError(err);
    }
    // Growing makes zeros (zeroFrom may stay); shrinking and regrowing would too, but a
    // write in flight beyond `size` may still land: zeroFrom never goes down.
    if (size > this.zeroFrom) this.zeroFrom = size;
    if (size < this.sizeFloor) this.sizeFloor = size;
    await this.changing(new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, size, (err) => (err ? reject(sysError(err)) : resolve()))));
    this.grown(size);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}

/**
 * Write a new image file: `file` is created, never overwriting one (O_EXCL:
 * EEXIST if it exists; qmount create is used next to evidence), filled by
 * `fill`, synced and closed. On any failure the partial file is removed.
 */
export async function writeNewFile(file: string, fill: (fh: fs.promises.FileHandle) => Promise<void>): Promise<void> {
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(file, 'wx', 0o644);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw new QmountError('EEXIST', `${file} already exists (qmount create never overwrites a file)`);
    throw new QmountError(code === 'EACCES' ? 'EACCES' : code === 'ENOENT' ? 'ENOENT' : 'EIO', `${file}: cannot create: ${code ?? 'error'}`);
  }
  try {
    await fill(fh);
    await fh.sync();
    await fh.close();
  } catch (err) {
    await fh.close().catch(() => {});
    await fs.promises.unlink(file).catch(() => {});
    throw err;
  }
}
