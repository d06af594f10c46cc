/**
 * The fuse3 backend: native/fuse3 (libfuse 3 low-level API on the event
 * loop; see native/fuse3/qfuse.h for the design). The addon answers
 * metadata itself from the node table built here from the service's tree
 * (inode = index + 1, the numbering of mount/tree.ts) and calls `handler`
 * for data requests with the file's inode and the index of the buffer
 * holding the request; we answer with reply(slot, result) at once or when
 * the driver's promise settles.
 */
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { oneLine } from '../src/errors.js';
import type { BackendContext, FuseBackend } from './backend.js';
import { findMount, readMounts } from './mountinfo.js';
import { MAX_IO_FUSE3, fuse3OptionList, ioSizes } from './options.js';

/** One node of the addon's table (native/fuse3/session.c read_nodes). */
export interface Fuse3Node {
  /** inode of the directory holding it (the root: 1) */
  parent: number;
  name: string;
  dir: boolean;
  mode: number;
  nlink: number;
  size: number;
  blocks: number;
  readOnly: boolean;
  /** false: another file shows the same bytes, so the page cache is dropped at open */
  keepCache: boolean;
}

export interface Fuse3Attrs {
  nodes: Fuse3Node[];
  dirMode: number;
  uid: number;
  gid: number;
  readOnly: boolean;
  directIo: boolean;
  maxRead: number;
  maxWrite: number;
}

export type Fuse3Handler = (op: number, slot: number, offset: number, length: number, arg: number, ino: number) => void;

export interface Fuse3Addon {
  mount(mountPoint: string, options: string, attrs: Fuse3Attrs, buffers: number, handler: Fuse3Handler): { handle: unknown; buffers: ArrayBuffer[]; fileReplyMax: number };
  reply(handle: unknown, slot: number, result: number): void;
  /**
   * Answer a read with `length` (<= fileReplyMax) bytes of descriptor `fd`
   * at `position`, spliced (filereply.c): 0. An errno: nothing was sent and
   * the read still waits for reply().
   */
  replyFd(handle: unknown, slot: number, fd: number, position: number, length: number): number;
  /** Drop the kernel's cached pages of [offset, +length) of a file (asynchronous; inval.c). */
  invalidate(handle: unknown, ino: number, offset: number, length: number): void;
  /** New size / st_blocks of a file (getattr answers them from then on). */
  setFile(handle: unknown, ino: number, size: number, blocks: number): void;
  close(handle: unknown): void;
  stats(handle: unknown): Record<string, number>;
  watchMounts(cb: () => void): unknown;
  unwatchMounts(handle: unknown): void;
  /** Calls back once when the FUSE connection on `fd` (a /dev/fuse descriptor) has ended. */
  watchConnection(fd: number, cb: () => void): unknown;
  unwatchConnection(handle: unknown): void;
  maxIo: number;
  libfuseVersion: number;
}

/** enum qf_op in native/fuse3/qfuse.h */
export const OP = { READ: 0, WRITE: 1, FLUSH: 2, FSYNC: 3, LSEEK: 4, FALLOCATE: 5, UNMOUNTED: 6, SETSIZE: 7 } as const;
const OP_NAMES = ['read', 'write', 'flush', 'fsync', 'lseek', 'fallocate', 'unmounted', 'truncate'];

/**
 * Request buffers per mount (1 MiB + 8 KiB each, touched only when used):
 * bounds the requests in flight; receiving pauses while all are taken.
 * QMOUNT_FUSE3_BUFFERS overrides it (tests use a tiny pool).
 */
export const DEFAULT_BUFFERS = 48;

const ADDON_REL = path.join('native', 'fuse3', 'build', 'Release', 'qmount_fuse3.node');
let cached: { addon?: Fuse3Addon; why?: string } | undefined;

/** The addon, found above this module (mount/ in tests, dist/mount when built), or why not. */
export function loadFuse3(): { addon?: Fuse3Addon; why?: string } {
  if (cached) return cached;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    const candidate = path.join(dir, ADDON_REL);
    if (fs.existsSync(candidate)) {
      try {
        cached = { addon: createRequire(import.meta.url)(candidate) as Fuse3Addon };
      } catch (err) {
        cached = { why: `${ADDON_REL} cannot be loaded: ${oneLine(err)}` };
      }
      return cached;
    }
    dir = path.dirname(dir);
  }
  cached = { why: `${ADDON_REL} is not built (run: node scripts/setup.mjs; it needs libfuse3-dev and pkg-config)` };
  return cached;
}

/**
 * Reads from this many bytes up to the addon's fileReplyMax (1016 KiB with
 * the usual 1 MiB pipe limit) are answered from the image file when the
 * engine can (DiskService.send: one contiguous host range, mapped by cached
 * metadata): spliced, so the kernel copies the bytes once instead of twice
 * (a pread into our buffer, then the reply out of it). Measured against
 * pread + reply, alternating, same run: 64 KiB reads at qd8 1.35-1.39x
 * (0.74-0.83x of the no-op ceiling, from 0.6-0.7x), 18-20 µs of CPU per
 * request against 25-27; 4 KiB reads at qd16 spliced were no faster (0.99x):
 * its three system calls (the header's write and two splices) cost what the
 * copy saves, so small reads keep readNow. A 1 MiB read does not fit the
 * pipe and keeps pread. QMOUNT_SPLICE_FROM overrides it (a huge number:
 * never).
 */
const SPLICE_FROM = envInt(process.env.QMOUNT_SPLICE_FROM, 8192);

function envInt(v: string | undefined, dflt: number): number {
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : dflt;
}

function bufferCount(): number {
  return Math.min(Math.max(envInt(process.env.QMOUNT_FUSE3_BUFFERS, DEFAULT_BUFFERS), 1), 1024);
}

export class Fuse3Backend implements FuseBackend {
  readonly name = 'fuse3';
  readonly options: string;
  readonly maxIo = MAX_IO_FUSE3;
  private handle: unknown;
  private bufs: Buffer[] = [];
  private released = false;
  private unmountedSeen = false;

  constructor(
    private readonly addon: Fuse3Addon,
    private readonly ctx: BackendContext,
  ) {
    this.options = fuse3OptionList(ctx.mount, ctx.readOnly).join(',');
  }

  mount(): Promise<void> {
    const { service, mount, readOnly, mountPoint } = this.ctx;
    const { maxRead, maxWrite } = ioSizes(mount, MAX_IO_FUSE3);
    const a = service.attrs;
    const nodes: Fuse3Node[] = service.tree.nodes.map((n) => {
      if (n.kind === 'dir') {
        const st = service.dirStat(n);
        return { parent: n.parent, name: n.name, dir: true, mode: st.mode, nlink: st.nlink, size: 4096, blocks: 0, readOnly: true, keepCache: true };
      }
      const st = service.fileStat(n);
      return { parent: n.parent, name: n.name, dir: false, mode: st.mode, nlink: 1, size: st.size, blocks: st.blocks ?? 0, readOnly: n.readOnly, keepCache: !service.hasAliases(n) };
    });
    const attrs: Fuse3Attrs = { nodes, dirMode: a.dirMode, uid: a.uid, gid: a.gid, readOnly, directIo: mount.directIo, maxRead, maxWrite };
    const m = this.addon.mount(mountPoint, this.options, attrs, bufferCount(), this.handler);
    this.handle = m.handle;
    // getattr is answered in C: keep each file's size and st_blocks current (called before the request that changed them is answered).
    service.onAttrs = (f, size, blocks) => {
      if (!this.released) this.addon.setFile(this.handle, f.ino, size, blocks);
    };
    this.bufs = m.buffers.map((ab) => Buffer.from(ab));
    this.spliceTo = m.fileReplyMax;
    // With direct_io nothing is cached: nothing to invalidate.
    if (!mount.directIo) service.invalidate = (f, offset, length) => this.addon.invalidate(this.handle, f.ino, offset, length);
    return this.raiseReadahead(maxRead);
  }

  /**
   * The kernel's read-ahead for a FUSE mount starts at 128 KiB (the bdi
   * default; max_readahead only caps it). Buffered sequential readers (dd,
   * a loop device) get fewer, larger requests with it at max_read: 10-20%
   * more on a buffered dd here. Needs root; best effort, but done before
   * the mount counts as ready: a reader started right after (the benchmark's
   * dd did) otherwise ran at 128 KiB requests. The device number comes from
   * mountinfo: a stat of the mount point from this process would wait for
   * the event loop that must answer it.
   */
  private raiseReadahead(maxRead: number): Promise<void> {
    const kb = Math.floor(maxRead / 1024);
    return (async () => {
      const dev = findMount(await readMounts(), this.ctx.mountPoint)?.device;
      if (!dev) return;
      const file = `/sys/class/bdi/${dev}/read_ahead_kb`;
      if (Number(await fs.promises.readFile(file, 'utf8')) < kb) await fs.promises.writeFile(file, `${kb}\n`);
    })().catch((err: unknown) => this.ctx.log.debug({ err: oneLine(err) }, 'read-ahead not raised'));
  }

  /** The largest read answered by splicing (the addon's fileReplyMax; 0 before mount). */
  private spliceTo = 0;

  /** The sink DiskService.send reads through: the slot of the read being answered (set just before; used synchronously). */
  private readonly sink = {
    slot: 0,
    send: (fd: number, position: number, len: number): boolean => this.addon.replyFd(this.handle, this.sink.slot, fd, position, len) === 0,
  };

  private readonly handler: Fuse3Handler = (op, slot, offset, length, arg, ino) => {
    if (op === OP.UNMOUNTED) {
      if (this.unmountedSeen) return;
      this.unmountedSeen = true;
      this.ctx.onUnmounted(arg ? `reading /dev/fuse failed: errno ${arg}` : undefined);
      return;
    }
    const service = this.ctx.service;
    let r: number | Promise<number>;
    try {
      // The addon forwards only requests for file inodes of its table, which is the service's tree.
      const f = service.fileByIno(ino);
      if (f === undefined) r = service.handlerFailed(OP_NAMES[op] ?? `op ${op}`, new Error(`inode ${ino} is not a file`));
      else {
        switch (op) {
          case OP.READ:
            if (length >= SPLICE_FROM && length <= this.spliceTo) {
              this.sink.slot = slot;
              if (service.send(f, length, offset, this.sink)) return;
            }
            r = service.read(f, this.bufs[slot]!, 0, length, offset);
            break;
          case OP.WRITE: r = service.write(f, this.bufs[slot]!, arg, length, offset); break;
          case OP.FLUSH: r = service.flush(); break;
          case OP.FSYNC: r = service.fsync(f); break;
          case OP.LSEEK: r = service.lseek(f, offset, arg); break;
          case OP.FALLOCATE: r = service.fallocate(f, arg, offset, length); break;
          case OP.SETSIZE: r = service.setSize(f, offset); break;
          default: r = service.handlerFailed(`op ${op}`, new Error('unknown operation'));
        }
      }
    } catch (err) {
      r = service.handlerFailed(OP_NAMES[op] ?? `op ${op}`, err);
    }
    if (typeof r === 'number') this.addon.reply(this.handle, slot, r);
    else {
      r.then(
        (n) => this.addon.reply(this.handle, slot, n),
        (err: unknown) => this.addon.reply(this.handle, slot, service.handlerFailed(OP_NAMES[op] ?? `op ${op}`, err)),
      );
    }
  };

  release(): void {
    if (this.released || this.handle === undefined) return;
    this.released = true;
    this.ctx.service.invalidate = undefined;
    this.ctx.service.onAttrs = undefined;
    this.addon.close(this.handle);
  }

  stats(): Record<string, number> | undefined {
    return this.handle === undefined ? undefined : this.addon.stats(this.handle);
  }
}
