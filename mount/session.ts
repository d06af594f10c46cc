/**
 * One mounted image: mount point checks, mounting through a backend
 * (mount/backend.ts), noticing an external unmount (the backend says so at
 * once), and the one clean close every way of ending goes through.
 *
 * Close order (each step waits for the one before):
 *   1. take the file system off the mount point (skipped when the kernel
 *      already did: umount / fusermount -u from outside);
 *   2. stop passing requests to the driver and wait for those in flight;
 *   3. release the binding (fuse3: close the session fd);
 *   4. the extra files' close() (snapshot drivers...), in reverse order, then
 *      driver.close(): flush caches, clear the dirty/need-check marks.
 * close() is idempotent: a second signal during close only logs.
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { QmountError, oneLine } from '../src/errors.js';
import type { BlockDriver } from '../src/formats/driver.js';
import { ioCounters } from '../src/io/file.js';
import type { Logger } from '../src/log.js';
import { createBackend, type BackendChoice, type FuseBackend } from './backend.js';
import { findMount, readMounts, readMountsSync } from './mountinfo.js';
import type { MountOptions } from './options.js';
import { DiskService, FILE_NAME } from './service.js';
import type { DiscardMode } from './sparse.js';
import { MountTree, type TreeEntry } from './tree.js';

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
  /** --fuse-backend; default auto */
  backend?: BackendChoice;
  /** --discard (mount/sparse.ts); default unmap */
  discard?: DiscardMode;
  /**
   * The files to show (mount/tree.ts), disk.raw first; default: disk.raw
   * alone. The driver passed to mount() is closed by the session; an extra
   * entry's source is closed through its own `close`.
   */
  files?: TreeEntry[];
}

export class MountSession {
  private readonly service: DiskService;
  private readonly files: TreeEntry[];
  private backend!: FuseBackend;
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
    const m = opts.mount;
    this.files = opts.files ?? [{ path: FILE_NAME, source: driver }];
    const tree = MountTree.build(this.files, { readOnly: opts.readOnly });
    this.service = new DiskService(tree, { readOnly: opts.readOnly, allowOther: m.allowOther, uid: m.uid, gid: m.gid, umask: m.umask, discard: opts.discard, log });
  }

  /** The backend in use ('fuse3' or 'fuse-native'). */
  get backendName(): string {
    return this.backend.name;
  }

  /** Mount `driver` on `mountPoint` (a real path checked by checkMountPoint). Resolves once FUSE is ready. */
  static async mount(driver: BlockDriver, mountPoint: string, opts: MountSessionOptions): Promise<MountSession> {
    const log = opts.log;
    const s = new MountSession(mountPoint, driver, log, opts);
    s.backend = await createBackend(opts.backend ?? 'auto', {
      mountPoint,
      service: s.service,
      mount: opts.mount,
      readOnly: opts.readOnly,
      log,
      onUnmounted: (detail) => {
        if (detail) log.error({ detail }, 'the FUSE session ended');
        if (!s.closing) void s.close('unmounted');
      },
    });
    log.debug({ backend: s.backend.name, options: s.backend.options }, 'mounting');
    try {
      await s.backend.mount();
    } catch (err) {
      s.service.drain().catch(() => {});
      throw new QmountError('EIO', `${mountPoint}: cannot mount: ${oneLine(err)}`);
    }
    log.info({ mountPoint, file: FILE_NAME, files: s.files.length, size: driver.virtualSize, readOnly: opts.readOnly, backend: s.backend.name, maxIo: s.backend.maxIo }, 'mounted');
    return s;
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
    this.log.info({ reason }, 'closing');
    if (reason !== 'unmounted') await this.unmountKernel();
    await this.service.drain();
    this.backend.release();
    let code = 0;
    for (const f of [...this.files].reverse()) {
      if (!('close' in f) || f.close === undefined) continue;
      try {
        await f.close();
      } catch (err) {
        this.log.error({ file: f.path, err: oneLine(err) }, 'closing a file source failed');
        code = 2;
      }
    }
    try {
      await this.driver.close();
    } catch (err) {
      this.log.error({ err: oneLine(err) }, 'closing the image failed');
      code = 2;
    }
    // io: image calls made inline on the event loop vs on the thread pool (src/io/file.ts).
    this.log.info({ stats: this.service.stats, io: ioCounters, backend: this.backend.name, fuse: this.backend.stats() }, 'closed');
    return code;
  }

  /** Log the request counters so far (SIGUSR1; `npm run bench` reads them around each job). */
  logStats(): void {
    this.log.warn({ stats: this.service.stats, io: ioCounters, backend: this.backend.name, fuse: this.backend.stats(), live: true }, 'request counters');
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
