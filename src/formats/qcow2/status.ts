/**
 * Block status of a qcow2 guest range (BlockDriver.blockStatus): the extents
 * `qemu-img map --output=json` prints, at cluster or (extended L2)
 * subcluster granularity, following the backing chain. Works on a
 * Qcow2State alone, without the metadata lock, like reads: a mapping that
 * changes meanwhile gives the status from before or after the change.
 *
 * Status per piece (map.ts classify):
 *  - Data / ExternalData: data, present, depth 0, hostOffset;
 *  - Compressed: data, present, compressed, no hostOffset;
 *  - Zero (zero flag or zero subclusters): zero, present;
 *  - Backing (unallocated): the backing file's own status with depth + 1
 *    where the backing file reaches; past its end, or with no backing file
 *    opened: zero, not present, depth 0 (QEMU: unallocated blocks of an
 *    image without backing, or past the backing file's end, read as zeros).
 */
import { backingStatus, type BlockExtent } from '../driver.js';
import { classify, ExtentKind, readL2Entry, type L2Entry, type Piece } from './map.js';
import type { Qcow2State } from './state.js';

/**
 * driver.ts's pushExtent for this image's own (present, depth 0) extents without
 * allocating one per cluster: the last extent grows when it continues.
 */
function pushOwn(out: BlockExtent[], guestOffset: number, length: number, data: boolean, compressed: boolean, hostOffset: number | undefined): void {
  const last = out[out.length - 1];
  if (
    last &&
    last.guestOffset + last.length === guestOffset &&
    last.depth === 0 &&
    last.present &&
    last.data === data &&
    last.zero === !data &&
    (last.compressed ?? false) === compressed &&
    (last.hostOffset === undefined ? hostOffset === undefined : hostOffset !== undefined && last.hostOffset + last.length === hostOffset)
  ) {
    last.length += length;
    return;
  }
  const e: BlockExtent = { guestOffset, length, data, zero: !data, present: true, depth: 0 };
  if (hostOffset !== undefined) e.hostOffset = hostOffset;
  if (compressed) e.compressed = true;
  out.push(e);
}

export async function blockStatus(s: Qcow2State, guestOffset: number, length: number): Promise<BlockExtent[]> {
  const g = s.g;
  const out: BlockExtent[] = [];
  const end = guestOffset + length;
  const entry: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
  const piece: Piece = { kind: ExtentKind.Zero, hostOffset: 0, length: 0 };
  // Unallocated runs are collected and asked of the backing file in one call each.
  let runStart = -1;
  let runEnd = -1;
  const flushBacking = async (): Promise<void> => {
    if (runStart < 0) return;
    const from = runStart;
    const to = runEnd;
    runStart = runEnd = -1;
    await backingStatus(s.backing, from, to - from, out);
  };
  const backingRun = (at: number, len: number): void => {
    if (runStart >= 0 && runEnd === at) {
      runEnd += len;
      return;
    }
    runStart = at;
    runEnd = at + len;
  };
  // An all-zero L2 entry: unallocated (backing) across its whole cluster? Then runs of them are skipped in one step.
  classify(g, entry, 0, 0, g.clusterSize, piece);
  const zeroEntryIsBacking = piece.kind === ExtentKind.Backing && piece.length === g.clusterSize;

  let pos = guestOffset;
  while (pos < end) {
    const l1Index = Math.floor(pos / g.l2Span);
    const spanEnd = Math.min(end, (l1Index + 1) * g.l2Span);
    const l2Offset = l1Index < s.l1Entries ? s.l2OffsetOf(l1Index) : 0;
    if (l2Offset === 0) {
      backingRun(pos, spanEnd - pos);
      pos = spanEnd;
      continue;
    }
    const table = await s.l2Table(l2Offset);
    // The table is used synchronously from here to the next await (flushBacking awaits only when
    // the backing file is asked); it is re-read for the next cluster after any await.
    while (pos < spanEnd) {
      const clusterIndex = Math.floor(pos / g.clusterSize);
      const clusterOffset = clusterIndex * g.clusterSize;
      const current = s.l2Cache.peek(l2Offset) ?? table;
      const index = clusterIndex % g.l2Entries;
      if (zeroEntryIsBacking && pos === clusterOffset) {
        const run = zeroEntries(current, index, Math.min(g.l2Entries, index + Math.ceil((spanEnd - pos) / g.clusterSize)), g.l2EntryBytes);
        if (run > 0) {
          const runEndOffset = Math.min(spanEnd, clusterOffset + run * g.clusterSize);
          backingRun(pos, runEndOffset - pos);
          pos = runEndOffset;
          continue;
        }
      }
      readL2Entry(g, current, index, entry);
      const clusterEnd = Math.min(spanEnd, clusterOffset + g.clusterSize);
      while (pos < clusterEnd) {
        classify(g, entry, clusterOffset, pos - clusterOffset, clusterEnd - pos, piece);
        const len = piece.length;
        if (piece.kind === ExtentKind.Backing) {
          backingRun(pos, len);
        } else {
          if (runStart >= 0) await flushBacking();
          const data = piece.kind !== ExtentKind.Zero;
          const compressed = piece.kind === ExtentKind.Compressed;
          const hostOffset = data && !compressed ? piece.hostOffset : undefined;
          pushOwn(out, pos, len, data, compressed, hostOffset);
        }
        pos += len;
      }
    }
  }
  await flushBacking();
  return out;
}

/** How many entries from `from` (below `to`) are all zero bytes (unallocated). */
function zeroEntries(table: Buffer, from: number, to: number, entryBytes: number): number {
  let i = from;
  for (; i < to; i++) {
    const at = i * entryBytes;
    let zero = true;
    for (let b = 0; b < entryBytes; b += 4) {
      if (table.readUInt32LE(at + b) !== 0) {
        zero = false;
        break;
      }
    }
    if (!zero) break;
  }
  return i - from;
}
