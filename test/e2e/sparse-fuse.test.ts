/**
 * The FUSE half of sparse files, on both backends, over an in-memory driver
 * mounted in this process (test/helpers/mem-driver.ts: clusters stored,
 * zero or absent), so the binding is tested apart from the formats: st_blocks
 * seen by stat(1) right after writes, punches and resizes (no waiting: the
 * kernel must ask again), SEEK_DATA/SEEK_HOLE walks from a child process,
 * util-linux fallocate -p / -z / -d / plain, truncate(1) growing and
 * shrinking, and the page cache dropped over a punched range. fuse-native
 * has no lseek/fallocate: there the kernel's fallbacks are checked.
 * Real images and tools: test/e2e/sparse-mount.test.ts.
 */
import fs from 'node:fs';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MountSession } from '../../mount/session.js';
import { parseMountOptions } from '../../mount/options.js';
import { configureLogging, logger } from '../../src/log.js';
import { MemDriver } from '../helpers/mem-driver.js';
import { BACKENDS, detach, isMounted, makeMountDir } from '../helpers/mount.js';
import { lseekOnce, seekWalk, statBlocks, tool } from '../helpers/sparse-tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const C = 64 * KiB;

beforeAll(() => configureLogging({ level: 'silent' }));

let cleanup: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanup.reverse()) await c();
  cleanup = [];
});

async function mountMem(d: MemDriver, backend: (typeof BACKENDS)[number]): Promise<string> {
  const dir = fs.realpathSync(makeMountDir());
  const session = await MountSession.mount(d, dir, { readOnly: d.readOnly, mount: parseMountOptions([]), log: logger('mount'), backend });
  cleanup.push(async () => {
    await session.close('test done');
    if (isMounted(dir)) detach(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return `${dir}/disk.raw`;
}

async function fill(d: MemDriver, pos: number, len: number, byte = 0xab): Promise<void> {
  await d.write(Buffer.alloc(len, byte), 0, len, pos);
}

async function readFile(file: string, pos: number, len: number): Promise<Buffer> {
  const fh = await fs.promises.open(file, 'r');
  try {
    const b = Buffer.alloc(len);
    const { bytesRead } = await fh.read(b, 0, len, pos);
    return b.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

describe.each(BACKENDS)('%s backend', (backend) => {
  it('st_blocks is the data allocated, current right after a write and after truncate', async () => {
    const d = new MemDriver(10 * GiB);
    await fill(d, 0, 3 * C);
    const raw = await mountMem(d, backend);
    expect(await statBlocks(raw)).toEqual({ size: 10 * GiB, blocks: (3 * C) / 512 });
    expect((await tool('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=64k', 'count=2', `seek=${GiB / C}`, 'conv=notrunc,fsync', 'status=none'])).code).toBe(0);
    expect(await statBlocks(raw)).toEqual({ size: 10 * GiB, blocks: (5 * C) / 512 });
    const du = await tool('du', ['-B1', raw]);
    expect(du.out.split('\t')[0]).toBe(String(5 * C));
    // truncate(1) grows through setattr: the next stat sees the size, from this mount too after a remount-free check.
    const t = await tool('truncate', ['-s', '+1G', raw]);
    expect(t.code, t.out).toBe(0);
    expect(await statBlocks(raw)).toEqual({ size: 11 * GiB, blocks: (5 * C) / 512 });
    expect(d.virtualSize).toBe(11 * GiB);
    // The grown part reads as zeros and takes writes.
    expect((await readFile(raw, 11 * GiB - 4096, 8192)).equals(Buffer.alloc(4096))).toBe(true);
    expect((await tool('dd', ['if=/dev/zero', `of=${raw}`, 'bs=4k', 'count=1', `seek=${(11 * GiB) / 4096 - 1}`, 'conv=notrunc', 'status=none'])).code).toBe(0);
    // Shrinking over data is refused; over nothing it is allowed.
    const shrink = await tool('truncate', ['-s', String(GiB), raw]);
    expect(shrink.code).not.toBe(0);
    expect(shrink.out).toMatch(/not permitted/i);
    const ok = await tool('truncate', ['-s', String(2 * GiB), raw]);
    expect(ok.code, ok.out).toBe(0);
    expect((await statBlocks(raw)).size).toBe(2 * GiB);
    const odd = await tool('truncate', ['-s', String(2 * GiB + 1), raw]);
    expect(odd.out).toMatch(/invalid argument/i);
  });

  if (backend === 'fuse3') {
    it('SEEK_DATA/SEEK_HOLE walk the driver extents (zero clusters are holes); ENXIO at the end', async () => {
      const d = new MemDriver(10 * GiB);
      await fill(d, 0, C);
      await fill(d, 5 * MiB + 3, 100); // one cluster
      d.clusters.set((6 * MiB) / C, 'zero');
      await fill(d, 7 * GiB, 2 * C);
      await fill(d, 10 * GiB - C, C);
      const raw = await mountMem(d, backend);
      expect(await seekWalk(raw)).toEqual([[0, C], [5 * MiB, 5 * MiB + C], [7 * GiB, 7 * GiB + 2 * C], [10 * GiB - C, 10 * GiB]]);
      expect(await lseekOnce(raw, 10 * GiB, 'SEEK_DATA')).toBe('ENXIO');
      expect(await lseekOnce(raw, 10 * GiB, 'SEEK_HOLE')).toBe('ENXIO');
      expect(await lseekOnce(raw, 10 * GiB - C + 5, 'SEEK_DATA')).toBe(10 * GiB - C + 5);
      expect(await lseekOnce(raw, 6 * MiB, 'SEEK_HOLE')).toBe(6 * MiB);
    });

    it('fallocate -p, -z, -d and plain: zeros read back (page cache dropped), st_blocks drops, growth past the end', async () => {
      const d = new MemDriver(64 * MiB);
      await fill(d, 0, 16 * MiB);
      const raw = await mountMem(d, backend);
      // Read through the page cache first: the punch must drop the cached pages.
      expect((await readFile(raw, MiB, 4096))[0]).toBe(0xab);
      let r = await tool('fallocate', ['-p', '-o', String(MiB), '-l', String(2 * MiB), raw]);
      expect(r.code, r.out).toBe(0);
      expect((await readFile(raw, MiB, 2 * MiB)).equals(Buffer.alloc(2 * MiB))).toBe(true);
      expect(d.calls.filter((c) => c.startsWith('writeZeroes'))).toEqual([`writeZeroes ${MiB} ${2 * MiB} unmap`]);
      expect((await statBlocks(raw)).blocks).toBe((14 * MiB) / 512);
      // -z: zero range, not unmapped (the clusters become zero clusters).
      r = await tool('fallocate', ['-z', '-o', String(4 * MiB), '-l', String(MiB), raw]);
      expect(r.code, r.out).toBe(0);
      expect(d.calls[d.calls.length - 1]).toBe(`writeZeroes ${4 * MiB} ${MiB} keep`);
      expect((await readFile(raw, 4 * MiB, MiB)).equals(Buffer.alloc(MiB))).toBe(true);
      expect(await lseekOnce(raw, 4 * MiB, 'SEEK_HOLE')).toBe(4 * MiB);
      // -d digs holes where the data is zeros: write zeros into stored clusters, then dig.
      r = await tool('dd', ['if=/dev/zero', `of=${raw}`, 'bs=1M', 'count=2', 'seek=8', 'conv=notrunc,fsync', 'status=none']);
      expect(r.code, r.out).toBe(0);
      const before = (await statBlocks(raw)).blocks;
      r = await tool('fallocate', ['-d', raw]);
      expect(r.code, r.out).toBe(0);
      expect((await statBlocks(raw)).blocks).toBe(before - (2 * MiB) / 512);
      expect((await readFile(raw, 0, 16 * MiB)).subarray(10 * MiB, 16 * MiB).every((b) => b === 0xab)).toBe(true);
      // Plain fallocate inside the disk: nothing to do; past the end it grows the disk.
      r = await tool('fallocate', ['-o', '0', '-l', String(MiB), raw]);
      expect(r.code, r.out).toBe(0);
      r = await tool('fallocate', ['-o', String(64 * MiB), '-l', String(MiB), raw]);
      expect(r.code, r.out).toBe(0);
      expect((await statBlocks(raw)).size).toBe(65 * MiB);
      // -z -n (KEEP_SIZE) past the end changes nothing; -z without -n grows.
      r = await tool('fallocate', ['-z', '-n', '-o', String(65 * MiB), '-l', String(MiB), raw]);
      expect(r.code, r.out).toBe(0);
      expect((await statBlocks(raw)).size).toBe(65 * MiB);
      r = await tool('fallocate', ['-z', '-o', String(65 * MiB), '-l', '1000', raw]);
      expect(r.code, r.out).toBe(0);
      expect((await statBlocks(raw)).size).toBe(65 * MiB + 1024); // rounded up to a sector
      // Collapse/insert are not supported.
      r = await tool('fallocate', ['-c', '-o', '0', '-l', String(C), raw]);
      expect(r.code).not.toBe(0);
      expect(r.out).toMatch(/not supported/i);
    });
  } else {
    it('lseek falls back to one data extent and fallocate is not supported (no such ops in fuse-native)', async () => {
      const d = new MemDriver(16 * MiB);
      await fill(d, 0, C);
      const raw = await mountMem(d, backend);
      expect(await lseekOnce(raw, 4096, 'SEEK_DATA')).toBe(4096);
      expect(await lseekOnce(raw, 0, 'SEEK_HOLE')).toBe(16 * MiB);
      for (const args of [['-o', String(32 * MiB), '-l', '4096'], ['-p', '-o', '0', '-l', '4096'], ['-z', '-o', '0', '-l', '4096']]) {
        const r = await tool('fallocate', [...args, raw]);
        expect(r.code).not.toBe(0);
        expect(r.out).toMatch(/not supported|unsupported/i);
      }
      expect(d.calls.filter((c) => !c.startsWith('blockStatus'))).toEqual([]);
    });
  }

  it('a read-only mount refuses truncate and fallocate with EROFS', async () => {
    const d = new MemDriver(16 * MiB, C, true);
    const raw = await mountMem(d, backend);
    const t = await tool('truncate', ['-s', '+1M', raw]);
    expect(t.out).toMatch(/read-only/i);
    const f = await tool('fallocate', ['-p', '-o', '0', '-l', '4096', raw]);
    expect(f.code).not.toBe(0);
    expect(d.calls.filter((c) => !c.startsWith('blockStatus'))).toEqual([]);
  });
});
