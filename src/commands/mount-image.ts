/**
 * What a mount opens, for the recovery options (issue 15):
 *
 *  - plain: the image itself (read-only with -r);
 *  - `-s, --snapshot`: a throwaway qcow2 overlay in $TMPDIR (default /tmp)
 *    whose backing file is the image; the image is opened O_RDONLY and never
 *    written; the overlay is unlinked as soon as it is open;
 *  - `--overlay FILE`: a persistent qcow2 overlay over the image, created if
 *    missing, reused if present, refused if its backing file is another file;
 *  - `-l, --load-snapshot NAME|ID`: an internal qcow2 snapshot, read-only;
 *  - `--salvage` (read-only): unreadable ranges read as zeros, listed in a
 *    damage report (src/formats/salvage.ts).
 *
 * Read-only mounts (also -l and --salvage) open an image whose backing file
 * is missing: the ranges it would supply fail with EIO, or are zeros and
 * damage with --salvage. Writable mounts still refuse such an image.
 *
 * Temporary overlays of -s are named qmount-snapshot-PID-RANDOM.qcow2; one
 * left behind by a process killed between creating and unlinking it (a
 * moment) is removed by the next -s of any qmount once PID is gone.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TreeEntry } from '../../mount/tree.js';
import { oneLine, QmountError } from '../errors.js';
import type { BlockDriver, FormatName, ImageInfo } from '../formats/driver.js';
import { openImage, type OpenImageOptions } from '../formats/open.js';
import { createQcow2 } from '../formats/qcow2/create.js';
import { scanQcow2Damage } from '../formats/qcow2/salvage.js';
import { findSnapshot, noSuchSnapshot, openSnapshotDisk, qcow2StateOf, snapshotFileNames } from '../formats/qcow2/snapshot-open.js';
import { DamageReport, MissingBacking, SalvageDriver, scanByReading } from '../formats/salvage.js';
import type { Logger } from '../log.js';

export interface RecoveryFlags {
  snapshot?: boolean;
  overlay?: string;
  loadSnapshot?: string;
  salvage?: boolean;
}

export interface MountOpen {
  driver: BlockDriver;
  /** with --salvage: the damage found so far (grows as reads find more) */
  damage?: DamageReport;
  /** with --salvage: whether `damage` already lists every damaged range (qcow2 tables scanned, all compressed clusters tried) */
  damageComplete?: boolean;
}

/** The mode a set of flags asks for, or the usage error (one line) when they do not combine. */
export function recoveryConflict(f: RecoveryFlags & { readOnly: boolean }): string | null {
  if (f.snapshot && f.overlay !== undefined) return '-s/--snapshot and --overlay cannot be combined';
  if ((f.snapshot || f.overlay !== undefined) && f.readOnly) return `${f.snapshot ? '-s/--snapshot' : '--overlay'} is a writable mount: leave out -r`;
  if (f.loadSnapshot !== undefined && (f.snapshot || f.overlay !== undefined)) return '-l/--load-snapshot cannot be combined with -s or --overlay';
  if (f.salvage && (f.snapshot || f.overlay !== undefined)) return '--salvage is read-only: it cannot be combined with -s or --overlay';
  return null;
}

/** -l and --salvage imply a read-only mount. */
export function impliesReadOnly(f: RecoveryFlags): boolean {
  return f.loadSnapshot !== undefined || !!f.salvage;
}

type BaseOptions = Omit<OpenImageOptions, 'readOnly'> & { log: Logger };

/**
 * Compressed clusters a --salvage mount decompresses while scanning (about a
 * second or two of zlib): more are checked by reads, and damage.json then
 * says complete: false. `qmount info --salvage` decompresses every one.
 */
const MOUNT_DECOMPRESS_CHECKS = 8192;

export async function openForMount(image: string, readOnly: boolean, flags: RecoveryFlags, base: BaseOptions, fullScan = false): Promise<MountOpen> {
  const log = base.log;
  if (flags.snapshot) return { driver: await openThrowaway(image, base) };
  if (flags.overlay !== undefined) return { driver: await openPersistentOverlay(image, path.resolve(flags.overlay), base) };
  const missing = readOnly
    ? {
        onMissingBacking: (resolved: string, name: string, format: FormatName | undefined) => {
          if (!flags.salvage) base.onWarning?.(missingWarning(name));
          log.warn({ backing: resolved, name }, 'backing file is missing: the ranges it would supply cannot be read');
          return new MissingBacking(resolved, name, format);
        },
      }
    : {};
  let driver = await openImage(image, { ...base, ...missing, readOnly });
  try {
    if (flags.loadSnapshot !== undefined) {
      const s = qcow2StateOf(driver);
      if (!s) throw new QmountError('ENOTSUP', `${image}: -l needs a qcow2 image (${driver.format} has no internal snapshots)`);
      const snap = findSnapshot(s.snapshots, flags.loadSnapshot);
      if (!snap) throw noSuchSnapshot(image, flags.loadSnapshot, s.snapshots);
      log.info({ id: snap.id, name: snap.name, size: snap.guestSize ?? s.virtualSize }, 'mounting internal snapshot');
      driver = await openSnapshotDisk(driver, snap, true);
    }
    if (!flags.salvage) return { driver };
    const damage = new DamageReport();
    damage.onNew = (r) => log.warn({ start: r.start, length: r.length, reason: r.reason }, 'damaged range: reads as zeros (--salvage)');
    const s = qcow2StateOf(driver);
    const salvage = new SalvageDriver(driver, damage, s ? s.g.subclusterSize : (driver.info().clusterSize ?? 512));
    // qcow2: the tables are scanned now, so the report is complete from the start (unless there are more
    // compressed clusters than MOUNT_DECOMPRESS_CHECKS); other formats report what reads find.
    const complete = s ? await scanQcow2Damage(s, damage, { maxDecompress: fullScan ? Infinity : MOUNT_DECOMPRESS_CHECKS }) : false;
    log.info({ ranges: damage.ranges().length, bytes: damage.bytes(), complete }, 'salvage: damage scan done');
    return { driver: salvage, damage, damageComplete: complete };
  } catch (err) {
    await driver.close().catch(() => {});
    throw err;
  }
}

function missingWarning(name: string): string {
  return `backing file ${name} is missing: the ranges it would supply fail with EIO (--salvage reads them as zeros)`;
}

/**
 * The missing-backing warnings a read-only mount of `image` will give (for
 * the parent of a daemon, whose stderr is the user's): opens the chain and
 * closes it again; an image that does not open gives none (the daemon
 * reports why).
 */
export async function missingBackingWarnings(image: string, base: BaseOptions): Promise<string[]> {
  const out: string[] = [];
  const onMissingBacking = (resolved: string, name: string, format: FormatName | undefined): BlockDriver => {
    out.push(missingWarning(name));
    return new MissingBacking(resolved, name, format);
  };
  try {
    const d = await openImage(image, { ...base, readOnly: true, onMissingBacking });
    await d.close();
  } catch {
    return [];
  }
  return out;
}

/** The image's format and size, opened read-only without its backing chain. */
async function probe(image: string, base: BaseOptions): Promise<{ format: FormatName; size: number; real: string }> {
  const d = await openImage(image, { ...base, readOnly: true, noBacking: true });
  const out = { format: d.format, size: d.virtualSize, real: d.filename };
  await d.close();
  return out;
}

const TEMP_PATTERN = /^qmount-snapshot-(\d+)-[0-9a-f]+\.qcow2$/;

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Remove temporary overlays of qmount processes that no longer run (killed in the moment before the unlink). */
async function sweepStale(dir: string, log: Logger): Promise<void> {
  let names: string[];
  try {
    names = await fs.promises.readdir(dir);
  } catch {
    return;
  }
  for (const n of names) {
    const m = TEMP_PATTERN.exec(n);
    if (!m || pidAlive(Number(m[1]))) continue;
    await fs.promises.unlink(path.join(dir, n)).then(
      () => log.info({ file: path.join(dir, n) }, 'removed a stale -s overlay'),
      () => {},
    );
  }
}

async function openThrowaway(image: string, base: BaseOptions): Promise<BlockDriver> {
  const log = base.log;
  const tmp = os.tmpdir();
  await sweepStale(tmp, log);
  const { format, size, real } = await probe(image, base);
  const overlay = path.join(tmp, `qmount-snapshot-${process.pid}-${crypto.randomBytes(6).toString('hex')}.qcow2`);
  // The engine opens the backing file by the name in the overlay: the image's absolute path.
  await createQcow2(overlay, { size, backingFile: real, backingFormat: format });
  try {
    const d = await openImage(overlay, { ...base, format: 'qcow2', readOnly: false });
    log.info({ overlay, image: real }, '-s: writes go to a temporary overlay (unlinked; gone when the mount ends)');
    return d;
  } finally {
    await fs.promises.unlink(overlay).catch(() => {});
  }
}

async function openPersistentOverlay(image: string, overlay: string, base: BaseOptions): Promise<BlockDriver> {
  const log = base.log;
  const { format, size, real } = await probe(image, base);
  if (!fs.existsSync(overlay)) {
    await createQcow2(overlay, { size, backingFile: real, backingFormat: format });
    log.info({ overlay, image: real }, '--overlay: created');
  } else {
    const top = await openImage(overlay, { ...base, readOnly: true, noBacking: true });
    const info = top.info();
    await top.close();
    if (info.format !== 'qcow2') throw new QmountError('EINVAL', `--overlay ${overlay} is a ${info.format} image, not a qcow2 overlay of ${image}`);
    if (info.backingFile === undefined) throw new QmountError('EINVAL', `--overlay ${overlay} has no backing file; it is not an overlay of ${image}`);
    const plain = info.backingFile.startsWith('file:') ? info.backingFile.slice(5) : info.backingFile;
    const named = path.isAbsolute(plain) ? plain : path.join(path.dirname(fs.realpathSync(overlay)), plain);
    let target: string | undefined;
    try {
      target = fs.realpathSync(named);
    } catch {
      target = undefined;
    }
    if (target !== real) {
      throw new QmountError('EINVAL', `--overlay ${overlay} has backing file ${info.backingFile}, not ${image}: refusing to mount another image's overlay`);
    }
    log.info({ overlay, image: real }, '--overlay: reusing');
  }
  return openImage(overlay, { ...base, format: 'qcow2', readOnly: false });
}

/**
 * `qmount info --salvage`: open as a salvage mount would and return the
 * complete damage report. qcow2 is scanned by its tables; other formats by
 * reading every byte through the salvage wrapper.
 */
export async function salvageScan(image: string, base: BaseOptions): Promise<{ info: ImageInfo; damage: DamageReport }> {
  const { driver, damage } = await openForMount(image, true, { salvage: true }, base, true);
  try {
    if (!qcow2StateOf((driver as SalvageDriver).inner)) await scanByReading(driver as SalvageDriver);
    return { info: driver.info(), damage: damage! };
  } finally {
    await driver.close().catch(() => {});
  }
}

/** The human form of a damage report (after `qmount info`'s lines). */
export function damageHuman(d: DamageReport): string {
  const ranges = d.ranges();
  if (ranges.length === 0) return 'Damage (--salvage): none found';
  const lines = [`Damage (--salvage): ${ranges.length} range${ranges.length === 1 ? '' : 's'}, ${d.bytes()} bytes read as zeros`];
  for (const r of ranges) lines.push(`    [${r.start}, +${r.length}): ${r.reason}`);
  return lines.join('\n');
}

/**
 * The mount's extra files for these features: snapshots/NAME.raw (one
 * read-only disk per internal snapshot of a qcow2 image; names from
 * snapshotFileNames) and, with --salvage, damage.json (the report as found
 * when the mount started: complete for qcow2, whose tables are scanned;
 * for other formats only the log lists what later reads find).
 */
export async function recoveryFiles(opened: MountOpen, log: Logger): Promise<TreeEntry[]> {
  const out: TreeEntry[] = [];
  const d = opened.driver instanceof SalvageDriver ? opened.driver.inner : opened.driver;
  const s = qcow2StateOf(d);
  if (s && s.snapshots.length > 0) {
    const names = snapshotFileNames(s.snapshots);
    for (const [i, snap] of s.snapshots.entries()) {
      try {
        const disk = await openSnapshotDisk(d, snap, false);
        out.push({ path: `snapshots/${names[i]!}`, source: disk, close: () => disk.close() });
      } catch (err) {
        log.warn({ id: snap.id, name: snap.name, err: oneLine(err) }, 'snapshot cannot be shown');
      }
    }
    log.info({ snapshots: names }, 'snapshot files');
  }
  if (opened.damage) {
    const json = { ...opened.damage.toJSON(opened.driver.filename), complete: opened.damageComplete ?? false };
    out.push({ path: 'damage.json', content: Buffer.from(`${JSON.stringify(json, null, 2)}\n`) });
  }
  return out;
}
