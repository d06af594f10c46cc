/**
 * Image locking that interoperates with QEMU.
 *
 * QEMU (block/file-posix.c) describes how a process uses an image file with
 * shared (F_RDLCK) open-file-description byte-range locks on the file itself:
 *   byte 100 + p  held: "I hold permission p"
 *   byte 200 + p  held: "I do not let others hold permission p"
 * with p the bit number of a block-layer permission: 0 consistent read,
 * 1 write, 2 write unchanged, 3 resize (4 was graph-mod, dropped in QEMU 6.2:
 * we never hold it and always share it, so bytes 104/204 are never touched).
 * Before it proceeds a process takes its own bytes, then tests with F_OFD_GETLK
 * (as an exclusive lock) that nobody holds 200 + p for a permission p it wants,
 * nor 100 + p for a permission p it does not share. Taking before testing
 * means two processes racing for the same image cannot both miss each other.
 *
 * The modes (the same bytes as QEMU 7.2's qemu-io, seen in /proc/locks; which
 * open takes which mode, and what is told about it, is the policy in
 * src/formats/image-lock.ts):
 *   'write'         holds consistent read, write, resize (100, 101, 103),
 *                   shares consistent read and write unchanged (201, 203)
 *   'read'          holds consistent read (100), shares all but write and
 *                   resize (201, 203): a reader keeps writers away
 *   'shared-read'   holds consistent read (100), shares everything (QEMU -U)
 *   'data-write'    holds consistent read, write, resize (100, 101, 103),
 *                   shares all but resize (203)
 *   'data-read'     holds consistent read (100), shares all but resize (203)
 * So a running QEMU or qmount that writes an image makes a 'write' lock
 * fail ("write" is not shared) and a 'read' one too (it would not share
 * write); 'shared-read' proceeds, seeing whatever the writer leaves on disk
 * at any moment.
 *
 * The locks belong to the image's open file description (ImageFile's fd):
 * they need no unlock call, they go when that descriptor is closed, also when
 * the process dies (SIGKILL included).
 *
 * Why a native addon: Node has no fcntl(). OFD locks are taken by fcntl on the
 * descriptor the engine reads and writes through, so they must come from this
 * process (or one sharing the descriptor); flock() would not interoperate
 * (Linux keeps flock and fcntl locks apart), and classic POSIX locks (F_SETLK)
 * are dropped when any descriptor of the file closes in the process (a backing
 * chain or `info` opening the same file again would silently unlock it).
 * native/ofd-lock is ~100 lines of C against Node-API (stable ABI across Node
 * versions), built by node-gyp from scripts/setup.mjs; if it is missing, opening
 * an image fails with a one-line message saying how to build it.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { QmountError } from '../errors.js';

const PERM_BASE = 100;
const SHARED_BASE = 200;

export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
/** The permission bits qmount speaks of (QEMU's BLK_PERM_ALL since 6.2). */
const PERM_ALL = 0xf;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

export type LockMode = 'write' | 'read' | 'shared-read' | 'data-write' | 'data-read';

interface Permissions {
  /** permissions this process holds */
  perm: number;
  /** permissions this process lets others hold */
  shared: number;
}

const MODES: Record<LockMode, Permissions> = {
  write: { perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED },
  read: { perm: PERM_CONSISTENT_READ, shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED },
  'shared-read': { perm: PERM_CONSISTENT_READ, shared: PERM_ALL },
  'data-write': { perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, shared: PERM_ALL & ~PERM_RESIZE },
  'data-read': { perm: PERM_CONSISTENT_READ, shared: PERM_ALL & ~PERM_RESIZE },
};

/** The bytes a mode holds (for tests and logs). */
export function lockBytes(mode: LockMode): number[] {
  const { perm, shared } = MODES[mode];
  const out: number[] = [];
  for (let p = 0; p < 4; p++) if (perm & (1 << p)) out.push(PERM_BASE + p);
  for (let p = 0; p < 4; p++) if (!(shared & (1 << p))) out.push(SHARED_BASE + p);
  return out;
}

interface OfdLockAddon {
  /** 0 or -errno; type 0 unlock, 1 read lock, 2 write lock */
  setLock(fd: number, start: number, length: number, type: 0 | 1 | 2): number;
  /** 0 free, 1 or 2 conflicting read/write lock elsewhere, or -errno */
  testLock(fd: number, start: number, length: number, type: 1 | 2): number;
}

const ADDON_REL = path.join('native', 'ofd-lock', 'build', 'Release', 'ofd_lock.node');
let addon: OfdLockAddon | undefined;

/** The addon, found above this module (src/io in tests, dist/src/io when built). */
function loadAddon(): OfdLockAddon {
  if (addon) return addon;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = path.join(dir, ADDON_REL);
    if (fs.existsSync(candidate)) {
      addon = createRequire(import.meta.url)(candidate) as OfdLockAddon;
      return addon;
    }
    dir = path.dirname(dir);
  }
  throw new QmountError('ENOTSUP', `image locking is unavailable: ${ADDON_REL} is not built (run: node scripts/setup.mjs)`);
}

const ERRNO_NAMES = new Map<number, string>(Object.entries(os.constants.errno).map(([name, n]) => [n, name]));
const errnoName = (rc: number): string => ERRNO_NAMES.get(-rc) ?? `errno ${-rc}`;
const E = os.constants.errno;
/** fcntl results that mean "this file system or kernel does not do OFD locks". */
const UNSUPPORTED = new Set([-E.EINVAL, -E.ENOLCK, -E.EOPNOTSUPP, -E.ENOSYS]);

export interface LockResult {
  /** false when the file system does not support locks (the image is used unlocked) */
  locked: boolean;
  /**
   * Set when another process holds the file for writing and this mode shares
   * write ('shared-read', the data-file modes): the caller proceeds, and for
   * --force-share warns that reads may be inconsistent.
   */
  inUseBy?: string;
  /** Set when locked is false: why. */
  unsupported?: string;
}

/** Processes (other than us) with the file open and a lock on `byte`, as "comm (pid N)". Best effort, for messages. */
export function lockHolders(filePath: string, byte: number): string[] {
  const out: string[] = [];
  let st: fs.Stats;
  try {
    st = fs.statSync(filePath);
  } catch {
    return out;
  }
  // glibc's dev_t encoding -> the kernel's "major:minor" in hex, as fdinfo prints it.
  const major = Math.floor(st.dev / 256) & 0xfff;
  const minor = (st.dev & 0xff) | (Math.floor(st.dev / 4096) & 0xfff00);
  const devIno = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino}`;
  let pids: string[];
  try {
    pids = fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid);
  } catch {
    return out;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${pid}/fdinfo`);
    } catch {
      continue; // gone, or not ours to see
    }
    const holds = fds.some((fd) => {
      try {
        const info = fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
        // lock:	1: OFDLCK ADVISORY  READ -1 fe:00:2162772 100 101
        return info.split('\n').some((line) => {
          const m = /^lock:\s+\d+:\s+\S+\s+\S+\s+\S+\s+\S+\s+([0-9a-f]+:[0-9a-f]+:\d+)\s+(\d+)\s+(\d+|EOF)/.exec(line);
          return m !== null && m[1] === devIno && Number(m[2]) <= byte && (m[3] === 'EOF' || Number(m[3]) >= byte);
        });
      } catch {
        return false;
      }
    });
    if (holds) {
      out.push(`${processName(pid)} (pid ${pid})`);
      if (out.length >= 3) break;
    }
  }
  return out;
}

/** "qmount" for a qmount process (its comm is "node"), else the command name. */
function processName(pid: string): string {
  try {
    const args = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    if (args.slice(0, 3).some((a) => /(^|\/)qmount$|\/src\/cli\.js$/.test(a))) return 'qmount';
    return fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '?'; // gone meanwhile
  }
}

function byWhom(filePath: string, byte: number): string {
  const holders = lockHolders(filePath, byte);
  return holders.length > 0 ? holders.join(', ') : 'another process';
}

/**
 * Lock an open image file for `mode` (see the table at the top). Throws a
 * one-line QmountError(EBUSY) naming the conflict when another process's
 * locks forbid it; our own bytes are released again before throwing.
 * `name` is the image as the user named it (for messages).
 */
export function lockImageFile(fd: number, filePath: string, name: string, mode: LockMode): LockResult {
  const lib = loadAddon();
  const { perm, shared } = MODES[mode];
  const taken: number[] = [];
  const release = (): void => {
    for (const b of taken) lib.setLock(fd, b, 1, 0);
  };
  for (const byte of lockBytes(mode)) {
    const rc = lib.setLock(fd, byte, 1, 1);
    if (rc === 0) {
      taken.push(byte);
      continue;
    }
    release();
    if (UNSUPPORTED.has(rc)) return { locked: false, unsupported: errnoName(rc) };
    // A shared lock fails only when someone holds the byte exclusively: not QEMU nor qmount, but still a conflict.
    throw new QmountError('EBUSY', `${name}: cannot lock byte ${byte} of the image (${errnoName(rc)}); is another process using it?`);
  }

  const test = (byte: number): number => {
    const rc = lib.testLock(fd, byte, 1, 2);
    if (rc < 0 && !UNSUPPORTED.has(rc)) {
      release();
      throw new QmountError('EIO', `${name}: cannot test the image's locks (${errnoName(rc)})`);
    }
    return rc > 0 ? rc : 0;
  };
  // Permissions we want that someone does not share.
  for (let p = 0; p < 4; p++) {
    if (!(perm & (1 << p)) || !test(SHARED_BASE + p)) continue;
    release();
    const who = byWhom(filePath, SHARED_BASE + p);
    if (p === 1) {
      throw new QmountError('EBUSY', `${name}: image is in use by ${who}, which does not allow writers; cannot open it read-write`);
    }
    throw new QmountError('EBUSY', `${name}: image is in use by ${who}, which does not share "${PERM_NAMES[p]}" access`);
  }
  // Permissions someone holds that we do not share.
  let writer: string | undefined;
  for (let p = 0; p < 4; p++) {
    if (!test(PERM_BASE + p)) continue;
    if (shared & (1 << p)) {
      if (p === 1) writer = byWhom(filePath, PERM_BASE + p);
      continue;
    }
    release();
    const who = byWhom(filePath, PERM_BASE + p);
    const what = p === 1 ? 'is writing it' : `holds "${PERM_NAMES[p]}" access`;
    if (mode === 'write') throw new QmountError('EBUSY', `${name}: image is in use by ${who}, which ${what}; cannot open it read-write`);
    throw new QmountError(
      'EBUSY',
      `${name}: image is in use by ${who}, which ${what}; to read it anyway, open it read-only with --force-share (the data may be inconsistent)`,
    );
  }
  return writer ? { locked: true, inUseBy: writer } : { locked: true };
}
