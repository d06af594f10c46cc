/**
 * What getattr shows of a mount's files and directories: owner, modes,
 * sizes, times. The fuse3 addon answers getattr in C from a node table
 * built from these same values (mount/backend-fuse3.ts), so this is the one
 * place the rules are written:
 * - modes follow from the mount options: 0600 / 0700 (0644 / 0755 with
 *   allow_other), or 0666 / 0777 less `umask`; a file is never executable;
 * - a read-only file in a writable mount (a snapshot, damage.json) shows no
 *   write bits;
 * - owner: -o uid/gid, else the server's own;
 * - a file's times are its last change through the mount, a directory's the
 *   mount's start; st_blocks = ceil(allocatedBytes / 512) (mount/sparse.ts).
 */
import { blocksOf } from './sparse.js';
import type { MountDir, MountFile } from './tree.js';

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;

/** Shown owner and modes (per file: the read-only files lose the write bits, see fileModeOf()). */
export interface FileAttrs {
  /** disk.raw's size (the first file's): statfs reports it */
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

/** The mount options attributes follow from (DiskServiceOptions has them). */
export interface AttrOptions {
  allowOther: boolean;
  uid?: number;
  gid?: number;
  /** octal, as given to -o umask */
  umask?: string;
}

/** The attributes a mount shows, its first file `size` bytes long. */
export function shownAttrs(opts: AttrOptions, size: number): FileAttrs {
  let fileMode = S_IFREG | (opts.allowOther ? 0o644 : 0o600);
  let dirMode = S_IFDIR | (opts.allowOther ? 0o755 : 0o700);
  if (opts.umask !== undefined) {
    const mask = parseInt(opts.umask, 8);
    fileMode = S_IFREG | (0o666 & ~mask); // disk.raw is never executable
    dirMode = S_IFDIR | (0o777 & ~mask);
  }
  return {
    size,
    fileMode,
    dirMode,
    uid: opts.uid ?? process.getuid?.() ?? 0,
    gid: opts.gid ?? process.getgid?.() ?? 0,
  };
}

function fileModeOf(a: FileAttrs, f: MountFile, mountReadOnly: boolean): number {
  return f.readOnly && !mountReadOnly ? a.fileMode & ~0o222 : a.fileMode;
}

export function fileStatOf(a: FileAttrs, f: MountFile, mountReadOnly: boolean): Stat {
  return {
    ...a, size: f.source.virtualSize, mode: fileModeOf(a, f, mountReadOnly), nlink: 1, blksize: 65536,
    blocks: blocksOf(f.source), atime: f.mtime, mtime: f.mtime, ctime: f.mtime,
  };
}

export function dirStatOf(a: FileAttrs, d: MountDir, startTime: number): Stat {
  let subdirs = 0;
  for (const c of d.children.values()) if (c.kind === 'dir') subdirs++;
  return { ...a, mode: a.dirMode, size: 4096, nlink: 2 + subdirs, atime: startTime, mtime: startTime, ctime: startTime };
}
