/**
 * Damaged qcow2 images: a valid image (made by qemu-img) whose header or
 * tables are broken with plain fs writes. Opening must fail fast with one
 * clear line naming the image and an errno, never allocate what a hostile
 * header asks for, and never write to the file. Damage inside the data path
 * (an L2 entry past EOF, garbage compressed data) fails only the reads that
 * touch it, with EIO.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmountError } from '../../src/errors.js';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { hashFiles, MiB } from '../helpers/images.js';
import { convertToRaw, patternBytes, qemuImg, qemuIo, scratchDir, sha256File, readAt, writeAt } from '../helpers/qemu.js';

const CLUSTER = 65536;
const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'dist', 'src', 'cli.js');

// ---- byte-level access to a qcow2 file ------------------------------------

const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const u64 = (v: number | bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};
const hdr32 = (p: string, off: number) => readAt(p, off, 4).readUInt32BE(0);
const hdr64 = (p: string, off: number) => Number(readAt(p, off, 8).readBigUInt64BE(0));
const roundUp = (v: number, a: number) => Math.ceil(v / a) * a;

// Header field offsets (docs/interop/qcow2.rst).
const H = {
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatible: 72,
  refcountOrder: 96,
  headerLength: 100,
};
const EXT_FEATURE_TABLE = 0x6803f857;
const L2_OFFSET_MASK = 0x00fffffffffffe00n;

/** Offset of the feature name table extension's data, or -1. */
function featureTableOffset(p: string): { off: number; len: number } {
  const head = readAt(p, 0, CLUSTER);
  let off = head.readUInt32BE(H.headerLength);
  while (off + 8 <= head.length) {
    const type = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    if (type === 0) break;
    if (type === EXT_FEATURE_TABLE) return { off: off + 8, len };
    off += 8 + roundUp(len, 8);
  }
  return { off: -1, len: 0 };
}

/** File offset of the L2 entry that maps guest cluster `guestCluster` (64 KiB clusters). */
function l2EntryOffset(p: string, guestCluster: number): number {
  const clusterBits = hdr32(p, H.clusterBits);
  const cs = 2 ** clusterBits;
  const perL2 = cs / 8;
  const l1Off = hdr64(p, H.l1TableOffset);
  const l1e = readAt(p, l1Off + 8 * Math.floor(guestCluster / perL2), 8).readBigUInt64BE(0);
  const l2 = Number(l1e & L2_OFFSET_MASK);
  if (l2 === 0) throw new Error(`guest cluster ${guestCluster} has no L2 table`);
  return l2 + 8 * (guestCluster % perL2);
}

// ---- expectations ---------------------------------------------------------

async function openFails(p: string, opts: { readOnly?: boolean; format?: 'qcow2' } = {}): Promise<QmountError> {
  let drv: BlockDriver | undefined;
  try {
    drv = await openImage(p, { readOnly: opts.readOnly ?? true, format: opts.format });
  } catch (err) {
    return err as QmountError;
  }
  await drv.close();
  throw new Error(`openImage(${p}) succeeded on a damaged image`);
}

function expectClearError(err: unknown, imagePath: string, errnos?: string[]): asserts err is QmountError {
  expect(err, String(err)).toBeInstanceOf(QmountError);
  const e = err as QmountError;
  expect(e.message).not.toMatch(/\n/);
  expect(e.message).toContain(imagePath);
  expect(e.errno).toMatch(/^E[A-Z]+$/);
  if (errnos) expect(errnos, e.message).toContain(e.errno);
}

/** Runs fn and checks it neither took long nor made the process grow by 100 MB. */
async function expectCheap<T>(fn: () => Promise<T>): Promise<T> {
  const LIMIT = 100 * 1024 * 1024;
  const before = process.memoryUsage();
  const peakBefore = process.resourceUsage().maxRSS * 1024;
  const t0 = Date.now();
  const out = await fn();
  const after = process.memoryUsage();
  expect(Date.now() - t0, 'time to fail').toBeLessThan(2000);
  expect(after.rss - before.rss, 'rss growth').toBeLessThan(LIMIT);
  expect(after.arrayBuffers - before.arrayBuffers, 'buffer growth').toBeLessThan(LIMIT);
  expect(process.resourceUsage().maxRSS * 1024 - Math.max(peakBefore, before.rss), 'peak rss growth').toBeLessThan(LIMIT);
  return out;
}

// ---- fixtures -------------------------------------------------------------

let scratch: { dir: string; cleanup: () => void };
let pristine: string; // a valid v3 image with data
let pristineOracle: string;
let n = 0;

/** A fresh copy of the pristine image for one case. */
function copyOf(tag: string): string {
  const p = path.join(scratch.dir, `${tag}-${n++}.qcow2`);
  fs.copyFileSync(pristine, p);
  return p;
}

beforeAll(() => {
  scratch = scratchDir('damaged');
  pristine = path.join(scratch.dir, 'pristine.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', pristine, String(64 * MiB));
  const rnd = path.join(scratch.dir, 'rnd.bin');
  fs.writeFileSync(rnd, patternBytes(MiB, 7));
  qemuIo(pristine, 'qcow2', [`write -s ${rnd} 0 ${MiB}`, `write -P 0x5c ${4 * MiB} ${MiB}`, `write -P 0x33 ${5 * MiB + 12345} 70000`]);
  pristineOracle = convertToRaw(pristine, path.join(scratch.dir, 'pristine.raw'));
});

afterAll(() => scratch?.cleanup());

interface HeaderCase {
  name: string;
  damage(p: string): void;
  format?: 'qcow2';
  errnos?: string[];
  /** the message must also match this */
  message?: RegExp;
  /** a hostile size: the failure must be cheap */
  cheap?: boolean;
}

const HEADER_CASES: HeaderCase[] = [
  { name: 'bad magic (opened as --format qcow2)', format: 'qcow2', damage: (p) => writeAt(p, 0, Buffer.from('QFJ\xfb', 'latin1')) },
  { name: 'version 1', damage: (p) => writeAt(p, H.version, u32(1)), message: /version/ },
  { name: 'version 4', damage: (p) => writeAt(p, H.version, u32(4)), message: /version/ },
  { name: 'cluster_bits 8', damage: (p) => writeAt(p, H.clusterBits, u32(8)), message: /cluster/ },
  { name: 'cluster_bits 22', damage: (p) => writeAt(p, H.clusterBits, u32(22)), message: /cluster/ },
  { name: 'L1 size 2^31 entries', damage: (p) => writeAt(p, H.l1Size, u32(2 ** 31)), cheap: true, message: /L1/i },
  { name: 'l1_table_offset unaligned', damage: (p) => writeAt(p, H.l1TableOffset, u64(hdr64(p, H.l1TableOffset) + 512)), message: /l1/i },
  {
    name: 'l1_table_offset past EOF',
    damage: (p) => writeAt(p, H.l1TableOffset, u64(roundUp(fs.statSync(p).size, CLUSTER) + 100 * CLUSTER)),
    message: /l1/i,
  },
  {
    name: 'refcount_table_offset unaligned',
    damage: (p) => writeAt(p, H.refcountTableOffset, u64(hdr64(p, H.refcountTableOffset) + 4096)),
    message: /refcount/i,
  },
  { name: 'refcount_order 7', damage: (p) => writeAt(p, H.refcountOrder, u32(7)), message: /refcount/i },
  { name: 'header_length 72 in a v3 image', damage: (p) => writeAt(p, H.headerLength, u32(72)), message: /header/i },
  {
    name: 'unknown incompatible bit 10, not in the feature name table',
    damage: (p) => writeAt(p, H.incompatible, u64(BigInt(hdr64(p, H.incompatible)) | (1n << 10n))),
    errnos: ['ENOTSUP'],
    message: /\b10\b|0x400/,
  },
  {
    name: 'unknown incompatible bit 10, named in the feature name table',
    damage: (p) => {
      const t = featureTableOffset(p);
      if (t.off < 0 || t.len < 48) throw new Error('qemu-img wrote no feature name table');
      // Rewrite the table's last entry to name incompatible bit 10.
      const entry = Buffer.alloc(48);
      entry[0] = 0;
      entry[1] = 10;
      entry.write('qmount_test_feature', 2, 'latin1');
      writeAt(p, t.off + t.len - 48, entry);
      writeAt(p, H.incompatible, u64(BigInt(hdr64(p, H.incompatible)) | (1n << 10n)));
    },
    errnos: ['ENOTSUP'],
    message: /qmount_test_feature/,
  },
  {
    name: 'snapshot table past EOF with nb_snapshots 2^31-1',
    damage: (p) => {
      writeAt(p, H.nbSnapshots, u32(0x7fffffff));
      writeAt(p, H.snapshotsOffset, u64(roundUp(fs.statSync(p).size, CLUSTER) + 1024 * MiB));
    },
    cheap: true,
    message: /snapshot/i,
  },
  {
    name: 'snapshot table past EOF with nb_snapshots 3',
    damage: (p) => {
      writeAt(p, H.nbSnapshots, u32(3));
      writeAt(p, H.snapshotsOffset, u64(roundUp(fs.statSync(p).size, CLUSTER) + 16 * CLUSTER));
    },
    message: /snapshot/i,
  },
];

describe('damaged qcow2 headers', () => {
  it.each(HEADER_CASES)('$name: open fails with one clear line, nothing written', async (c) => {
    const p = copyOf(c.name.replace(/\W+/g, '_'));
    c.damage(p);
    const before = sha256File(p);
    const attempt = () => openFails(p, { format: c.format });
    const err = c.cheap ? await expectCheap(attempt) : await attempt();
    expectClearError(err, p, c.errnos);
    if (c.message) expect(err.message).toMatch(c.message);
    // A read-write open must refuse too, and also without writing.
    const rw = c.cheap ? await expectCheap(() => openFails(p, { readOnly: false, format: c.format })) : await openFails(p, { readOnly: false, format: c.format });
    expectClearError(rw, p, c.errnos);
    expect(sha256File(p)).toBe(before);
  });

  it('corrupt bit: read-only open works and reads correctly, read-write open is refused', async () => {
    const p = copyOf('corrupt');
    writeAt(p, H.incompatible, u64(BigInt(hdr64(p, H.incompatible)) | 2n));
    const before = sha256File(p);
    const drv = await openImage(p, { readOnly: true });
    try {
      expect(drv.info().features).toContain('corrupt');
      const got = Buffer.alloc(2 * MiB);
      await drv.read(got, 0, got.length, 4 * MiB);
      expect(Buffer.compare(got, readAt(pristineOracle, 4 * MiB, 2 * MiB))).toBe(0);
    } finally {
      await drv.close();
    }
    const err = await openFails(p, { readOnly: false });
    expectClearError(err, p);
    expect(err.message).toMatch(/corrupt/i);
    expect(sha256File(p)).toBe(before);
  });

  it('backing file name offset past the header cluster', async () => {
    const base = path.join(scratch.dir, 'bo-base.qcow2');
    const top = path.join(scratch.dir, 'bo-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, String(16 * MiB));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'bo-base.qcow2', '-F', 'qcow2', top);
    expect(hdr64(top, H.backingFileOffset)).toBeGreaterThan(0);
    writeAt(top, H.backingFileOffset, u64(CLUSTER + 8));
    const hashes = hashFiles([top, base]);
    const err = await openFails(top);
    expectClearError(err, top);
    expect(err.message).toMatch(/backing/i);
    expect(hashFiles([top, base])).toEqual(hashes);
  });

  it('a backing file loop (a <- b <- a) fails with ELOOP', async () => {
    const a = path.join(scratch.dir, 'loop-a.qcow2');
    const b = path.join(scratch.dir, 'loop-b.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', a, String(16 * MiB));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'loop-a.qcow2', '-F', 'qcow2', b);
    qemuImg('rebase', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', a);
    const hashes = hashFiles([a, b]);
    const err = await expectCheap(() => openFails(b));
    expectClearError(err, b, ['ELOOP']);
    expect(hashFiles([a, b])).toEqual(hashes);
  });

  it('a missing backing file fails with ENOENT naming the overlay', async () => {
    const base = path.join(scratch.dir, 'gone-base.qcow2');
    const top = path.join(scratch.dir, 'gone-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, String(16 * MiB));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'gone-base.qcow2', '-F', 'qcow2', top);
    fs.rmSync(base);
    const before = sha256File(top);
    const err = await openFails(top);
    expectClearError(err, top, ['ENOENT']);
    expect(err.message).toContain('gone-base.qcow2');
    expect(sha256File(top)).toBe(before);
  });
});

describe('damaged qcow2 data path', () => {
  it('an L2 entry past EOF: EIO for that cluster only, the rest still reads correctly', async () => {
    const p = copyOf('l2-past-eof');
    const badCluster = (4 * MiB) / CLUSTER + 3; // inside the 0x5c run
    const entryOff = l2EntryOffset(p, badCluster);
    expect(readAt(p, entryOff, 8).readBigUInt64BE(0) & L2_OFFSET_MASK).not.toBe(0n);
    const far = roundUp(fs.statSync(p).size, CLUSTER) + 256 * CLUSTER;
    writeAt(p, entryOff, u64((1n << 63n) | BigInt(far)));
    const before = sha256File(p);
    const drv = await openImage(p, { readOnly: true });
    try {
      const bad = Buffer.alloc(4096);
      const err = await drv.read(bad, 0, 4096, badCluster * CLUSTER + 100).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err, 'read of the damaged cluster').toBeInstanceOf(QmountError);
      expect((err as QmountError).errno).toBe('EIO');
      expect((err as QmountError).message).not.toMatch(/\n/);
      // A read spanning good and bad clusters fails as a whole.
      const span = Buffer.alloc(3 * CLUSTER);
      await expect(drv.read(span, 0, span.length, (badCluster - 1) * CLUSTER)).rejects.toMatchObject({ errno: 'EIO' });
      // Neighbours and other areas are unaffected.
      for (const [off, len] of [
        [0, MiB],
        [(badCluster - 1) * CLUSTER, CLUSTER],
        [(badCluster + 1) * CLUSTER, CLUSTER],
        [5 * MiB, 2 * CLUSTER],
      ]) {
        const got = Buffer.alloc(len);
        await drv.read(got, 0, len, off);
        expect(Buffer.compare(got, readAt(pristineOracle, off, len)), `guest ${off}+${len}`).toBe(0);
      }
    } finally {
      await drv.close();
    }
    expect(sha256File(p)).toBe(before);
  });

  it.each(['zlib', 'zstd'])('a %s compressed cluster with garbage data: EIO for that range only', async (type) => {
    const src = path.join(scratch.dir, `csrc-${type}.raw`);
    const text = Buffer.from('a compressible line of text for qmount tests\n'.repeat(6000));
    fs.writeFileSync(src, text.subarray(0, 4 * CLUSTER));
    const p = path.join(scratch.dir, `cgarbage-${type}.qcow2`);
    qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, src, p);
    const oracle = convertToRaw(p, path.join(scratch.dir, `cgarbage-${type}.raw`));
    const entry = readAt(p, l2EntryOffset(p, 1), 8).readBigUInt64BE(0);
    expect(entry & (1n << 62n), 'cluster 1 is compressed').not.toBe(0n);
    const offsetBits = 62n - (16n - 8n); // cluster_bits 16
    const host = Number(entry & ((1n << offsetBits) - 1n));
    // 0xff: for deflate a reserved block type, for zstd a bad magic: never valid.
    writeAt(p, host, Buffer.alloc(64, 0xff));
    const before = sha256File(p);
    const drv = await openImage(p, { readOnly: true });
    try {
      const buf = Buffer.alloc(CLUSTER);
      await expect(drv.read(buf, 0, 1000, CLUSTER + 5000)).rejects.toMatchObject({ errno: 'EIO' });
      for (const c of [0, 2, 3]) {
        await drv.read(buf, 0, CLUSTER, c * CLUSTER);
        expect(Buffer.compare(buf, readAt(oracle, c * CLUSTER, CLUSTER)), `cluster ${c}`).toBe(0);
      }
    } finally {
      await drv.close();
    }
    expect(sha256File(p)).toBe(before);
  });
});

// ---- the same through the CLI --------------------------------------------

describe('damaged qcow2 through `qmount info`', () => {
  beforeAll(() => {
    if (!fs.existsSync(CLI)) {
      const r = spawnSync('npx', ['tsc', '-p', '.'], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`build failed: ${r.stdout}${r.stderr}`);
    }
  });

  // Cases with `format` run `info --format qcow2` on a file without the
  // qcow2 magic: it must fail like openImage(..., {format: 'qcow2'}) does
  // (once a regression: the program-level --format swallowed info's).
  it.each(HEADER_CASES)('$name: exits non-zero with one line on stderr, no stack', (c) => cliFails(c));

  function cliFails(c: HeaderCase): void {
    const p = copyOf(`cli-${c.name.replace(/\W+/g, '_')}`);
    c.damage(p);
    const before = sha256File(p);
    const args = [CLI, 'info', ...(c.format ? ['--format', c.format] : []), p];
    const r = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).not.toBe(0);
    expect(r.status).not.toBeNull();
    const lines = r.stderr.split('\n').filter((l) => l.length > 0);
    expect(lines, r.stderr).toHaveLength(1);
    expect(r.stderr).not.toContain('    at ');
    expect(lines[0]).toContain(p);
    expect(sha256File(p)).toBe(before);
  }
});
