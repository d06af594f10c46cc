/**
 * The files a mount shows: a small static tree built once at mount time
 * (directories and regular files, nothing created or removed later).
 *
 *   const tree = MountTree.build([
 *     { path: 'disk.raw', source: driver },
 *     { path: 'p1.raw', source: slice, viewOf: { base: driver, offset: slice.start } },
 *     { path: 'snapshots/NAME.raw', source: snapDriver, close: () => snapDriver.close() },
 *     { path: 'damage.json', content: Buffer.from(json) },
 *   ], { readOnly });
 *
 * Rules (the one place they are written):
 * - Paths are relative, '/'-separated; every component is 1..255 bytes, not
 *   '.' or '..', without NUL. Directories are implied by the paths (no
 *   empty directories); a name may not be both a file and a directory, and
 *   no path may repeat. At most MAX_NODES nodes. Violations are EINVAL: the
 *   composition root built a bad list (a bug, or a name it did not escape).
 * - Inode numbers: the root is 1, then every node in order of first mention
 *   (a file's parent directories before it). The fuse3 addon gets the nodes
 *   in this order and numbers them the same way (index + 1).
 * - A file is read-only when the mount is, when its source is, or always
 *   for `content` files.
 * - `viewOf` says the file shows bytes of another source from `offset` on
 *   (a partition of disk.raw): a write through one must drop the other's
 *   cached pages (see DiskService.aliasesOf and native/fuse3's invalidation).
 */
import { QmountError } from '../src/errors.js';
import type { BlockDriver, BlockExtent } from '../src/formats/driver.js';

/** What a file's bytes come from: the data half of the BlockDriver contract (same rules, same errnos). */
export type FileSource = Pick<
  BlockDriver,
  'virtualSize' | 'readOnly' | 'read' | 'write' | 'readNow' | 'writeNow' | 'sendNow' | 'flush' | 'blockStatus' | 'writeZeroes' | 'resize' | 'allocatedBytes'
>;

export type TreeEntry =
  | {
      path: string;
      source: FileSource;
      /** This file shows `base`'s bytes from `offset` on (a partition of disk.raw). */
      viewOf?: { base: FileSource; offset: number };
      /** Called by the session once requests have drained (before disk.raw's driver closes). */
      close?: () => Promise<void>;
    }
  | { path: string; content: Buffer };

export const MAX_NODES = 4096;
const MAX_NAME_BYTES = 255;

export interface MountDir {
  readonly kind: 'dir';
  readonly ino: number;
  /** '/' for the root, else '/a/b' */
  readonly path: string;
  readonly name: string;
  readonly parent: number;
  readonly children: Map<string, MountNode>;
}

export interface MountFile {
  readonly kind: 'file';
  readonly ino: number;
  /** '/disk.raw', '/snapshots/x.raw' */
  readonly path: string;
  readonly name: string;
  readonly parent: number;
  readonly source: FileSource;
  readonly readOnly: boolean;
  readonly viewOf?: { base: FileSource; offset: number };
  readonly close?: () => Promise<void>;
  /** ms since the epoch; set at mount and by every completed write */
  mtime: number;
}

export type MountNode = MountDir | MountFile;

/** A fixed byte buffer as a read-only FileSource (damage.json and the like). */
export class BufferSource implements FileSource {
  readonly readOnly = true;
  constructor(private readonly bytes: Buffer) {}
  get virtualSize(): number {
    return this.bytes.length;
  }
  read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    if (!(Number.isSafeInteger(guestOffset) && Number.isSafeInteger(length) && guestOffset >= 0 && length >= 0) || guestOffset + length > this.bytes.length) {
      return Promise.reject(new QmountError('EINVAL', `read [${guestOffset}, +${length}) outside a ${this.bytes.length}-byte file`));
    }
    this.bytes.copy(buf, bufOffset, guestOffset, guestOffset + length);
    return Promise.resolve();
  }
  write(): Promise<void> {
    return Promise.reject(new QmountError('EROFS', 'a fixed file is read-only'));
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    return Promise.resolve(length === 0 ? [] : [{ guestOffset, length, data: true, zero: false, present: true, depth: 0 }]);
  }
  writeZeroes(): Promise<void> {
    return this.write();
  }
  resize(): Promise<void> {
    return this.write();
  }
  allocatedBytes(): number {
    return this.bytes.length;
  }
}

function bad(path: string, why: string): QmountError {
  return new QmountError('EINVAL', `mount tree: ${JSON.stringify(path)}: ${why}`);
}

export class MountTree {
  /** index = ino - 1 */
  readonly nodes: MountNode[] = [];
  readonly root: MountDir;
  private readonly byPathMap = new Map<string, MountNode>();

  private constructor(now: number) {
    this.root = { kind: 'dir', ino: 1, path: '/', name: '', parent: 1, children: new Map() };
    this.nodes.push(this.root);
    this.byPathMap.set('/', this.root);
    this.startTime = now;
  }

  readonly startTime: number;

  static build(entries: readonly TreeEntry[], opts: { readOnly: boolean; now?: number }): MountTree {
    const now = opts.now ?? Date.now();
    const t = new MountTree(now);
    for (const e of entries) t.add(e, opts.readOnly, now);
    return t;
  }

  private add(e: TreeEntry, mountReadOnly: boolean, now: number): void {
    const parts = e.path.split('/');
    for (const p of parts) {
      if (p === '' || p === '.' || p === '..') throw bad(e.path, 'empty, "." or ".." component (paths are relative, no leading or doubled "/")');
      if (p.includes('\0')) throw bad(e.path, 'NUL in a name');
      if (Buffer.byteLength(p) > MAX_NAME_BYTES) throw bad(e.path, `a name longer than ${MAX_NAME_BYTES} bytes`);
    }
    let dir = this.root;
    for (let i = 0; i < parts.length - 1; i++) {
      const existing = dir.children.get(parts[i]!);
      if (existing?.kind === 'file') throw bad(e.path, `${existing.path} is a file`);
      if (existing) {
        dir = existing;
        continue;
      }
      const path = `${dir.path === '/' ? '' : dir.path}/${parts[i]!}`;
      const d: MountDir = { kind: 'dir', ino: this.nextIno(e.path), path, name: parts[i]!, parent: dir.ino, children: new Map() };
      this.insert(dir, d);
      dir = d;
    }
    const name = parts[parts.length - 1]!;
    if (dir.children.has(name)) throw bad(e.path, 'appears twice (or is also a directory)');
    const path = `${dir.path === '/' ? '' : dir.path}/${name}`;
    const ino = this.nextIno(e.path);
    const f: MountFile =
      'content' in e
        ? { kind: 'file', ino, path, name, parent: dir.ino, source: new BufferSource(e.content), readOnly: true, mtime: now }
        : {
            kind: 'file', ino, path, name, parent: dir.ino, source: e.source, readOnly: mountReadOnly || e.source.readOnly,
            viewOf: e.viewOf, close: e.close, mtime: now,
          };
    this.insert(dir, f);
  }

  private nextIno(path: string): number {
    if (this.nodes.length >= MAX_NODES) throw bad(path, `more than ${MAX_NODES} files and directories`);
    return this.nodes.length + 1;
  }

  private insert(dir: MountDir, n: MountNode): void {
    dir.children.set(n.name, n);
    this.nodes.push(n);
    this.byPathMap.set(n.path, n);
  }

  /** The node at an absolute path ('/', '/disk.raw'), as the fuse-native backend gets them. */
  byPath(path: string): MountNode | undefined {
    return this.byPathMap.get(path);
  }

  byIno(ino: number): MountNode | undefined {
    return this.nodes[ino - 1];
  }

  files(): MountFile[] {
    return this.nodes.filter((n): n is MountFile => n.kind === 'file');
  }
}
