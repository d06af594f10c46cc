/**
 * Partition table parsing (src/partition): tables made by sfdisk on raw
 * files match `sfdisk --json`; hostile tables (EBR loops and long chains,
 * huge GPT entry counts, bad CRCs, entries past the end) give bounded reads
 * and the documented answers.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { crc32 } from '../../src/partition/crc32.js';
import { MAX_ARRAY_BYTES } from '../../src/partition/gpt.js';
import { MAX_EBRS } from '../../src/partition/mbr.js';
import { readPartitionTable } from '../../src/partition/read.js';
import type { ReadAt } from '../../src/partition/types.js';
import { run, scratchDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
let scratch: { dir: string; cleanup: () => void };
beforeAll(() => {
  scratch = scratchDir('partition');
});
afterAll(() => scratch.cleanup());

/** A ReadAt over a buffer that refuses reads outside it and counts bytes read. */
function disk(buf: Buffer): { read: ReadAt; stats: { reads: number; bytes: number } } {
  const stats = { reads: 0, bytes: 0 };
  const read: ReadAt = (offset, length) => {
    if (offset < 0 || length < 0 || offset + length > buf.length) throw new Error(`read [${offset}, +${length}) outside the ${buf.length}-byte disk`);
    stats.reads++;
    stats.bytes += length;
    return Promise.resolve(Buffer.from(buf.subarray(offset, offset + length)));
  };
  return { read, stats };
}

interface SfdiskPart {
  node: string;
  start: number;
  size: number;
  type: string;
}

/** A raw file of `size` bytes partitioned by sfdisk with `script`; its bytes and sfdisk's own view. */
function sfdisk(name: string, size: number, script: string): { buf: Buffer; parts: SfdiskPart[]; file: string } {
  const file = path.join(scratch.dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  run('sfdisk', ['-q', file], { input: script });
  const json = JSON.parse(run('sfdisk', ['--json', file]).stdout) as { partitiontable: { partitions: SfdiskPart[] } };
  return { buf: fs.readFileSync(file), parts: json.partitiontable.partitions, file };
}

const partNumber = (node: string): number => Number(/(\d+)$/.exec(node)![1]);

function setMbrEntry(buf: Buffer, sectorOffset: number, slot: number, type: number, startLba: number, sectors: number): void {
  const o = sectorOffset + 446 + 16 * slot;
  buf.fill(0, o, o + 16);
  buf[o + 4] = type;
  buf.writeUInt32LE(startLba, o + 8);
  buf.writeUInt32LE(sectors, o + 12);
  buf[sectorOffset + 510] = 0x55;
  buf[sectorOffset + 511] = 0xaa;
}

/** Recompute a GPT header's entry-array and header CRCs (header at `lba`, 512-byte sectors). */
function fixGptCrcs(buf: Buffer, lba: number): void {
  const h = lba * 512;
  const entriesLba = Number(buf.readBigUInt64LE(h + 72));
  const bytes = buf.readUInt32LE(h + 80) * buf.readUInt32LE(h + 84);
  if (bytes <= MAX_ARRAY_BYTES && (entriesLba + Math.ceil(bytes / 512)) * 512 <= buf.length) {
    buf.writeUInt32LE(crc32(buf.subarray(entriesLba * 512, entriesLba * 512 + bytes)), h + 88);
  }
  const size = buf.readUInt32LE(h + 12);
  buf.writeUInt32LE(0, h + 16);
  buf.writeUInt32LE(crc32(buf.subarray(h, h + size)), h + 16);
}

describe('crc32', () => {
  it('is CRC-32/IEEE (check value of "123456789")', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(crc32(Buffer.alloc(0))).toBe(0);
  });
});

describe('tables made by sfdisk', () => {
  it('GPT with three partitions (one named) equals sfdisk --json', async () => {
    const { buf, parts } = sfdisk('gpt.raw', 64 * MiB, 'label: gpt\nsize=8MiB, type=linux, name="root fs"\nsize=16MiB, type=swap\nsize=10MiB\n');
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t?.scheme).toBe('gpt');
    expect(t!.warnings).toEqual([]);
    expect(t!.partitions.map((p) => [p.number, p.start, p.length])).toEqual(parts.map((p) => [partNumber(p.node), p.start * 512, p.size * 512]));
    expect(t!.partitions.map((p) => p.type)).toEqual(parts.map((p) => p.type.toLowerCase()));
    expect(t!.partitions[0]!.name).toBe('root fs');
  });

  it('MBR with two primaries and an extended container holding two logical partitions: p1, p2, p5, p6 (the container gets none)', async () => {
    const { buf, parts } = sfdisk('mbr.raw', 64 * MiB, 'label: dos\nsize=8MiB, type=83\nsize=8MiB, type=83\ntype=5\nsize=6MiB, type=83\nsize=7MiB, type=7\n');
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t?.scheme).toBe('mbr');
    expect(t!.warnings).toEqual([]);
    const expected = parts.filter((p) => !['5', 'f', '85'].includes(p.type)).map((p) => [partNumber(p.node), p.start * 512, p.size * 512, p.type.padStart(2, '0')]);
    expect(expected.map((e) => e[0])).toEqual([1, 2, 5, 6]);
    expect(t!.partitions.map((p) => [p.number, p.start, p.length, p.type])).toEqual(expected);
  });

  it('GPT on 4096-byte sectors (4Kn; built by hand, this sfdisk has no --sector-size) is found after the 512-byte look', async () => {
    const SS = 4096;
    const buf = Buffer.alloc(16 * MiB);
    const sectors = buf.length / SS;
    setMbrEntry(buf, 0, 0, 0xee, 1, sectors - 1);
    const h = SS; // LBA 1
    buf.write('EFI PART', h, 'latin1');
    buf.writeUInt32LE(0x10000, h + 8);
    buf.writeUInt32LE(92, h + 12);
    buf.writeBigUInt64LE(1n, h + 24);
    buf.writeBigUInt64LE(BigInt(sectors - 1), h + 32);
    buf.writeBigUInt64LE(6n, h + 40);
    buf.writeBigUInt64LE(BigInt(sectors - 6), h + 48);
    buf.writeBigUInt64LE(2n, h + 72); // entries at LBA 2
    buf.writeUInt32LE(128, h + 80);
    buf.writeUInt32LE(128, h + 84);
    const e = 2 * SS;
    const linux = Buffer.from('af3dc60f838472478e793d69d8477de4', 'hex'); // 0fc63daf-8483-4772-8e79-3d69d8477de4 on disk
    for (const [i, first, last] of [[0, 256, 511], [2, 512, 1023]] as const) {
      linux.copy(buf, e + i * 128);
      buf[e + i * 128 + 16] = i + 1; // a partition GUID that is not zero
      buf.writeBigUInt64LE(BigInt(first), e + i * 128 + 32);
      buf.writeBigUInt64LE(BigInt(last), e + i * 128 + 40);
    }
    buf.writeUInt32LE(crc32(buf.subarray(e, e + 128 * 128)), h + 88);
    buf.writeUInt32LE(crc32(buf.subarray(h, h + 92)), h + 16);
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t?.sectorSize).toBe(SS);
    expect(t!.warnings).toEqual([]);
    expect(t!.partitions.map((p) => [p.number, p.start, p.length, p.type])).toEqual([
      [1, 256 * SS, 256 * SS, '0fc63daf-8483-4772-8e79-3d69d8477de4'],
      [3, 512 * SS, 512 * SS, '0fc63daf-8483-4772-8e79-3d69d8477de4'],
    ]);
  });

  it('a disk without a table, or with a bad boot flag, has none', async () => {
    expect(await readPartitionTable(disk(Buffer.alloc(MiB)).read, MiB)).toBeUndefined();
    const { buf } = sfdisk('bootflag.raw', 16 * MiB, 'label: dos\nsize=4MiB, type=83\n');
    buf[446] = 0x12; // boot flag of slot 1: neither 00 nor 80 (a FAT/NTFS boot sector, not a table)
    expect(await readPartitionTable(disk(buf).read, buf.length)).toBeUndefined();
  });
});

describe('GPT damage', () => {
  const script = 'label: gpt\nsize=4MiB\nsize=4MiB\n';

  it('a bad primary header CRC: the backup header is used, with a warning', async () => {
    const { buf, parts } = sfdisk('gpt-badhdr.raw', 16 * MiB, script);
    buf[512 + 40] ^= 0xff; // first usable LBA, CRC not fixed
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t!.warnings.join('\n')).toMatch(/primary header invalid \(header CRC32 mismatch\); using the backup/);
    expect(t!.partitions.map((p) => p.start)).toEqual(parts.map((p) => p.start * 512));
  });

  it('a bad primary entry-array CRC: the backup (with its own array) is used', async () => {
    const { buf, parts } = sfdisk('gpt-badarr.raw', 16 * MiB, script);
    buf[1024 + 32] ^= 0x01; // first entry's first LBA in the primary array
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t!.warnings.join('\n')).toMatch(/entry array CRC32 mismatch/);
    expect(t!.partitions.map((p) => p.start)).toEqual(parts.map((p) => p.start * 512));
  });

  it('both headers bad: a GPT disk with no partitions and warnings', async () => {
    const { buf } = sfdisk('gpt-bothbad.raw', 16 * MiB, script);
    buf[512 + 40] ^= 0xff;
    buf[buf.length - 512 + 40] ^= 0xff;
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t!.scheme).toBe('gpt');
    expect(t!.partitions).toEqual([]);
    expect(t!.warnings.join('\n')).toMatch(/backup header invalid/);
  });

  it('a huge entry count (with valid CRCs) is refused without reading it', async () => {
    const { buf } = sfdisk('gpt-huge.raw', 16 * MiB, script);
    for (const lba of [1, buf.length / 512 - 1]) {
      buf.writeUInt32LE(0xffffffff, lba * 512 + 80);
      fixGptCrcs(buf, lba);
    }
    const d = disk(buf);
    const t = await readPartitionTable(d.read, buf.length);
    expect(t!.partitions).toEqual([]);
    expect(t!.warnings.join('\n')).toMatch(/4294967295 entries of 128 bytes exceed/);
    expect(d.stats.bytes).toBeLessThanOrEqual(8 * 4096);
  });

  it('an entry reaching past the disk is skipped; MyLBA must match where the header is', async () => {
    const { buf, parts } = sfdisk('gpt-past.raw', 16 * MiB, script);
    buf.writeBigUInt64LE(BigInt(buf.length / 512), 1024 + 128 + 40); // entry 2's last LBA = the sector count
    fixGptCrcs(buf, 1);
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t!.partitions.map((p) => p.number)).toEqual([1]);
    expect(t!.partitions[0]!.start).toBe(parts[0]!.start * 512);
    expect(t!.warnings.join('\n')).toMatch(/GPT entry 2: .* skipped/);

    buf.writeBigUInt64LE(5n, 512 + 24); // MyLBA
    fixGptCrcs(buf, 1);
    const t2 = await readPartitionTable(disk(buf).read, buf.length);
    expect(t2!.warnings.join('\n')).toMatch(/MyLBA 5 but read at LBA 1/);
  });
});

describe('hostile MBR tables', () => {
  const SECTORS = 4096; // 2 MiB disk
  const blank = (): Buffer => Buffer.alloc(SECTORS * 512);

  it('an EBR linking to itself: one logical partition, then the loop is noticed', async () => {
    const buf = blank();
    setMbrEntry(buf, 0, 0, 0x05, 100, 1000);
    setMbrEntry(buf, 100 * 512, 0, 0x83, 1, 10);
    setMbrEntry(buf, 100 * 512, 1, 0x05, 0, 50); // next EBR = container start + 0 = itself
    const d = disk(buf);
    const t = await readPartitionTable(d.read, buf.length);
    expect(t!.partitions.map((p) => [p.number, p.start / 512, p.length / 512])).toEqual([[5, 101, 10]]);
    expect(t!.warnings.join('\n')).toMatch(/loops back to sector 100/);
    expect(d.stats.reads).toBe(2);
  });

  it('a two-EBR cycle stops after both', async () => {
    const buf = blank();
    setMbrEntry(buf, 0, 1, 0x0f, 100, 2000);
    setMbrEntry(buf, 100 * 512, 0, 0x83, 1, 10);
    setMbrEntry(buf, 100 * 512, 1, 0x05, 100, 50); // -> sector 200
    setMbrEntry(buf, 200 * 512, 0, 0x83, 1, 10);
    setMbrEntry(buf, 200 * 512, 1, 0x05, 0, 50); // -> sector 100 again
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t!.partitions.map((p) => p.number)).toEqual([5, 6]);
    expect(t!.warnings.join('\n')).toMatch(/loops back/);
  });

  it(`a chain longer than ${MAX_EBRS} EBRs is cut there (reads stay bounded)`, async () => {
    const buf = blank();
    setMbrEntry(buf, 0, 0, 0x85, 10, 3000);
    for (let i = 0; i < 300; i++) {
      const ebr = 10 + i * 4;
      setMbrEntry(buf, ebr * 512, 0, 0x83, 1, 2);
      setMbrEntry(buf, ebr * 512, 1, 0x05, (i + 1) * 4, 4);
    }
    const d = disk(buf);
    const t = await readPartitionTable(d.read, buf.length);
    expect(t!.partitions.length).toBe(MAX_EBRS);
    expect(t!.partitions.at(-1)!.number).toBe(4 + MAX_EBRS);
    expect(t!.warnings.join('\n')).toMatch(new RegExp(`more than ${MAX_EBRS} EBRs`));
    expect(d.stats.reads).toBeLessThanOrEqual(MAX_EBRS + 1);
  });

  it('an EBR link outside the container ends the chain; garbage in EBR slots 3-4 outside the span is ignored', async () => {
    const buf = blank();
    setMbrEntry(buf, 0, 0, 0x05, 100, 100);
    setMbrEntry(buf, 100 * 512, 0, 0x83, 1, 10);
    setMbrEntry(buf, 100 * 512, 2, 0x83, 500, 10); // slot 3, outside the container: garbage
    setMbrEntry(buf, 100 * 512, 1, 0x05, 5000, 10); // next EBR past the container (and the disk)
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t!.partitions.map((p) => p.number)).toEqual([5]);
    expect(t!.warnings.join('\n')).toMatch(/outside the container or the disk/);
  });

  it('a primary past the end is skipped, one reaching past it is cut at the end (as Linux)', async () => {
    const buf = blank();
    setMbrEntry(buf, 0, 0, 0x83, 2048, 4096);
    setMbrEntry(buf, 0, 1, 0x83, 0xfffffff0, 100);
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t!.partitions.map((p) => [p.number, p.start / 512, p.length / 512])).toEqual([[1, 2048, SECTORS - 2048]]);
    expect(t!.warnings.join('\n')).toMatch(/p2: starts at sector 4294967280, past the end/);
  });

  it('a protective MBR without any GPT: no partitions', async () => {
    const buf = blank();
    setMbrEntry(buf, 0, 0, 0xee, 1, SECTORS - 1);
    const t = await readPartitionTable(disk(buf).read, buf.length);
    expect(t).toMatchObject({ scheme: 'gpt', partitions: [] });
  });
});

describe('random tables', () => {
  it('2000 disks of random MBR/EBR/GPT bytes: every read stays inside the disk, the count and reads stay bounded', async () => {
    let seed = 12345;
    const rand = (n: number): number => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % n;
    };
    const SECTORS = 2048;
    const seen = { logical: 0, gpt: 0 };
    for (let i = 0; i < 2000; i++) {
      const buf = Buffer.alloc(SECTORS * 512);
      const types = [0x05, 0x0f, 0x85, 0x83, 0xee, 0x07, 0];
      // a primary table and a few hundred EBR-like sectors pointing around
      for (let slot = 0; slot < 4; slot++) setMbrEntry(buf, 0, slot, types[rand(types.length)]!, rand(SECTORS + 100), rand(SECTORS * 2));
      for (let k = 0; k < 300; k++) {
        const sec = rand(SECTORS);
        setMbrEntry(buf, sec * 512, rand(4), types[rand(types.length)]!, rand(SECTORS), rand(SECTORS));
      }
      if (rand(2) === 0) {
        // a GPT header with random fields and a valid CRC
        buf.write('EFI PART', 512, 'latin1');
        buf.writeUInt32LE(92, 512 + 12);
        buf.writeBigUInt64LE(1n, 512 + 24);
        buf.writeBigUInt64LE(BigInt(rand(SECTORS)), 512 + 40);
        buf.writeBigUInt64LE(BigInt(rand(SECTORS + 10)), 512 + 48);
        const entriesLba = rand(3) === 0 ? rand(SECTORS + 10) : 2;
        buf.writeBigUInt64LE(BigInt(entriesLba), 512 + 72);
        for (let j = 0; j < 8 && (entriesLba + 2) * 512 <= buf.length; j++) {
          const o = entriesLba * 512 + j * 128;
          buf[o] = rand(256);
          buf.writeBigUInt64LE(BigInt(rand(SECTORS + 10)), o + 32);
          buf.writeBigUInt64LE(BigInt(rand(SECTORS + 10)), o + 40);
        }
        buf.writeUInt32LE(rand(3) === 0 ? 0xffffffff : rand(300), 512 + 80);
        buf.writeUInt32LE([128, 256, 100, 0][rand(4)]!, 512 + 84);
        fixGptCrcs(buf, 1);
      }
      const d = disk(buf);
      const t = await readPartitionTable(d.read, buf.length);
      expect(t === undefined || t.partitions.length <= 256).toBe(true);
      for (const p of t?.partitions ?? []) expect(p.start + p.length).toBeLessThanOrEqual(buf.length);
      if (t?.partitions.some((p) => p.number >= 5) && t.scheme === 'mbr') seen.logical++;
      if (t?.scheme === 'gpt' && t.partitions.length > 0) seen.gpt++;
      expect(d.stats.reads).toBeLessThanOrEqual(4 * (MAX_EBRS + 2));
      expect(d.stats.bytes).toBeLessThanOrEqual(2 * MAX_ARRAY_BYTES + 4 * (MAX_EBRS + 2) * 4096);
    }
    // the inputs reached the interesting paths
    expect(seen.logical).toBeGreaterThan(20);
    expect(seen.gpt).toBeGreaterThan(20);
  });
});
