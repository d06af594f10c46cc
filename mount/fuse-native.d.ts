/**
 * The part of fuse-native (2.2.x, CommonJS, untyped) that qmount uses.
 * Callback convention: cb(result) where result is 0 / a byte count on
 * success and a negative errno on failure; getattr-like ops take
 * cb(result, value).
 */
declare module 'fuse-native' {
  export interface FuseStat {
    mode: number;
    uid: number;
    gid: number;
    size: number;
    nlink?: number;
    blksize?: number;
    blocks?: number;
    atime: Date | number;
    mtime: Date | number;
    ctime: Date | number;
  }

  export interface FuseStatfs {
    bsize: number;
    frsize: number;
    blocks: number;
    bfree: number;
    bavail: number;
    files: number;
    ffree: number;
    favail: number;
    fsid: number;
    flag: number;
    namemax: number;
  }

  export type Cb = (result: number) => void;

  export interface FuseOps {
    init?(cb: Cb): void;
    getattr?(path: string, cb: (result: number, stat?: FuseStat) => void): void;
    fgetattr?(path: string, fd: number, cb: (result: number, stat?: FuseStat) => void): void;
    readdir?(path: string, cb: (result: number, names?: string[]) => void): void;
    statfs?(path: string, cb: (result: number, statfs?: FuseStatfs) => void): void;
    open?(path: string, flags: number, cb: (result: number, fd?: number) => void): void;
    read?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: Cb): void;
    write?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: Cb): void;
    release?(path: string, fd: number, cb: Cb): void;
    flush?(path: string, fd: number, cb: Cb): void;
    /** Argument order as fuse-native 2.2.6 really calls it (its README says fd, datasync). */
    fsync?(path: string, datasync: number, fd: number, cb: Cb): void;
    truncate?(path: string, size: number, cb: Cb): void;
    ftruncate?(path: string, fd: number, size: number, cb: Cb): void;
    utimens?(path: string, atime: number, mtime: number, cb: Cb): void;
    chmod?(path: string, mode: number, cb: Cb): void;
    chown?(path: string, uid: number, gid: number, cb: Cb): void;
  }

  export interface FuseOptions {
    /** false: never answer a slow request by timeout. */
    timeout?: number | false;
    debug?: boolean;
    allowOther?: boolean;
    allowRoot?: boolean;
    defaultPermissions?: boolean;
    maxRead?: number;
    fsname?: string;
    subtype?: string;
    kernelCache?: boolean;
    umask?: string;
    uid?: number;
    gid?: number;
  }

  class Fuse {
    constructor(mnt: string, ops: FuseOps, opts?: FuseOptions);
    readonly mnt: string;
    readonly opts: FuseOptions;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    /** The "-o a,b,c" argument handed to libfuse ('' for none). */
    _fuseOptions(): string;
  }
  export default Fuse;
}
