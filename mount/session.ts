/**
 * One mounted image: mount point checks, mounting, noticing an external
 * unmount, and the one clean close every way of ending goes through.
 *
 * Close order (each step waits for the one before):
 *   1. take the file system off the mount point (skipped when the kernel
 *      already did: umount / fusermount -u from outside);
 *   2. stop passing requests to the driver and wait for those in flight;
 *   3. driver.close(): flush caches, clear the dirty/need-check marks.
 * close() is idempotent: a second signal during close only logs.
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import Fuse, { type FuseOps } from 'fuse-native';
import { QmountError, oneLine } from '../src/errors.js';
import type { BlockDriver } from '../src/formats/driver.js';
import { ioCounters } from '../src/io/file.js';
import type { Logger } from '../src/log.js';
import { DiskFs, FILE_NAME } from './disk-fs.js';
import { findMount, readMounts, readMountsSync } from './mountinfo.js';
import { fuseOptionList, type MountOptions } from './options.js';

/** The file system type our mounts show in mountinfo (subtype=qmount, see options.ts). */
const FS_TYPE = 'fuse.qmount';
/** How often /proc/self/mountinfo is read to notice an external unmount. */
const POLL_MS = 500;

/**
 * fuse-native has no switch for big_writes, max_write, ro or direct_io: this
 * is the one place qmount adds options to the ones fuse-native builds.
 * Exported for scripts/noop-fs.mjs (the benchmark's ceiling mounts with it).
 */
export class QmountFuse extends Fuse {
  constructor(
    mnt: string,
    ops: FuseOps,
    private readonly extraOptions: string[],
  ) {
    // timeout false: fuse-native would otherwise answer any request slower than 15 s with ETIMEDOUT.
    super(mnt, ops, { timeout: false });
  }

  override _fuseOptions(): string {
    const base = super._fuseOptions();
    const extra = this.extraOptions.join(',');
    if (!extra) return base;
    return base ? `${base},${extra}` : `-o${extra}`;
  }
}

function run(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, (err, _stdout, stderr) => (err ? reject(new Error(stderr.trim() || err.message)) : resolve()));
  });
}

/**
 * Check DIR before mounting: an existing, empty directory that is not a
 * mount point already. Returns its real path. Errors are one-line QmountErrors.
 */
export async function checkMountPoint(dir: string): Promise<string> {
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') {
      throw new QmountError('EBUSY', `${dir}: stale FUSE mount (transport endpoint is not connected); clean it up with: fusermount -u ${dir}`);
    }
    if (code === 'ENOENT') throw new QmountError('ENOENT', `${dir}: mount point does not exist`);
    throw new QmountError('EACCES', `${dir}: cannot use as mount point: ${code ?? oneLine(err)}`);
  }
  if (!st.isDirectory()) throw new QmountError('ENOTDIR', `${dir}: mount point is not a directory`);
  const real = await fs.promises.realpath(dir);
  if (findMount(await readMounts(), real)) throw new QmountError('EBUSY', `${dir}: something is already mounted there`);
  const entries = await fs.promises.readdir(real);
  if (entries.length > 0) throw new QmountError('EEXIST', `${dir}: mount point is not empty`);
  try {
    await fs.promises.access('/dev/fuse', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    throw new QmountError('EACCES', 'cannot use /dev/fuse (is the fuse module loaded and /dev/fuse accessible?)');
  }
  return real;
}

export interface MountSessionOptions {
  readOnly: boolean;
  mount: MountOptions;
  log: Logger;
}

export class MountSession {
  private readonly fs: DiskFs;
  private readonly fuse: QmountFuse;
  private poll: NodeJS.Timeout | undefined;
  private closing: Promise<number> | undefined;
  private resolveDone!: (code: number) => void;
  /** Settles with the exit code once the mount is closed, however it ended. */
  readonly done: Promise<number> = new Promise((resolve) => (this.resolveDone = resolve));

  private constructor(
    readonly mountPoint: string,
    private readonly driver: BlockDriver,
    private readonly log: Logger,
    opts: MountSessionOptions,
  ) {
    this.fs = new DiskFs(driver, { readOnly: opts.readOnly, allowOther: opts.mount.allowOther, log });
    this.fuse = new QmountFuse(mountPoint, this.fs.ops(), fuseOptionList(opts.mount, opts.readOnly));
  }

  /** Mount `driver` on `mountPoint` (a real path checked by checkMountPoint). Resolves once FUSE is ready. */
  static async mount(driver: BlockDriver, mountPoint: string, opts: MountSessionOptions): Promise<MountSession> {
    const log = opts.log;
    const s = new MountSession(mountPoint, driver, log, opts);
    log.debug({ options: s.fuse._fuseOptions() }, 'mounting');
    await new Promise<void>((resolve, reject) => {
      s.fuse.mount((err) => {
        if (err) reject(new QmountError('EIO', `${mountPoint}: cannot mount: ${oneLine(err)}`));
        else resolve();
      });
    });
    s.poll = setInterval(() => s.checkStillMounted(), POLL_MS);
    log.info({ mountPoint, file: FILE_NAME, size: driver.virtualSize, readOnly: opts.readOnly }, 'mounted');
    return s;
  }

  private checkStillMounted(): void {
    readMounts().then(
      (entries) => {
        const ours = entries.some((e) => e.mountPoint === this.mountPoint && e.fsType === FS_TYPE);
        if (!this.closing && !ours) void this.close('unmounted');
      },
      (err: unknown) => this.log.warn({ err: oneLine(err) }, 'cannot read /proc/self/mountinfo'),
    );
  }

  /**
   * Close cleanly (see the order at the top). `reason` 'unmounted' means the
   * kernel already let go of the mount point. Resolves to the exit code.
   */
  close(reason: string): Promise<number> {
    if (this.closing) {
      this.log.warn({ reason }, 'already closing; ignored');
      return this.closing;
    }
    this.closing = this.doClose(reason);
    void this.closing.then((code) => this.resolveDone(code));
    return this.closing;
  }

  private async doClose(reason: string): Promise<number> {
    clearInterval(this.poll);
    this.log.info({ reason }, 'closing');
    if (reason !== 'unmounted') await this.unmountKernel();
    await this.fs.drain();
    let code = 0;
    try {
      await this.driver.close();
    } catch (err) {
      this.log.error({ err: oneLine(err) }, 'closing the image failed');
      code = 2;
    }
    // io: image calls made inline on the event loop vs on the thread pool (src/io/file.ts).
    this.log.info({ stats: this.fs.stats, io: ioCounters }, 'closed');
    return code;
  }

  /** Log the request counters so far (SIGUSR1; `npm run bench` reads them around each job). */
  logStats(): void {
    this.log.warn({ stats: this.fs.stats, io: ioCounters, live: true }, 'request counters');
  }

  /** Unmount; when busy (a file still open), detach lazily: remaining requests then get EIO. */
  private async unmountKernel(): Promise<void> {
    if (!findMount(await readMounts(), this.mountPoint)) return;
    try {
      await run('fusermount', ['-u', this.mountPoint]);
      return;
    } catch (err) {
      this.log.warn({ err: oneLine(err) }, 'unmount failed; detaching lazily');
    }
    try {
      await run('fusermount', ['-uz', this.mountPoint]);
    } catch (err) {
      this.log.error({ err: oneLine(err) }, 'lazy unmount failed');
    }
  }

  /** Last resort on a fatal error: detach the mount point so it is not left stale. */
  emergencyDetach(): void {
    try {
      if (findMount(readMountsSync(), this.mountPoint)) {
        // execFileSync would block the event loop that serves FUSE requests: fine here, nothing is served any more.
        execFileSync('fusermount', ['-uz', this.mountPoint], { stdio: 'ignore' });
      }
    } catch {
      // nothing more can be done
    }
  }
}
