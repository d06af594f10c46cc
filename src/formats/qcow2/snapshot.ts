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
import { L1E_BYTES, MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE_BYTES, SNAP, SNAPSHOT_ENTRY_MIN_BYTES } from './spec.js';

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

export async function readSnapshotTable(
  file: ImageFile,
  offset: number,
  count: number,
  fileSize: number,
  clusterSize: number,
): Promise<SnapshotTable> {
  if (count === 0) return { snapshots: [], byteLength: 0 };
  const avail = Math.min(fileSize - offset, MAX_SNAPSHOT_TABLE_BYTES);
  if (avail < SNAPSHOT_ENTRY_MIN_BYTES * count) throw new FormatError('snapshot table lies past the end of the file');
  // Read as far as the entries reach, not all that the file could hold:
  // a guess for typical entries first, more when one runs past it.
  let buf = Buffer.alloc(Math.min(avail, Math.max(4096, count * 128)));
  await file.read(buf, 0, buf.length, offset);
  const need = async (end: number): Promise<void> => {
    if (end <= buf.length || buf.length === avail) return;
    const grown = Buffer.alloc(Math.min(avail, Math.max(end, buf.length * 2)));
    buf.copy(grown);
    await file.read(grown, buf.length, grown.length - buf.length, offset + buf.length);
    buf = grown;
  };
  const snapshots: Qcow2Snapshot[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    await need(pos + SNAPSHOT_ENTRY_MIN_BYTES);
    if (pos + SNAPSHOT_ENTRY_MIN_BYTES > buf.length) throw new FormatError(`snapshot ${i} lies past the end of the file`);
    const l1TableOffset = headerU64BE(buf, pos + SNAP.l1TableOffset, `snapshot ${i}: l1_table_offset`);
    const l1Size = buf.readUInt32BE(pos + SNAP.l1Size);
    const idLen = buf.readUInt16BE(pos + SNAP.idSize);
    const nameLen = buf.readUInt16BE(pos + SNAP.nameSize);
    const dateSec = buf.readUInt32BE(pos + SNAP.dateSec);
    const dateNsec = buf.readUInt32BE(pos + SNAP.dateNsec);
    // Nanoseconds of guest run time pass 2^53 after 104 days: split, not bounded.
    const vmClock = buf.readBigUInt64BE(pos + SNAP.vmClockNsec);
    const vmClockSec = Number(vmClock / 1_000_000_000n);
    const vmClockNsec = Number(vmClock % 1_000_000_000n);
    let vmStateSize = buf.readUInt32BE(pos + SNAP.vmStateSize);
    const extraLen = buf.readUInt32BE(pos + SNAP.extraDataSize);
    const entryLen = SNAP.extra + extraLen + idLen + nameLen;
    if (extraLen > MAX_SNAPSHOT_EXTRA) throw new FormatError(`snapshot ${i} entry is malformed or past the end of the file`);
    await need(pos + entryLen);
    if (pos + entryLen > buf.length) throw new FormatError(`snapshot ${i} entry is malformed or past the end of the file`);
    let guestSize: number | undefined;
    if (extraLen >= 8) vmStateSize = headerU64BE(buf, pos + SNAP.extra, `snapshot ${i}: vm_state_size_large`);
    if (extraLen >= 16) guestSize = headerU64BE(buf, pos + SNAP.extra + 8, `snapshot ${i}: disk_size`);
    // icount (QEMU 5.0+): 2^64-1 means "not recorded", like a shorter entry.
    let icount: number | undefined;
    if (extraLen >= 24) {
      const v = buf.readBigUInt64BE(pos + SNAP.extra + 16);
      if (v !== 0xffff_ffff_ffff_ffffn) icount = Number(v);
    }
    const idStart = pos + SNAP.extra + extraLen;
    const id = buf.toString('utf8', idStart, idStart + idLen);
    const name = buf.toString('utf8', idStart + idLen, idStart + idLen + nameLen);
    if (l1TableOffset % clusterSize !== 0 || l1TableOffset + l1Size * L1E_BYTES > fileSize || l1Size * L1E_BYTES > MAX_L1_BYTES) {
      throw new FormatError(`snapshot "${name}" has an invalid L1 table`);
    }
    snapshots.push({ id, name, dateSec, dateNsec, vmClockSec, vmClockNsec, vmStateSize, guestSize, icount, extraDataBytes: extraLen, l1TableOffset, l1Size });
    pos += Math.ceil(entryLen / 8) * 8;
  }
  return { snapshots, byteLength: pos };
}
