/**
 * GPT (UEFI 2.x, chapter 5.3). Rules, with where they differ from Linux's
 * block/partitions/efi.c:
 * - GPT is used only behind a protective MBR (an entry of type EE), as
 *   Linux without the `gpt` boot option.
 * - A header is valid when: signature "EFI PART"; 92 <= header size <= one
 *   sector; its CRC32 (over header size bytes, the CRC field as zero)
 *   matches; MyLBA is where we read it; first usable <= last usable <
 *   the disk's sector count; entry size is 128 x 2^n up to MAX_ENTRY_SIZE;
 *   the entry array (count x size bytes) is at most MAX_ARRAY_BYTES, lies
 *   inside the disk, and its CRC32 matches.
 * - The primary header is at LBA 1. When it is invalid, the backup header
 *   at the last LBA is used, with a warning (what sfdisk, gdisk and parted
 *   do; Linux itself needs the `gpt` boot option for that). Both invalid:
 *   no partitions (and a warning).
 * - A used entry (type GUID not zero) is pN with N = its index + 1 (gaps
 *   stay gaps, as /dev/sdaN); first LBA <= last LBA <= the disk's last LBA,
 *   else it is skipped with a warning (as Linux's is_pte_valid).
 * - 64-bit fields above Number.MAX_SAFE_INTEGER make the header or entry
 *   invalid.
 * Hostile tables: every read is bounded (one sector for a header, at most
 * MAX_ARRAY_BYTES for the entries), and so is the count (MAX_PARTITIONS).
 */
import { crc32 } from './crc32.js';
import { MAX_PARTITIONS, type Partition, type ReadAt } from './types.js';

export const GPT_SIGNATURE = 'EFI PART';
export const MAX_ENTRY_SIZE = 4096;
export const MAX_ARRAY_BYTES = 1024 * 1024;
const MIN_HEADER = 92;

export interface GptHeader {
  myLba: number;
  alternateLba: number;
  firstUsableLba: number;
  lastUsableLba: number;
  diskGuid: string;
  entriesLba: number;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
}

function u64(buf: Buffer, off: number): number | undefined {
  const v = buf.readBigUInt64LE(off);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(v);
}

/** A mixed-endian GUID as text (the first three fields little-endian). */
export function guidText(b: Buffer, off: number): string {
  const h = (from: number, to: number, rev: boolean): string => {
    const part = Buffer.from(b.subarray(off + from, off + to));
    if (rev) part.reverse();
    return part.toString('hex');
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`;
}

/** The header in `sector` (read at `lba`), or why it is not valid (entries are checked by checkEntries). */
export function parseGptHeader(sector: Buffer, lba: number, diskSectors: number, sectorSize: number): GptHeader | string {
  if (sector.length < sectorSize || sector.toString('latin1', 0, 8) !== GPT_SIGNATURE) return 'no "EFI PART" signature';
  const size = sector.readUInt32LE(12);
  if (size < MIN_HEADER || size > sectorSize) return `header size ${size} outside ${MIN_HEADER}..${sectorSize}`;
  const copy = Buffer.from(sector.subarray(0, size));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== sector.readUInt32LE(16)) return 'header CRC32 mismatch';
  const myLba = u64(sector, 24);
  const alternateLba = u64(sector, 32);
  const firstUsableLba = u64(sector, 40);
  const lastUsableLba = u64(sector, 48);
  const entriesLba = u64(sector, 72);
  if (myLba === undefined || alternateLba === undefined || firstUsableLba === undefined || lastUsableLba === undefined || entriesLba === undefined) {
    return 'an LBA field is too large';
  }
  if (myLba !== lba) return `MyLBA ${myLba} but read at LBA ${lba}`;
  if (firstUsableLba > lastUsableLba || lastUsableLba >= diskSectors) return `usable LBAs ${firstUsableLba}..${lastUsableLba} do not fit the ${diskSectors}-sector disk`;
  const entryCount = sector.readUInt32LE(80);
  const entrySize = sector.readUInt32LE(84);
  if (entrySize < 128 || entrySize > MAX_ENTRY_SIZE || (entrySize & (entrySize - 1)) !== 0) return `entry size ${entrySize} is not 128 x 2^n up to ${MAX_ENTRY_SIZE}`;
  if (entryCount * entrySize > MAX_ARRAY_BYTES) return `${entryCount} entries of ${entrySize} bytes exceed ${MAX_ARRAY_BYTES} bytes`;
  const arraySectors = Math.ceil((entryCount * entrySize) / sectorSize);
  if (entriesLba < 1 || entriesLba + arraySectors > diskSectors) return `the entry array at LBA ${entriesLba} does not fit the disk`;
  return { myLba, alternateLba, firstUsableLba, lastUsableLba, diskGuid: guidText(sector, 56), entriesLba, entryCount, entrySize, entriesCrc: sector.readUInt32LE(88) };
}

/** Read and check a header and its entry array at `lba`: the parsed pair, or why not. */
async function readGpt(read: ReadAt, lba: number, diskSectors: number, sectorSize: number): Promise<{ h: GptHeader; array: Buffer } | string> {
  const h = parseGptHeader(await read(lba * sectorSize, sectorSize), lba, diskSectors, sectorSize);
  if (typeof h === 'string') return h;
  const array = h.entryCount === 0 ? Buffer.alloc(0) : await read(h.entriesLba * sectorSize, h.entryCount * h.entrySize);
  if (crc32(array) !== h.entriesCrc) return 'entry array CRC32 mismatch';
  return { h, array };
}

/** The used entries of a checked array (see the top for the rules). */
export function gptEntries(h: GptHeader, array: Buffer, diskSectors: number, sectorSize: number, warnings: string[]): Partition[] {
  const out: Partition[] = [];
  for (let i = 0; i < h.entryCount; i++) {
    const o = i * h.entrySize;
    const type = guidText(array, o);
    if (type === '00000000-0000-0000-0000-000000000000') continue;
    const first = u64(array, o + 32);
    const last = u64(array, o + 40);
    if (first === undefined || last === undefined || first > last || last >= diskSectors) {
      warnings.push(`GPT entry ${i + 1}: LBAs ${String(first)}..${String(last)} do not fit the ${diskSectors}-sector disk; skipped`);
      continue;
    }
    if (out.length >= MAX_PARTITIONS) {
      warnings.push(`more than ${MAX_PARTITIONS} GPT partitions; the rest is ignored`);
      break;
    }
    let end = 56;
    while (end < 128 && (array[o + end] !== 0 || array[o + end + 1] !== 0)) end += 2;
    out.push({
      number: i + 1,
      start: first * sectorSize,
      length: (last - first + 1) * sectorSize,
      type,
      uuid: guidText(array, o + 16),
      name: array.toString('utf16le', o + 56, o + end),
    });
  }
  return out;
}

/** GPT partitions of a disk whose MBR is protective; `undefined` when neither header is valid. */
export async function gptPartitions(read: ReadAt, diskSize: number, sectorSize: number, warnings: string[]): Promise<Partition[] | undefined> {
  const diskSectors = Math.floor(diskSize / sectorSize);
  if (diskSectors < 3) return undefined;
  const primary = await readGpt(read, 1, diskSectors, sectorSize);
  if (typeof primary !== 'string') return gptEntries(primary.h, primary.array, diskSectors, sectorSize, warnings);
  const backup = await readGpt(read, diskSectors - 1, diskSectors, sectorSize);
  if (typeof backup === 'string') {
    warnings.push(`GPT: primary header invalid (${primary}), backup header invalid (${backup})`);
    return undefined;
  }
  warnings.push(`GPT: primary header invalid (${primary}); using the backup header at LBA ${diskSectors - 1}`);
  return gptEntries(backup.h, backup.array, diskSectors, sectorSize, warnings);
}
