/**
 * The qcow2 damage scan for `--salvage` and `qmount info --salvage`: walks
 * the L1 and L2 tables (of the active image, or of a snapshot) and reports
 * every guest range a read would fail on, without reading guest data
 * except compressed clusters (which are decompressed to know).
 *
 * What counts, in the same terms as the read path (read.ts, map.ts, which
 * raise the errors this mirrors):
 *  - an L1 entry whose L2 table is misaligned, in the header cluster, past
 *    the end of the file, or cannot be read: the table's whole guest range
 *    is unknown (never backing data in its place);
 *  - an L2 entry the read path refuses (misaligned data offset, bad
 *    extended-L2 bitmaps), a data cluster at or past the end of the file, a
 *    compressed cluster outside the file or one that does not decompress;
 *  - ranges left to a backing file that is missing (MissingBacking).
 */
import { errnoOf, oneLine } from '../../errors.js';
import { MissingBacking, type DamageReport } from '../salvage.js';
import { classify, ExtentKind, readL2Entry, type L2Entry, type Piece } from './map.js';
import { decompressedCluster } from './read.js';
import type { Qcow2State } from './state.js';
import { badCompressed, decodeCompressed } from './spec.js';

export interface ScanOptions {
  /**
   * Compressed clusters decompressed at most (the rest are checked for lying
   * in the file only; reads find them later). Default: all.
   */
  maxDecompress?: number;
}

/** Returns whether the scan was complete (every compressed cluster decompressed). */
export async function scanQcow2Damage(s: Qcow2State, report: DamageReport, opts: ScanOptions = {}): Promise<boolean> {
  const budget = { left: opts.maxDecompress ?? Infinity, skipped: false };
  const g = s.g;
  const size = s.virtualSize;
  const missing = s.backing instanceof MissingBacking ? s.backing : null;
  const entry: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
  const piece: Piece = { kind: ExtentKind.Zero, hostOffset: 0, length: 0 };
  const l1Needed = Math.ceil(size / g.l2Span);
  for (let l1Index = 0; l1Index < l1Needed; l1Index++) {
    const spanStart = l1Index * g.l2Span;
    const spanEnd = Math.min(size, spanStart + g.l2Span);
    const l2Offset = l1Index * 8 < s.l1.length ? s.l2OffsetOf(l1Index) : 0;
    if (l2Offset === 0) {
      if (missing) report.add(spanStart, spanEnd - spanStart, `backing file ${missing.name} is missing`);
      continue;
    }
    let table: Buffer;
    try {
      table = await s.l2With(l2Offset, (t) => Buffer.from(t)); // a copy: the loop below awaits (compressed clusters)
    } catch (err) {
      if (errnoOf(err) !== 'EIO') throw err;
      report.add(spanStart, spanEnd - spanStart, oneLine(err));
      continue;
    }
    for (let pos = spanStart; pos < spanEnd; ) {
      const clusterIndex = Math.floor(pos / g.clusterSize);
      const clusterStart = clusterIndex * g.clusterSize;
      const clusterEnd = Math.min(spanEnd, clusterStart + g.clusterSize);
      readL2Entry(g, table, clusterIndex % g.l2Entries, entry);
      while (pos < clusterEnd) {
        try {
          classify(g, entry, clusterStart, pos - clusterStart, clusterEnd - pos, piece);
        } catch (err) {
          report.add(clusterStart, clusterEnd - clusterStart, `guest offset ${clusterStart}: ${oneLine(err)}`);
          pos = clusterEnd;
          break;
        }
        // Only compressed clusters need I/O (an await per cluster would dominate the scan of a big disk).
        const damaged = piece.kind === ExtentKind.Compressed ? await compressedDamage(s, entry, pos, budget) : pieceDamage(s, piece, pos, missing);
        if (damaged) report.add(pos, piece.length, damaged);
        pos += piece.length;
      }
    }
  }
  return !budget.skipped;
}

/** Why the bytes of one classified (not compressed) piece cannot be read (null when they can). */
function pieceDamage(s: Qcow2State, piece: Piece, guestOffset: number, missing: MissingBacking | null): string | null {
  switch (piece.kind) {
    case ExtentKind.Data:
      if (piece.hostOffset >= s.fileSize) return `guest offset ${guestOffset}: cluster at host offset ${piece.hostOffset} lies past the end of ${s.file.path}`;
      return null;
    case ExtentKind.ExternalData:
      if (piece.hostOffset >= s.dataFileSize) return `guest offset ${guestOffset}: cluster at host offset ${piece.hostOffset} lies past the end of ${s.dataFile!.path}`;
      return null;
    case ExtentKind.Backing:
      return missing ? `backing file ${missing.name} is missing` : null;
    default:
      return null;
  }
}

/** Why a compressed cluster cannot be read: outside the file, or (within the budget) it does not decompress. */
async function compressedDamage(s: Qcow2State, e: L2Entry, guestOffset: number, budget: { left: number; skipped: boolean }): Promise<string | null> {
  const d = decodeCompressed(s.g, e.hi, e.lo);
  const bad = badCompressed(s.g, d, s.fileSize);
  if (bad) return `guest offset ${guestOffset}: compressed cluster: ${bad}`;
  if (budget.left <= 0) {
    budget.skipped = true;
    return null;
  }
  budget.left--;
  try {
    await decompressedCluster(s, e.hi, e.lo, guestOffset);
    return null;
  } catch (err) {
    if (errnoOf(err) !== 'EIO') throw err;
    return oneLine(err);
  }
}
