/**
 * Is a qcow2 file shorter than its metadata says (copied or downloaded only
 * in part, or cut by a full disk)? Answered at open for a warning, from what
 * costs at most one refcount block to read: L2 tables the active L1 table
 * names, refcount blocks the refcount table names, and the highest cluster
 * the last refcount block counts as in use. Data clusters past the end are
 * found by `qmount check`, which reads every table.
 *
 * Such an image reads zeros past the end; writes never make it worse
 * (test/e2e/cli-parity.test.ts): the write path refuses (and marks the
 * image corrupt) what needs a table past the end, and writes into data
 * clusters past the end only grow the file over them.
 */
import type { ImageFile } from '../../io/file.js';
import { parseHeader } from './header.js';
import { entryOffset, HDR, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V3_HEADER_BYTES } from './spec.js';

/** A one-line description of how the file is short, or null when nothing says it is. */
export async function truncation(file: ImageFile): Promise<string | null> {
  const fileSize = await file.size();
  const first = Buffer.alloc(Math.min(fileSize, V3_HEADER_BYTES));
  await file.read(first, 0, first.length, 0);
  const clusterBits = first.readUInt32BE(HDR.clusterBits);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) return null;
  const head = Buffer.alloc(Math.min(fileSize, 2 ** clusterBits));
  await file.read(head, 0, head.length, 0);
  let h;
  try {
    h = parseHeader(head, fileSize);
  } catch {
    return null; // the driver opened it with the whole header cluster; not worth a second opinion
  }
  const cs = 2 ** h.clusterBits;
  let highest = 0;
  let what = '';
  const note = (offset: number, name: string): void => {
    // A cluster that starts inside the file is there (QEMU's files end inside their last cluster); one at or past the end is not.
    if (offset >= fileSize && offset + cs > highest) {
      highest = offset + cs;
      what = name;
    }
  };
  const l1 = Buffer.alloc(h.l1Size * 8);
  await file.read(l1, 0, l1.length, h.l1TableOffset);
  for (let i = 0; i < h.l1Size; i++) note(entryOffset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4)), 'an L2 table');
  const table = Buffer.alloc(h.refcountTableClusters * cs);
  await file.read(table, 0, table.length, h.refcountTableOffset);
  let lastBlock = -1;
  for (let i = 0; i < table.length / 8; i++) {
    const off = entryOffset(table.readUInt32BE(i * 8), table.readUInt32BE(i * 8 + 4));
    if (off === 0) continue;
    note(off, 'a refcount block');
    lastBlock = i;
  }
  if (lastBlock >= 0) {
    const off = entryOffset(table.readUInt32BE(lastBlock * 8), table.readUInt32BE(lastBlock * 8 + 4));
    if (off + cs <= fileSize && off % cs === 0) {
      const block = Buffer.alloc(cs);
      await file.read(block, 0, cs, off);
      const bits = 2 ** h.refcountOrder;
      const perBlock = (cs * 8) / bits;
      const bytes = bits / 8;
      const perByte = 8 / bits;
      for (let e = perBlock - 1; e >= 0; e--) {
        // Entries as refcount.ts reads them: whole bytes big-endian, or packed from the low bits up.
        let used = false;
        if (bits >= 8) for (let b = 0; b < bytes && !used; b++) used = block[e * bytes + b] !== 0;
        else used = ((block[Math.floor(e / perByte)]! >> ((e % perByte) * bits)) & ((1 << bits) - 1)) !== 0;
        if (used) {
          note((lastBlock * perBlock + e) * cs, 'a cluster in use');
          break;
        }
      }
    }
  }
  if (highest === 0) return null;
  return `the image file is ${fileSize} bytes, but its metadata names ${what} up to ${highest}: the file looks truncated; what lies past its end reads as zeros (run qmount check for the whole picture)`;
}
