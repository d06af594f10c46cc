/**
 * DIR/pN.raw: one file per partition of disk.raw, each a SliceDriver over the
 * image's driver (src/formats/slice.ts), listed as a view of disk.raw so the
 * service keeps their caches coherent (mount/tree.ts viewOf).
 *
 * The table is read once, at mount time. When the guest (or a tool writing
 * disk.raw) rewrites the table later, the files keep the bounds they were
 * mounted with until the next mount: their names and sizes are fixed for
 * the life of the mount (a FUSE tree whose files come and go under an open
 * file descriptor would be worse). Writes to sectors 0..33 or the backup
 * GPT are not watched.
 *
 * A table that cannot be read (a read error in sector 0 of a damaged image)
 * or that is not valid gives no partition files, with a warning in the log:
 * disk.raw is still mounted.
 */
import { oneLine } from '../src/errors.js';
import type { BlockDriver } from '../src/formats/driver.js';
import { SliceDriver } from '../src/formats/slice.js';
import type { Logger } from '../src/log.js';
import { readPartitionTable } from '../src/partition/read.js';
import type { PartitionTable } from '../src/partition/types.js';
import type { TreeEntry } from './tree.js';

export function partitionFileName(n: number): string {
  return `p${n}.raw`;
}

/** The table of `driver`'s disk, or undefined (none, or unreadable: logged). */
export async function readDiskPartitions(driver: BlockDriver, log: Logger): Promise<PartitionTable | undefined> {
  const read = async (offset: number, length: number): Promise<Buffer> => {
    const buf = Buffer.alloc(length);
    await driver.read(buf, 0, length, offset);
    return buf;
  };
  let table: PartitionTable | undefined;
  try {
    table = await readPartitionTable(read, driver.virtualSize);
  } catch (err) {
    log.warn({ err: oneLine(err) }, 'cannot read the partition table; no partition files');
    return undefined;
  }
  for (const w of table?.warnings ?? []) log.warn({ scheme: table?.scheme }, `partition table: ${w}`);
  return table;
}

/** The pN.raw entries for the mount tree (none without a table). */
export async function partitionFiles(driver: BlockDriver, log: Logger): Promise<TreeEntry[]> {
  const table = await readDiskPartitions(driver, log);
  if (!table) return [];
  const files: TreeEntry[] = table.partitions.map((p) => {
    const slice = new SliceDriver(driver, p.start, p.length, `p${p.number}`);
    return { path: partitionFileName(p.number), source: slice, viewOf: { base: driver, offset: p.start } };
  });
  log.info({ scheme: table.scheme, partitions: table.partitions.map((p) => ({ file: partitionFileName(p.number), start: p.start, length: p.length, type: p.type })) }, 'partitions');
  return files;
}
