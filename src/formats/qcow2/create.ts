/**
 * Creating a qcow2 image (qemu-img create -f qcow2 with its meanings).
 *
 * Layout, in clusters: the header (with its extensions and the backing file
 * name) at 0, the refcount table from 1, the refcount blocks after it, the
 * L1 table, and with preallocation=metadata every L2 table and then every
 * data cluster. Every cluster of [0, total) has refcount 1 and nothing else
 * does, so `qemu-img check` finds neither leaks nor errors; L1/L2 entries
 * carry COPIED (refcount exactly 1).
 *
 * Invariant (crash safety of a new file): the file is created exclusively
 * (O_EXCL) and unlinked again when anything fails, so a half-written image
 * never stays under FILE; it is fsynced before create() resolves.
 */
import fs from 'node:fs';
import { QmountError } from '../../errors.js';
import { writeNewFile } from '../../io/file.js';
import type { WorkHooks } from '../../progress.js';
import type { Qcow2Header } from './header.js';
import { serializeHeader } from './header.js';
import {
  ALL_SUBCLUSTERS,
  COMPAT_LAZY_REFCOUNTS,
  EXT_BACKING_FORMAT,
  EXT_FEATURE_TABLE,
  FEATURE_NAME_BYTES,
  FEATURE_NAME_ENTRY_BYTES,
  HDR,
  INCOMPAT_EXTL2,
  L1E_BYTES,
  L1E_COPIED,
  L2E_ALLOC_BITMAP,
  L2E_BYTES,
  L2E_COPIED,
  L2E_EXT_BYTES,
  MAX_BACKING_NAME_BYTES,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MIN_CLUSTER_BITS,
  MIN_EXTL2_CLUSTER_BITS,
  V2_HEADER_BYTES,
  writeEntry,
} from './spec.js';
import { MAX_DISK_BYTES } from '../u64.js';

export interface Qcow2CreateOptions {
  /** guest bytes; rounded up to 512 like qemu-img */
  size: number;
  /** 2 (compat=0.10) or 3 (compat=1.1, the default) */
  version?: 2 | 3;
  /** bytes, a power of two from 512 to 2 MiB; default 64 KiB */
  clusterSize?: number;
  lazyRefcounts?: boolean;
  extendedL2?: boolean;
  /** 1, 2, 4, ... 64; default 16 */
  refcountBits?: number;
  preallocation?: 'off' | 'metadata';
  /** stored as given (resolved against the new image's directory when opened) */
  backingFile?: string;
  backingFormat?: string;
}

/** The header fields and layout create() writes (exported for tests and `create`'s summary line). */
export interface Qcow2Plan {
  header: Qcow2Header;
  clusterSize: number;
  refcountOrder: number;
  /** clusters */
  refTableClusters: number;
  refBlocks: number;
  l1Clusters: number;
  /** L2 tables and data clusters of preallocation=metadata (0 otherwise) */
  l2Tables: number;
  dataClusters: number;
  /** clusters in use: the file is exactly this long */
  totalClusters: number;
}

/** QEMU's v3 header_length: the fixed fields, the compression type byte, padding to 8. */
const V3_HEADER_LENGTH = 112;

/** The feature name table QEMU writes (so tools that do not know a bit can name it). */
const FEATURE_NAMES: Array<[kind: 0 | 1 | 2, bit: number, name: string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

function bad(message: string): QmountError {
  return new QmountError('EINVAL', message);
}

/** Validate options as qemu-img does and compute the layout. Pure. */
export function planQcow2(o: Qcow2CreateOptions): Qcow2Plan {
  const version = o.version ?? 3;
  const clusterSize = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw bad(`cluster size must be a power of two between ${2 ** MIN_CLUSTER_BITS} and ${2 ** MAX_CLUSTER_BITS / 1024 / 1024}M`);
  }
  const refcountBits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw bad('refcount_bits must be a power of two from 1 to 64');
  }
  if (version === 2) {
    if (o.lazyRefcounts) throw bad('lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    if (refcountBits !== 16) throw bad('different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    if (o.extendedL2) throw bad('extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (o.extendedL2 && clusterBits < MIN_EXTL2_CLUSTER_BITS) throw bad('extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  if (o.backingFormat !== undefined && o.backingFile === undefined) throw bad('backing format cannot be used without a backing file');
  if (o.backingFile !== undefined && o.preallocation === 'metadata') {
    throw bad('backing file and preallocation=metadata cannot be used together (qmount does not preallocate over a backing file)');
  }
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw bad(`invalid size ${String(o.size)}`);
  const size = Math.ceil(o.size / 512) * 512;
  if (size > MAX_DISK_BYTES) throw bad(`size ${size} is larger than qmount supports (${MAX_DISK_BYTES} bytes)`);

  const l2EntryBytes = o.extendedL2 ? L2E_EXT_BYTES : L2E_BYTES;
  const l2Entries = clusterSize / l2EntryBytes;
  const l2Span = l2Entries * clusterSize;
  const l1Size = Math.ceil(size / l2Span);
  if (l1Size * L1E_BYTES > MAX_L1_BYTES) throw bad(`size ${size} needs an L1 table larger than ${MAX_L1_BYTES} bytes: use a larger cluster size`);
  // A 0-byte disk has an empty L1 table (no cluster; its offset is where it would start), as qemu-img makes it.
  const l1Clusters = Math.ceil((l1Size * L1E_BYTES) / clusterSize);
  const prealloc = o.preallocation === 'metadata';
  const l2Tables = prealloc ? l1Size : 0;
  const dataClusters = prealloc ? Math.ceil(size / clusterSize) : 0;
  const refblockEntries = (clusterSize * 8) / refcountBits;
  const fixed = 1 + l1Clusters + l2Tables + dataClusters;
  let refBlocks = 1;
  let refTableClusters = 1;
  for (;;) {
    const total = fixed + refBlocks + refTableClusters;
    const rb = Math.ceil(total / refblockEntries);
    const rt = Math.ceil((rb * 8) / clusterSize);
    if (rb === refBlocks && rt === refTableClusters) break;
    refBlocks = Math.max(refBlocks, rb);
    refTableClusters = Math.max(refTableClusters, rt);
  }
  if (refTableClusters * clusterSize > MAX_REFTABLE_BYTES) throw bad('the refcount table this image needs is larger than QEMU allows: use a larger cluster size');

  const extensions: Qcow2Header['extensions'] = [];
  if (o.backingFormat !== undefined) extensions.push({ type: EXT_BACKING_FORMAT, data: Buffer.from(o.backingFormat, 'utf8') });
  const headerLength = version === 3 ? V3_HEADER_LENGTH : V2_HEADER_BYTES;
  const backingBytes = o.backingFile === undefined ? 0 : Buffer.byteLength(o.backingFile, 'utf8');
  if (o.backingFile !== undefined && (backingBytes === 0 || backingBytes > MAX_BACKING_NAME_BYTES)) {
    throw bad(`backing file name must be 1 to ${MAX_BACKING_NAME_BYTES} bytes long`);
  }
  if (o.backingFile?.includes('\0')) throw bad('backing file name contains a NUL byte');
  const extBytes = (list: Qcow2Header['extensions']): number => list.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 0) + 8;
  const table = featureTable();
  // The feature name table is optional: left out when it would not fit in a small header cluster.
  if (headerLength + extBytes([...extensions, { type: EXT_FEATURE_TABLE, data: table }]) + backingBytes <= clusterSize) {
    extensions.push({ type: EXT_FEATURE_TABLE, data: table });
  }
  const backingFileOffset = o.backingFile === undefined ? 0 : headerLength + extBytes(extensions);
  if (backingFileOffset + backingBytes > clusterSize) throw bad('backing file name and header extensions do not fit in the header cluster');

  const refTableOffset = clusterSize;
  const l1TableOffset = (1 + refTableClusters + refBlocks) * clusterSize;
  const header: Qcow2Header = {
    version,
    backingFileOffset,
    backingFileSize: backingBytes,
    clusterBits,
    size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset,
    refcountTableOffset: refTableOffset,
    refcountTableClusters: refTableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatible: o.extendedL2 ? BigInt(INCOMPAT_EXTL2) : 0n,
    compatible: o.lazyRefcounts ? BigInt(COMPAT_LAZY_REFCOUNTS) : 0n,
    autoclear: 0n,
    refcountOrder,
    headerLength,
    compressionType: 0,
    // v3: the bytes after compression_type up to header_length (padding), zero.
    extraFields: Buffer.alloc(version === 3 ? headerLength - (HDR.compressionType + 1) : 0),
    extensions,
    backingFile: o.backingFile,
    backingFormat: o.backingFormat,
    featureNames: [],
  };
  const totalClusters = fixed + refBlocks + refTableClusters;
  return { header, clusterSize, refcountOrder, refTableClusters, refBlocks, l1Clusters, l2Tables, dataClusters, totalClusters };
}

function featureTable(): Buffer {
  const b = Buffer.alloc(FEATURE_NAMES.length * FEATURE_NAME_ENTRY_BYTES);
  FEATURE_NAMES.forEach(([kind, bit, name], i) => {
    const at = i * FEATURE_NAME_ENTRY_BYTES;
    b[at] = kind;
    b[at + 1] = bit;
    b.write(name.slice(0, FEATURE_NAME_BYTES), at + 2, 'utf8');
  });
  return b;
}

/**
 * Set refcount entry `idx` of a block to 1. The entry layout (sub-byte
 * widths count from the least significant bit, wider ones are big-endian) is
 * the one Refcounts.writeEntry (refcount.ts) implements for open images.
 */
function setRefcountOne(block: Buffer, idx: number, order: number): void {
  if (order < 3) {
    const bits = 1 << order;
    const perByte = 8 >> order;
    block[Math.floor(idx / perByte)] |= 1 << ((idx % perByte) * bits);
  } else {
    const bytes = 1 << (order - 3);
    block[idx * bytes + bytes - 1] = 1;
  }
}

/** Write the image described by `o` to `file` (which must not exist). */
/** `hooks`: progress (metadata clusters written of all) for a large preallocated image. */
export async function createQcow2(file: string, o: Qcow2CreateOptions, hooks?: WorkHooks): Promise<Qcow2Plan> {
  const plan = planQcow2(o);
  await writeNewFile(file, (fh) => writeLayout(fh, plan, hooks));
  return plan;
}

async function writeLayout(fh: fs.promises.FileHandle, p: Qcow2Plan, hooks: WorkHooks | undefined): Promise<void> {
  const cs = p.clusterSize;
  const h = p.header;
  const write = async (buf: Buffer, at: number): Promise<void> => {
    let done = 0;
    while (done < buf.length) done += (await fh.write(buf, done, buf.length - done, at + done)).bytesWritten;
  };
  await write(serializeHeader(h, cs), 0);

  // Refcount table and blocks: clusters [0, total) have refcount 1.
  const firstBlock = 1 + p.refTableClusters;
  const reftable = Buffer.alloc(p.refTableClusters * cs);
  for (let i = 0; i < p.refBlocks; i++) writeEntry(reftable, i * 8, 0, (firstBlock + i) * cs, 0);
  await write(reftable, cs);
  const perBlock = (cs * 8) / 2 ** p.refcountOrder;
  const metaTotal = p.refBlocks + p.l2Tables;
  for (let i = 0; i < p.refBlocks; i++) {
    hooks?.progress?.('creating', i, metaTotal);
    const block = Buffer.alloc(cs);
    const n = Math.min(perBlock, p.totalClusters - i * perBlock);
    for (let j = 0; j < n; j++) setRefcountOne(block, j, p.refcountOrder);
    await write(block, (firstBlock + i) * cs);
  }

  // L1 (and with preallocation the L2 tables and the data clusters they name).
  const l1 = Buffer.alloc(p.l1Clusters * cs);
  const firstL2 = h.l1TableOffset / cs + p.l1Clusters;
  const firstData = firstL2 + p.l2Tables;
  if (p.l2Tables > 0) {
    const extL2 = (h.incompatible & BigInt(INCOMPAT_EXTL2)) !== 0n;
    const entryBytes = extL2 ? L2E_EXT_BYTES : L2E_BYTES;
    const entries = cs / entryBytes;
    for (let t = 0; t < p.l2Tables; t++) {
      hooks?.progress?.('creating', p.refBlocks + t, metaTotal);
      writeEntry(l1, t * L1E_BYTES, L1E_COPIED, (firstL2 + t) * cs, 0);
      const l2 = Buffer.alloc(cs);
      for (let e = 0; e < entries; e++) {
        const guestCluster = t * entries + e;
        if (guestCluster >= p.dataClusters) break;
        writeEntry(l2, e * entryBytes, L2E_COPIED, (firstData + guestCluster) * cs, 0);
        if (extL2) l2.writeUInt32BE(ALL_SUBCLUSTERS, e * entryBytes + L2E_ALLOC_BITMAP);
      }
      await write(l2, (firstL2 + t) * cs);
    }
  }
  if (l1.length > 0) await write(l1, h.l1TableOffset);
  // The data clusters (preallocation) read as zeros: the file is extended over them without writing.
  await fh.truncate(p.totalClusters * cs);
}
