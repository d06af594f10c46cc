/**
 * The file system a mount shows: a directory holding one regular file,
 * `disk.raw`, whose bytes are the driver's guest disk. This is the only
 * place where errno names become negative FUSE result codes.
 *
 * Op choices:
 * - read/write hand fuse-native's Buffer (an external buffer over FUSE's own
 *   memory) straight to the driver: no copies. fuse-native detaches that
 *   buffer once we answer, so the driver must be done with it when its
 *   promise settles (also when it rejects).
 * - truncate/ftruncate to the current size succeed (shells do that with
 *   O_TRUNC-free redirections); any other size is EPERM: the disk has a fixed size.
 * - utimens is accepted and ignored (touch, cp -p work); chmod/chown answer
 *   ENOTSUP: the mode follows from the mount options.
 * - flush (close(2)) does nothing: writes are answered only once the driver
 *   has them, so there is nothing deferred to report. fsync -> driver.flush().
 */
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import type { FuseOps, FuseStat, FuseStatfs } from 'fuse-native';
import { errnoOf, oneLine, type ErrnoName } from '../src/errors.js';
import type { BlockDriver } from '../src/formats/driver.js';
import type { Logger } from '../src/log.js';

const E = os.constants.errno;

/** Negative FUSE result for an errno name. */
export function fuseCode(name: ErrnoName | 'ENOTCONN' | 'EISDIR'): number {
  return -(E[name] ?? E.EIO);
}

const EIO = fuseCode('EIO');
const ENOENT = fuseCode('ENOENT');
const EROFS = fuseCode('EROFS');
const ENOSPC = fuseCode('ENOSPC');
const EPERM = fuseCode('EPERM');
const ENOTSUP = fuseCode('ENOTSUP');
const EISDIR = fuseCode('EISDIR');

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const O_ACCMODE = 3;
const FILE_PATH = '/disk.raw';
export const FILE_NAME = 'disk.raw';
/** Read errors are logged once per guest offset; this bounds the remembered set. */
const MAX_LOGGED_READ_ERRORS = 1024;

export interface DiskFsOptions {
  readOnly: boolean;
  /** allow_other: others may read disk.raw (0644 instead of 0600). */
  allowOther: boolean;
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
}

export class DiskFs {
  readonly stats: IoStats = {
    reads: 0, readBytes: 0, maxRead: 0, writes: 0, writeBytes: 0, maxWrite: 0, smallWrites: 0,
    readErrors: 0, writeErrors: 0, readMicros: 0, writeMicros: 0,
  };
  private readonly size: number;
  private readonly fileMode: number;
  private readonly dirMode: number;
  private readonly uid = process.getuid?.() ?? 0;
  private readonly gid = process.getgid?.() ?? 0;
  private readonly startTime = Date.now();
  private mtime = this.startTime;
  private readonly loggedReadErrors = new Set<number>();
  /** Requests that reached the driver and are not answered yet. */
  private inflight = 0;
  private drainWaiters: Array<() => void> = [];
  /** Once set, nothing new reaches the driver (it is about to be closed). */
  private closing = false;
  private readonly log: Logger;

  constructor(
    private readonly driver: BlockDriver,
    private readonly opts: DiskFsOptions,
  ) {
    this.size = driver.virtualSize;
    this.fileMode = S_IFREG | (opts.allowOther ? 0o644 : 0o600);
    this.dirMode = S_IFDIR | (opts.allowOther ? 0o755 : 0o700);
    this.log = opts.log;
  }

  /** Stop passing requests to the driver; resolves once those already there are answered. */
  drain(): Promise<void> {
    this.closing = true;
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  private enter(): boolean {
    if (this.closing) return false;
    this.inflight++;
    return true;
  }

  private leave(): void {
    if (--this.inflight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  private fileStat(): FuseStat {
    return {
      mode: this.fileMode,
      uid: this.uid,
      gid: this.gid,
      size: this.size,
      nlink: 1,
      blksize: 65536,
      blocks: Math.ceil(this.size / 512),
      atime: this.mtime,
      mtime: this.mtime,
      ctime: this.mtime,
    };
  }

  private dirStat(): FuseStat {
    return {
      mode: this.dirMode, uid: this.uid, gid: this.gid, size: 4096, nlink: 2,
      atime: this.startTime, mtime: this.startTime, ctime: this.startTime,
    };
  }

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

  ops(): FuseOps {
    return {
      getattr: (path, cb) => {
        if (path === '/') return cb(0, this.dirStat());
        if (path === FILE_PATH) return cb(0, this.fileStat());
        return cb(ENOENT);
      },
      fgetattr: (path, _fd, cb) => {
        if (path === FILE_PATH) return cb(0, this.fileStat());
        if (path === '/') return cb(0, this.dirStat());
        return cb(ENOENT);
      },
      readdir: (path, cb) => {
        if (path !== '/') return cb(ENOENT);
        return cb(0, ['.', '..', FILE_NAME]);
      },
      statfs: (_path, cb) => {
        const blocks = Math.min(Math.ceil(this.size / 4096), 0xffffffff);
        const st: FuseStatfs = {
          bsize: 4096, frsize: 4096, blocks, bfree: 0, bavail: 0,
          files: 2, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255,
        };
        return cb(0, st);
      },
      open: (path, flags, cb) => {
        if (path === '/') return cb(EISDIR);
        if (path !== FILE_PATH) return cb(ENOENT);
        if (this.opts.readOnly && (flags & O_ACCMODE) !== 0) return cb(EROFS);
        return cb(0, 0);
      },
      release: (_path, _fd, cb) => cb(0),
      flush: (_path, _fd, cb) => cb(0),
      read: (path, _fd, buf, len, pos, cb) => {
        if (path !== FILE_PATH) return cb(ENOENT);
        // Reads reaching past the end of the disk get a short count (0 at or after it).
        const n = pos >= this.size ? 0 : Math.min(len, this.size - pos);
        if (n === 0) return cb(0);
        if (!this.enter()) return cb(EIO);
        const s = this.stats;
        s.reads++;
        s.readBytes += n;
        if (n > s.maxRead) s.maxRead = n;
        const t0 = performance.now();
        this.driver.read(buf, 0, n, pos).then(
          () => {
            s.readMicros += (performance.now() - t0) * 1000;
            this.leave();
            cb(n);
          },
          (err: unknown) => {
            s.readMicros += (performance.now() - t0) * 1000;
            this.leave();
            cb(this.readFailed(err, pos, n));
          },
        );
      },
      write: (path, _fd, buf, len, pos, cb) => {
        if (path !== FILE_PATH) return cb(ENOENT);
        if (this.opts.readOnly) return cb(EROFS);
        // Like a block device: a write crossing the end is cut short, one at the end gets ENOSPC.
        const n = pos >= this.size ? 0 : Math.min(len, this.size - pos);
        if (n === 0) return cb(len === 0 ? 0 : ENOSPC);
        if (!this.enter()) return cb(EIO);
        const s = this.stats;
        s.writes++;
        s.writeBytes += n;
        if (n > s.maxWrite) s.maxWrite = n;
        if (n <= 4096) s.smallWrites++;
        const t0 = performance.now();
        this.driver.write(buf, 0, n, pos).then(
          () => {
            s.writeMicros += (performance.now() - t0) * 1000;
            this.mtime = Date.now();
            this.leave();
            cb(n);
          },
          (err: unknown) => {
            s.writeMicros += (performance.now() - t0) * 1000;
            this.leave();
            s.writeErrors++;
            const code = errnoOf(err);
            this.log.error({ guestOffset: pos, length: n, errno: code, err: oneLine(err) }, 'write failed');
            cb(fuseCode(code));
          },
        );
      },
      fsync: (path, _datasync, _fd, cb) => {
        if (path !== FILE_PATH) return cb(0);
        if (!this.enter()) return cb(EIO);
        this.driver.flush().then(
          () => {
            this.leave();
            cb(0);
          },
          (err: unknown) => {
            this.leave();
            const code = errnoOf(err);
            this.log.error({ errno: code, err: oneLine(err) }, 'flush failed');
            cb(fuseCode(code));
          },
        );
      },
      truncate: (path, size, cb) => cb(this.truncateResult(path, size)),
      ftruncate: (path, _fd, size, cb) => cb(this.truncateResult(path, size)),
      utimens: (path, _atime, _mtime, cb) => cb(path === FILE_PATH || path === '/' ? 0 : ENOENT),
      chmod: (_path, _mode, cb) => cb(ENOTSUP),
      chown: (_path, _uid, _gid, cb) => cb(ENOTSUP),
    };
  }

  private truncateResult(path: string, size: number): number {
    if (path !== FILE_PATH) return path === '/' ? EISDIR : ENOENT;
    if (this.opts.readOnly) return EROFS;
    return size === this.size ? 0 : EPERM;
  }
}
