/**
 * Positional file I/O. Knows byte offsets and lengths, nothing of formats.
 *
 * - Every write and flush names an IoPoint (see points.ts) so tests can
 *   inject faults there and the crash harness can record it.
 * - A file opened read-only refuses writes with EROFS before touching the
 *   kernel: an image opened with -r is never written, whatever a bug above does.
 * - Reads past end of file return short counts; callers decide whether that is
 *   zeros (data) or corruption (metadata).
 * - Errors (faults, EROFS, the kernel's) always come as rejected promises,
 *   never as exceptions thrown by the call itself.
 */
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import { ReadOnlyError } from '../errors.js';
import { instrumentation } from './instrument.js';
import type { IoPoint } from './points.js';

function preadOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwriteOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/**
 * Inline I/O. A FUSE request already crosses threads twice (FUSE thread ->
 * event loop -> FUSE thread); a pread/pwrite on libuv's thread pool adds two
 * more crossings (event loop -> worker -> event loop), which on a small
 * machine is most of a request's latency. A call the page cache satisfies
 * takes microseconds, so reads and writes run synchronously on the event
 * loop instead. What that risks is a call that waits for the disk and stalls
 * the loop, and every other request with it: each inline call is timed, and
 * one slower than SLOW_MS sends this file's calls to the thread pool for a
 * back-off period that doubles while the probing inline calls stay slow (at
 * most one stall per period) and ends with the first fast one. fdatasync,
 * fstat, ftruncate always use the thread pool.
 */
export const ioTuning = {
  /** QMOUNT_INLINE_IO=0 turns inline calls off (every call on the thread pool). */
  inline: process.env.QMOUNT_INLINE_IO !== '0',
};
const SLOW_MS = 1;
const BACKOFF_MIN_MS = 20;
const BACKOFF_MAX_MS = 2000;

export class InlinePolicy {
  private asyncUntil = 0;
  private backoffMs = 0;
  /** Counters for tests and benchmarks. */
  readonly stats = { inline: 0, pooled: 0, slow: 0 };

  /** `now`: milliseconds, monotonic (tests pass a fake clock). */
  constructor(readonly now: () => number = () => performance.now()) {}

  /** May the next call run inline? */
  allowed(): boolean {
    if (!ioTuning.inline) return false;
    return this.asyncUntil === 0 || this.now() >= this.asyncUntil;
  }

  /** An inline call that started at `start` (this.now()) is over. */
  done(start: number): void {
    this.stats.inline++;
    const end = this.now();
    if (end - start <= SLOW_MS) {
      this.backoffMs = 0;
      this.asyncUntil = 0;
      return;
    }
    this.stats.slow++;
    this.backoffMs = Math.min(BACKOFF_MAX_MS, this.backoffMs === 0 ? BACKOFF_MIN_MS : this.backoffMs * 2);
    this.asyncUntil = end + this.backoffMs;
  }
}

export interface OpenOptions {
  readOnly: boolean;
}

export class ImageFile {
  private closed = false;
  /** Replaceable by tests (fake clock). */
  policy = new InlinePolicy();

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly readOnly: boolean,
  ) {}

  static async open(path: string, opts: OpenOptions): Promise<ImageFile> {
    const fd = await new Promise<number>((resolve, reject) => {
      fs.open(path, opts.readOnly ? 'r' : 'r+', (err, f) => (err ? reject(err) : resolve(f)));
    });
    return new ImageFile(path, fd, opts.readOnly);
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
    if (!this.policy.allowed()) return this.readPooled(buf, bufOffset, length, position);
    try {
      const start = this.policy.now();
      let done = 0;
      while (done < length) {
        const n = fs.readSync(this.fd, buf, bufOffset + done, length - done, position + done);
        if (n === 0) break;
        done += n;
      }
      this.policy.done(start);
      return Promise.resolve(done);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private async readPooled(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    this.policy.stats.pooled++;
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
      if (this.readOnly) throw new ReadOnlyError(`refusing to write ${this.path}: opened read-only`);
      if (instrumentation.active) {
        instrumentation.check('write', point, this.path, position, length, buf.subarray(bufOffset, bufOffset + length));
      }
      if (!this.policy.allowed()) return this.writePooled(buf, bufOffset, length, position);
      const start = this.policy.now();
      let done = 0;
      while (done < length) done += fs.writeSync(this.fd, buf, bufOffset + done, length - done, position + done);
      this.policy.done(start);
      return Promise.resolve();
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private async writePooled(buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    this.policy.stats.pooled++;
    let done = 0;
    while (done < length) {
      done += await pwriteOnce(this.fd, buf, bufOffset + done, length - done, position + done);
    }
  }

  /** fdatasync: everything written before is durable when this resolves. */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    if (instrumentation.active) instrumentation.check('flush', 'flush', this.path, 0, 0);
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  async size(): Promise<number> {
    const st = await new Promise<fs.Stats>((resolve, reject) =>
      fs.fstat(this.fd, (err, s) => (err ? reject(err) : resolve(s))),
    );
    return st.size;
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`refusing to resize ${this.path}: opened read-only`);
    if (instrumentation.active) instrumentation.check('truncate', 'truncate', this.path, size, 0);
    await new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, size, (err) => (err ? reject(err) : resolve())));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
