/**
 * Creating a QED image (qemu-img create -f qed with its meanings): the
 * header cluster (header, then the backing file name at byte 64), then an
 * all-zero L1 table of table_size clusters. Nothing else: QED has no
 * refcounts, and L2 tables are allocated on first write.
 *
 * Invariant (as for qcow2, qcow2/create.ts): the file is created exclusively
 * and unlinked when anything fails; fsynced before create resolves.
 */
import { QmountError } from '../../errors.js';
import { writeNewFile } from '../../io/file.js';
import { MAX_DISK_BYTES } from '../u64.js';
import {
  MAX_BACKING_NAME,
  MAX_CLUSTER_SIZE,
  MAX_TABLE_SIZE,
  MIN_CLUSTER_SIZE,
  maxImageSize,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_HEADER_BYTES,
  serializeHeader,
  type QedHeader,
} from './header.js';

export interface QedCreateOptions {
  /** guest bytes, rounded up to 512 */
  size: number;
  /** bytes; default 64 KiB */
  clusterSize?: number;
  /** clusters per table; default 4 */
  tableSize?: number;
  backingFile?: string;
  /** only "raw" is recorded (as backing_format_no_probe); QED stores no other format */
  backingFormat?: string;
}

function bad(message: string): QmountError {
  return new QmountError('EINVAL', message);
}

const isPow2 = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

export function planQed(o: QedCreateOptions): { header: QedHeader; backing: Buffer } {
  const clusterSize = o.clusterSize ?? 65536;
  const tableSize = o.tableSize ?? 4;
  if (!isPow2(clusterSize) || clusterSize < MIN_CLUSTER_SIZE || clusterSize > MAX_CLUSTER_SIZE) {
    throw bad(`QED cluster size must be a power of two from ${MIN_CLUSTER_SIZE} to ${MAX_CLUSTER_SIZE}`);
  }
  if (!isPow2(tableSize) || tableSize > MAX_TABLE_SIZE) throw bad(`QED table size must be a power of two from 1 to ${MAX_TABLE_SIZE}`);
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw bad(`invalid size ${String(o.size)}`);
  const size = Math.ceil(o.size / 512) * 512;
  const max = Math.min(maxImageSize(clusterSize, tableSize), MAX_DISK_BYTES);
  if (size > max) throw bad(`size ${size} is too large for QED tables of this geometry (at most ${max} bytes)`);
  if (o.backingFormat !== undefined && o.backingFile === undefined) throw bad('backing format cannot be used without a backing file');
  const backing = Buffer.from(o.backingFile ?? '', 'utf8');
  if (o.backingFile !== undefined && (backing.length === 0 || backing.length > MAX_BACKING_NAME || o.backingFile.includes('\0'))) {
    throw bad(`backing file name must be 1 to ${MAX_BACKING_NAME} bytes without NUL`);
  }
  if (QED_HEADER_BYTES + backing.length > clusterSize) throw bad('backing file name does not fit in the QED header cluster');
  let features = 0n;
  if (o.backingFile !== undefined) features |= QED_F_BACKING_FILE;
  if (o.backingFile !== undefined && o.backingFormat === 'raw') features |= QED_F_BACKING_FORMAT_NO_PROBE;
  const header: QedHeader = {
    clusterSize,
    tableSize,
    headerSize: 1,
    features,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: clusterSize,
    imageSize: size,
    backingFilenameOffset: o.backingFile === undefined ? 0 : QED_HEADER_BYTES,
    backingFilenameSize: backing.length,
  };
  return { header, backing };
}

export async function createQed(file: string, o: QedCreateOptions): Promise<QedHeader> {
  const { header, backing } = planQed(o);
  await writeNewFile(file, async (fh) => {
    const head = Buffer.alloc(header.clusterSize);
    serializeHeader(header).copy(head, 0);
    backing.copy(head, QED_HEADER_BYTES);
    await fh.write(head, 0, head.length, 0);
    // The L1 table is all zeros: extending the file writes it.
    await fh.truncate(header.clusterSize * (1 + header.tableSize));
  });
  return header;
}
