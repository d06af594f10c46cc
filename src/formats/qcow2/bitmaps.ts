/**
 * Persistent dirty bitmaps: qmount does not maintain them. The spec lets a
 * writer that does not maintain bitmaps clear the autoclear bit; QEMU then
 * treats the bitmaps as gone and their clusters as leaks. qmount instead
 * retires them completely on its first write: one header write drops the
 * extension and the bit, then the clusters are released, so the image
 * stays clean (a crash in between only leaks).
 */
import { CorruptionError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import type { Qcow2Header } from './header.js';
import { u64BE } from '../u64.js';
import { BITMAP_DIR, BITMAPS_EXT, entryOffset, EXT_BITMAPS } from './spec.js';

export interface BitmapRange {
  offset: number;
  /** bytes */
  length: number;
}

/** Host ranges used by the bitmaps extension: directory, bitmap tables and data clusters. */
export async function bitmapRanges(file: ImageFile, h: Qcow2Header, fileSize: number): Promise<{ names: string[]; ranges: BitmapRange[] }> {
  const ext = h.extensions.find((e) => e.type === EXT_BITMAPS);
  if (!ext || ext.data.length < BITMAPS_EXT.bytes) return { names: [], ranges: [] };
  const cs = 2 ** h.clusterBits;
  const nb = ext.data.readUInt32BE(BITMAPS_EXT.count);
  const dirSize = u64BE(ext.data, BITMAPS_EXT.directorySize);
  const dirOffset = u64BE(ext.data, BITMAPS_EXT.directoryOffset);
  if (dirOffset % cs !== 0 || dirOffset + dirSize > fileSize || dirSize > 64 * 1024 * 1024 || nb > 65535) {
    throw new CorruptionError('bitmap directory is invalid');
  }
  const ranges: BitmapRange[] = [{ offset: dirOffset, length: dirSize }];
  const names: string[] = [];
  const dir = Buffer.alloc(dirSize);
  await file.read(dir, 0, dirSize, dirOffset);
  let pos = 0;
  for (let i = 0; i < nb; i++) {
    if (pos + BITMAP_DIR.bytes > dirSize) throw new CorruptionError('bitmap directory entry past its end');
    const tableOffset = u64BE(dir, pos + BITMAP_DIR.tableOffset);
    const tableSize = dir.readUInt32BE(pos + BITMAP_DIR.tableSize);
    const nameSize = dir.readUInt16BE(pos + BITMAP_DIR.nameSize);
    const extraSize = dir.readUInt32BE(pos + BITMAP_DIR.extraSize);
    const nameAt = pos + BITMAP_DIR.bytes + extraSize;
    names.push(dir.toString('utf8', nameAt, nameAt + nameSize));
    if (tableOffset % cs !== 0 || tableOffset + tableSize * 8 > fileSize) throw new CorruptionError('bitmap table is invalid');
    ranges.push({ offset: tableOffset, length: tableSize * 8 });
    const table = Buffer.alloc(tableSize * 8);
    await file.read(table, 0, table.length, tableOffset);
    for (let j = 0; j < tableSize; j++) {
      const off = entryOffset(table.readUInt32BE(j * 8), table.readUInt32BE(j * 8 + 4));
      if (off === 0) continue;
      if (off % cs !== 0 || off >= fileSize) throw new CorruptionError('bitmap data cluster is invalid');
      ranges.push({ offset: off, length: cs });
    }
    pos += Math.ceil((BITMAP_DIR.bytes + extraSize + nameSize) / 8) * 8;
  }
  return { names, ranges };
}
