/**
 * The fuse-native backend (libfuse 2.9): the package qmount started from,
 * kept as the fallback where native/fuse3 cannot be built or loaded.
 * fuse-native's threads hand each request to the event loop; the ops below
 * pass them to the DiskService. libfuse 2 says nothing when the kernel
 * drops the connection, so we watch its /dev/fuse descriptor ourselves:
 * through native/fuse3's watchConnection (POLLERR on a dup of the fd: the
 * kernel ended the connection) when that addon loads, else by checking
 * every POLL_MS that libfuse still has the fd open (its loop closes it when
 * reading returns ENODEV). Not the mount table: after a lazy unmount the
 * mount point is gone while a loop device or an open file can still send
 * requests.
 *
 * Sparse files here: st_blocks (getattr asks the service each time) and
 * truncate/ftruncate (resize) work. lseek and fallocate do not: fuse-native
 * has no such ops, so the kernel gets ENOSYS and SEEK_DATA/SEEK_HOLE see one
 * data extent (SEEK_HOLE finds the end), and fallocate(2), `fallocate -p`,
 * fstrim through a loop device fail with EOPNOTSUPP (the kernel turns ENOSYS
 * into that and asks no more). Use the fuse3 backend for them.
 */
import fs from 'node:fs';
import Fuse, { type FuseOps, type FuseStat } from 'fuse-native';
import { QmountError } from '../src/errors.js';
import type { BackendContext, FuseBackend } from './backend.js';
import { loadFuse3 } from './backend-fuse3.js';
import { MAX_IO_FUSE_NATIVE, fuseOptionList } from './options.js';
import type { DiskService, Stat } from './service.js';

const POLL_MS = 500;

/** This process's descriptors open on /dev/fuse. */
function fuseFds(): Set<number> {
  const out = new Set<number>();
  for (const name of fs.readdirSync('/proc/self/fd')) {
    try {
      if (fs.readlinkSync(`/proc/self/fd/${name}`) === '/dev/fuse') out.add(Number(name));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

/** fuse-native mounts of this process, one at a time: the new /dev/fuse fd tells which is ours. */
let mountQueue: Promise<unknown> = Promise.resolve();

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

const asFuseStat = (s: Stat): FuseStat => s;

function answer(cb: (r: number) => void, r: number | Promise<number>, service: DiskService, op: string): void {
  if (typeof r === 'number') cb(r);
  else r.then(cb, (err: unknown) => cb(service.handlerFailed(op, err)));
}

/**
 * fuse-native's ops over a DiskService (fuse-native's Buffers are views of
 * FUSE's memory: no copies). Requests name a path: each data op finds its
 * MountFile by path (a Map lookup), ENOENT/EISDIR when there is none.
 */
export function fuseNativeOps(service: DiskService): FuseOps {
  const stat = (path: string, cb: (code: number, st?: FuseStat) => void) => {
    const r = service.getattr(path);
    if (typeof r === 'number') cb(r);
    else cb(0, asFuseStat(r));
  };
  return {
    getattr: (path, cb) => stat(path, cb),
    fgetattr: (path, _fd, cb) => stat(path, cb),
    readdir: (path, cb) => {
      const r = service.readdir(path);
      return typeof r === 'number' ? cb(r) : cb(0, r);
    },
    statfs: (_path, cb) => {
      const blocks = Math.min(Math.ceil(service.size / 4096), 0xffffffff);
      cb(0, { bsize: 4096, frsize: 4096, blocks, bfree: 0, bavail: 0, files: service.tree.nodes.length, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255 });
    },
    open: (path, flags, cb) => {
      const r = service.open(path, flags);
      return r < 0 ? cb(r) : cb(0, 0);
    },
    release: (_path, _fd, cb) => cb(0),
    flush: (_path, _fd, cb) => cb(service.flush()),
    read: (path, _fd, buf, len, pos, cb) => {
      const f = service.file(path);
      if (typeof f === 'number') return cb(f);
      answer(cb, service.read(f, buf, 0, len, pos), service, 'read');
    },
    write: (path, _fd, buf, len, pos, cb) => {
      const f = service.file(path);
      if (typeof f === 'number') return cb(f);
      answer(cb, service.write(f, buf, 0, len, pos), service, 'write');
    },
    fsync: (path, _datasync, _fd, cb) => {
      const f = service.file(path);
      if (typeof f === 'number') return cb(0);
      answer(cb, service.fsync(f), service, 'fsync');
    },
    truncate: (path, size, cb) => answer(cb, service.truncate(path, size), service, 'truncate'),
    ftruncate: (path, _fd, size, cb) => answer(cb, service.truncate(path, size), service, 'truncate'),
    utimens: (path, _atime, _mtime, cb) => cb(service.utimens(path)),
    chmod: (_path, _mode, cb) => cb(service.chmod()),
    chown: (_path, _uid, _gid, cb) => cb(service.chmod()),
  };
}

export class FuseNativeBackend implements FuseBackend {
  readonly name = 'fuse-native';
  readonly options: string;
  readonly maxIo = MAX_IO_FUSE_NATIVE;
  private readonly fuse: QmountFuse;
  private watch: unknown;
  private poll: NodeJS.Timeout | undefined;
  private fd = -1;
  private gone = false;

  constructor(private readonly ctx: BackendContext) {
    // kernel_cache keeps pages across opens; with files showing the same bytes (pN.raw in disk.raw) a
    // write through one would leave the other's pages stale, so then each open drops them (libfuse 2's default).
    const aliased = ctx.service.tree.files().some((f) => ctx.service.hasAliases(f));
    const options = fuseOptionList(ctx.mount, ctx.readOnly).filter((o) => !(aliased && o === 'kernel_cache'));
    this.fuse = new QmountFuse(ctx.mountPoint, fuseNativeOps(ctx.service), options);
    this.options = this.fuse._fuseOptions();
  }

  mount(): Promise<void> {
    const p = mountQueue.then(() => this.mountAndFindFd());
    mountQueue = p.catch(() => {});
    return p;
  }

  private async mountAndFindFd(): Promise<void> {
    const before = fuseFds();
    await new Promise<void>((resolve, reject) => {
      this.fuse.mount((err) => (err ? reject(err) : resolve()));
    });
    const fresh = [...fuseFds()].filter((fd) => !before.has(fd));
    if (fresh.length !== 1) throw new QmountError('EIO', `cannot tell which /dev/fuse descriptor is this mount's (${fresh.length} new)`);
    this.fd = fresh[0]!;
    const addon = loadFuse3().addon;
    if (addon) this.watch = addon.watchConnection(this.fd, () => this.ended());
    else this.poll = setInterval(() => this.check(), POLL_MS);
  }

  private check(): void {
    let link = '';
    try {
      link = fs.readlinkSync(`/proc/self/fd/${this.fd}`);
    } catch {
      // closed: libfuse's loop ended
    }
    if (link !== '/dev/fuse') this.ended();
  }

  private ended(): void {
    if (this.gone) return;
    this.gone = true;
    this.stopWatching();
    this.ctx.onUnmounted();
  }

  private stopWatching(): void {
    clearInterval(this.poll);
    if (this.watch !== undefined) {
      loadFuse3().addon?.unwatchConnection(this.watch);
      this.watch = undefined;
    }
  }

  release(): void {
    this.gone = true;
    this.stopWatching();
  }

  stats(): undefined {
    return undefined;
  }
}
