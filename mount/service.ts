/**
 * The file system a mount shows, independent of the FUSE binding: the small
 * static tree of mount/tree.ts (disk.raw, whose bytes are the driver's guest
 * disk, and whatever else the composition root added: pN.raw partitions,
 * snapshots/NAME.raw, damage.json). Every file follows the rules below with
 * its own source, size and read-only flag. Backends (mount/backend.ts) route
 * each request to its MountFile (fuse3 by inode, fuse-native by path) and
 * pass the answers on. This is the only place where errno names become
 * negative FUSE result codes.
 *
 * Results: every data op returns a number (or a promise of one, which never
 * rejects): >= 0 the answer (bytes, offset, 0), < 0 a negative errno.
 *
 * Op choices:
 * - read/write hand the backend's buffer (FUSE's own memory) straight to the
 *   driver: no copies. The backend reuses that memory once we answer, so the
 *   driver must be done with it when its promise settles (also on rejection).
 * - truncate/ftruncate resize the disk (mount/sparse.ts has the rules:
 *   growing reads as zeros, shrinking is EPERM unless nothing is allocated
 *   past the new end); the current size always succeeds.
 * - utimens is accepted and ignored (touch, cp -p work); chmod/chown answer
 *   ENOTSUP: the mode follows from the mount options.
 * - flush (close(2)) does nothing: writes are answered only once the driver
 *   has them, so there is nothing deferred to report. fsync -> driver.flush().
 * - lseek (SEEK_DATA/SEEK_HOLE) and fallocate: mount/sparse.ts (block
 *   status, writeZeroes, resize); st_blocks = ceil(allocatedBytes / 512).
 *   Attributes that change (size after a resize, st_blocks after writes and
 *   discards) are handed to `onAttrs` before the request is answered, for a
 *   backend that answers getattr itself (fuse3), and every ATTR_REFRESH_MS
 *   for changes the engine makes on its own (a background count); the
 *   kernel asks again after each of these requests, so nothing else needs
 *   invalidating.
 * - a handler that throws or rejects where the engine's typed errors are not
 *   expected (a bug) answers EIO and is logged once per cause; a request not
 *   answered after UNANSWERED_MS is logged with its op and offset.
 */
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { errnoOf, oneLine, type ErrnoName } from '../src/errors.js';
import type { Logger } from '../src/log.js';
import type { FdSink } from '../src/formats/driver.js';
import { Aliases } from './aliases.js';
import { dirStatOf, fileStatOf, shownAttrs, type FileAttrs, type Stat } from './attrs.js';
import { RequestTracker } from './requests.js';
import { StatusCache, blocksOf, fallocate, seek, truncate, type DiscardMode, SEEK_DATA } from './sparse.js';
import { MountTree, type MountDir, type MountFile, type MountNode } from './tree.js';

const E = os.constants.errno;

/** Negative FUSE result for an errno name. */
/** Bytes of a request of `len` at `pos` inside a file of `size`: cut short at the end (0 at or after it), as a block device does. */
function within(size: number, pos: number, len: number): number {
  return pos >= size ? 0 : Math.min(len, size - pos);
}

export function fuseCode(name: ErrnoName | 'ENOTCONN' | 'EISDIR' | 'ENOSYS' | 'EOPNOTSUPP' | 'ENXIO'): number {
  return -(E[name] ?? E.EIO);
}

const EIO = fuseCode('EIO');
const ENOENT = fuseCode('ENOENT');
const ENOTDIR = fuseCode('ENOTDIR');
const EROFS = fuseCode('EROFS');
const ENOSPC = fuseCode('ENOSPC');
const ENOTSUP = fuseCode('ENOTSUP');
const EISDIR = fuseCode('EISDIR');
const ENXIO = fuseCode('ENXIO');

export type { FileAttrs, Stat } from './attrs.js';

const O_ACCMODE = 3;
/** The main file: the composition root puts the image's guest disk here, first. */
export const FILE_NAME = 'disk.raw';
/** Read errors are logged once per guest offset; this bounds the remembered set. */
const MAX_LOGGED_READ_ERRORS = 1024;
/** A request not answered after this long is a bug worth a log line (not a timeout: it stays pending). */
export { UNANSWERED_MS } from './requests.js';
/**
 * A source's allocation can change without a request of ours (qcow2 counts
 * its data clusters in the background after open and answers an estimate
 * until then; raw learns its file's allocation after a flush): the sizes and
 * st_blocks a backend caches are refreshed this often, the kernel's attribute
 * timeout (native/fuse3/ops.c ATTR_TIMEOUT).
 */
const ATTR_REFRESH_MS = 1000;

export interface DiskServiceOptions {
  readOnly: boolean;
  /** allow_other: others may read disk.raw (0644 instead of 0600). */
  allowOther: boolean;
  /** -o uid/gid/umask: shown owner and permissions (umask clears bits of 0666 for files, 0777 for the directory). */
  uid?: number;
  gid?: number;
  umask?: string;
  /** --discard: 'ignore' makes PUNCH_HOLE zero without freeing clusters; default 'unmap' */
  discard?: DiscardMode;
  log: Logger;
}

/** Request counters, logged when the mount closes (tests read them from the log). */
export interface IoStats {
  reads: number;
  readBytes: number;
  maxRead: number;
  writes: number;
  writeBytes: number;
  maxWrite: number;
  /** write requests of at most 4 KiB: many of these mean big_writes is not in effect */
  smallWrites: number;
  readErrors: number;
  writeErrors: number;
  /** Time the driver took, from the call to its promise settling (microseconds, summed). */
  readMicros: number;
  writeMicros: number;
  /** handler bugs answered with EIO, requests seen unanswered after UNANSWERED_MS */
  handlerErrors: number;
  unanswered: number;
}

/** A request that reached the driver; records are reused (no allocation per request). */
export class DiskService {
  readonly stats: IoStats = {
    reads: 0, readBytes: 0, maxRead: 0, writes: 0, writeBytes: 0, maxWrite: 0, smallWrites: 0,
    readErrors: 0, writeErrors: 0, readMicros: 0, writeMicros: 0, handlerErrors: 0, unanswered: 0,
  };
  readonly attrs: FileAttrs;
  readonly readOnly: boolean;
  readonly tree: MountTree;
  /** The first file (disk.raw). */
  readonly main: MountFile;
  /**
   * Set by a backend that can drop cached pages of a file (fuse3): called
   * after a completed change of `file` for every alias range it touched.
   */
  invalidate: ((file: MountFile, offset: number, length: number) => void) | undefined;
  private readonly aliases: Aliases;
  private readonly loggedReadErrors = new Set<number>();
  private readonly loggedCauses = new Set<string>();
  /** Requests that reached the driver and are not answered yet (mount/requests.ts). */
  private readonly requests: RequestTracker;
  private readonly log: Logger;
  private readonly discard: DiscardMode;
  /** Each file's size and st_blocks as last handed to onAttrs */
  private readonly published = new Map<MountFile, { size: number; blocks: number }>();
  private refresh: NodeJS.Timeout | undefined;
  /** The last block status lseek asked for (every change in the mount invalidates it). */
  private readonly statusCache = new StatusCache();
  /**
   * Set by a backend that answers getattr itself (fuse3): called with a
   * file's size and st_blocks when either changed, before the request that
   * changed them is answered.
   */
  onAttrs: ((file: MountFile, size: number, blocks: number) => void) | undefined;

  constructor(tree: MountTree, opts: DiskServiceOptions) {
    this.tree = tree;
    const main = tree.files()[0];
    if (!main) throw new Error('DiskService: the mount tree has no file');
    this.main = main;
    this.aliases = new Aliases(tree.files());
    this.readOnly = opts.readOnly;
    this.log = opts.log;
    this.discard = opts.discard ?? 'unmap';
    for (const f of tree.files()) this.published.set(f, { size: f.source.virtualSize, blocks: blocksOf(f.source) });
    this.attrs = shownAttrs(opts, main.source.virtualSize);
    this.requests = new RequestTracker(opts.log, () => this.stats.unanswered++);
    this.refresh = setInterval(() => {
      for (const f of this.tree.files()) this.publish(f);
    }, ATTR_REFRESH_MS);
    this.refresh.unref();
  }

  get size(): number {
    return this.main.source.virtualSize;
  }

  /** True when some other file shows bytes of `f` (its kernel page cache must not outlive an open). */
  hasAliases(f: MountFile): boolean {
    return this.aliases.has(f);
  }

  /**
   * After a completed change of f's bytes [pos, pos + length): tell the
   * backend which ranges of other files showed them. Data ops that change
   * bytes (write, and the sparse ops) call this.
   */
  changed(f: MountFile, pos: number, length: number): void {
    const invalidate = this.invalidate;
    if (invalidate === undefined) return;
    this.aliases.ranges(f, pos, length, (file, offset, len) => {
      try {
        invalidate(file, offset, len);
      } catch (err) {
        this.handlerFailed('invalidate', err); // logged once; the change itself succeeded
      }
    });
  }

  /** Stop passing requests to the driver; resolves once those already there are answered. */
  drain(): Promise<void> {
    clearInterval(this.refresh);
    return this.requests.drain();
  }

  /**
   * Right after the mount is ready, in the background: the SEEK_DATA a
   * client would ask at offset 0 (through lseek, so its answer is kept for
   * the real one) and a read of the first sector into a private buffer, not
   * counted. The first requests of a fresh process run cold code (measured
   * in-process: a first blockStatus 2.6 ms, the same call on a second image
   * 0.2 ms; a first read 0.4 ms, then 0.05), and nearly every client starts
   * there (a partition table, cp's first SEEK_DATA). Only reads; errors (a
   * damaged image) are ignored here, the client's own request meets them.
   * Tracked like requests, so draining waits for it.
   */
  warmUp(): void {
    const f = this.main;
    const size = f.source.virtualSize;
    if (size === 0) return;
    const buf = Buffer.alloc(Math.min(512, size));
    const warm = async (): Promise<void> => {
      await this.lseek(f, 0, SEEK_DATA);
      const id = this.requests.enter('warm-up read', 0, buf.length);
      if (id === 0) return;
      try {
        await f.source.read(buf, 0, buf.length, 0);
      } finally {
        this.requests.leave(id);
      }
    };
    warm().catch(() => {});
  }

  /** A bug in a handler (not an engine error): EIO, logged once per op and message. */
  handlerFailed(op: string, err: unknown): number {
    this.stats.handlerErrors++;
    const msg = oneLine(err);
    const key = `${op}:${msg}`;
    if (!this.loggedCauses.has(key) && this.loggedCauses.size < 256) {
      this.loggedCauses.add(key);
      this.log.error({ op, err: msg }, 'request handler failed; answering EIO (logged once per cause)');
    }
    return EIO;
  }

  // ---- metadata (mount/attrs.ts has the rules; the fuse3 backend answers these in C from a node table of the same values) ----

  fileStat(f: MountFile = this.main): Stat {
    return fileStatOf(this.attrs, f, this.readOnly);
  }

  dirStat(d: MountDir = this.tree.root): Stat {
    return dirStatOf(this.attrs, d, this.tree.startTime);
  }

  /** The node at an absolute path ('/', '/disk.raw', '/snapshots/a.raw'). */
  node(path: string): MountNode | undefined {
    return this.tree.byPath(path);
  }

  /** The file at a path, or a negative errno (ENOENT; EISDIR for a directory). */
  file(path: string): MountFile | number {
    const n = this.tree.byPath(path);
    if (n === undefined) return ENOENT;
    return n.kind === 'file' ? n : EISDIR;
  }

  /** The file with inode number `ino` (fuse3), or undefined. */
  fileByIno(ino: number): MountFile | undefined {
    const n = this.tree.byIno(ino);
    return n?.kind === 'file' ? n : undefined;
  }

  /** getattr: a Stat, or a negative errno. */
  getattr(path: string): Stat | number {
    const n = this.tree.byPath(path);
    if (n === undefined) return ENOENT;
    return n.kind === 'file' ? this.fileStat(n) : this.dirStat(n);
  }

  /** readdir: the names in a directory ('.' and '..' first), or a negative errno. */
  readdir(path: string): string[] | number {
    const n = this.tree.byPath(path);
    if (n === undefined) return ENOENT;
    if (n.kind !== 'dir') return ENOTDIR;
    return ['.', '..', ...n.children.keys()];
  }

  open(path: string, flags: number): number {
    const f = this.file(path);
    if (typeof f === 'number') return f;
    if (f.readOnly && (flags & O_ACCMODE) !== 0) return EROFS;
    return 0;
  }

  /** truncate/ftruncate by path (fuse-native); fuse3 calls setSize with the file. */
  truncate(path: string, size: number): number | Promise<number> {
    const f = this.file(path);
    if (typeof f === 'number') return f;
    return this.setSize(f, size);
  }

  utimens(path: string): number {
    return this.tree.byPath(path) ? 0 : ENOENT;
  }

  chmod(): number {
    return ENOTSUP;
  }

  // ---- data ----

  private readFailed(f: MountFile, err: unknown, guestOffset: number, length: number): number {
    this.stats.readErrors++;
    const code = errnoOf(err);
    if (this.loggedReadErrors.size < MAX_LOGGED_READ_ERRORS && !this.loggedReadErrors.has(guestOffset)) {
      this.loggedReadErrors.add(guestOffset);
      this.log.error({ file: f.path, guestOffset, length, errno: code, err: oneLine(err) }, 'read failed');
      if (this.loggedReadErrors.size === MAX_LOGGED_READ_ERRORS) {
        this.log.error('too many failing read offsets; further read errors are not logged');
      }
    }
    return fuseCode(code);
  }

  /**
   * Read `len` bytes of file `f` at offset `pos` into buf[bufOff..]. A
   * request the source can answer before returning (readNow) is answered
   * with a number, no promise; the rest through read().
   */
  read(f: MountFile, buf: Buffer, bufOff: number, len: number, pos: number): number | Promise<number> {
    // Reads reaching past the end of the file get a short count (0 at or after it).
    const src = f.source;
    const n = within(src.virtualSize, pos, len);
    if (n === 0) return 0;
    const id = this.requests.enter('read', pos, n);
    if (id === 0) return EIO;
    this.countRead(n);
    const t0 = performance.now();
    if (src.readNow !== undefined) {
      let done: boolean;
      try {
        done = src.readNow(buf, bufOff, n, pos);
      } catch (err) {
        return this.readFailedAfter(f, id, t0, err, pos, n);
      }
      if (done) return this.readDone(id, t0, n);
    }
    let p: Promise<void>;
    try {
      p = src.read(buf, bufOff, n, pos);
    } catch (err) {
      this.requests.leave(id);
      return this.handlerFailed('read', err);
    }
    return p.then(
      () => this.readDone(id, t0, n),
      (err: unknown) => this.readFailedAfter(f, id, t0, err, pos, n),
    );
  }

  /**
   * A read the backend can answer from a file descriptor (fuse3's splice):
   * true when the source sent it through `sink` (sendNow), counted like a
   * read; false, nothing done, and the backend uses read(). Reads reaching
   * past the end are cut short as read() cuts them; errors are left to
   * read(), which meets them again and answers them.
   */
  send(f: MountFile, len: number, pos: number, sink: FdSink): boolean {
    const src = f.source;
    if (src.sendNow === undefined) return false;
    const n = within(src.virtualSize, pos, len);
    if (n === 0) return false;
    const id = this.requests.enter('read', pos, n);
    if (id === 0) return false;
    const t0 = performance.now();
    let sent: boolean;
    try {
      sent = src.sendNow(n, pos, sink);
    } catch {
      sent = false;
    }
    this.requests.leave(id);
    if (!sent) return false;
    this.countRead(n);
    this.stats.readMicros += (performance.now() - t0) * 1000;
    return true;
  }

  private countRead(n: number): void {
    const s = this.stats;
    s.reads++;
    s.readBytes += n;
    if (n > s.maxRead) s.maxRead = n;
  }

  private readDone(id: number, t0: number, n: number): number {
    this.stats.readMicros += (performance.now() - t0) * 1000;
    this.requests.leave(id);
    return n;
  }

  private readFailedAfter(f: MountFile, id: number, t0: number, err: unknown, pos: number, n: number): number {
    this.stats.readMicros += (performance.now() - t0) * 1000;
    this.requests.leave(id);
    return this.readFailed(f, err, pos, n);
  }

  /** Write like read(): writeNow answered with a number, the rest through write(). */
  write(f: MountFile, buf: Buffer, bufOff: number, len: number, pos: number): number | Promise<number> {
    if (f.readOnly) return EROFS;
    // Like a block device: a write crossing the end is cut short, one at the end gets ENOSPC.
    const src = f.source;
    const n = within(src.virtualSize, pos, len);
    if (n === 0) return len === 0 ? 0 : ENOSPC;
    const id = this.requests.enter('write', pos, n);
    if (id === 0) return EIO;
    const s = this.stats;
    s.writes++;
    s.writeBytes += n;
    if (n > s.maxWrite) s.maxWrite = n;
    if (n <= 4096) s.smallWrites++;
    const t0 = performance.now();
    this.statusCache.invalidate();
    if (src.writeNow !== undefined) {
      let done: boolean;
      try {
        done = src.writeNow(buf, bufOff, n, pos);
      } catch (err) {
        return this.writeFailed(f, id, t0, err, pos, n);
      }
      if (done) return this.writeDone(f, id, t0, pos, n);
    }
    let p: Promise<void>;
    try {
      p = src.write(buf, bufOff, n, pos);
    } catch (err) {
      this.requests.leave(id);
      return this.handlerFailed('write', err);
    }
    return p.then(
      () => this.writeDone(f, id, t0, pos, n),
      (err: unknown) => this.writeFailed(f, id, t0, err, pos, n),
    );
  }

  private writeDone(f: MountFile, id: number, t0: number, pos: number, n: number): number {
    this.stats.writeMicros += (performance.now() - t0) * 1000;
    f.mtime = Date.now();
    this.statusCache.invalidate();
    this.attrsChanged(f);
    this.requests.leave(id);
    this.changed(f, pos, n);
    return n;
  }

  private writeFailed(f: MountFile, id: number, t0: number, err: unknown, pos: number, n: number): number {
    const s = this.stats;
    s.writeMicros += (performance.now() - t0) * 1000;
    this.statusCache.invalidate();
    this.requests.leave(id);
    s.writeErrors++;
    const code = errnoOf(err);
    this.log.error({ file: f.path, guestOffset: pos, length: n, errno: code, err: oneLine(err) }, 'write failed');
    return fuseCode(code);
  }

  flush(): number {
    return 0;
  }

  fsync(f: MountFile): number | Promise<number> {
    const id = this.requests.enter('fsync', 0, 0);
    if (id === 0) return EIO;
    let p: Promise<void>;
    try {
      p = f.source.flush();
    } catch (err) {
      this.requests.leave(id);
      return this.handlerFailed('fsync', err);
    }
    return p.then(
      () => {
        this.requests.leave(id);
        return 0;
      },
      (err: unknown) => {
        this.requests.leave(id);
        const code = errnoOf(err);
        this.log.error({ errno: code, err: oneLine(err) }, 'flush failed');
        return fuseCode(code);
      },
    );
  }

  // ---- sparse files (mount/sparse.ts) ----

  /**
   * f's size or st_blocks changed (or may have): tell a backend that caches
   * them, for f and the files sharing its bytes (a partition's allocation is
   * disk.raw's too). The first file's size is also attrs.size (statfs).
   */
  private attrsChanged(f: MountFile): void {
    this.publish(f);
    for (const o of this.aliases.others(f)) this.publish(o);
  }

  private publish(f: MountFile): void {
    const size = f.source.virtualSize;
    const blocks = blocksOf(f.source);
    const last = this.published.get(f);
    if (last && last.size === size && last.blocks === blocks) return;
    this.published.set(f, { size, blocks });
    if (f === this.main) this.attrs.size = size;
    this.onAttrs?.(f, size, blocks);
  }

  /** Run a sparse op on f under in-flight tracking; its QmountError becomes the FUSE code, anything else EIO. */
  private sparseOp(f: MountFile, op: string, pos: number, length: number, run: () => Promise<number | null | void>): Promise<number> | number {
    const id = this.requests.enter(op, pos, length);
    if (id === 0) return EIO;
    const changes = op !== 'lseek';
    if (changes) this.statusCache.invalidate();
    let p: Promise<number | null | void>;
    try {
      p = run();
    } catch (err) {
      this.requests.leave(id);
      return this.handlerFailed(op, err);
    }
    const after = (): void => {
      // Also after a failure: a resize or zeroing may have happened in part.
      if (!changes) return;
      f.mtime = Date.now();
      this.statusCache.invalidate();
      this.attrsChanged(f);
      if (op === 'fallocate') this.changed(f, pos, Math.min(length, f.source.virtualSize - pos));
    };
    return p.then(
      (r) => {
        after();
        this.requests.leave(id);
        return r === null ? ENXIO : (r ?? 0);
      },
      (err: unknown) => {
        after();
        this.requests.leave(id);
        const code = errnoOf(err);
        // Refusals the caller asked for (shrinking over data, a bad mode or size) are not engine failures.
        const level = code === 'EPERM' || code === 'EINVAL' || code === 'ENOTSUP' || code === 'ENOSPC' ? 'info' : 'error';
        this.log[level]({ file: f.path, op, guestOffset: pos, length, errno: code, err: oneLine(err) }, `${op} failed`);
        return fuseCode(code);
      },
    );
  }

  /** lseek SEEK_DATA / SEEK_HOLE: the offset, or a negative errno (ENXIO: none). */
  lseek(f: MountFile, pos: number, whence: number): number | Promise<number> {
    return this.sparseOp(f, 'lseek', pos, 0, () => seek(f.source, pos, whence, this.statusCache));
  }

  fallocate(f: MountFile, mode: number, pos: number, length: number): number | Promise<number> {
    if (f.readOnly) return EROFS;
    return this.sparseOp(f, 'fallocate', pos, length, () => fallocate(f.source, mode, pos, length, this.discard));
  }

  /** truncate/ftruncate to `size`: the current size succeeds at once, another one resizes. */
  setSize(f: MountFile, size: number): number | Promise<number> {
    if (f.readOnly) return EROFS;
    if (size === f.source.virtualSize) return 0;
    return this.sparseOp(f, 'truncate', size, 0, () => truncate(f.source, size));
  }
}
