/**
 * The image-lock policy: which lock each open of a file takes, and what is
 * told about it. The mechanism - QEMU's OFD byte-range locks, the bytes of
 * each mode, the refusals - is src/io/lock.ts; every open of an image file,
 * backing file or data file goes through lockForUse() here.
 *
 *  - Read-write (a read-write mount, `check --repair`): 'write', as a QEMU
 *    writer. Read-only (a read-only mount, `info`, `map`, `check`, every
 *    backing file): 'read', a reader that keeps writers away.
 *  - `-U`/`--force-share`, read-only only: 'shared-read', a reader that
 *    shares everything, so an image another process writes can be opened.
 *    When a writer holds it, one warning: the reads may be inconsistent.
 *  - A qcow2 external data file: 'data-write' / 'data-read' (QEMU shares
 *    write on a data file, not resize).
 *  - A file system without OFD locks: one warning, the file is used
 *    unlocked.
 * Warnings go where the caller says: a log line (`log`) and one line for
 * the user (`onWarning`); a caller that gives neither (`check`, whose
 * output is its report, and data files) stays silent.
 */
import { printable, QmountError } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import { lockImageFile, type LockMode } from '../io/lock.js';
import type { Logger } from '../log.js';

export interface ImageUse {
  /** opened read-only */
  readOnly: boolean;
  /** -U / --force-share (read-only only) */
  forceShare?: boolean;
  /** a qcow2 external data file */
  dataFile?: boolean;
}

export interface LockReport {
  /** the log line of each warning */
  log?: Logger;
  /** the one line for the user */
  onWarning?: (message: string) => void;
}

/** Refuse a use the policy does not allow (before anything is opened). `name`: the file as the user named it. */
export function checkImageUse(name: string, use: ImageUse): void {
  if (use.forceShare && !use.readOnly) throw new QmountError('EINVAL', `${name}: --force-share is only allowed read-only (-r)`);
}

/** The lock mode of a use (the table above). */
export function lockModeFor(use: ImageUse): LockMode {
  checkImageUse('image', use);
  if (use.dataFile) return use.readOnly ? 'data-read' : 'data-write';
  if (!use.readOnly) return 'write';
  return use.forceShare ? 'shared-read' : 'read';
}

/**
 * Lock an open file for `use`, before anything reads or writes it. Throws a
 * one-line EBUSY when another process's locks forbid the use (io/lock.ts).
 * `realPath`: the resolved path (for the lock holders' names and the log);
 * `name`: as the user named it (for messages).
 */
export function lockForUse(file: ImageFile, realPath: string, name: string, use: ImageUse, report: LockReport = {}): void {
  const lock = lockImageFile(file.descriptor, realPath, name, lockModeFor(use));
  if (!lock.locked) report.log?.warn({ image: realPath, reason: lock.unsupported }, 'file system does not support locks: image not locked');
  if (lock.inUseBy && use.forceShare) {
    report.log?.warn({ image: realPath, writer: lock.inUseBy }, 'image in use by a writer; opened because of --force-share');
    report.onWarning?.(printable(`${name} is being written by ${lock.inUseBy}; --force-share: the mount may see inconsistent data`));
  }
}
