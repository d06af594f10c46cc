/**
 * The qcow2 snapshot table: parsed for `info`, for refcount rebuilds, and
 * so that copy-on-write knows which clusters snapshots still reference.
 * Entries are variable length; every length is bounded by the table's place
 * in the file before anything is read.
 */
import { FormatError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import type { SnapshotInfo } from '../driver.js';
import { headerU64BE } from '../u64.js';

export interface Qcow2Snapshot extends SnapshotInfo {
  /** bytes of extra data in the entry (v3 requires at least 16) */
  extraDataBytes: number;
  l1TableOffset: number;
  /** entries */
  l1Size: number;
}

export interface SnapshotTable {
  snapshots: Qcow2Snapshot[];
  /** bytes the table occupies */
  byteLength: number;
}

/** Largest snapshot table we read (QEMU: 64 MiB). */
const MAX_TABLE_BYTES = 64 * 1024 * 1024;

export async function readSnapshotTable(
  file: ImageFile,
  offset: number,
  count: number,
  fileSize: number,
  clusterSize: number,
): Promise<SnapshotTable> {
  if (count === 0) return { snapshots: [], byteLength: 0 };
  const avail = Math.min(fileSize - offset, MAX_TABLE_BYTES);
  if (avail < 40 * count) throw new FormatError('snapshot table lies past the end of the file');
  const buf = Buffer.alloc(avail);
  await file.read(buf, 0, avail, offset);
  const snapshots: Qcow2Snapshot[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    if (pos + 40 > avail) throw new FormatError(`snapshot ${i} lies past the end of the file`);
    const l1TableOffset = headerU64BE(buf, pos, `snapshot ${i}: l1_table_offset`);
    const l1Size = buf.readUInt32BE(pos + 8);
    const idLen = buf.readUInt16BE(pos + 12);
    const nameLen = buf.readUInt16BE(pos + 14);
    const dateSec = buf.readUInt32BE(pos + 16);
    // Nanoseconds of guest run time pass 2^53 after 104 days: split, not bounded.
    const vmClock = buf.readBigUInt64BE(pos + 24);
    const vmClockSec = Number(vmClock / 1_000_000_000n);
    const vmClockNsec = Number(vmClock % 1_000_000_000n);
    let vmStateSize = buf.readUInt32BE(pos + 32);
    const extraLen = buf.readUInt32BE(pos + 36);
    const entryLen = 40 + extraLen + idLen + nameLen;
    if (extraLen > 1024 || pos + entryLen > avail) throw new FormatError(`snapshot ${i} entry is malformed or past the end of the file`);
    let guestSize: number | undefined;
    if (extraLen >= 8) vmStateSize = headerU64BE(buf, pos + 40, `snapshot ${i}: vm_state_size_large`);
    if (extraLen >= 16) guestSize = headerU64BE(buf, pos + 48, `snapshot ${i}: disk_size`);
    const idStart = pos + 40 + extraLen;
    const id = buf.toString('utf8', idStart, idStart + idLen);
    const name = buf.toString('utf8', idStart + idLen, idStart + idLen + nameLen);
    if (l1TableOffset % clusterSize !== 0 || l1TableOffset + l1Size * 8 > fileSize || l1Size * 8 > 32 * 1024 * 1024) {
      throw new FormatError(`snapshot "${name}" has an invalid L1 table`);
    }
    snapshots.push({ id, name, dateSec, vmClockSec, vmClockNsec, vmStateSize, guestSize, extraDataBytes: extraLen, l1TableOffset, l1Size });
    pos += Math.ceil(entryLen / 8) * 8;
  }
  return { snapshots, byteLength: pos };
}
