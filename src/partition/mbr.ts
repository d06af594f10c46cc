/**
 * MBR (DOS) partition tables, read the way Linux's block/partitions/msdos.c
 * reads them, so pN.raw numbers match /dev/loop0pN:
 * - sector 0 ends in 55 AA; every primary entry's boot flag is 00 or 80
 *   (anything else: this is no partition table, e.g. a FAT or NTFS boot
 *   sector of a disk without one);
 * - primaries are p1..p4 by slot, empty slots (type 0 or no sectors) leave gaps;
 * - an extended container (types 05, 0F, 85) gets no file of its own
 *   (the slot's number stays unused); its chain of EBRs gives the logical
 *   partitions p5, p6, ... in chain order. In each EBR every non-empty,
 *   non-extended entry is a logical partition at (this EBR's LBA + its
 *   start); entries 3 and 4 only if they lie inside the EBR's span and the
 *   container (Linux: "these sometimes contain random garbage"); the first
 *   extended entry links the next EBR at (container start + its start).
 * - a partition starting past the end of the disk is skipped; one reaching
 *   past it is cut at the end (Linux's "extends beyond EOD, truncated").
 *
 * Hostile tables: the chain is bounded (MAX_EBRS reads, an EBR seen before
 * ends it, an EBR outside its container ends it) and so is the count
 * (MAX_PARTITIONS); each step costs one sector read.
 */
import { MAX_PARTITIONS, type Partition, type ReadAt } from './types.js';

export const SECTOR = 512;
export const EXTENDED_TYPES: ReadonlySet<number> = new Set([0x05, 0x0f, 0x85]);
export const GPT_PROTECTIVE_TYPE = 0xee;
/** Most EBRs followed in one extended container (Linux stops after 100). */
export const MAX_EBRS = 128;

export interface MbrEntry {
  /** slot 0..3 */
  slot: number;
  boot: number;
  type: number;
  /** in sectors, relative to what the table's kind says (disk start, EBR, container) */
  startLba: number;
  sectors: number;
}

/** The four entries of a sector holding an MBR or EBR, or undefined without the 55 AA signature. */
export function mbrEntries(sector: Buffer): MbrEntry[] | undefined {
  if (sector.length < SECTOR || sector[510] !== 0x55 || sector[511] !== 0xaa) return undefined;
  const out: MbrEntry[] = [];
  for (let slot = 0; slot < 4; slot++) {
    const o = 446 + 16 * slot;
    out.push({ slot, boot: sector[o]!, type: sector[o + 4]!, startLba: sector.readUInt32LE(o + 8), sectors: sector.readUInt32LE(o + 12) });
  }
  return out;
}

/** The primary table of sector 0, or undefined when sector 0 holds none (no signature, a bad boot flag). */
export function parseMbr(sector0: Buffer): MbrEntry[] | undefined {
  const entries = mbrEntries(sector0);
  if (entries === undefined || entries.some((e) => e.boot !== 0 && e.boot !== 0x80)) return undefined;
  return entries;
}

const empty = (e: MbrEntry): boolean => e.type === 0 || e.sectors === 0;
const hex2 = (t: number): string => t.toString(16).padStart(2, '0');

/** Bounds rule for every MBR partition (see the top): undefined when it starts past the end. */
function clip(number: number, startSector: number, sectors: number, diskSectors: number, type: number, warnings: string[]): Partition | undefined {
  if (startSector >= diskSectors) {
    warnings.push(`p${number}: starts at sector ${startSector}, past the end of the ${diskSectors}-sector disk; skipped`);
    return undefined;
  }
  let n = sectors;
  if (startSector + n > diskSectors) {
    n = diskSectors - startSector;
    warnings.push(`p${number}: reaches past the end of the disk; cut to ${n} sectors`);
  }
  return { number, start: startSector * SECTOR, length: n * SECTOR, type: hex2(type) };
}

/** Partitions of an MBR disk (primaries, then logical ones); `entries` from parseMbr. */
export async function mbrPartitions(entries: MbrEntry[], read: ReadAt, diskSize: number, warnings: string[]): Promise<Partition[]> {
  const diskSectors = Math.floor(diskSize / SECTOR);
  const out: Partition[] = [];
  const extended: MbrEntry[] = [];
  for (const e of entries) {
    if (empty(e)) continue;
    if (EXTENDED_TYPES.has(e.type)) {
      extended.push(e);
      continue;
    }
    const p = clip(e.slot + 1, e.startLba, e.sectors, diskSectors, e.type, warnings);
    if (p) out.push(p);
  }
  let next = 5;
  for (const ext of extended) {
    next = await logicalPartitions(ext, read, diskSectors, next, out, warnings);
  }
  return out;
}

/** Walk one extended container's EBR chain; returns the next logical number. */
async function logicalPartitions(ext: MbrEntry, read: ReadAt, diskSectors: number, next: number, out: Partition[], warnings: string[]): Promise<number> {
  const first = ext.startLba;
  const firstEnd = first + ext.sectors;
  const seen = new Set<number>();
  let ebr = first;
  let ebrSpan = ext.sectors;
  for (let hops = 0; ; hops++) {
    if (hops >= MAX_EBRS) {
      warnings.push(`extended partition at sector ${first}: more than ${MAX_EBRS} EBRs; the rest is ignored`);
      return next;
    }
    if (seen.has(ebr)) {
      warnings.push(`extended partition at sector ${first}: the EBR chain loops back to sector ${ebr}; stopped there`);
      return next;
    }
    if (ebr < first || ebr >= firstEnd || ebr >= diskSectors) {
      warnings.push(`extended partition at sector ${first}: an EBR at sector ${ebr} lies outside the container or the disk; stopped there`);
      return next;
    }
    seen.add(ebr);
    const entries = mbrEntries(await read(ebr * SECTOR, SECTOR));
    if (entries === undefined) return next; // no signature: the chain ends (as Linux)
    for (const e of entries) {
      if (empty(e) || EXTENDED_TYPES.has(e.type)) continue;
      const start = ebr + e.startLba;
      if (e.slot >= 2 && (e.startLba + e.sectors > ebrSpan || start < first || start + e.sectors > firstEnd)) continue;
      if (out.length >= MAX_PARTITIONS) {
        warnings.push(`more than ${MAX_PARTITIONS} partitions; the rest is ignored`);
        return next;
      }
      const p = clip(next, start, e.sectors, diskSectors, e.type, warnings);
      next++;
      if (p) out.push(p);
    }
    const link = entries.find((e) => !empty(e) && EXTENDED_TYPES.has(e.type));
    if (link === undefined) return next;
    ebr = first + link.startLba;
    ebrSpan = link.sectors;
  }
}
