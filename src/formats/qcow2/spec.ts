/**
 * The qcow2 on-disk format (QEMU's docs/interop/qcow2.rst): every header
 * field offset, feature bit, extension type, limit, table-entry flag and
 * mask, and the decoders of L1/L2 entries and compressed descriptors. Pure;
 * no I/O. No other file spells a qcow2 offset, flag or mask as a literal.
 *
 * 64-bit entries are decoded as two 32-bit halves (hi, lo) on the hot path,
 * through ../u64.ts: a host offset at or above 2^52 decodes as
 * INVALID_OFFSET, which no bounds or alignment check accepts.
 */
import { hexOffset, INVALID_OFFSET, MAX_DISK_BYTES, u64Of } from '../u64.js';

// ---- header ----------------------------------------------------------------

/** Byte offsets of the header fields (all big-endian). */
export const HDR = {
  magic: 0,
  version: 4,
  backingFileOffset: 8, // u64
  backingFileSize: 16,
  clusterBits: 20,
  size: 24, // u64, guest bytes
  cryptMethod: 32,
  l1Size: 36, // entries
  l1TableOffset: 40, // u64
  refcountTableOffset: 48, // u64, followed by refcountTableClusters: one 12-byte write switches tables
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64, // u64
  // version 3 only:
  incompatible: 72, // u64 mask
  compatible: 80, // u64 mask
  autoclear: 88, // u64 mask
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104, // one byte, when headerLength > 104
} as const;

/** Bytes of the fixed header: version 2, version 3 without optional fields. */
export const V2_HEADER_BYTES = 72;
export const V3_HEADER_BYTES = 104;

export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_DATA_FILE = 1 << 2;
export const INCOMPAT_COMPRESSION = 1 << 3;
export const INCOMPAT_EXTL2 = 1 << 4;
export const INCOMPAT_KNOWN = 0x1f;
export const COMPAT_LAZY_REFCOUNTS = 1 << 0;
export const AUTOCLEAR_BITMAPS = 1 << 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1;

/** Header extension types (each: u32 type, u32 length, data padded to 8 bytes). */
export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_DATA_FILE = 0x44415441;
/** Feature name table entries: u8 kind, u8 bit, 46 bytes of name. */
export const FEATURE_NAME_ENTRY_BYTES = 48;
export const FEATURE_NAME_BYTES = 46;
/** Bitmaps extension: u32 count, 4 reserved, u64 directory size, u64 directory offset. */
export const BITMAPS_EXT = { count: 0, directorySize: 8, directoryOffset: 16, bytes: 24 } as const;
/** Bitmap directory entry: u64 table offset, u32 table size (entries), ..., u16 name size, u32 extra data size, then extra data and name. */
export const BITMAP_DIR = { tableOffset: 0, tableSize: 8, nameSize: 18, extraSize: 20, bytes: 24 } as const;

/** Snapshot table entry fields (each entry is padded to 8 bytes). */
export const SNAP = {
  l1TableOffset: 0, // u64
  l1Size: 8,
  idSize: 12, // u16
  nameSize: 14, // u16
  dateSec: 16,
  dateNsec: 20,
  vmClockNsec: 24, // u64
  vmStateSize: 32,
  extraDataSize: 36,
  /** start of the extra data: u64 vm_state_size_large, u64 disk_size, u64 icount */
  extra: 40,
} as const;
export const SNAPSHOT_ENTRY_MIN_BYTES = 40;
/** Extra data a version 3 snapshot entry must carry (vm_state_size_large and disk_size). */
export const SNAPSHOT_V3_MIN_EXTRA = 16;
/** Largest extra data we accept in one entry, and largest snapshot table we read (QEMU: 1 KiB, 64 MiB). */
export const MAX_SNAPSHOT_EXTRA = 1024;
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

/** QEMU's implementation limits, which we share so images stay interchangeable. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_BACKING_NAME_BYTES = 1023;
/** Extended L2 entries need clusters of at least 16 KiB (32 subclusters of 512 bytes or more). */
export const MIN_EXTL2_CLUSTER_BITS = 14;
/** Bytes per L2 entry: standard, extended. */
export const L2E_BYTES = 8;
export const L2E_EXT_BYTES = 16;
export const L1E_BYTES = 8;

/** True when `bit` (a single-bit mask below 2^31) is set in a 64-bit feature field. */
export function hasBit(mask: bigint, bit: number): boolean {
  return (mask & BigInt(bit)) !== 0n;
}

/**
 * The header writes an open image makes, as [file offset, bytes]: the
 * incompatible-features field (dirty, corrupt bits) and the refcount table
 * switch (offset and cluster count are adjacent: one write, atomic per sector).
 */
export function incompatibleField(v: bigint): [number, Buffer] {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return [HDR.incompatible, b];
}

export function refcountTableFields(offset: number, clusters: number): [number, Buffer] {
  const b = Buffer.alloc(12);
  b.writeBigUInt64BE(BigInt(offset), 0);
  b.writeUInt32BE(clusters, 8);
  return [HDR.refcountTableOffset, b];
}

/** The active L1 table switch: l1_size and l1_table_offset are adjacent (one 12-byte write, atomic per sector). */
export function l1TableFields(offset: number, entries: number): [number, Buffer] {
  const b = Buffer.alloc(12);
  b.writeUInt32BE(entries, 0);
  b.writeBigUInt64BE(BigInt(offset), 4);
  return [HDR.l1Size, b];
}

/** The guest size field (resize). */
export function sizeField(bytes: number): [number, Buffer] {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(bytes));
  return [HDR.size, b];
}

// ---- geometry ----------------------------------------------------------------

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
  hasDataFile: boolean;
  v3: boolean;
}

export function geometryOf(h: { clusterBits: number; incompatible: bigint; refcountOrder: number; version: number }): Geometry {
  const clusterSize = 2 ** h.clusterBits;
  const extL2 = hasBit(h.incompatible, INCOMPAT_EXTL2);
  const l2EntryBytes = extL2 ? L2E_EXT_BYTES : L2E_BYTES;
  const l2Entries = clusterSize / l2EntryBytes;
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
    refblockEntries: (clusterSize * 8) / 2 ** h.refcountOrder,
    hasDataFile: hasBit(h.incompatible, INCOMPAT_DATA_FILE),
    v3: h.version === 3,
  };
}

// ---- L1/L2 and refcount table entries -----------------------------------------

/** Flags in the high half (bits 32..63) of an entry. */
export const L1E_COPIED = 0x80000000; // bit 63: refcount of the L2 table is exactly 1
export const L2E_COPIED = 0x80000000; // bit 63: refcount of the data cluster is exactly 1
export const L2E_COMPRESSED = 0x40000000; // bit 62
/** In the low half: bit 0, the cluster reads as zeros (v3 without extended L2). */
export const L2E_ZERO = 1;
/** Bits that must be zero: L1 entries 0..8 and 56..62; standard L2 entries 1..8 and 56..61; refcount table entries 0..8. */
export const L1E_RESERVED_HI = 0x7f000000;
export const L1E_RESERVED_LO = 0x1ff;
export const L2E_RESERVED_HI = 0x3f000000;
export const L2E_RESERVED_LO = 0x1fe;
export const REFT_RESERVED_LO = 0x1ff;
/** Extended L2 entries: the zero bitmap at +8, the allocation bitmap at +12 (bit i: subcluster i). */
export const L2E_ZERO_BITMAP = 8;
export const L2E_ALLOC_BITMAP = 12;
export const ALL_SUBCLUSTERS = 0xffffffff;

const TWO32 = 0x1_0000_0000;

/** Host offset in bits 9..55 of an L1/L2/refcount table entry split as (hi, lo); INVALID_OFFSET at or above 2^52. */
export function entryOffset(hi: number, lo: number): number {
  return u64Of(hi & 0x00ffffff, (lo & 0xfffffe00) >>> 0);
}

export function writeEntry(buf: Buffer, at: number, hiFlags: number, offset: number, loFlags: number): void {
  const hi = (hiFlags | Math.floor(offset / TWO32)) >>> 0;
  const lo = ((offset % TWO32) | loFlags) >>> 0;
  buf.writeUInt32BE(hi, at);
  buf.writeUInt32BE(lo, at + 4);
}

/**
 * What an L2 entry maps (QEMU's qcow2_get_cluster_type):
 *  - Compressed: bit 62; the rest is a compressed descriptor.
 *  - Unallocated: no host cluster (reads from the backing file or zeros).
 *  - ZeroPlain: the zero flag without a host cluster (v3, no extended L2).
 *  - ZeroAlloc: the zero flag over a host cluster kept for later writes.
 *  - Normal: guest data in a host cluster.
 * A host cluster exists when the offset is not 0 - or, with an external
 * data file (where the host offset is the guest offset and cluster 0 is
 * offset 0), when the COPIED flag says so. Extended L2 entries are Normal or
 * Unallocated; per-subcluster state is in their bitmaps.
 */
export const enum ClusterType {
  Unallocated = 0,
  ZeroPlain = 1,
  ZeroAlloc = 2,
  Normal = 3,
  Compressed = 4,
}

/** Does the entry name a host cluster of its own (Normal or ZeroAlloc)? */
export function hasHostCluster(t: ClusterType): boolean {
  return t === ClusterType.Normal || t === ClusterType.ZeroAlloc;
}

export function clusterType(g: Geometry, hi: number, lo: number): ClusterType {
  if (hi & L2E_COMPRESSED) return ClusterType.Compressed;
  const hasCluster = entryOffset(hi, lo) !== 0 || (g.hasDataFile && (hi & L2E_COPIED) !== 0);
  if (!g.extL2 && g.v3 && lo & L2E_ZERO) return hasCluster ? ClusterType.ZeroAlloc : ClusterType.ZeroPlain;
  return hasCluster ? ClusterType.Normal : ClusterType.Unallocated;
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

// ---- compressed clusters -------------------------------------------------------

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
  const v = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
  const shift = BigInt(g.csizeShift);
  const offsetBits = v & ((1n << shift) - 1n);
  const sectors = Number(v >> shift) + 1;
  if (offsetBits >= BigInt(MAX_DISK_BYTES)) return { hostOffset: INVALID_OFFSET, length: sectors * 512 };
  const hostOffset = Number(offsetBits);
  return { hostOffset, length: sectors * 512 - (hostOffset % 512) };
}

/**
 * The host bytes a compressed descriptor holds a reference to: its whole
 * sectors, [start, start + bytes). Every host cluster they touch is
 * referenced (and refcounted) once per compressed entry.
 */
export function compressedExtent(d: CompressedDescriptor): { start: number; bytes: number } {
  const start = d.hostOffset - (d.hostOffset % 512);
  return { start, bytes: d.length + (d.hostOffset - start) };
}

/** Host clusters a compressed descriptor touches: [first, last] cluster byte offsets. */
export function compressedClusters(g: Geometry, d: CompressedDescriptor): [number, number] {
  const mask = g.clusterSize - 1;
  const first = d.hostOffset - (d.hostOffset & mask);
  const lastByte = d.hostOffset + d.length - 1;
  return [first, lastByte - (lastByte & mask)];
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
