/**
 * QED consistency check (docs/interop/qed_spec.rst, "Consistency checking").
 *
 * Rules checked, starting from the L1 table and descending into every L2:
 *  - every L1/L2 offset is cluster-aligned, after the header area and inside
 *    the file (a table's last cluster too). A bad one is a corruption; with
 *    repair it is cleared (the guest range reads from the backing file or
 *    zeros again) and counted as fixed.
 *  - every cluster is referenced at most once (header, L1, each L2 table,
 *    each data cluster). A second reference is a corruption nothing can
 *    repair safely: it is reported and stays.
 *  - a cluster after the header that nothing references is a leak: harmless
 *    space (a crash during an append allocation leaves them). Repair can only
 *    give back leaked clusters at the end of the file (truncate).
 *
 * Counts follow qemu-img check: `corruptions` and `leaks` are what remains
 * after any repair, `fixed*` what the repair fixed. Exit codes (mapped by the
 * CLI): 0 clean, 2 corruptions remain, 3 only leaks remain.
 */
import { FormatError } from '../../errors.js';
import { hexOffset } from '../u64.js';
import { ImageFile } from '../../io/file.js';
import type { Logger } from '../../log.js';
import type { CheckReport as GenericCheckReport, FragInfo, RepairMode } from '../driver.js';
import {
  QED_F_NEED_CHECK,
  QED_HEADER_BYTES,
  QED_ZERO_CLUSTER,
  geometryOf,
  parseHeader,
  readEntry,
  serializeHeader,
  writeEntry,
  type QedGeometry,
  type QedHeader,
} from './header.js';
import { lockForUse } from '../image-lock.js';
import { validClusterOffset, validTableOffset } from './table.js';

/** The dispatcher's report type, narrowed to this format. */
export type CheckReport = GenericCheckReport & { format: 'qed' };
export type { RepairMode };

/** What one pass over the tables found (and fixed when asked). */
export interface ScanResult {
  corruptions: number;
  fixedCorruptions: number;
  leaks: number;
  /** leaked clusters after the last used one (a truncate gives them back) */
  trailingLeaks: number;
  imageEndOffset: number;
  /** qemu-img check's cluster counts */
  frag?: FragInfo;
  messages: string[];
  /** corruptions no repair can fix (clusters referenced more than once), included in corruptions */
  unfixable: number;
  /** the message of the first unfixable corruption */
  firstUnfixable?: string;
}

const MAX_MESSAGES = 50;
const hex = hexOffset;

class Scan {
  readonly used: Uint8Array;
  readonly nclusters: number;
  readonly result: ScanResult;
  private dropped = 0;

  constructor(
    readonly geo: QedGeometry,
    readonly fileSize: number,
  ) {
    this.nclusters = Math.ceil(fileSize / geo.clusterSize);
    this.used = new Uint8Array(Math.ceil(this.nclusters / 8));
    this.result = { corruptions: 0, fixedCorruptions: 0, leaks: 0, trailingLeaks: 0, imageEndOffset: 0, messages: [], unfixable: 0 };
  }

  /** A corruption left in place. */
  corrupt(msg: string, fixable: boolean): void {
    this.result.corruptions++;
    if (!fixable) {
      this.result.unfixable++;
      this.result.firstUnfixable ??= msg;
    }
    this.note(msg);
  }

  note(msg: string): void {
    if (this.result.messages.length < MAX_MESSAGES) this.result.messages.push(msg);
    else this.dropped++;
  }

  finishMessages(): void {
    if (this.dropped > 0) this.result.messages.push(`... and ${this.dropped} more`);
  }

  /** Mark clusters used; returns the first cluster already marked (a double reference) or -1. */
  mark(offset: number, clusters: number): number {
    const first = Math.floor(offset / this.geo.clusterSize);
    let clash = -1;
    for (let c = first; c < first + clusters; c++) {
      const bit = 1 << (c & 7);
      if (this.used[c >> 3] & bit) {
        if (clash < 0) clash = c;
      } else {
        this.used[c >> 3] |= bit;
      }
    }
    return clash;
  }

  isUsed(c: number): boolean {
    return (this.used[c >> 3] & (1 << (c & 7))) !== 0;
  }
}

/**
 * Walk L1 and every L2 table of an open image. With `fix`, invalid offsets
 * are cleared in the tables on disk and in `l1` (point qed_check_repair) and
 * the file is synced; double references are never touched.
 */
export async function scanQed(
  file: ImageFile,
  header: QedHeader,
  l1: Buffer,
  fileSize: number,
  fix: boolean,
  log: Logger,
): Promise<ScanResult> {
  const geo = geometryOf(header);
  const cs = geo.clusterSize;
  const tableClusters = header.tableSize;
  const scan = new Scan(geo, fileSize);
  const r = scan.result;
  scan.mark(0, header.headerSize);
  scan.mark(header.l1TableOffset, tableClusters);

  let l1Changed = false;
  const frag = { totalClusters: Math.ceil(header.imageSize / cs), allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0 };
  r.frag = frag;
  const l2 = Buffer.allocUnsafe(geo.tableBytes);
  for (let i = 0; i < geo.tableEntries; i++) {
    const off = readEntry(l1, i);
    if (off === 0) continue;
    if (!validTableOffset(geo, off, fileSize)) {
      if (fix) {
        writeEntry(l1, i, 0);
        l1Changed = true;
        r.fixedCorruptions++;
        scan.note(`L1 entry ${i}: invalid L2 table offset ${hex(off)}, cleared`);
      } else {
        scan.corrupt(`L1 entry ${i}: invalid L2 table offset ${hex(off)}`, true);
      }
      continue;
    }
    const clash = scan.mark(off, tableClusters);
    if (clash >= 0) {
      scan.corrupt(`L1 entry ${i}: L2 table at ${hex(off)} overlaps cluster ${hex(clash * cs)} used elsewhere`, false);
      continue; // do not trust a table that overlaps other metadata
    }
    await file.readZeroFill(l2, 0, geo.tableBytes, off);
    let l2Changed = 0;
    let lastData = 0;
    for (let j = 0; j < geo.tableEntries; j++) {
      const e = readEntry(l2, j);
      if (e === 0 || e === QED_ZERO_CLUSTER) continue;
      // qemu-img's counts (qed-check.c): every allocated entry, and those not right after the previous one in this table.
      frag.allocatedClusters++;
      if (lastData !== 0 && lastData + cs !== e) frag.fragmentedClusters++;
      lastData = e;
      const guest = (i * geo.tableEntries + j) * cs;
      if (!validClusterOffset(geo, e, fileSize)) {
        if (fix) {
          writeEntry(l2, j, 0);
          l2Changed++;
          scan.note(`guest offset ${hex(guest)}: invalid data cluster offset ${hex(e)}, cleared`);
        } else {
          scan.corrupt(`guest offset ${hex(guest)}: invalid data cluster offset ${hex(e)}`, true);
        }
        continue;
      }
      if (scan.mark(e, 1) >= 0) {
        scan.corrupt(`guest offset ${hex(guest)}: data cluster ${hex(e)} is referenced more than once`, false);
      }
    }
    if (l2Changed > 0) {
      await file.write('qed_check_repair', l2, 0, geo.tableBytes, off);
      r.fixedCorruptions += l2Changed;
    }
  }
  if (l1Changed) {
    await file.write('qed_check_repair', l1, 0, geo.tableBytes, header.l1TableOffset);
  }
  if (l1Changed || r.fixedCorruptions > 0) await file.flush();

  let lastUsed = header.headerSize - 1;
  for (let c = header.headerSize; c < scan.nclusters; c++) {
    if (scan.isUsed(c)) lastUsed = c;
    else r.leaks++;
  }
  r.trailingLeaks = scan.nclusters - 1 - lastUsed;
  r.imageEndOffset = (lastUsed + 1) * cs;
  if (r.leaks > 0) scan.note(`${r.leaks} leaked clusters (${r.trailingLeaks} at the end of the file)`);
  scan.finishMessages();
  log.debug({ corruptions: r.corruptions, fixed: r.fixedCorruptions, leaks: r.leaks }, 'qed check done');
  return r;
}

/** Read and validate the header and L1 table of an open file. */
export async function readQedMeta(file: ImageFile): Promise<{ header: QedHeader; l1: Buffer; fileSize: number }> {
  const fileSize = await file.size();
  const head = Buffer.alloc(QED_HEADER_BYTES);
  const n = await file.read(head, 0, QED_HEADER_BYTES, 0);
  const header = parseHeader(head.subarray(0, n), fileSize);
  const geo = geometryOf(header);
  const l1 = Buffer.alloc(geo.tableBytes);
  await file.readZeroFill(l1, 0, geo.tableBytes, header.l1TableOffset);
  return { header, l1, fileSize };
}

/** Rewrite the header with the need-check bit cleared and sync (callers flushed everything before). */
export async function clearNeedCheck(file: ImageFile, header: QedHeader): Promise<void> {
  const next = { ...header, features: header.features & ~QED_F_NEED_CHECK };
  await file.write('header_update', serializeHeader(next), 0, QED_HEADER_BYTES, 0);
  await file.flush();
  header.features = next.features;
}

/** `qmount check` for QED images. Opens the file itself (read-only unless repairing). */
export async function checkQed(path: string, opts: { repair: RepairMode; log: Logger; forceShare?: boolean }): Promise<CheckReport> {
  const repairing = opts.repair !== 'none';
  let file: ImageFile;
  try {
    file = await ImageFile.open(path, { readOnly: !repairing });
  } catch (err) {
    throw new FormatError(`${path}: cannot open: ${(err as NodeJS.ErrnoException).code ?? 'error'}`, 'EIO');
  }
  try {
    lockForUse(file, path, path, { readOnly: !repairing, forceShare: opts.forceShare }); // like qemu-img check (../image-lock.ts)
    let meta: Awaited<ReturnType<typeof readQedMeta>>;
    try {
      meta = await readQedMeta(file);
    } catch (err) {
      if (err instanceof FormatError) throw new FormatError(`${path}: ${err.message}`, err.errno);
      throw err;
    }
    const { header, l1, fileSize } = meta;
    const r = await scanQed(file, header, l1, fileSize, opts.repair === 'all', opts.log);
    let leaks = r.leaks;
    let fixedLeaks = 0;
    if (repairing && r.trailingLeaks > 0 && r.corruptions === 0) {
      // Only leaked clusters at the end can be given back without moving data,
      // and only when no corrupt entry might still point into them.
      await file.truncate(r.imageEndOffset);
      await file.flush();
      fixedLeaks = r.trailingLeaks;
      leaks -= fixedLeaks;
      r.messages.push(`truncated ${fixedLeaks} leaked clusters at the end of the file`);
    }
    if (repairing && r.corruptions === 0 && header.features & QED_F_NEED_CHECK) {
      await clearNeedCheck(file, header);
      r.messages.push('need-check bit cleared');
    }
    return {
      format: 'qed',
      corruptions: r.corruptions,
      leaks,
      fixedCorruptions: r.fixedCorruptions,
      fixedLeaks,
      messages: r.messages,
      imageEndOffset: r.imageEndOffset,
      frag: r.frag,
    };
  } finally {
    await file.close();
  }
}
