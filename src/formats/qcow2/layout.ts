/**
 * qcow2 geometry and table-entry codecs. Pure; no I/O.
 *
 * 64-bit entries are decoded as two 32-bit halves (hi, lo) on the hot path:
 * host offsets fit in 56 bits, so `hi & 0x00ffffff` times 2^32 plus the low
 * half stays an exact JavaScript number.
 */
import { hasBit, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, type Qcow2Header } from './header.js';

export const L1E_COPIED = 0x80000000; // bit 63, in hi
export const L2E_COPIED = 0x80000000; // bit 63, in hi
export const L2E_COMPRESSED = 0x40000000; // bit 62, in hi
export const L2E_ZERO = 1; // bit 0, in lo (v3, no extended L2)
const TWO32 = 0x1_0000_0000;

export interface Geometry {
  clusterBits: number;
  /** bytes */
  clusterSize: number;
  /** bytes per L2 entry: 8, or 16 with extended L2 */
  l2EntryBytes: number;
  /** entries per L2 table */
  l2Entries: number;
  /** guest bytes one L2 table maps */
  l2Span: number;
  extL2: boolean;
  /** bytes; clusterSize / 32 with extended L2, else clusterSize */
  subclusterSize: number;
  /** compressed descriptor: bit where the sector count starts */
  csizeShift: number;
  refcountOrder: number;
  /** refcount entries per refcount block */
  refblockEntries: number;
  /** host bytes one refcount block describes */
  refblockSpan: number;
  hasDataFile: boolean;
  v3: boolean;
}

export function geometryOf(h: Qcow2Header): Geometry {
  const clusterSize = 2 ** h.clusterBits;
  const extL2 = hasBit(h.incompatible, INCOMPAT_EXTL2);
  const l2EntryBytes = extL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntryBytes;
  const refblockEntries = (clusterSize * 8) / 2 ** h.refcountOrder;
  return {
    clusterBits: h.clusterBits,
    clusterSize,
    l2EntryBytes,
    l2Entries,
    l2Span: l2Entries * clusterSize,
    extL2,
    subclusterSize: extL2 ? clusterSize / 32 : clusterSize,
    csizeShift: 62 - (h.clusterBits - 8),
    refcountOrder: h.refcountOrder,
    refblockEntries,
    refblockSpan: refblockEntries * clusterSize,
    hasDataFile: hasBit(h.incompatible, INCOMPAT_DATA_FILE),
    v3: h.version === 3,
  };
}

/** Host offset in bits 9..55 of an L1/L2 entry split as (hi, lo). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
}

export function writeEntry(buf: Buffer, at: number, hiFlags: number, offset: number, loFlags: number): void {
  const hi = (hiFlags | Math.floor(offset / TWO32)) >>> 0;
  const lo = ((offset % TWO32) | loFlags) >>> 0;
  buf.writeUInt32BE(hi, at);
  buf.writeUInt32BE(lo, at + 4);
}

export interface CompressedDescriptor {
  /** byte offset of the compressed data (not aligned) */
  hostOffset: number;
  /** bytes to read: whole sectors from the sector holding hostOffset */
  length: number;
}

export function decodeCompressed(g: Geometry, hi: number, lo: number): CompressedDescriptor {
  const v = ((BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0));
  const shift = BigInt(g.csizeShift);
  const hostOffset = Number(v & ((1n << shift) - 1n));
  const sectors = Number(v >> shift) + 1;
  return { hostOffset, length: sectors * 512 - (hostOffset & 511) };
}

/** Host clusters a compressed descriptor touches: [first, last] cluster byte offsets. */
export function compressedClusters(g: Geometry, d: CompressedDescriptor): [number, number] {
  const mask = g.clusterSize - 1;
  const first = d.hostOffset - (d.hostOffset & mask);
  const lastByte = d.hostOffset + d.length - 1;
  return [first, lastByte - (lastByte & mask)];
}
