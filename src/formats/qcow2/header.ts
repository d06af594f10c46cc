/**
 * qcow2 header: parse, validate, serialize. Pure functions over buffers.
 *
 * Every field is validated against the spec's limits and against the real
 * file size before anything is allocated from it: a header that claims a
 * 2^31-entry L1 table is rejected with a message, not answered with a 16 GiB
 * allocation. Sizes are in bytes unless a name says otherwise.
 */
import { FormatError, UnsupportedError } from '../../errors.js';
import { QCOW2_MAGIC } from '../probe.js';
import { headerU64BE } from '../u64.js';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  EXT_BACKING_FORMAT,
  EXT_DATA_FILE,
  EXT_END,
  EXT_FEATURE_TABLE,
  FEATURE_NAME_BYTES,
  FEATURE_NAME_ENTRY_BYTES,
  hasBit,
  HDR,
  INCOMPAT_COMPRESSION,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  INCOMPAT_KNOWN,
  L1E_BYTES,
  L2E_BYTES,
  L2E_EXT_BYTES,
  MAX_BACKING_NAME_BYTES,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS,
  MIN_CLUSTER_BITS,
  MIN_EXTL2_CLUSTER_BITS,
  SNAPSHOT_ENTRY_MIN_BYTES,
  V2_HEADER_BYTES,
  V3_HEADER_BYTES,
} from './spec.js';

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface FeatureName {
  kind: 0 | 1 | 2; // incompatible, compatible, autoclear
  bit: number;
  name: string;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** guest bytes */
  size: number;
  cryptMethod: number;
  /** entries */
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** 64-bit masks; only bits below 2^53 are representable and the known ones are all low */
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** raw bytes of the header beyond the fields we know (v3 additional fields), kept for rewrite */
  extraFields: Buffer;
  extensions: HeaderExtension[];
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  featureNames: FeatureName[];
}

/** Names of incompatible bits that are set and unknown to us, named from the image's table. */
function unknownIncompatNames(mask: bigint, names: FeatureName[]): string[] {
  const out: string[] = [];
  let more = 0;
  for (let bit = 0; bit < 64; bit++) {
    if (!((mask >> BigInt(bit)) & 1n)) continue;
    if (out.length === 4) {
      more++;
      continue;
    }
    const n = names.find((f) => f.kind === 0 && f.bit === bit);
    out.push(n ? `"${n.name.replace(/[\x00-\x1f\x7f]/g, '?')}" (bit ${bit})` : `unknown feature bit ${bit}`);
  }
  if (more > 0) out.push(`and ${more} more`);
  return out;
}

/**
 * Parse and validate the header cluster. `head` holds at least the first
 * cluster (or the whole file if smaller); `fileSize` bounds every table.
 */
export function parseHeader(head: Buffer, fileSize: number): Qcow2Header {
  if (head.length < V2_HEADER_BYTES) throw new FormatError('file too short for a qcow2 header');
  if (head.readUInt32BE(HDR.magic) !== QCOW2_MAGIC) throw new FormatError('not a qcow2 image (bad magic)');
  const version = head.readUInt32BE(HDR.version);
  if (version !== 2 && version !== 3) throw new FormatError(`unsupported qcow2 version ${version}`);
  const clusterBits = head.readUInt32BE(HDR.clusterBits);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new FormatError(`cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: headerU64BE(head, HDR.backingFileOffset, 'backing_file_offset'),
    backingFileSize: head.readUInt32BE(HDR.backingFileSize),
    clusterBits,
    size: headerU64BE(head, HDR.size, 'virtual size'),
    cryptMethod: head.readUInt32BE(HDR.cryptMethod),
    l1Size: head.readUInt32BE(HDR.l1Size),
    l1TableOffset: headerU64BE(head, HDR.l1TableOffset, 'l1_table_offset'),
    refcountTableOffset: headerU64BE(head, HDR.refcountTableOffset, 'refcount_table_offset'),
    refcountTableClusters: head.readUInt32BE(HDR.refcountTableClusters),
    nbSnapshots: head.readUInt32BE(HDR.nbSnapshots),
    snapshotsOffset: headerU64BE(head, HDR.snapshotsOffset, 'snapshots_offset'),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_BYTES,
    compressionType: 0,
    extraFields: Buffer.alloc(0),
    extensions: [],
    featureNames: [],
  };
  if (version === 3) {
    if (head.length < V3_HEADER_BYTES) throw new FormatError('file too short for a qcow2 v3 header');
    h.incompatible = head.readBigUInt64BE(HDR.incompatible);
    h.compatible = head.readBigUInt64BE(HDR.compatible);
    h.autoclear = head.readBigUInt64BE(HDR.autoclear);
    h.refcountOrder = head.readUInt32BE(HDR.refcountOrder);
    h.headerLength = head.readUInt32BE(HDR.headerLength);
    if (h.headerLength < V3_HEADER_BYTES || h.headerLength % 8 !== 0 || h.headerLength > Math.min(clusterSize, head.length)) {
      throw new FormatError(`invalid header_length ${h.headerLength}`);
    }
    if (h.headerLength > HDR.compressionType) h.compressionType = head[HDR.compressionType]!;
    if (h.headerLength > HDR.compressionType + 1) h.extraFields = Buffer.from(head.subarray(HDR.compressionType + 1, h.headerLength));
  }
  if (h.refcountOrder > 6) throw new FormatError(`refcount_order ${h.refcountOrder} is above 6`);

  parseExtensions(h, head, clusterSize);

  // Features.
  const unknown = h.incompatible & ~BigInt(INCOMPAT_KNOWN);
  if (unknown) {
    throw new UnsupportedError(`image uses unsupported incompatible feature ${unknownIncompatNames(unknown, h.featureNames).join(', ')}`);
  }
  const incompat = Number(h.incompatible);
  if (incompat & INCOMPAT_COMPRESSION) {
    if (h.compressionType === 0) throw new FormatError('compression type bit set but compression_type is zlib');
  }
  if (h.compressionType > 1) throw new UnsupportedError(`unknown compression_type ${h.compressionType}`);
  if (!(incompat & INCOMPAT_COMPRESSION) && h.compressionType !== 0) {
    throw new FormatError('compression_type set without the compression type feature bit');
  }
  if (incompat & INCOMPAT_EXTL2 && clusterBits < MIN_EXTL2_CLUSTER_BITS) {
    throw new FormatError('extended L2 entries need clusters of at least 16 KiB');
  }
  if (incompat & INCOMPAT_DATA_FILE && !h.dataFile) {
    throw new UnsupportedError('image has an external data file but does not name it');
  }
  if (h.cryptMethod !== 0) throw new UnsupportedError('encrypted qcow2 images are not supported');

  // Tables must lie in the file, be aligned, and respect the format's limits.
  const align = (v: number, what: string): void => {
    if (v % clusterSize !== 0) throw new FormatError(`${what} ${v} is not aligned to the cluster size`);
  };
  const inFile = (off: number, len: number, what: string): void => {
    if (off + len > fileSize) throw new FormatError(`${what} (${off}+${len}) lies past the end of the file (${fileSize})`);
  };
  if (h.l1Size * L1E_BYTES > MAX_L1_BYTES) throw new FormatError(`L1 table of ${h.l1Size} entries is larger than ${MAX_L1_BYTES} bytes`);
  const l2Entries = clusterSize / ((incompat & INCOMPAT_EXTL2) ? L2E_EXT_BYTES : L2E_BYTES);
  const guestPerL1 = clusterSize * l2Entries;
  const l1Needed = Math.ceil(h.size / guestPerL1);
  if (l1Needed > h.l1Size) throw new FormatError(`L1 table (${h.l1Size} entries) too small for virtual size ${h.size}`);
  if (h.l1Size > 0) {
    align(h.l1TableOffset, 'l1_table_offset');
    if (h.l1TableOffset === 0) throw new FormatError('l1_table_offset is 0');
    inFile(h.l1TableOffset, h.l1Size * L1E_BYTES, 'L1 table');
  }
  align(h.refcountTableOffset, 'refcount_table_offset');
  if (h.refcountTableOffset === 0) throw new FormatError('refcount_table_offset is 0');
  if (h.refcountTableClusters === 0) throw new FormatError('refcount table has no clusters');
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw new FormatError(`refcount table of ${h.refcountTableClusters} clusters is too large`);
  }
  inFile(h.refcountTableOffset, h.refcountTableClusters * clusterSize, 'refcount table');
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw new FormatError(`${h.nbSnapshots} snapshots is above the limit of ${MAX_SNAPSHOTS}`);
  if (h.nbSnapshots > 0) {
    align(h.snapshotsOffset, 'snapshots_offset');
    inFile(h.snapshotsOffset, h.nbSnapshots * SNAPSHOT_ENTRY_MIN_BYTES, 'snapshot table');
  }
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME_BYTES || h.backingFileSize === 0) throw new FormatError(`invalid backing file name length ${h.backingFileSize}`);
    if (h.backingFileOffset + h.backingFileSize > Math.min(clusterSize, head.length)) {
      throw new FormatError('backing file name lies outside the header cluster');
    }
    h.backingFile = head.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
    if (h.backingFile.includes('\0')) throw new FormatError('backing file name contains a NUL byte');
  }
  return h;
}

function parseExtensions(h: Qcow2Header, head: Buffer, clusterSize: number): void {
  const end = Math.min(clusterSize, head.length);
  let off = h.headerLength;
  while (off + 8 <= end) {
    const type = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    if (type === EXT_END) return;
    const dataStart = off + 8;
    if (dataStart + len > end) throw new FormatError(`header extension 0x${type.toString(16)} runs past the header cluster`);
    const data = Buffer.from(head.subarray(dataStart, dataStart + len));
    h.extensions.push({ type, data });
    switch (type) {
      case EXT_BACKING_FORMAT:
        h.backingFormat = data.toString('utf8').replace(/\0+$/, '');
        break;
      case EXT_DATA_FILE:
        h.dataFile = data.toString('utf8').replace(/\0+$/, '');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + FEATURE_NAME_ENTRY_BYTES <= len; i += FEATURE_NAME_ENTRY_BYTES) {
          const kind = data[i];
          if (kind > 2) continue;
          const nameBytes = data.subarray(i + 2, i + FEATURE_NAME_ENTRY_BYTES);
          const z = nameBytes.indexOf(0);
          h.featureNames.push({ kind: kind as 0 | 1 | 2, bit: data[i + 1], name: nameBytes.toString('utf8', 0, z < 0 ? FEATURE_NAME_BYTES : z) });
        }
        break;
      default:
        break;
    }
    off = dataStart + Math.ceil(len / 8) * 8;
  }
}

/**
 * Serialize the header and its extensions into one cluster-sized buffer
 * (everything before the backing file name). Extensions we did not
 * understand are written back unchanged.
 */
export function serializeHeader(h: Qcow2Header, clusterSize: number): Buffer {
  const out = Buffer.alloc(clusterSize);
  out.writeUInt32BE(QCOW2_MAGIC, HDR.magic);
  out.writeUInt32BE(h.version, HDR.version);
  out.writeBigUInt64BE(BigInt(h.backingFileOffset), HDR.backingFileOffset);
  out.writeUInt32BE(h.backingFileSize, HDR.backingFileSize);
  out.writeUInt32BE(h.clusterBits, HDR.clusterBits);
  out.writeBigUInt64BE(BigInt(h.size), HDR.size);
  out.writeUInt32BE(h.cryptMethod, HDR.cryptMethod);
  out.writeUInt32BE(h.l1Size, HDR.l1Size);
  out.writeBigUInt64BE(BigInt(h.l1TableOffset), HDR.l1TableOffset);
  out.writeBigUInt64BE(BigInt(h.refcountTableOffset), HDR.refcountTableOffset);
  out.writeUInt32BE(h.refcountTableClusters, HDR.refcountTableClusters);
  out.writeUInt32BE(h.nbSnapshots, HDR.nbSnapshots);
  out.writeBigUInt64BE(BigInt(h.snapshotsOffset), HDR.snapshotsOffset);
  let off: number = V2_HEADER_BYTES;
  if (h.version === 3) {
    out.writeBigUInt64BE(h.incompatible, HDR.incompatible);
    out.writeBigUInt64BE(h.compatible, HDR.compatible);
    out.writeBigUInt64BE(h.autoclear, HDR.autoclear);
    out.writeUInt32BE(h.refcountOrder, HDR.refcountOrder);
    out.writeUInt32BE(h.headerLength, HDR.headerLength);
    if (h.headerLength > HDR.compressionType) out[HDR.compressionType] = h.compressionType;
    h.extraFields.copy(out, HDR.compressionType + 1);
    off = h.headerLength;
  }
  for (const ext of h.extensions) {
    out.writeUInt32BE(ext.type, off);
    out.writeUInt32BE(ext.data.length, off + 4);
    ext.data.copy(out, off + 8);
    off += 8 + Math.ceil(ext.data.length / 8) * 8;
  }
  out.writeUInt32BE(EXT_END, off);
  out.writeUInt32BE(0, off + 4);
  off += 8;
  if (h.backingFile !== undefined) {
    if (off > h.backingFileOffset) throw new FormatError('header extensions would overwrite the backing file name');
    out.write(h.backingFile, h.backingFileOffset, 'utf8');
  }
  return out;
}


/** Human names of the feature bits that are set (for info and logs). */
export function featureList(h: Qcow2Header): string[] {
  const out: string[] = [];
  if (hasBit(h.incompatible, INCOMPAT_DIRTY)) out.push('dirty');
  if (hasBit(h.incompatible, INCOMPAT_CORRUPT)) out.push('corrupt');
  if (hasBit(h.incompatible, INCOMPAT_DATA_FILE)) out.push('external_data_file');
  if (hasBit(h.incompatible, INCOMPAT_COMPRESSION)) out.push('compression_type');
  if (hasBit(h.incompatible, INCOMPAT_EXTL2)) out.push('extended_l2');
  if (hasBit(h.compatible, COMPAT_LAZY_REFCOUNTS)) out.push('lazy_refcounts');
  if (hasBit(h.autoclear, AUTOCLEAR_BITMAPS)) out.push('bitmaps');
  if (hasBit(h.autoclear, AUTOCLEAR_DATA_FILE_RAW)) out.push('data_file_raw');
  return out;
}
