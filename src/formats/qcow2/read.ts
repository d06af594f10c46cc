/**
 * The qcow2 read path: guest range -> extents -> I/O, straight into the
 * caller's buffer. Contiguous host data, contiguous backing ranges and zero
 * ranges are each coalesced; compressed clusters are decompressed through a
 * small cache of recently used clusters.
 */
import { CorruptionError, FormatError } from '../../errors.js';
import { settleAll, type FdSink } from '../../io/file.js';
import { readFromBacking } from '../driver.js';
import { classify, ExtentKind, readL2Entry, type L2Entry, type Piece } from './map.js';
import { decompressCluster } from './compress.js';
import type { Qcow2State } from './state.js';
import { decodeCompressed } from './spec.js';

/**
 * Add an I/O promise to a batch that is awaited later. The promise gets a
 * handler at once: if it rejects while the caller is still awaiting
 * something else (the next L2 table), that is not an unhandled rejection;
 * the batch's settleAll still sees the error.
 */
export function track(ios: Promise<unknown>[], p: Promise<unknown>): void {
  p.catch(() => {});
  ios.push(p);
}

const fastEntry: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
const fastPiece: Piece = { kind: ExtentKind.Zero, hostOffset: 0, length: 0 };

/**
 * The fast path: a range inside one cluster whose L2 table is cached and
 * whose mapping is one piece (most requests: FUSE splits I/O at 1 MiB or
 * less, clusters are 64 KiB). Returns the piece's kind, its host offset in
 * fastPiece; -1 when the range needs the general path. Synchronous, so the
 * scratch objects are not shared.
 */
function singlePiece(s: Qcow2State, length: number, guestOffset: number): ExtentKind | -1 {
  const g = s.g;
  const cs = g.clusterSize;
  const clusterIndex = Math.floor(guestOffset / cs);
  const inCluster = guestOffset - clusterIndex * cs;
  if (length === 0 || inCluster + length > cs) return -1;
  const table = s.cachedL2(Math.floor(clusterIndex / g.l2Entries));
  if (!table) return -1;
  readL2Entry(g, table, clusterIndex % g.l2Entries, fastEntry);
  classify(g, fastEntry, clusterIndex * cs, inCluster, length, fastPiece);
  return fastPiece.length === length ? fastPiece.kind : -1;
}

/**
 * readGuest done before returning (BlockDriver.readNow): a single-piece
 * range of data or zeros whose data read runs inline. Returns false, having
 * done nothing, for everything else. The caller checked the request.
 */
export function readGuestNow(s: Qcow2State, buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
  switch (singlePiece(s, length, guestOffset)) {
    case ExtentKind.Data:
      return fastPiece.hostOffset < s.fileSize && s.file.readZeroFillNow(buf, bufOffset, length, fastPiece.hostOffset) >= 0;
    case ExtentKind.ExternalData:
      return fastPiece.hostOffset < s.dataFileSize && s.dataFile!.readZeroFillNow(buf, bufOffset, length, fastPiece.hostOffset) >= 0;
    case ExtentKind.Zero:
      buf.fill(0, bufOffset, bufOffset + length);
      return true;
    default:
      return false;
  }
}

/**
 * BlockDriver.sendNow: guest [guestOffset, +length) as one host-contiguous
 * run of data in the image file (or the external data file), inside one
 * cached L2 table, sent by `sink` from the file when the file lets it
 * (ImageFile.sendNow: inline, all of it below the file's size). false,
 * nothing done, for anything else. The caller checked the request.
 */
export function sendGuestNow(s: Qcow2State, length: number, guestOffset: number, sink: FdSink): boolean {
  const g = s.g;
  const cs = g.clusterSize;
  const l1Index = Math.floor(guestOffset / g.l2Span);
  if (length === 0 || guestOffset + length > (l1Index + 1) * g.l2Span) return false;
  const table = s.cachedL2(l1Index);
  if (!table) return false;
  let kind: ExtentKind | -1 = -1;
  let host = 0;
  let pos = guestOffset;
  const end = guestOffset + length;
  while (pos < end) {
    const clusterIndex = Math.floor(pos / cs);
    readL2Entry(g, table, clusterIndex % g.l2Entries, fastEntry);
    classify(g, fastEntry, clusterIndex * cs, pos - clusterIndex * cs, Math.min(end - pos, (clusterIndex + 1) * cs - pos), fastPiece);
    if (fastPiece.kind !== ExtentKind.Data && fastPiece.kind !== ExtentKind.ExternalData) return false;
    if (kind === -1) {
      kind = fastPiece.kind;
      host = fastPiece.hostOffset;
    } else if (fastPiece.kind !== kind || fastPiece.hostOffset !== host + (pos - guestOffset)) {
      return false;
    }
    pos += fastPiece.length;
  }
  const file = kind === ExtentKind.Data ? s.file : s.dataFile!;
  return file.sendNow(host, length, sink);
}

/** Read guest bytes into buf; see BlockDriver.read. */
export async function readGuest(s: Qcow2State, buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
  // The driver checked the caller's request (checkRequest); this guards the internal callers (copy-on-write fills).
  if (guestOffset < 0 || length < 0 || guestOffset + length > s.virtualSize) {
    throw new FormatError(`read [${guestOffset}, +${length}) outside the disk`, 'EINVAL');
  }
  switch (singlePiece(s, length, guestOffset)) {
    case ExtentKind.Data:
      await readData(s, s.file, s.fileSize, buf, bufOffset, length, fastPiece.hostOffset, guestOffset);
      return;
    case ExtentKind.ExternalData:
      await readData(s, s.dataFile!, s.dataFileSize, buf, bufOffset, length, fastPiece.hostOffset, guestOffset);
      return;
    case ExtentKind.Zero:
      buf.fill(0, bufOffset, bufOffset + length);
      return;
    default:
      break; // backing, compressed, several pieces, an L2 table not cached: the general path
  }
  const g = s.g;
  const ios: Promise<unknown>[] = [];
  const entry: L2Entry = { hi: 0, lo: 0, alloc: 0, zero: 0 };
  const piece: Piece = { kind: ExtentKind.Zero, hostOffset: 0, length: 0 };
  // The pending run being coalesced.
  let runKind: ExtentKind | -1 = -1;
  let runHost = 0;
  let runGuest = 0;
  let runBuf = 0;
  let runLen = 0;
  const flushRun = (): void => {
    if (runLen === 0) return;
    switch (runKind) {
      case ExtentKind.Data:
        track(ios, readData(s, s.file, s.fileSize, buf, runBuf, runLen, runHost, runGuest));
        break;
      case ExtentKind.ExternalData:
        track(ios, readData(s, s.dataFile!, s.dataFileSize, buf, runBuf, runLen, runHost, runGuest));
        break;
      case ExtentKind.Backing:
        track(ios, readFromBacking(s.backing, buf, runBuf, runLen, runGuest));
        break;
      case ExtentKind.Zero:
        buf.fill(0, runBuf, runBuf + runLen);
        break;
      case ExtentKind.Compressed: // read on its own, never part of a run
      case -1:
        break;
    }
    runLen = 0;
    runKind = -1;
  };

  try {
    let pos = guestOffset;
    let out = bufOffset;
    const end = guestOffset + length;
    while (pos < end) {
      const l1Index = Math.floor(pos / g.l2Span);
      const spanEnd = Math.min(end, (l1Index + 1) * g.l2Span);
      const l2Offset = s.l2OffsetOf(l1Index);
      if (l2Offset === 0) {
        extend(ExtentKind.Backing, 0, spanEnd - pos);
      } else {
        flushRun();
        const table = await s.l2Table(l2Offset);
        while (pos < spanEnd) {
          const clusterIndex = Math.floor(pos / g.clusterSize);
          const inCluster = pos - clusterIndex * g.clusterSize;
          readL2Entry(g, table, clusterIndex % g.l2Entries, entry);
          let remaining = Math.min(spanEnd - pos, g.clusterSize - inCluster);
          while (remaining > 0) {
            classify(g, entry, clusterIndex * g.clusterSize, pos - clusterIndex * g.clusterSize, remaining, piece);
            if (piece.kind === ExtentKind.Compressed) {
              flushRun();
              track(ios, readCompressed(s, entry.hi, entry.lo, buf, out, piece.length, pos - clusterIndex * g.clusterSize, pos));
              pos += piece.length;
              out += piece.length;
            } else {
              extend(piece.kind, piece.hostOffset, piece.length);
            }
            remaining -= piece.length;
          }
        }
      }
    }
    flushRun();

    // Adds `len` bytes of `kind` at the current position, extending the run when contiguous.
    function extend(kind: ExtentKind, host: number, len: number): void {
      const contiguous =
        kind === runKind &&
        (kind === ExtentKind.Backing || kind === ExtentKind.Zero || host === runHost + runLen);
      if (!contiguous) {
        flushRun();
        runKind = kind;
        runHost = host;
        runGuest = pos;
        runBuf = out;
      }
      runLen += len;
      pos += len;
      out += len;
    }
  } catch (err) {
    await Promise.allSettled(ios);
    throw err;
  }
  await settleAll(ios);
}

function readData(
  s: Qcow2State,
  file: Qcow2State['file'],
  fileSize: number,
  buf: Buffer,
  bufOffset: number,
  length: number,
  hostOffset: number,
  guestOffset: number,
): Promise<unknown> {
  if (hostOffset < fileSize) return file.readZeroFill(buf, bufOffset, length, hostOffset);
  // Past the size we know of: ask the file (a write may have grown it) before calling it corrupt.
  return file.size().then((size) => {
    if (hostOffset >= size) {
      throw new CorruptionError(`guest offset ${guestOffset}: cluster at host offset ${hostOffset} lies past the end of ${file.path}`);
    }
    return file.readZeroFill(buf, bufOffset, length, hostOffset);
  });
}

async function readCompressed(
  s: Qcow2State,
  hi: number,
  lo: number,
  buf: Buffer,
  bufOffset: number,
  length: number,
  inCluster: number,
  guestOffset: number,
): Promise<void> {
  const cluster = await decompressedCluster(s, hi, lo, guestOffset);
  cluster.copy(buf, bufOffset, inCluster, inCluster + length);
}

/** A compressed cluster's content, through the driver's small cache. */
export async function decompressedCluster(s: Qcow2State, hi: number, lo: number, guestOffset: number): Promise<Buffer> {
  const d = decodeCompressed(s.g, hi, lo);
  const cached = s.decompressed.get(d.hostOffset);
  if (cached) return cached;
  if (d.hostOffset >= s.fileSize || d.hostOffset < s.g.clusterSize) {
    throw new CorruptionError(`guest offset ${guestOffset}: compressed cluster at host offset ${d.hostOffset} is outside the file`);
  }
  const input = Buffer.allocUnsafe(d.length);
  await s.file.readZeroFill(input, 0, d.length, d.hostOffset);
  let data: Buffer;
  try {
    data = await decompressCluster(s.compressionType, input, s.g.clusterSize);
  } catch (err) {
    throw new CorruptionError(`guest offset ${guestOffset}: ${(err as Error).message}`);
  }
  s.decompressed.set(d.hostOffset, data);
  return data;
}
