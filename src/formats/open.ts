/**
 * Opening an image: probe the format, open the driver, follow its backing
 * chain. Backing files are always opened read-only, relative names resolve
 * against the directory of the image that names them, and a chain that comes
 * back to a file already in it is an error (ELOOP).
 */
import fs from 'node:fs';
import path from 'node:path';
import { FormatError, QmountError, safeError } from '../errors.js';
import { ImageFile } from '../io/file.js';
import { logger, type Logger } from '../log.js';
import { DEFAULT_L2_CACHE_BYTES, DEFAULT_REFCOUNT_CACHE_BYTES, type BlockDriver, type DriverOpenOptions, type FormatName } from './driver.js';
import type { WorkHooks } from '../progress.js';
import { checkImageUse, lockForUse } from './image-lock.js';
import { guardProbedRaw } from './raw-guard.js';
import { PROBE_BYTES, probeOrRefuse } from './probe.js';
import { openRaw } from './raw/raw.js';
import { openQcow2 } from './qcow2/driver.js';
import { truncation } from './qcow2/truncated.js';
import { openQed } from './qed/driver.js';

export interface OpenImageOptions {
  readOnly: boolean;
  format?: FormatName;
  /** Do not follow backing files: unallocated clusters read as zeros. */
  noBacking?: boolean;
  /**
   * Read-only only: lock as a reader that shares every permission (QEMU's
   * -U), so an image another process is writing can still be opened.
   */
  forceShare?: boolean;
  /** Told (one line) when --force-share let an image in use be opened. */
  onWarning?: (message: string) => void;
  l2CacheBytes?: number;
  refcountCacheBytes?: number;
  log?: Logger;
  /**
   * Read-only opens (salvage, read-only mounts): a backing file that does not
   * exist is replaced by what this returns (src/formats/salvage.ts:
   * MissingBacking, whose reads fail with EIO) instead of failing the open.
   */
  onMissingBacking?: (resolvedPath: string, name: string, format: FormatName | undefined) => BlockDriver;
  /** Progress and interruption of long work during the open (the refcount rebuild of a dirty image). */
  hooks?: WorkHooks;
}

/** Longest backing chain followed. */
export const MAX_CHAIN_DEPTH = 64;

type FormatOpener = (file: ImageFile, opts: DriverOpenOptions) => Promise<BlockDriver>;
const OPENERS: Record<FormatName, FormatOpener> = { qcow2: openQcow2, qed: openQed, raw: openRaw };

export async function openImage(imagePath: string, opts: OpenImageOptions): Promise<BlockDriver> {
  if (opts.noBacking && !opts.readOnly) {
    // A partial write into an unallocated cluster copies the rest of the
    // cluster from the backing file; without it that would become zeros.
    throw new QmountError('EINVAL', `${imagePath}: --no-backing is only allowed read-only (-r): writes need the backing file`);
  }
  checkImageUse(imagePath, { readOnly: opts.readOnly, forceShare: opts.forceShare });
  try {
    return await openInChain(imagePath, opts.format, opts.readOnly, opts, []);
  } catch (err) {
    // Names inside images (backing file, data file, backing format) are
    // untrusted: one with control characters must not turn an error into
    // several lines or terminal escapes, nor a long one into a screenful,
    // wherever in the chain or driver it was quoted.
    throw safeError(err);
  }
}

async function openInChain(
  imagePath: string,
  format: FormatName | undefined,
  readOnly: boolean,
  opts: OpenImageOptions,
  chain: string[],
): Promise<BlockDriver> {
  let real: string;
  try {
    real = await fs.promises.realpath(imagePath);
  } catch (err) {
    throw new QmountError('ENOENT', `${imagePath}: cannot open: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
  }
  if (chain.includes(real)) {
    throw new QmountError('ELOOP', `${chain[0]}: backing chain loops: ${[...chain, real].join(' -> ')}`);
  }
  if (chain.length >= MAX_CHAIN_DEPTH) {
    throw new QmountError('ELOOP', `${chain[0]}: backing chain deeper than ${MAX_CHAIN_DEPTH}`);
  }
  const st = await fs.promises.stat(real);
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new QmountError('EINVAL', `${imagePath}: not a regular file`);
  }
  let file: ImageFile;
  try {
    file = await ImageFile.open(real, { readOnly });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
    throw new QmountError(code === 'EACCES' ? 'EACCES' : 'EIO', `${imagePath}: cannot open: ${code}`);
  }
  try {
    // Before the driver reads or writes a byte (the policy: image-lock.ts).
    lockForUse(file, real, imagePath, { readOnly, forceShare: opts.forceShare }, { log: opts.log ?? logger('image'), onWarning: opts.onWarning });
    let fmt = format;
    if (!fmt) {
      const head = Buffer.alloc(PROBE_BYTES);
      const n = await file.read(head, 0, PROBE_BYTES, 0);
      fmt = probeOrRefuse(head.subarray(0, n));
    }
    const log = (opts.log ?? logger('image')).child({ image: real });
    const nextChain = [...chain, real];
    const dir = path.dirname(real);
    const driverOpts: DriverOpenOptions = {
      readOnly,
      l2CacheBytes: opts.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES,
      refcountCacheBytes: opts.refcountCacheBytes ?? DEFAULT_REFCOUNT_CACHE_BYTES,
      log,
      hooks: opts.hooks,
      openBacking: opts.noBacking
        ? undefined
        : async (name, backingFormat) => {
            if (/^[a-z0-9+]+:/i.test(name) && !name.startsWith('file:')) {
              throw new FormatError(`${imagePath}: backing file "${name}" uses a protocol qmount does not support`, 'ENOTSUP');
            }
            const plain = name.startsWith('file:') ? name.slice(5) : name;
            const resolved = path.isAbsolute(plain) ? plain : path.join(dir, plain);
            if (opts.onMissingBacking && readOnly && !fs.existsSync(resolved)) return opts.onMissingBacking(resolved, name, backingFormat);
            log.info({ backing: resolved, format: backingFormat }, 'opening backing file');
            return openInChain(resolved, backingFormat, true, opts, nextChain);
          },
    };
    const driver = await OPENERS[fmt](file, driverOpts);
    if (fmt === 'qcow2' && chain.length === 0) {
      const short = await truncation(file).catch(() => null);
      if (short) {
        log.warn({ image: real }, short);
        opts.onWarning?.(`${imagePath}: ${short}`);
      }
    }
    // A probed raw image must not be written into looking like another format (raw-guard.ts).
    return fmt === 'raw' && !format && !readOnly ? guardProbedRaw(driver) : driver;
  } catch (err) {
    await file.close().catch(() => {});
    // Name the image in the message, keeping the error's class and errno.
    if (err instanceof QmountError && !err.message.includes(imagePath) && !err.message.includes(real)) {
      err.message = `${imagePath}: ${err.message}`;
    }
    throw err;
  }
}
