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
import type { BlockExtent } from '../driver.js';
import { classify, ExtentKind, readL2Entry, type L2Entry, type Piece } from './map.js';
import type { Qcow2State } from './state.js';

/** Append `e` to `out`, merging it into the last extent when their status is equal and host bytes contiguous. */
export function pushExtent(out: BlockExtent[], e: BlockExtent): void {
  const last = out[out.length - 1];
  if (
    last &&
    last.guestOffset + last.length === e.guestOffset &&
    last.data === e.data &&
    last.zero === e.zero &&
    last.present === e.present &&
    last.depth === e.depth &&
    (last.compressed ?? false) === (e.compressed ?? false) &&
    (last.hostOffset === undefined
      ? e.hostOffset === undefined
      : e.hostOffset !== undefined && last.hostOffset + last.length === e.hostOffset)
  ) {
    last.length += e.length;
    return;
  }
  out.push(e);
}

const UNALLOCATED_ZERO = { data: false, zero: true, present: false } as const;

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
    const backing = s.backing;
    const avail = backing ? Math.max(0, Math.min(to, backing.virtualSize) - from) : 0;
    if (avail > 0) {
      for (const e of await backing!.blockStatus(from, avail)) pushExtent(out, { ...e, depth: e.depth + 1 });
    }
    if (from + avail < to) pushExtent(out, { guestOffset: from + avail, length: to - from - avail, ...UNALLOCATED_ZERO, depth: 0 });
  };
  const backingRun = (at: number, len: number): void => {
    if (runStart >= 0 && runEnd === at) {
      runEnd += len;
      return;
    }
    runStart = at;
    runEnd = at + len;
  };
  const own = async (e: BlockExtent): Promise<void> => {
    await flushBacking();
    pushExtent(out, e);
  };

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
    // The table is used synchronously from here to the next await (own/flushBacking only await when
    // the backing file is asked); it is re-read for the next cluster after any await.
    while (pos < spanEnd) {
      const ci = Math.floor(pos / g.clusterSize);
      const clusterOffset = ci * g.clusterSize;
      readL2Entry(g, s.l2Cache.peek(l2Offset) ?? table, ci % g.l2Entries, entry);
      const clusterEnd = Math.min(spanEnd, clusterOffset + g.clusterSize);
      while (pos < clusterEnd) {
        classify(g, entry, clusterOffset, pos - clusterOffset, clusterEnd - pos, piece);
        const len = piece.length;
        switch (piece.kind) {
          case ExtentKind.Data:
          case ExtentKind.ExternalData:
            await own({ guestOffset: pos, length: len, data: true, zero: false, present: true, depth: 0, hostOffset: piece.hostOffset });
            break;
          case ExtentKind.Compressed:
            await own({ guestOffset: pos, length: len, data: true, zero: false, present: true, depth: 0, compressed: true });
            break;
          case ExtentKind.Zero:
            await own({ guestOffset: pos, length: len, data: false, zero: true, present: true, depth: 0 });
            break;
          case ExtentKind.Backing:
            backingRun(pos, len);
            break;
        }
        pos += len;
      }
    }
  }
  await flushBacking();
  return out;
}
