/**
 * Typed errors. Every error the engine raises carries a POSIX errno name so
 * that the FUSE adapter (mount/) can translate it without guessing, and the
 * CLI can print one clear line. Only mount/ turns these into FUSE codes.
 */
export type ErrnoName =
  | 'EIO'
  | 'EROFS'
  | 'ENOSPC'
  | 'EINVAL'
  | 'ENOENT'
  | 'ENOTSUP'
  | 'EBUSY'
  | 'ELOOP'
  | 'EACCES'
  | 'EPERM'
  | 'EFBIG'
  | 'ENOTDIR'
  | 'EEXIST'
  | 'ENOMEM'
  | 'EOVERFLOW'
  | 'EBADF'
  | 'EINTR';

export class QmountError extends Error {
  readonly errno: ErrnoName;
  constructor(errno: ErrnoName, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.errno = errno;
    this.name = new.target.name;
  }
}

/** The image's bytes break a rule of its format (bad header, bad table entry). */
export class FormatError extends QmountError {
  constructor(message: string, errno: ErrnoName = 'EINVAL') {
    super(errno, message);
  }
}

/** The image uses a feature qmount does not implement. */
export class UnsupportedError extends QmountError {
  constructor(message: string) {
    super('ENOTSUP', message);
  }
}

/** Metadata found corrupt while serving a request: that request fails with EIO. */
export class CorruptionError extends QmountError {
  constructor(message: string) {
    super('EIO', message);
  }
}

/** Long work (a check, a refcount rebuild at open) stopped by a signal before it finished. */
export class InterruptedError extends QmountError {
  constructor(message = 'interrupted') {
    super('EINTR', message);
  }
}

/** A write was attempted on something opened read-only. */
export class ReadOnlyError extends QmountError {
  constructor(message = 'image is opened read-only') {
    super('EROFS', message);
  }
}

const KNOWN = new Set<string>([
  'EIO', 'EROFS', 'ENOSPC', 'EINVAL', 'ENOENT', 'ENOTSUP', 'EBUSY', 'ELOOP', 'EACCES',
  'EPERM', 'EFBIG', 'ENOTDIR', 'EEXIST', 'ENOMEM', 'EOVERFLOW', 'EBADF', 'EINTR',
]);

/** The errno name of any thrown value: ours, Node's system errors, else EIO. */
export function errnoOf(err: unknown): ErrnoName {
  if (err instanceof QmountError) return err.errno;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string') {
    if (KNOWN.has(code)) return code as ErrnoName;
    if (code === 'EDQUOT') return 'ENOSPC';
    if (code === 'EISDIR') return 'EINVAL';
  }
  return 'EIO';
}

/** A message fit for one line of output: no stack, no newlines. */
export function oneLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return msg.replace(/\s*\n\s*/g, '; ');
}

/** Untrusted text (a name read from an image) made safe for one line of a terminal: control characters as \xNN. */
export function printable(text: string): string {
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** Longest error message passed on; longer ones keep their start and end (where the errno name usually is). */
const MAX_MESSAGE = 600;

function bounded(message: string): string {
  if (message.length <= MAX_MESSAGE) return message;
  return `${message.slice(0, MAX_MESSAGE - 201)}…${message.slice(-200)}`;
}

/**
 * Make a QmountError's message fit one terminal line: control characters
 * escaped, length bounded. Keeps the error's class and errno. (Messages may
 * quote names read from an image: untrusted.)
 */
export function safeError(err: unknown): unknown {
  if (err instanceof QmountError) err.message = bounded(printable(err.message));
  return err;
}
