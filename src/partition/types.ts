/**
 * Partition tables as qmount reads them (src/partition/: pure parsing, no
 * image-format knowledge; the bytes come through a ReadAt function). Offsets
 * and lengths are bytes of the guest disk.
 */

export type PartitionScheme = 'gpt' | 'mbr';

export interface Partition {
  /** Linux's number: GPT entry index + 1; MBR primaries 1-4, logical partitions from 5 */
  number: number;
  /** bytes from the start of the disk */
  start: number;
  /** bytes */
  length: number;
  /** MBR: the type byte as two hex digits ("83"); GPT: the type GUID, lower case ("0fc63daf-...") */
  type: string;
  /** GPT only: the entry's partition GUID and name */
  uuid?: string;
  name?: string;
}

export interface PartitionTable {
  scheme: PartitionScheme;
  /** bytes per sector the table was read with */
  sectorSize: number;
  /** in number order; an MBR extended container is not listed */
  partitions: Partition[];
  /** what was skipped or repaired while reading (each one a log line) */
  warnings: string[];
}

/** Reads `length` guest bytes at `offset` (inside the disk; the caller never asks past its end). */
export type ReadAt = (offset: number, length: number) => Promise<Buffer>;

/** Most partitions listed from one table (Linux's DISK_MAX_PARTS). */
export const MAX_PARTITIONS = 256;
