/**
 * FUSE mount options: the user's `-o` list checked against an allow-list,
 * plus the options qmount always sets. No format knowledge here.
 *
 * Generic mount options are accepted as sshfs accepts them, because
 * mount(8) and mount.fuse pass them on (`mount -t fuse.qmount`, fstab,
 * systemd): mount.fuse adds `dev,suid` as root and passes atime and sync
 * flags; someone calling qmount directly may copy `nofail`, `_netdev`,
 * `noauto`, `x-systemd.*` from an fstab line. `ro`/`rw` apply; the rest is
 * accepted and ignored: qmount always mounts nosuid,nodev, its one file is
 * never executable, and FUSE keeps no atimes of its own.
 */
import { QmountError } from '../src/errors.js';

/**
 * Largest request per backend: libfuse 2 (fuse-native) caps max_write at its
 * 128 KiB receive buffer and the kernel's read requests at 32 pages; the
 * fuse3 backend negotiates max_pages for 1 MiB (native/fuse3/qfuse.h).
 */
export const MAX_IO_FUSE_NATIVE = 128 * 1024;
export const MAX_IO_FUSE3 = 1024 * 1024;
/** The largest -o max_read/max_write accepted (fuse-native clamps to its own). */
export const MAX_IO = MAX_IO_FUSE3;
const MIN_IO = 4096;

export interface MountOptions {
  allowOther: boolean;
  allowRoot: boolean;
  defaultPermissions: boolean;
  /** `-o ro`: same as --read-only. */
  readOnly: boolean;
  /** Bypass the kernel page cache (every read/write goes to qmount). */
  directIo: boolean;
  /** -o max_read/max_write; undefined: the backend's largest. */
  maxRead?: number;
  maxWrite?: number;
  uid?: number;
  gid?: number;
  /** octal string, e.g. "022" */
  umask?: string;
  /** The mount's source (fsname) shown by df and mount: the image path, set by the session. */
  source?: string;
}

export function defaultMountOptions(): MountOptions {
  return {
    allowOther: false,
    allowRoot: false,
    defaultPermissions: false,
    readOnly: false,
    directIo: false,
  };
}

/** Options a user may pass with -o (besides the generic ones below); anything else is refused (EINVAL). */
export const ALLOWED_OPTIONS = [
  'allow_other', 'allow_root', 'default_permissions', 'ro', 'rw', 'direct_io',
  'max_read=N', 'max_write=N', 'uid=N', 'gid=N', 'umask=OCTAL',
] as const;

/** Generic mount(8) / mount.fuse / fstab options: accepted and ignored (see the top of this file). */
export const IGNORED_OPTIONS = new Set([
  'defaults', 'auto', 'noauto', 'user', 'nouser', 'users', 'owner', 'group', 'nofail', '_netdev', 'netdev',
  'dev', 'nodev', 'suid', 'nosuid', 'exec', 'noexec', 'async', 'sync', 'dirsync',
  'atime', 'noatime', 'diratime', 'nodiratime', 'relatime', 'norelatime', 'strictatime', 'nostrictatime',
  'lazytime', 'nolazytime', 'iversion', 'noiversion', 'mand', 'nomand', 'silent', 'loud', 'symfollow', 'nosymfollow',
]);

/** Generic options with a value, and systemd's and other tools' x-* options (userspace only). */
function ignoredWithValue(name: string): boolean {
  return name.startsWith('x-') || name === 'comment' || name === 'context' || name === 'fscontext' || name === 'defcontext' || name === 'rootcontext';
}

function bad(message: string): QmountError {
  return new QmountError('EINVAL', message);
}

function intValue(name: string, value: string | undefined, min: number, max: number): number {
  if (value === undefined || !/^\d+$/.test(value)) throw bad(`-o ${name} needs a number`);
  const n = Number(value);
  if (n < min || n > max) throw bad(`-o ${name}=${value} is out of range (${min}..${max})`);
  return n;
}

/** Parse the -o lists (each "a,b=c"); throws a one-line QmountError(EINVAL) on anything unknown. */
export function parseMountOptions(lists: string[]): MountOptions {
  const o = defaultMountOptions();
  for (const list of lists) {
    for (const raw of list.split(',')) {
      const item = raw.trim();
      if (item === '') continue;
      const eq = item.indexOf('=');
      const name = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? undefined : item.slice(eq + 1);
      const flag = (): true => {
        if (value !== undefined) throw bad(`-o ${name} takes no value`);
        return true;
      };
      switch (name) {
        case 'allow_other': o.allowOther = flag(); break;
        case 'allow_root': o.allowRoot = flag(); break;
        case 'default_permissions': o.defaultPermissions = flag(); break;
        case 'ro': o.readOnly = flag(); break;
        case 'rw': flag(); break;
        case 'direct_io': o.directIo = flag(); break;
        case 'max_read': o.maxRead = intValue(name, value, MIN_IO, MAX_IO); break;
        case 'max_write': o.maxWrite = intValue(name, value, MIN_IO, MAX_IO); break;
        case 'uid': o.uid = intValue(name, value, 0, 0xffffffff); break;
        case 'gid': o.gid = intValue(name, value, 0, 0xffffffff); break;
        case 'umask':
          if (value === undefined || !/^[0-7]{1,4}$/.test(value)) throw bad('-o umask needs an octal number');
          o.umask = value;
          break;
        default:
          if ((IGNORED_OPTIONS.has(name) && value === undefined) || ignoredWithValue(name)) break;
          throw bad(`unknown mount option "${name}" (allowed: ${ALLOWED_OPTIONS.join(', ')}, and generic mount options such as nofail, noatime, nosuid, which are ignored)`);
      }
    }
  }
  if (o.allowOther && o.allowRoot) throw bad('-o allow_other and allow_root cannot be combined');
  return o;
}

/**
 * fsname=SOURCE: libfuse splits its option list at commas and takes a
 * backslash as escape (both libfuse 2 and 3), so escape those two.
 */
function fsnameOption(o: MountOptions): string {
  const source = o.source ?? 'qmount';
  return `fsname=${source.replace(/[\\,]/g, (c) => `\\${c}`)}`;
}

/** max_read/max_write a backend uses: the user's, capped at the backend's largest. */
export function ioSizes(o: MountOptions, maxIo: number): { maxRead: number; maxWrite: number } {
  return { maxRead: Math.min(o.maxRead ?? maxIo, maxIo), maxWrite: Math.min(o.maxWrite ?? maxIo, maxIo) };
}

/**
 * The libfuse 2 option list for a fuse-native mount. Choices made here:
 * - big_writes + max_write: without them libfuse 2 gets 4 KiB write requests.
 * - kernel_cache: the page cache is kept across opens. This is coherent
 *   because disk.raw changes only through this mount (qmount is the image's
 *   single writer and FUSE without writeback caching writes through), so the
 *   cached pages always equal what a read would return. direct_io (opt-in)
 *   turns the page cache off instead.
 * - allow_other implies default_permissions: qmount does no permission checks
 *   of its own, so the kernel must enforce disk.raw's 0644 for other users.
 * - ro on a read-only mount: the kernel refuses writes before they reach us.
 * - fsname=IMAGE, subtype=qmount: df and mount show the image as the source
 *   and the type as fuse.qmount.
 */
export function fuseOptionList(o: MountOptions, readOnly: boolean): string[] {
  const { maxRead, maxWrite } = ioSizes(o, MAX_IO_FUSE_NATIVE);
  const list = [fsnameOption(o), 'subtype=qmount', 'big_writes', `max_write=${maxWrite}`, `max_read=${maxRead}`];
  if (readOnly) list.push('ro');
  if (o.directIo) list.push('direct_io');
  else list.push('kernel_cache');
  list.push(...permissionOptions(o));
  // uid, gid and umask are not handed to libfuse 2, whose umask would replace every mode with 0777 & ~umask
  // (an execute bit on disk.raw): the DiskService answers getattr with them, as the fuse3 addon does.
  return list;
}

function permissionOptions(o: MountOptions): string[] {
  const list: string[] = [];
  if (o.allowOther) list.push('allow_other');
  if (o.allowRoot) list.push('allow_root');
  if (o.defaultPermissions || o.allowOther) list.push('default_permissions');
  return list;
}

/**
 * The libfuse 3 option list (fuse_session_new) for a fuse3 mount: only what
 * libfuse 3 takes as mount options. Rendered differently from libfuse 2: no
 * big_writes (always on); max_write is negotiated in init (the addon's
 * attrs), max_read is both a mount option and negotiated; kernel_cache is
 * keep_cache on open, direct_io is set on open; uid/gid/umask are the
 * attributes the addon answers getattr with (DiskService.attrs).
 */
export function fuse3OptionList(o: MountOptions, readOnly: boolean): string[] {
  const { maxRead } = ioSizes(o, MAX_IO_FUSE3);
  const list = [fsnameOption(o), 'subtype=qmount', `max_read=${maxRead}`];
  if (readOnly) list.push('ro');
  list.push(...permissionOptions(o));
  return list;
}
