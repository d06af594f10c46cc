/**
 * QED header: parse, validate, serialize. Pure functions, no I/O.
 *
 * On-disk layout (docs/interop/qed_spec.rst, all little-endian, 64 bytes):
 *   0 magic "QED\0"        4 cluster_size       8 table_size (clusters)
 *  12 header_size (clusters)  16 features  24 compat_features  32 autoclear_features
 *  40 l1_table_offset     48 image_size        56 backing_filename_offset  60 backing_filename_size
 *
 * Every rule an opened image must satisfy is checked here, once; a broken
 * rule is a one-line FormatError and nothing is written.
 */
import { FormatError } from '../../errors.js';
import { headerU64LE, MAX_DISK_BYTES, u64LE } from '../u64.js';

export const QED_MAGIC = 0x00444551;
export const QED_HEADER_BYTES = 64;

export const QED_F_BACKING_FILE = 0x01n;
export const QED_F_NEED_CHECK = 0x02n;
export const QED_F_BACKING_FORMAT_NO_PROBE = 0x04n;
/** Incompatible feature bits this implementation understands. */
export const QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE;
/** No compat or autoclear bits are defined by the spec. */
export const QED_AUTOCLEAR_FEATURE_MASK = 0n;

export const MIN_CLUSTER_SIZE = 4096;
export const MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
export const MAX_TABLE_SIZE = 16;
/** The longest backing file name read (PATH_MAX). */
export const MAX_BACKING_NAME = 4096;
/** Tables larger than this are refused (memory bound for L1 and the L2 cache). */
export const MAX_TABLE_BYTES = 256 * 1024 * 1024;

/** Entry value of an L2 table meaning "cluster reads as zeros, nothing allocated". */
export const QED_ZERO_CLUSTER = 1;

export interface QedHeader {
  clusterSize: number;
  /** clusters per L1/L2 table */
  tableSize: number;
  /** clusters before the first regular cluster */
  headerSize: number;
  features: bigint;
  compatFeatures: bigint;
  autoclearFeatures: bigint;
  l1TableOffset: number;
  imageSize: number;
  backingFilenameOffset: number;
  backingFilenameSize: number;
}

/** Geometry derived from a valid header. */
export interface QedGeometry {
  clusterSize: number;
  clusterBits: number;
  tableBytes: number;
  /** entries per table */
  tableEntries: number;
  /** guest bytes mapped by one L2 table */
  l2Span: number;
  /** first byte after the header area */
  headerEnd: number;
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

const hex = (n: number | bigint): string => `0x${n.toString(16)}`;

/** The largest guest size the tables of this geometry can map. */
export function maxImageSize(clusterSize: number, tableSize: number): number {
  const entries = (clusterSize * tableSize) / 8;
  // entries^2 * clusterSize may exceed 2^53; compare in bigint and clamp to qmount's limit (../u64.ts).
  const max = BigInt(entries) * BigInt(entries) * BigInt(clusterSize);
  return max >= BigInt(MAX_DISK_BYTES) ? MAX_DISK_BYTES - 512 : Number(max);
}


/**
 * Parse and validate the fixed header. `buf` holds the file's first bytes
 * (at least 64 unless the file is shorter), `fileSize` the file's length.
 */
export function parseHeader(buf: Buffer, fileSize: number): QedHeader {
  if (buf.length < QED_HEADER_BYTES || fileSize < QED_HEADER_BYTES) {
    throw new FormatError(`QED header truncated: file has ${Math.min(buf.length, fileSize)} bytes, the header needs ${QED_HEADER_BYTES}`);
  }
  const magic = buf.readUInt32LE(0);
  if (magic !== QED_MAGIC) throw new FormatError(`not a QED image: bad magic ${hex(magic)}`);
  const h: QedHeader = {
    clusterSize: buf.readUInt32LE(4),
    tableSize: buf.readUInt32LE(8),
    headerSize: buf.readUInt32LE(12),
    features: buf.readBigUInt64LE(16),
    compatFeatures: buf.readBigUInt64LE(24),
    autoclearFeatures: buf.readBigUInt64LE(32),
    l1TableOffset: 0,
    imageSize: 0,
    backingFilenameOffset: buf.readUInt32LE(56),
    backingFilenameSize: buf.readUInt32LE(60),
  };
  const unknown = h.features & ~QED_FEATURE_MASK;
  if (unknown !== 0n) {
    throw new FormatError(`QED image uses unsupported incompatible features ${hex(unknown)}`, 'ENOTSUP');
  }
  const cs = h.clusterSize;
  if (!isPow2(cs) || cs < MIN_CLUSTER_SIZE || cs > MAX_CLUSTER_SIZE) {
    throw new FormatError(`QED cluster size ${cs} is invalid (must be a power of two from ${MIN_CLUSTER_SIZE} to ${MAX_CLUSTER_SIZE})`);
  }
  if (!isPow2(h.tableSize) || h.tableSize > MAX_TABLE_SIZE) {
    throw new FormatError(`QED table size ${h.tableSize} is invalid (must be a power of two from 1 to ${MAX_TABLE_SIZE} clusters)`);
  }
  if (cs * h.tableSize > MAX_TABLE_BYTES) {
    throw new FormatError(`QED tables of ${cs * h.tableSize} bytes are larger than qmount supports (${MAX_TABLE_BYTES})`, 'ENOTSUP');
  }
  // The header area must hold the 64-byte header and its size in bytes must fit 32 bits.
  if (h.headerSize === 0 || h.headerSize * cs > 0xffffffff) {
    throw new FormatError(`QED header size ${h.headerSize} clusters is invalid`);
  }
  const headerEnd = h.headerSize * cs;
  h.l1TableOffset = headerU64LE(buf, 40, 'QED L1 table offset');
  h.imageSize = headerU64LE(buf, 48, 'QED image size');
  const l1 = h.l1TableOffset;
  if (l1 % cs !== 0 || l1 < headerEnd) {
    throw new FormatError(`QED L1 table offset ${hex(l1)} is invalid (must be cluster-aligned and after the ${headerEnd}-byte header)`);
  }
  if (l1 + (h.tableSize - 1) * cs >= fileSize) {
    throw new FormatError(`QED L1 table at ${hex(l1)} lies past the end of the file (${fileSize} bytes)`);
  }
  if (h.imageSize % 512 !== 0) {
    throw new FormatError(`QED image size ${h.imageSize} is not a multiple of 512`);
  }
  const max = maxImageSize(cs, h.tableSize);
  if (h.imageSize > max) {
    throw new FormatError(`QED image size ${h.imageSize} is too large for the tables (at most ${max} bytes)`);
  }
  if (h.features & QED_F_BACKING_FILE) {
    if (h.backingFilenameOffset + h.backingFilenameSize > headerEnd) {
      throw new FormatError(`QED backing file name (offset ${h.backingFilenameOffset}, ${h.backingFilenameSize} bytes) lies outside the header`);
    }
    if (h.backingFilenameSize > MAX_BACKING_NAME) {
      throw new FormatError(`QED backing file name is ${h.backingFilenameSize} bytes long (at most ${MAX_BACKING_NAME})`);
    }
  }
  return h;
}

export function geometryOf(h: QedHeader): QedGeometry {
  const tableBytes = h.clusterSize * h.tableSize;
  const tableEntries = tableBytes / 8;
  return {
    clusterSize: h.clusterSize,
    clusterBits: Math.log2(h.clusterSize),
    tableBytes,
    tableEntries,
    l2Span: tableEntries * h.clusterSize,
    headerEnd: h.headerSize * h.clusterSize,
  };
}

/** Decode the backing file name bytes (not NUL-terminated; a stray NUL ends it). */
export function decodeBackingName(bytes: Buffer): string {
  const nul = bytes.indexOf(0);
  const s = (nul >= 0 ? bytes.subarray(0, nul) : bytes).toString('utf8');
  if (s.includes('\ufffd')) throw new FormatError('QED backing file name is not valid UTF-8');
  return s;
}

/** The 64-byte on-disk form of the header fields (strings after it are untouched). */
export function serializeHeader(h: QedHeader): Buffer {
  const b = Buffer.alloc(QED_HEADER_BYTES);
  b.writeUInt32LE(QED_MAGIC, 0);
  b.writeUInt32LE(h.clusterSize, 4);
  b.writeUInt32LE(h.tableSize, 8);
  b.writeUInt32LE(h.headerSize, 12);
  b.writeBigUInt64LE(h.features, 16);
  b.writeBigUInt64LE(h.compatFeatures, 24);
  b.writeBigUInt64LE(h.autoclearFeatures, 32);
  b.writeBigUInt64LE(BigInt(h.l1TableOffset), 40);
  b.writeBigUInt64LE(BigInt(h.imageSize), 48);
  b.writeUInt32LE(h.backingFilenameOffset, 56);
  b.writeUInt32LE(h.backingFilenameSize, 60);
  return b;
}

/** Human names of the set feature bits (for info()). */
export function featureNames(features: bigint): string[] {
  const out: string[] = [];
  if (features & QED_F_BACKING_FILE) out.push('backing_file');
  if (features & QED_F_NEED_CHECK) out.push('need_check');
  if (features & QED_F_BACKING_FORMAT_NO_PROBE) out.push('backing_format_no_probe');
  return out;
}

/** A little-endian 64-bit table entry; INVALID_OFFSET at or above 2^52 (../u64.ts), which fails every offset check. */
export function readEntry(table: Buffer, index: number): number {
  return u64LE(table, index * 8);
}

export function writeEntry(table: Buffer, index: number, value: number): void {
  const off = index * 8;
  table.writeUInt32LE(value % 0x100000000, off);
  table.writeUInt32LE(Math.floor(value / 0x100000000), off + 4);
}
