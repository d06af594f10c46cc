/**
 * FUSE mount options: the user's `-o` list checked against an allow-list,
 * plus the options qmount always sets. No format knowledge here.
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

/** Options a user may pass with -o; anything else is refused (EINVAL). */
export const ALLOWED_OPTIONS = [
  'allow_other', 'allow_root', 'default_permissions', 'ro', 'rw', 'direct_io',
  'max_read=N', 'max_write=N', 'uid=N', 'gid=N', 'umask=OCTAL',
] as const;

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
          throw bad(`unknown mount option "${name}" (allowed: ${ALLOWED_OPTIONS.join(', ')})`);
      }
    }
  }
  if (o.allowOther && o.allowRoot) throw bad('-o allow_other and allow_root cannot be combined');
  return o;
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
 */
export function fuseOptionList(o: MountOptions, readOnly: boolean): string[] {
  const { maxRead, maxWrite } = ioSizes(o, MAX_IO_FUSE_NATIVE);
  const list = ['fsname=qmount', 'subtype=qmount', 'big_writes', `max_write=${maxWrite}`, `max_read=${maxRead}`];
  if (readOnly) list.push('ro');
  if (o.directIo) list.push('direct_io');
  else list.push('kernel_cache');
  list.push(...permissionOptions(o));
  if (o.uid !== undefined) list.push(`uid=${o.uid}`);
  if (o.gid !== undefined) list.push(`gid=${o.gid}`);
  if (o.umask !== undefined) list.push(`umask=${o.umask}`);
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
  const list = ['fsname=qmount', 'subtype=qmount', `max_read=${maxRead}`];
  if (readOnly) list.push('ro');
  list.push(...permissionOptions(o));
  return list;
}
