/**
 * Which partition table a disk has, and its partitions (see mbr.ts and
 * gpt.ts for the rules of each). Sector 0 decides: no MBR signature or a bad
 * boot flag: no table; a protective entry (type EE): GPT, looked for with
 * 512-byte sectors and then 4096-byte ones (4Kn disks); else MBR.
 * A disk with a protective MBR but no valid GPT shows no partitions (as
 * Linux). Read errors propagate (the caller decides; the mount then shows
 * no partition files).
 */
import { gptPartitions } from './gpt.js';
import { GPT_PROTECTIVE_TYPE, SECTOR, mbrPartitions, parseMbr } from './mbr.js';
import type { PartitionTable, ReadAt } from './types.js';

export async function readPartitionTable(read: ReadAt, diskSize: number): Promise<PartitionTable | undefined> {
  if (diskSize < 2 * SECTOR) return undefined;
  const entries = parseMbr(await read(0, SECTOR));
  if (entries === undefined) return undefined;
  const warnings: string[] = [];
  if (entries.some((e) => e.type === GPT_PROTECTIVE_TYPE)) {
    for (const sectorSize of [512, 4096]) {
      const tried: string[] = [];
      const parts = await gptPartitions(read, diskSize, sectorSize, tried);
      // The warnings of a sector size that did not work are only news when none did.
      if (parts !== undefined) return { scheme: 'gpt', sectorSize, partitions: parts, warnings: tried };
      warnings.push(...tried.map((w) => `${sectorSize}-byte sectors: ${w}`));
    }
    return { scheme: 'gpt', sectorSize: SECTOR, partitions: [], warnings };
  }
  const parts = await mbrPartitions(entries, read, diskSize, warnings);
  return parts.length === 0 && warnings.length === 0 ? undefined : { scheme: 'mbr', sectorSize: SECTOR, partitions: parts, warnings };
}
