/**
 * The file system a mount shows, independent of the FUSE binding: a
 * directory holding one regular file, `disk.raw`, whose bytes are the
 * driver's guest disk. Backends (mount/backend.ts) call in here and pass the
 * answers on. This is the only place where errno names become negative FUSE
 * result codes.
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
 *   backend that answers getattr itself (fuse3); the kernel asks again after
 *   each of these requests, so nothing else needs invalidating.
 * - a handler that throws or rejects where the engine's typed errors are not
 *   expected (a bug) answers EIO and is logged once per cause; a request not
 *   answered after UNANSWERED_MS is logged with its op and offset.
 */
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import { errnoOf, oneLine, type ErrnoName } from '../src/errors.js';
import type { BlockDriver } from '../src/formats/driver.js';
import type { Logger } from '../src/log.js';
import { StatusCache, blocksOf, fallocate, seek, truncate, type DiscardMode } from './sparse.js';

const E = os.constants.errno;

/** Negative FUSE result for an errno name. */
export function fuseCode(name: ErrnoName | 'ENOTCONN' | 'EISDIR' | 'ENOSYS' | 'EOPNOTSUPP' | 'ENXIO'): number {
  return -(E[name] ?? E.EIO);
}

const EIO = fuseCode('EIO');
const ENOENT = fuseCode('ENOENT');
const EROFS = fuseCode('EROFS');
const ENOSPC = fuseCode('ENOSPC');
const ENOTSUP = fuseCode('ENOTSUP');
const EISDIR = fuseCode('EISDIR');
const ENXIO = fuseCode('ENXIO');

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
const O_ACCMODE = 3;
export const FILE_PATH = '/disk.raw';
export const FILE_NAME = 'disk.raw';
/** Read errors are logged once per guest offset; this bounds the remembered set. */
const MAX_LOGGED_READ_ERRORS = 1024;
/** A request not answered after this long is a bug worth a log line (not a timeout: it stays pending). */
export const UNANSWERED_MS = 120_000;
const SWEEP_MS = 30_000;

export interface DiskServiceOptions {
  readOnly: boolean;
  /** allow_other: others may read disk.raw (0644 instead of 0600). */
  allowOther: boolean;
  /** -o uid/gid/umask: shown owner and permissions (as libfuse 2's options: umask sets the bits to 0777 & ~umask). */
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

export interface FileAttrs {
  size: number;
  fileMode: number;
  dirMode: number;
  uid: number;
  gid: number;
}

export interface Stat extends FileAttrs {
  mode: number;
  nlink: number;
  blksize?: number;
  blocks?: number;
  atime: number;
  mtime: number;
  ctime: number;
}

interface Pending {
  op: string;
  pos: number;
  length: number;
  start: number;
  logged: boolean;
}

export class DiskService {
  readonly stats: IoStats = {
    reads: 0, readBytes: 0, maxRead: 0, writes: 0, writeBytes: 0, maxWrite: 0, smallWrites: 0,
    readErrors: 0, writeErrors: 0, readMicros: 0, writeMicros: 0, handlerErrors: 0, unanswered: 0,
  };
  readonly attrs: FileAttrs;
  readonly readOnly: boolean;
  private readonly startTime = Date.now();
  private mtime = this.startTime;
  private readonly loggedReadErrors = new Set<number>();
  private readonly loggedCauses = new Set<string>();
  /** Requests that reached the driver and are not answered yet. */
  private inflight = 0;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private sweep: NodeJS.Timeout | undefined;
  private drainWaiters: Array<() => void> = [];
  /** Once set, nothing new reaches the driver (it is about to be closed). */
  private closing = false;
  private readonly log: Logger;
  private readonly discard: DiscardMode;
  /** st_blocks last handed to onAttrs */
  private blocks: number;
  /** The last block status lseek asked for (every change invalidates it). */
  private readonly statusCache = new StatusCache();
  /** Set by a backend that answers getattr itself: called with the file's size and st_blocks when either changed. */
  onAttrs: ((size: number, blocks: number) => void) | undefined;

  constructor(
    private readonly driver: BlockDriver,
    opts: DiskServiceOptions,
  ) {
    this.readOnly = opts.readOnly;
    this.log = opts.log;
    this.discard = opts.discard ?? 'unmap';
    this.blocks = blocksOf(driver);
    let fileMode = S_IFREG | (opts.allowOther ? 0o644 : 0o600);
    let dirMode = S_IFDIR | (opts.allowOther ? 0o755 : 0o700);
    if (opts.umask !== undefined) {
      const perm = 0o777 & ~parseInt(opts.umask, 8);
      fileMode = S_IFREG | perm;
      dirMode = S_IFDIR | perm;
    }
    this.attrs = {
      size: driver.virtualSize,
      fileMode,
      dirMode,
      uid: opts.uid ?? process.getuid?.() ?? 0,
      gid: opts.gid ?? process.getgid?.() ?? 0,
    };
    this.sweep = setInterval(() => this.logUnanswered(), SWEEP_MS);
    this.sweep.unref();
  }

  get size(): number {
    return this.attrs.size;
  }

  /** Stop passing requests to the driver; resolves once those already there are answered. */
  drain(): Promise<void> {
    this.closing = true;
    clearInterval(this.sweep);
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  private enter(op: string, pos: number, length: number): number {
    if (this.closing) return 0;
    this.inflight++;
    const id = this.nextId++;
    this.pending.set(id, { op, pos, length, start: Date.now(), logged: false });
    return id;
  }

  private leave(id: number): void {
    this.pending.delete(id);
    if (--this.inflight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  private logUnanswered(): void {
    const now = Date.now();
    for (const p of this.pending.values()) {
      if (p.logged || now - p.start < UNANSWERED_MS) continue;
      p.logged = true;
      this.stats.unanswered++;
      this.log.error({ op: p.op, guestOffset: p.pos, length: p.length, waitingMs: now - p.start }, 'request not answered (a bug: it stays pending)');
    }
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

  // ---- metadata (the fuse3 backend answers these in C from `attrs`, by the same rules) ----

  fileStat(): Stat {
    const a = this.attrs;
    return {
      ...a, mode: a.fileMode, nlink: 1, blksize: 65536, blocks: blocksOf(this.driver),
      atime: this.mtime, mtime: this.mtime, ctime: this.mtime,
    };
  }

  dirStat(): Stat {
    const a = this.attrs;
    return { ...a, mode: a.dirMode, size: 4096, nlink: 2, atime: this.startTime, mtime: this.startTime, ctime: this.startTime };
  }

  /** getattr: a Stat, or a negative errno. */
  getattr(path: string): Stat | number {
    if (path === FILE_PATH) return this.fileStat();
    if (path === '/') return this.dirStat();
    return ENOENT;
  }

  open(path: string, flags: number): number {
    if (path === '/') return EISDIR;
    if (path !== FILE_PATH) return ENOENT;
    if (this.readOnly && (flags & O_ACCMODE) !== 0) return EROFS;
    return 0;
  }

  truncate(path: string, size: number): number | Promise<number> {
    if (path !== FILE_PATH) return path === '/' ? EISDIR : ENOENT;
    if (this.readOnly) return EROFS;
    if (size === this.size) return 0;
    return this.sparseOp('truncate', size, 0, () => truncate(this.driver, size));
  }

  utimens(path: string): number {
    return path === FILE_PATH || path === '/' ? 0 : ENOENT;
  }

  chmod(): number {
    return ENOTSUP;
  }

  // ---- data ----

  private readFailed(err: unknown, guestOffset: number, length: number): number {
    this.stats.readErrors++;
    const code = errnoOf(err);
    if (this.loggedReadErrors.size < MAX_LOGGED_READ_ERRORS && !this.loggedReadErrors.has(guestOffset)) {
      this.loggedReadErrors.add(guestOffset);
      this.log.error({ guestOffset, length, errno: code, err: oneLine(err) }, 'read failed');
      if (this.loggedReadErrors.size === MAX_LOGGED_READ_ERRORS) {
        this.log.error('too many failing read offsets; further read errors are not logged');
      }
    }
    return fuseCode(code);
  }

  /** Read `len` bytes at guest offset `pos` into buf[bufOff..]. */
  read(buf: Buffer, bufOff: number, len: number, pos: number): number | Promise<number> {
    // Reads reaching past the end of the disk get a short count (0 at or after it).
    const n = pos >= this.size ? 0 : Math.min(len, this.size - pos);
    if (n === 0) return 0;
    const id = this.enter('read', pos, n);
    if (id === 0) return EIO;
    const s = this.stats;
    s.reads++;
    s.readBytes += n;
    if (n > s.maxRead) s.maxRead = n;
    const t0 = performance.now();
    let p: Promise<void>;
    try {
      p = this.driver.read(buf, bufOff, n, pos);
    } catch (err) {
      this.leave(id);
      return this.handlerFailed('read', err);
    }
    return p.then(
      () => {
        s.readMicros += (performance.now() - t0) * 1000;
        this.leave(id);
        return n;
      },
      (err: unknown) => {
        s.readMicros += (performance.now() - t0) * 1000;
        this.leave(id);
        return this.readFailed(err, pos, n);
      },
    );
  }

  write(buf: Buffer, bufOff: number, len: number, pos: number): number | Promise<number> {
    if (this.readOnly) return EROFS;
    // Like a block device: a write crossing the end is cut short, one at the end gets ENOSPC.
    const n = pos >= this.size ? 0 : Math.min(len, this.size - pos);
    if (n === 0) return len === 0 ? 0 : ENOSPC;
    const id = this.enter('write', pos, n);
    if (id === 0) return EIO;
    const s = this.stats;
    s.writes++;
    s.writeBytes += n;
    if (n > s.maxWrite) s.maxWrite = n;
    if (n <= 4096) s.smallWrites++;
    const t0 = performance.now();
    this.statusCache.invalidate();
    let p: Promise<void>;
    try {
      p = this.driver.write(buf, bufOff, n, pos);
    } catch (err) {
      this.leave(id);
      return this.handlerFailed('write', err);
    }
    return p.then(
      () => {
        s.writeMicros += (performance.now() - t0) * 1000;
        this.mtime = Date.now();
        this.statusCache.invalidate();
        this.attrsChanged();
        this.leave(id);
        return n;
      },
      (err: unknown) => {
        s.writeMicros += (performance.now() - t0) * 1000;
        this.statusCache.invalidate();
        this.leave(id);
        s.writeErrors++;
        const code = errnoOf(err);
        this.log.error({ guestOffset: pos, length: n, errno: code, err: oneLine(err) }, 'write failed');
        return fuseCode(code);
      },
    );
  }

  flush(): number {
    return 0;
  }

  fsync(): number | Promise<number> {
    const id = this.enter('fsync', 0, 0);
    if (id === 0) return EIO;
    let p: Promise<void>;
    try {
      p = this.driver.flush();
    } catch (err) {
      this.leave(id);
      return this.handlerFailed('fsync', err);
    }
    return p.then(
      () => {
        this.leave(id);
        return 0;
      },
      (err: unknown) => {
        this.leave(id);
        const code = errnoOf(err);
        this.log.error({ errno: code, err: oneLine(err) }, 'flush failed');
        return fuseCode(code);
      },
    );
  }

  // ---- sparse files (mount/sparse.ts) ----

  /** The file's size or st_blocks changed (or may have): tell a backend that caches them. */
  private attrsChanged(): void {
    const size = this.driver.virtualSize;
    const blocks = blocksOf(this.driver);
    if (size === this.attrs.size && blocks === this.blocks) return;
    this.attrs.size = size;
    this.blocks = blocks;
    this.onAttrs?.(size, blocks);
  }

  /** Run a sparse op under in-flight tracking; its QmountError becomes the FUSE code, anything else EIO. */
  private sparseOp(op: string, pos: number, length: number, run: () => Promise<number | null | void>): Promise<number> | number {
    const id = this.enter(op, pos, length);
    if (id === 0) return EIO;
    const changes = op !== 'lseek';
    if (changes) this.statusCache.invalidate();
    let p: Promise<number | null | void>;
    try {
      p = run();
    } catch (err) {
      this.leave(id);
      return this.handlerFailed(op, err);
    }
    return p.then(
      (r) => {
        if (changes) {
          this.mtime = Date.now();
          this.statusCache.invalidate();
          this.attrsChanged();
        }
        this.leave(id);
        return r === null ? ENXIO : (r ?? 0);
      },
      (err: unknown) => {
        // A resize or zeroing may have happened in part: publish what the driver says now.
        if (changes) {
          this.statusCache.invalidate();
          this.attrsChanged();
        }
        this.leave(id);
        const code = errnoOf(err);
        // Refusals the caller asked for (shrinking over data, a bad mode or size) are not engine failures.
        const level = code === 'EPERM' || code === 'EINVAL' || code === 'ENOTSUP' || code === 'ENOSPC' ? 'info' : 'error';
        this.log[level]({ op, guestOffset: pos, length, errno: code, err: oneLine(err) }, `${op} failed`);
        return fuseCode(code);
      },
    );
  }

  /** lseek SEEK_DATA / SEEK_HOLE: the offset, or a negative errno (ENXIO: none). */
  lseek(pos: number, whence: number): number | Promise<number> {
    return this.sparseOp('lseek', pos, 0, () => seek(this.driver, pos, whence, this.statusCache));
  }

  fallocate(mode: number, pos: number, length: number): number | Promise<number> {
    if (this.readOnly) return EROFS;
    return this.sparseOp('fallocate', pos, length, () => fallocate(this.driver, mode, pos, length, this.discard));
  }
}
