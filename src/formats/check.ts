/**
 * Image consistency check (`qmount check`), dispatching on the probed format.
 *
 * Counts follow qemu-img check: `corruptions` and `leaks` are what remains
 * after any repair; `fixedCorruptions`/`fixedLeaks` say what the repair fixed.
 */
import fs from 'node:fs';
import { QmountError, safeError, UnsupportedError } from '../errors.js';
import type { Logger } from '../log.js';
import type { CheckReport, FormatName, RepairMode } from './driver.js';

export type { CheckReport, FragInfo, RepairMode } from './driver.js';
import { foreignFormat, PROBE_BYTES, probeFormat } from './probe.js';
import { checkQcow2 } from './qcow2/check.js';
import type { WorkHooks } from '../progress.js';
import { checkQed } from './qed/check.js';

/**
 * The image's format has no metadata to check (raw): qemu-img check's exit
 * 63. Only this; a qcow2 or QED image that cannot be opened (an unknown
 * feature, encryption) is a check that could not complete.
 */
export class NothingToCheckError extends UnsupportedError {}

export interface CheckOptions {
  repair: RepairMode;
  log: Logger;
  /** Progress and interruption (src/progress.ts). */
  hooks?: WorkHooks;
  /** Skip probing (qemu-img check -f). */
  format?: FormatName;
  /** Check an image another process is writing (qemu-img check -U; not with a repair). */
  forceShare?: boolean;
}

export async function checkImage(path: string, opts: CheckOptions): Promise<CheckReport> {
  try {
    return await checkFormat(path, opts);
  } catch (err) {
    // Messages may quote names from the image (untrusted): see safeError.
    throw safeError(err);
  }
}

async function checkFormat(path: string, opts: CheckOptions): Promise<CheckReport> {
  let head: Buffer;
  try {
    const fh = await fs.promises.open(path, 'r');
    try {
      head = Buffer.alloc(PROBE_BYTES);
      const { bytesRead } = await fh.read(head, 0, PROBE_BYTES, 0);
      head = head.subarray(0, bytesRead);
    } finally {
      await fh.close();
    }
  } catch (err) {
    throw new QmountError('ENOENT', `${path}: cannot open: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
  }
  const foreign = opts.format ? undefined : foreignFormat(head);
  if (foreign) throw new NothingToCheckError(`${path}: this is a ${foreign} image, a format qmount does not support (qcow2, QED, raw)`);
  const format = opts.format ?? probeFormat(head);
  opts.log.debug({ path, format, repair: opts.repair }, 'checking image');
  switch (format) {
    case 'raw':
      throw new NothingToCheckError(`${path}: raw images have no metadata to check`);
    case 'qcow2':
      return checkQcow2(path, opts);
    case 'qed':
      return checkQed(path, opts);
  }
}
