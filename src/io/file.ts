/**
 * Positional file I/O. Knows byte offsets and lengths, nothing of formats.
 *
 * - Every write and flush names an IoPoint (see points.ts) so tests can
 *   inject faults there and the crash harness can record it.
 * - A file opened read-only refuses writes with EROFS before touching the
 *   kernel: an image opened with -r is never written, whatever a bug above does.
 * - Reads past end of file return short counts; callers decide whether that is
 *   zeros (data) or corruption (metadata).
 */
import fs from 'node:fs';
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

export interface OpenOptions {
  readOnly: boolean;
}

export class ImageFile {
  private closed = false;

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

  /**
   * Read up to `length` bytes at `position` into buf[bufOffset..]. Loops over
   * short reads; returns fewer than `length` only at end of file.
   */
  async read(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    let done = 0;
    while (done < length) {
      const n = await preadOnce(this.fd, buf, bufOffset + done, length - done, position + done);
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  /** Read exactly; bytes past end of file are zero-filled. Returns bytes really read. */
  async readZeroFill(buf: Buffer, bufOffset: number, length: number, position: number): Promise<number> {
    const n = await this.read(buf, bufOffset, length, position);
    if (n < length) buf.fill(0, bufOffset + n, bufOffset + length);
    return n;
  }

  async write(point: IoPoint, buf: Buffer, bufOffset: number, length: number, position: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`refusing to write ${this.path}: opened read-only`);
    if (instrumentation.active) {
      instrumentation.check('write', point, this.path, position, length, buf.subarray(bufOffset, bufOffset + length));
    }
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
