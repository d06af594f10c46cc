/**
 * qcow2 geometry and table-entry codecs. Pure; no I/O.
 *
 * 64-bit entries are decoded as two 32-bit halves (hi, lo) on the hot path,
 * through ../u64.ts: a host offset at or above 2^52 decodes as
 * INVALID_OFFSET, which no bounds or alignment check accepts.
 */
import { hexOffset, INVALID_OFFSET, MAX_DISK_BYTES, u64Of } from '../u64.js';
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

/** Host offset in bits 9..55 of an L1/L2 entry split as (hi, lo); INVALID_OFFSET at or above 2^52. */
export function entryOffset(hi: number, lo: number): number {
  return u64Of(hi & 0x00ffffff, (lo & 0xfffffe00) >>> 0);
}

/**
 * Why a data or table cluster offset from an L1/L2 entry cannot be used
 * (null when it can): unrepresentable, or not aligned to the cluster size.
 * Offsets past the end of the file are the caller's to judge (a write may
 * grow the file over them; a read or a release may not).
 */
export function badClusterOffset(g: Geometry, offset: number): string | null {
  if (offset === INVALID_OFFSET) return 'is at or above 2^52';
  if (offset % g.clusterSize !== 0) return `${hexOffset(offset)} is not aligned to the cluster size`;
  return null;
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

/**
 * A compressed L2 entry: bits 0..x-1 the byte offset, bits x..61 the number
 * of additional 512-byte sectors (x = 62 - (cluster_bits - 8)). An offset at
 * or above 2^52 decodes as INVALID_OFFSET (length then means nothing).
 */
export function decodeCompressed(g: Geometry, hi: number, lo: number): CompressedDescriptor {
  const v = ((BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0));
  const shift = BigInt(g.csizeShift);
  const offsetBits = v & ((1n << shift) - 1n);
  const sectors = Number(v >> shift) + 1;
  if (offsetBits >= BigInt(MAX_DISK_BYTES)) return { hostOffset: INVALID_OFFSET, length: sectors * 512 };
  const hostOffset = Number(offsetBits);
  return { hostOffset, length: sectors * 512 - (hostOffset % 512) };
}

/**
 * Why a compressed descriptor cannot be read or released (null when it can):
 * its sectors must lie after the header cluster and inside the file.
 */
export function badCompressed(g: Geometry, d: CompressedDescriptor, fileSize: number): string | null {
  if (d.hostOffset === INVALID_OFFSET) return 'its offset is at or above 2^52';
  if (d.hostOffset < g.clusterSize) return 'its data lies in the header cluster';
  if (d.hostOffset >= fileSize) return 'its data lies past the end of the file';
  return null;
}

/** Host clusters a compressed descriptor touches: [first, last] cluster byte offsets. */
export function compressedClusters(g: Geometry, d: CompressedDescriptor): [number, number] {
  const mask = g.clusterSize - 1;
  const first = d.hostOffset - (d.hostOffset & mask);
  const lastByte = d.hostOffset + d.length - 1;
  return [first, lastByte - (lastByte & mask)];
}
