/**
 * The qcow2 read matrix: for every image kind the factory builds, what the
 * engine reads (directly and through a real read-only FUSE mount) is byte
 * for byte what `qemu-img convert -O raw` produces, nothing is written to
 * any file of the image, and info() agrees with `qemu-img info`.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockDriver, ImageInfo } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { hashFiles, MiB, QCOW2_KINDS, qemuInfo, type ImageKind, type QemuInfo, type TestImage } from '../helpers/images.js';
import { mountImage } from '../helpers/mount.js';
import { convertToRaw, scratchDir } from '../helpers/qemu.js';
import { mulberry32 } from '../helpers/workload.js';


/** Pread exactly `len` bytes of the oracle file (it is exactly virtualSize long). */
function oracleRead(fd: number, buf: Buffer, len: number, off: number): void {
  let done = 0;
  while (done < len) {
    const n = fs.readSync(fd, buf, done, len - done, off + done);
    if (n === 0) throw new Error(`oracle short at ${off + done}`);
    done += n;
  }
}

/** Fail with the first differing guest offset, not a 1 MiB buffer dump. */
function expectSame(got: Buffer, want: Buffer, len: number, guestOffset: number, what: string): void {
  const a = got.subarray(0, len);
  const b = want.subarray(0, len);
  if (Buffer.compare(a, b) === 0) return;
  let i = 0;
  while (i < len && a[i] === b[i]) i++;
  throw new Error(
    `${what}: guest bytes differ from qemu-img at offset ${guestOffset + i} (read [${guestOffset}, +${len})): got 0x${a[i].toString(16)}, want 0x${b[i].toString(16)}`,
  );
}

const SEQ_CHUNKS = [MiB, 65536 + 512, 4096, 777, MiB - 3, 131072];
const RANDOM_SIZES = [1, 511, 512, 777, 4096, 4097, 65536 + 512, 200_000, MiB];

async function checkSequential(drv: BlockDriver, oracleFd: number, size: number): Promise<void> {
  const got = Buffer.alloc(MiB + 4096);
  const want = Buffer.alloc(MiB + 4096);
  let off = 0;
  for (let i = 0; off < size; i++) {
    const len = Math.min(SEQ_CHUNKS[i % SEQ_CHUNKS.length], size - off);
    got.fill(0xa5, 0, len); // a read that leaves bytes untouched is caught
    await drv.read(got, 0, len, off);
    oracleRead(oracleFd, want, len, off);
    expectSame(got, want, len, off, 'sequential read');
    off += len;
  }
}

async function checkRandom(drv: BlockDriver, oracleFd: number, size: number, seed: number, count: number): Promise<void> {
  const rnd = mulberry32(seed);
  const got = Buffer.alloc(MiB + 16);
  const want = Buffer.alloc(MiB + 16);
  for (let i = 0; i < count; i++) {
    const len = Math.min(RANDOM_SIZES[Math.floor(rnd() * RANDOM_SIZES.length)], size);
    // A few reads end exactly at the end of the disk.
    const off = i % 17 === 0 ? size - len : Math.floor(rnd() * (size - len + 1));
    const bufOffset = i % 3; // unaligned destination offsets
    got.fill(0x5a);
    await drv.read(got, bufOffset, len, off);
    oracleRead(oracleFd, want, len, off);
    expectSame(got.subarray(bufOffset), want, len, off, `random read #${i}`);
  }
}

/** Several reads in flight at once, as FUSE issues them. */
async function checkConcurrent(drv: BlockDriver, oracleFd: number, size: number, seed: number): Promise<void> {
  const rnd = mulberry32(seed);
  for (let round = 0; round < 8; round++) {
    const reqs = Array.from({ length: 8 }, () => {
      const len = Math.min(1 + Math.floor(rnd() * 300_000), size);
      const off = Math.floor(rnd() * (size - len + 1));
      return { off, len, buf: Buffer.alloc(len, 0x5a) };
    });
    await Promise.all(reqs.map((r) => drv.read(r.buf, 0, r.len, r.off)));
    for (const r of reqs) {
      const want = Buffer.alloc(r.len);
      oracleRead(oracleFd, want, r.len, r.off);
      expectSame(r.buf, want, r.len, r.off, 'concurrent read');
    }
  }
}

function chainOf(info: ImageInfo): ImageInfo[] {
  const out: ImageInfo[] = [];
  for (let i: ImageInfo | undefined = info; i; i = i.backing) out.push(i);
  return out;
}

function checkInfo(ours: ImageInfo, q: QemuInfo[], img: TestImage): void {
  const levels = chainOf(ours);
  expect(levels.map((l) => l.format)).toEqual(q.map((x) => x.format));
  for (let i = 0; i < q.length; i++) {
    const o = levels[i];
    const want = q[i];
    expect(o.virtualSize, `level ${i} virtual size`).toBe(want['virtual-size']);
    expect(fs.realpathSync(o.filename), `level ${i} filename`).toBe(fs.realpathSync(path.resolve(path.dirname(img.path), want.filename)));
    if (want.format !== 'qcow2') continue;
    expect(o.clusterSize, `level ${i} cluster size`).toBe(want['cluster-size']);
    expect(o.backingFile, `level ${i} backing file name`).toBe(want['backing-filename']);
    if (want['backing-filename']) {
      expect(o.backingFormat, `level ${i} backing format`).toBe(want['backing-filename-format']);
      expect(o.backingPath && fs.realpathSync(o.backingPath), `level ${i} resolved backing`).toBe(fs.realpathSync(want['full-backing-filename']!));
    }
    const fsd = want['format-specific']!.data;
    expect(o.version, `level ${i} version`).toBe(fsd.compat === '0.10' ? 2 : 3);
    expect(o.refcountBits, `level ${i} refcount bits`).toBe(fsd['refcount-bits']);
    expect((o.snapshots ?? []).map((s) => s.name)).toEqual((want.snapshots ?? []).map((s) => s.name));
    expect((o.snapshots ?? []).map((s) => s.id)).toEqual((want.snapshots ?? []).map((s) => s.id));
    expect((o.snapshots ?? []).map((s) => s.dateSec)).toEqual((want.snapshots ?? []).map((s) => s['date-sec']));
    expect((o.snapshots ?? []).map((s) => s.vmStateSize)).toEqual((want.snapshots ?? []).map((s) => s['vm-state-size']));
    expect(o.compressionType ?? 'zlib').toBe(fsd['compression-type'] ?? 'zlib');
    expect(Boolean(o.extendedL2)).toBe(Boolean(fsd['extended-l2']));
    expect(o.dataFile).toBe(fsd['data-file']);
    expect(o.features.includes('dirty'), 'dirty feature').toBe(Boolean(want['dirty-flag']));
    expect(o.features.includes('lazy_refcounts'), 'lazy_refcounts feature').toBe(Boolean(fsd['lazy-refcounts']));
    expect(o.features.includes('corrupt'), 'corrupt feature').toBe(Boolean(fsd.corrupt));
  }
}

describe.each(QCOW2_KINDS)('qcow2 read $name', (kind: ImageKind) => {
  let scratch: { dir: string; cleanup: () => void };
  let img: TestImage;
  let oracle: string;
  let hashes: Record<string, string>;

  beforeAll(() => {
    scratch = scratchDir(`read-${kind.name}`);
    img = kind.build(scratch.dir);
    oracle = convertToRaw(img.path, path.join(scratch.dir, 'oracle.raw'));
    expect(fs.statSync(oracle).size).toBe(img.virtualSize);
    hashes = hashFiles(img.files);
  });

  afterAll(() => scratch?.cleanup());

  it(`engine reads equal qemu-img convert (${kind.note})`, async () => {
    const fd = fs.openSync(oracle, 'r');
    const drv = await openImage(img.path, { readOnly: true });
    try {
      expect(drv.virtualSize).toBe(img.virtualSize);
      expect(drv.readOnly).toBe(true);
      await checkSequential(drv, fd, img.virtualSize);
      await checkRandom(drv, fd, img.virtualSize, 1, 150);
      await checkConcurrent(drv, fd, img.virtualSize, 2);
    } finally {
      await drv.close();
    }
    // Again with the smallest caches, so L2 tables are evicted and reloaded all the time.
    const tiny = await openImage(img.path, { readOnly: true, l2CacheBytes: 1, refcountCacheBytes: 1 });
    try {
      await checkRandom(tiny, fd, img.virtualSize, 3, 150);
      await checkConcurrent(tiny, fd, img.virtualSize, 4);
    } finally {
      await tiny.close();
      fs.closeSync(fd);
    }
    expect(hashFiles(img.files)).toEqual(hashes);
  });

  it('a read-only mount shows disk.raw equal to qemu-img convert and writes nothing', async () => {
    const m = await mountImage(img.path, { readOnly: true });
    try {
      expect(fs.statSync(m.rawPath).size).toBe(img.virtualSize);
      const fd = fs.openSync(m.rawPath, 'r');
      const ofd = fs.openSync(oracle, 'r');
      try {
        const got = Buffer.alloc(MiB);
        const want = Buffer.alloc(MiB);
        for (let off = 0; off < img.virtualSize; off += MiB) {
          const len = Math.min(MiB, img.virtualSize - off);
          let n = 0;
          while (n < len) {
            const r = fs.readSync(fd, got, n, len - n, off + n);
            if (r === 0) throw new Error(`disk.raw short read at ${off + n}`);
            n += r;
          }
          oracleRead(ofd, want, len, off);
          expectSame(got, want, len, off, 'mounted disk.raw');
        }
        // Odd-sized reads at odd offsets go through the kernel's page cache and FUSE's splitting.
        await checkRandomFd(fd, ofd, img.virtualSize);
      } finally {
        fs.closeSync(fd);
        fs.closeSync(ofd);
      }
    } finally {
      await m.unmount();
    }
    expect(hashFiles(img.files)).toEqual(hashes);
  });

  it('info() matches qemu-img info', async () => {
    const drv = await openImage(img.path, { readOnly: true });
    try {
      checkInfo(drv.info(), qemuInfo(img.path, true), img);
    } finally {
      await drv.close();
    }
  });
});

async function checkRandomFd(fd: number, ofd: number, size: number): Promise<void> {
  const rnd = mulberry32(9);
  const got = Buffer.alloc(65536 + 512);
  const want = Buffer.alloc(65536 + 512);
  for (let i = 0; i < 40; i++) {
    const len = Math.min([777, 4097, 65536 + 512][i % 3], size);
    const off = i === 0 ? size - len : Math.floor(rnd() * (size - len + 1));
    const n = fs.readSync(fd, got, 0, len, off);
    expect(n).toBe(len);
    oracleRead(ofd, want, len, off);
    expectSame(got, want, len, off, 'mounted random read');
  }
}
