/**
 * One mounted image: mount point checks, mounting through a backend
 * (mount/backend.ts), stopping, and the one clean close every way of
 * ending goes through.
 *
 * Invariant: the image is closed only after the kernel has ended the FUSE
 * connection (the backend's onUnmounted: /dev/fuse says ENODEV/POLLERR),
 * because until then a loop device, a mounted file system on it or an open
 * file can still send requests, and answering them with errors loses data.
 * The one exception is forceClose(), documented as losing data.
 *
 * Ways of ending:
 *   - umount / fusermount -u / qmount umount from outside: the connection
 *     ends at once (or, after a lazy unmount, when the last user lets go);
 *   - stop() (SIGINT, SIGTERM, SIGHUP): a plain unmount; when DIR is in use
 *     it says by what (mount/users.ts), keeps serving and retries every
 *     RETRY_MS and on every further stop(). Never a lazy unmount.
 * Close order once the connection has ended (each step waits for the one before):
 *   1. stop passing requests to the driver and wait for those in flight;
 *   2. release the binding (fuse3: close the session fd);
 *   3. the extra files' close() (snapshot drivers...), in reverse order, then
 *      driver.close(): flush caches, clear the dirty/need-check marks,
 *      release the image locks;
 *   4. the registry record says `closed` with the exit code (mount/registry.ts).
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { QmountError, oneLine } from '../src/errors.js';
import type { BlockDriver } from '../src/formats/driver.js';
import type { Logger } from '../src/log.js';
import type { FuseBackend } from './backend.js';
import { createBackend, type BackendChoice } from './backend-choice.js';
import { loadFuse3 } from './backend-fuse3.js';
import { findMount, readMounts, readMountsSync, type MountEntry } from './mountinfo.js';
import type { MountOptions } from './options.js';
import { Registration, type MountState } from './registry.js';
import { DiskService, FILE_NAME } from './service.js';
import type { DiscardMode } from './sparse.js';
import { MountTree, type TreeEntry } from './tree.js';
import { describeUsers, findUsers } from './users.js';

/** How often a stop that found DIR busy tries the plain unmount again. */
const RETRY_MS = 1000;
/** How long a vanished mount table entry may wait for the connection's end before it is called a lazy unmount (log only). */
const LAZY_NOTICE_MS = 200;

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
  /** Engine I/O counters for the close log (the composition root passes src/io's). */
  ioCounters?: Readonly<Record<string, number>>;
  /** --discard (mount/sparse.ts); default unmap */
  discard?: DiscardMode;
  /**
   * The files to show (mount/tree.ts), disk.raw first; default: disk.raw
   * alone. The driver passed to mount() is closed by the session; an extra
   * entry's source is closed through its own `close`.
   */
  files?: TreeEntry[];
}

/** Busy notices go to stderr too (a foreground user sees them; a daemon's stderr is /dev/null). */
function notify(msg: string): void {
  try {
    process.stderr.write(`qmount: ${msg}\n`);
  } catch {
    // no terminal any more (SIGHUP): the log has it
  }
}
// A closed terminal must not turn a notice into an uncaught error (that would abort the mount).
process.stderr.on('error', () => {});

export class MountSession {
  private readonly service: DiskService;
  private readonly files: TreeEntry[];
  private backend!: FuseBackend;
  private state: MountState = 'serving';
  private closing: Promise<number> | undefined;
  private registration: Registration | undefined;
  /** our mount in mountinfo, once mounted (the id survives a lazy unmount; the entry does not) */
  private entry: MountEntry | undefined;
  private retry: NodeJS.Timeout | undefined;
  private unmounting = false;
  private unmountedByUs = false;
  private lastUsers: string | undefined;
  private mountWatch: unknown;
  private resolveDone!: (code: number) => void;
  /** Settles with the exit code once the mount is closed, however it ended. */
  readonly done: Promise<number> = new Promise((resolve) => (this.resolveDone = resolve));

  private constructor(
    readonly mountPoint: string,
    private readonly driver: BlockDriver,
    private readonly log: Logger,
    private readonly opts: MountSessionOptions,
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
      // The image path is the mount's source (fsname): what df and mount show.
      mount: { ...opts.mount, source: driver.info().filename },
      readOnly: opts.readOnly,
      log,
      onUnmounted: (detail) => {
        if (detail) log.error({ detail }, 'the FUSE session ended');
        if (!s.closing) void s.finish('unmounted');
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
    await s.announce();
    s.service.warmUp();
    return s;
  }

  /**
   * After the mount is ready: learn our mount id, write the registry record,
   * and watch the mount table to notice a lazy unmount (for the log and `list`).
   */
  private async announce(): Promise<void> {
    this.entry = findMount(await readMounts(), this.mountPoint);
    const info = this.driver.info();
    try {
      this.registration = Registration.create({
        image: info.filename,
        format: info.format,
        mountPoint: this.mountPoint,
        mode: this.opts.readOnly ? 'ro' : 'rw',
        backend: this.backend.name,
        mountId: this.entry?.id,
        device: this.entry?.device,
      });
    } catch (err) {
      this.log.warn({ err: oneLine(err) }, 'cannot write the registry record: qmount list and qmount umount will not see this mount');
    }
    const addon = loadFuse3().addon;
    if (addon && this.entry) this.mountWatch = addon.watchMounts(() => void this.mountTableChanged());
  }

  private setState(state: MountState, users?: string): void {
    this.state = state;
    try {
      this.registration?.update({ state, users });
    } catch (err) {
      this.log.warn({ err: oneLine(err) }, 'cannot update the registry record');
    }
  }

  private async ourEntry(): Promise<MountEntry | undefined> {
    const id = this.entry?.id;
    if (id === undefined) return findMount(await readMounts(), this.mountPoint);
    return (await readMounts()).find((e) => e.id === id);
  }

  private async mountTableChanged(): Promise<void> {
    if ((this.state !== 'serving' && this.state !== 'stopping') || this.closing || this.unmountedByUs) return;
    if (await this.ourEntry()) return;
    // Gone from the table. After a plain unmount the connection ends at the same moment: give that event its turn.
    await new Promise((resolve) => setTimeout(resolve, LAZY_NOTICE_MS));
    if (this.closing || this.unmountedByUs) return;
    // Still connected: a lazy unmount (umount -l, fusermount -uz) with users left.
    const users = describeUsers(await findUsers(this.identity()));
    if (this.closing) return;
    this.log.warn({ mountPoint: this.mountPoint, users }, 'detached lazily while still in use: serving until the last user is gone');
    this.setState('detached', users);
  }

  private identity(): { mountPoint: string; mountId?: number; device?: string } {
    return { mountPoint: this.mountPoint, mountId: this.entry?.id, device: this.entry?.device };
  }

  /**
   * A signal: unmount as soon as nothing uses DIR. Never closes the image
   * itself: the close follows from the kernel ending the connection.
   */
  stop(reason: string): void {
    if (this.closing) {
      this.log.info({ reason }, 'already closing');
      return;
    }
    if (this.state === 'serving') this.log.info({ reason }, 'stopping: unmounting');
    else this.log.info({ reason }, 'still stopping: trying the unmount again');
    this.lastUsers = undefined; // say again who keeps it busy
    if (this.state === 'serving') this.setState('stopping');
    void this.tryUnmount(reason);
  }

  private async tryUnmount(reason: string): Promise<void> {
    if (this.unmounting || this.closing) return;
    this.unmounting = true;
    clearTimeout(this.retry);
    try {
      const ours = await this.ourEntry();
      if (this.closing) return;
      if (!ours) {
        // Lazily detached (or unmounted in our namespace only): nothing to unmount, wait for the connection to end.
        const users = describeUsers(await findUsers(this.identity())) ?? 'unknown users';
        if (this.unmountedByUs) {
          this.tellBusy(users, `${this.mountPoint} is unmounted here, but the kernel still has the connection (another mount namespace?); still serving it`, reason, 'detached');
          return;
        }
        this.tellBusy(users, `${this.mountPoint} was unmounted lazily and is still in use by ${users}; still serving it until the last user is gone`, reason, 'detached');
        return;
      }
      const top = findMount(await readMounts(), this.mountPoint);
      if (top && top.id !== ours.id) {
        this.tellBusy(`covered by ${top.source}`, `${this.mountPoint} is covered by another mount (${top.source}); still serving; unmount that first`, reason, 'stopping');
        this.retry = setTimeout(() => void this.tryUnmount('retry'), RETRY_MS);
        return;
      }
      try {
        await run('fusermount', ['-u', this.mountPoint]);
        this.unmountedByUs = true;
        this.log.info({ reason }, 'unmounted');
        if (this.lastUsers !== undefined) notify(`${this.mountPoint} is no longer in use: unmounted, closing the image`);
        // The kernel now ends the connection (onUnmounted); with users in other mount namespaces, once they are gone.
        return;
      } catch (err) {
        if (this.closing) return;
        const users = describeUsers(await findUsers(this.identity()));
        this.log.debug({ err: oneLine(err) }, 'plain unmount failed');
        this.tellBusy(
          users ?? 'unknown users',
          `${this.mountPoint} is still in use${users ? ` by ${users}` : ''}; still serving it. It is unmounted once nothing uses it (tried again every ${RETRY_MS / 1000} s and on the next signal)`,
          reason,
          'stopping',
        );
        this.retry = setTimeout(() => void this.tryUnmount('retry'), RETRY_MS);
      }
    } finally {
      this.unmounting = false;
    }
  }

  /** Log and print who keeps DIR busy, once per change (and again after each signal). */
  private tellBusy(users: string, message: string, reason: string, state: MountState): void {
    if (users === this.lastUsers && this.state === state) return;
    this.lastUsers = users;
    this.log.warn({ mountPoint: this.mountPoint, users, reason }, 'still in use: not unmounting yet');
    notify(message);
    this.setState(state, users);
  }

  /**
   * Explicit force (SIGUSR2, qmount umount --force): detach lazily and close
   * the image now. Users still there get errors (the kernel sees the
   * connection end), and what they write after this is lost.
   */
  forceClose(reason: string): Promise<number> {
    if (this.closing) return this.closing;
    this.log.warn({ reason, mountPoint: this.mountPoint }, 'forced close: users still there get errors and lose what they write');
    notify(`forced close of ${this.mountPoint}: whoever still uses it gets I/O errors from now on`);
    this.closing = (async () => {
      await this.unmountKernel();
      return this.closeImage('forced');
    })();
    void this.closing.then((code) => this.resolveDone(code));
    return this.closing;
  }

  /**
   * Close after a failed start (the mount may be up, nobody uses it yet).
   * `reason` 'unmounted' means the kernel already let go of the mount point.
   */
  close(reason: string): Promise<number> {
    if (this.closing) {
      this.log.warn({ reason }, 'already closing; ignored');
      return this.closing;
    }
    this.closing = (async () => {
      if (reason !== 'unmounted') await this.unmountKernel();
      return this.closeImage(reason);
    })();
    void this.closing.then((code) => this.resolveDone(code));
    return this.closing;
  }

  /** The kernel ended the connection: no request can come any more. */
  private finish(reason: string): Promise<number> {
    return this.close(reason);
  }

  private async closeImage(reason: string): Promise<number> {
    this.log.info({ reason }, 'closing');
    clearTimeout(this.retry);
    if (this.mountWatch !== undefined) loadFuse3().addon?.unwatchMounts(this.mountWatch);
    this.setState('closing');
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
    this.log.info({ stats: this.service.stats, io: this.opts.ioCounters, backend: this.backend.name, fuse: this.backend.stats() }, 'closed');
    this.state = 'closed';
    try {
      this.registration?.update({ state: 'closed', exitCode: code });
    } catch {
      // qmount umount then sees the process end without a record
    }
    return code;
  }

  /** Log the request counters so far (SIGUSR1; `npm run bench` reads them around each job). */
  logStats(): void {
    this.log.warn({ stats: this.service.stats, io: this.opts.ioCounters, backend: this.backend.name, fuse: this.backend.stats(), live: true }, 'request counters');
  }

  /** Start-up failure or force: unmount, lazily when busy (remaining requests then get errors). */
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
