/**
 * fallocate(2) and lseek(2) SEEK_DATA/SEEK_HOLE through native/fileops (Node
 * has neither). Knows file descriptors and byte offsets, nothing of images;
 * src/io/file.ts (ImageFile) is the only caller in the engine.
 *
 * - Errors are thrown (rejected, for fallocate) as Node-style errors with
 *   `code` set to the errno name (EOPNOTSUPP, ENOSPC, EBADF, ...), so
 *   file.ts turns them into IoErrors exactly like the fs module's errors.
 * - Without the addon (not built): available() is false and every call
 *   fails with QmountError ENOTSUP saying how to build it. ImageFile answers
 *   "cannot punch" (false) then, and raw block status treats the file as all
 *   data: qmount works, images just do not shrink.
 * - fallocate comes both ways: on libuv's thread pool (napi async work) and
 *   synchronous. A 64 KiB punch on ext4 takes ~12 µs inline and ~95 µs
 *   through the pool (measured), but it journals extent changes and may wait
 *   for the disk, so ImageFile picks per call with its InlinePolicy, as for
 *   writes. lseek is synchronous only: it reads the extent tree the kernel
 *   holds for an open file (~1 µs per call measured, fragmented file too).
 * - isZero: a one-pass zero test of a buffer range (the addon's AVX2 test of
 *   256-byte blocks), for --detect-zeroes; callers keep a plain JavaScript
 *   test for small ranges (where the call costs more than it saves) and for
 *   when the addon is missing.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { QmountError } from '../errors.js';

interface FileOpsAddon {
  /** 0 or -errno */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number>;
  fallocateSync(fd: number, mode: number, offset: number, length: number): number;
  /** the offset found, or -errno (-ENXIO: none at or after offset) */
  lseek(fd: number, offset: number, whence: number): number;
  isZero(buf: Buffer, offset: number, length: number): boolean;
  constants: { PUNCH_HOLE: number; KEEP_SIZE: number; ZERO_RANGE: number; SEEK_DATA: number; SEEK_HOLE: number };
}

const ADDON_REL = path.join('native', 'fileops', 'build', 'Release', 'fileops.node');
let addon: FileOpsAddon | null | undefined;

/** The addon, found above this module (src/io in tests, dist/src/io when built); null when not built. */
function load(): FileOpsAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = path.join(dir, ADDON_REL);
    if (fs.existsSync(candidate)) {
      addon = createRequire(import.meta.url)(candidate) as FileOpsAddon;
      break;
    }
    dir = path.dirname(dir);
  }
  return addon;
}

function need(): FileOpsAddon {
  const a = load();
  if (!a) throw new QmountError('ENOTSUP', `hole punching and SEEK_DATA/SEEK_HOLE are unavailable: ${ADDON_REL} is not built (run: node scripts/setup.mjs)`);
  return a;
}

/** Is the native addon loaded? */
export function fileOpsAvailable(): boolean {
  return load() !== null;
}

const ERRNO_NAMES = new Map<number, string>(Object.entries(os.constants.errno).map(([name, n]) => [n, name]));

/** A Node-style system error for -errno `rc` (what fs would throw). */
function sysErr(rc: number, call: string): Error & { code: string; errno: number; syscall: string } {
  const code = ERRNO_NAMES.get(-rc) ?? `E${-rc}`;
  const err = new Error(`${code}: ${call}`) as Error & { code: string; errno: number; syscall: string };
  err.code = code;
  err.errno = rc;
  err.syscall = call.split(' ')[0];
  return err;
}

export type FallocateMode = 'punch' | 'zero' | 'allocate';

function modeBits(a: FileOpsAddon, mode: FallocateMode): number {
  const c = a.constants;
  if (mode === 'punch') return c.PUNCH_HOLE | c.KEEP_SIZE;
  if (mode === 'zero') return c.ZERO_RANGE | c.KEEP_SIZE;
  return 0;
}

/**
 * fallocate(fd, mode, offset, length), length > 0:
 *  - 'punch': PUNCH_HOLE|KEEP_SIZE: deallocate, reads give zeros, size kept;
 *  - 'zero': ZERO_RANGE|KEEP_SIZE: reads give zeros, space stays allocated;
 *  - 'allocate': mode 0: allocate space, the file grows to offset + length.
 * Rejects with the errno (EOPNOTSUPP where the file system cannot).
 */
export async function fallocate(fd: number, mode: FallocateMode, offset: number, length: number): Promise<void> {
  const a = need();
  const rc = await a.fallocate(fd, modeBits(a, mode), offset, length);
  if (rc < 0) throw sysErr(rc, `fallocate ${mode} [${offset}, +${length})`);
}

/** fallocate on the calling thread (tests, and callers that measured it cheap). */
export function fallocateSync(fd: number, mode: FallocateMode, offset: number, length: number): void {
  const a = need();
  const rc = a.fallocateSync(fd, modeBits(a, mode), offset, length);
  if (rc < 0) throw sysErr(rc, `fallocate ${mode} [${offset}, +${length})`);
}

/**
 * lseek(fd, offset, SEEK_DATA | SEEK_HOLE): the first data byte / hole byte
 * at or after `offset`; null for ENXIO (no data at or after offset, or
 * offset at or past the end of file; the end of file counts as a hole, so
 * SEEK_HOLE below the end never gives null). Other errors are thrown.
 */
export function seek(fd: number, offset: number, what: 'data' | 'hole'): number | null {
  const a = need();
  const rc = a.lseek(fd, offset, what === 'data' ? a.constants.SEEK_DATA : a.constants.SEEK_HOLE);
  if (rc >= 0) return rc;
  if (rc === -os.constants.errno.ENXIO) return null;
  throw sysErr(rc, `lseek SEEK_${what.toUpperCase()} at ${offset}`);
}

/** The addon's zero test of buf[offset, +length), or null when the addon is not built. */
export function nativeZeroTest(): ((buf: Buffer, offset: number, length: number) => boolean) | null {
  const a = load();
  return a ? a.isZero.bind(a) : null;
}
