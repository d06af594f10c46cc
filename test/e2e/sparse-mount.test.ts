/**
 * Standard tools on sparse images, through the built CLI and the real
 * engines (qcow2, QED, raw), judged by QEMU's tools:
 * - `cp --sparse=always` of a 10 GiB mostly-empty disk.raw is identical to
 *   `qemu-img convert -O raw` and allocates at most twice the data;
 * - SEEK_DATA/SEEK_HOLE walks agree with `qemu-img map --output=json`, and
 *   st_blocks (stat, du) with the data it lists;
 * - fallocate -p / -z / -d on disk.raw, and the same commands on a raw
 *   reference file: `qemu-img compare` identical, `qemu-img check` clean,
 *   punched clusters no longer data;
 * - `truncate -s +1G disk.raw`, then a remount shows the new size;
 * - ext4 on a loop device over disk.raw: write and delete a 300 MiB file,
 *   fstrim: the data qemu-img map lists and the image file's allocation drop,
 *   e2fsck -fn is clean.
 * lseek and fallocate exist on the fuse3 backend only (fuse-native has no
 * such ops: test/e2e/sparse-fuse.test.ts checks its fallbacks); st_blocks and
 * truncate run on both.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BACKENDS, CLI, mountImage, type MountedImage } from '../helpers/mount.js';
import { patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, run, scratchDir } from '../helpers/qemu.js';
import { extentBytes, qemuMapData, seekWalk, settledBlocks, statBlocks, tool } from '../helpers/sparse-tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const PATH = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/sbin:/sbin`;

let scratch: { dir: string; cleanup: () => void };
beforeAll(() => {
  process.env.PATH = PATH; // losetup, mkfs.ext4, fstrim, e2fsck live in /sbin
  scratch = scratchDir('sparse-mount');
});
afterAll(() => scratch.cleanup());

type Format = 'qcow2' | 'qed' | 'raw';

interface Kind {
  name: string;
  format: Format;
  create: string[];
  /** qemu-img check: exit codes accepted after discards (QED keeps no free-space record: leaks) */
  checkOk: number[];
}

const KINDS: Kind[] = [
  { name: 'qcow2', format: 'qcow2', create: ['-o', 'cluster_size=65536'], checkOk: [0] },
  { name: 'qcow2 v2', format: 'qcow2', create: ['-o', 'compat=0.10,cluster_size=65536'], checkOk: [0] },
  { name: 'qcow2 extended L2', format: 'qcow2', create: ['-o', 'extended_l2=on,cluster_size=131072'], checkOk: [0] },
  { name: 'QED', format: 'qed', create: ['-o', 'cluster_size=65536'], checkOk: [0, 3] },
  { name: 'raw', format: 'raw', create: [], checkOk: [0, 63] },
];

let n = 0;
function img(kind: Kind, size: number, writes: string[]): string {
  const file = path.join(scratch.dir, `${kind.format}-${n++}.${kind.format}`);
  qemuImg('create', '-q', '-f', kind.format, ...kind.create, file, String(size));
  if (writes.length) qemuIo(file, kind.format, writes);
  return file;
}

function checkCode(kind: Kind, file: string): { code: number; output: string } {
  if (kind.format === 'raw') return { code: 0, output: '' };
  return qemuCheck(file, kind.format);
}

function hostAllocated(file: string): number {
  return fs.statSync(file).blocks * 512;
}

/** Data scattered over a 10 GiB disk: ~5 MiB in pieces, a zeroed range, the last cluster. */
const SCATTERED = [
  'write -P 0x11 0 1M',
  'write -P 0x22 1G 64k',
  'write -P 0x33 3G 2M',
  'write -z 3G 512k',
  'write -P 0x44 5000000000 123457',
  'write -P 0x55 7G 1M',
  `write -P 0x66 ${10 * GiB - 64 * KiB} 64k`,
];

describe('fuse3: holes through lseek', () => {
  for (const kind of KINDS) {
    it(`cp --sparse=always of a 10 GiB mostly-empty ${kind.name} disk equals qemu-img convert, SEEK walk = qemu-img map`, async () => {
      const image = img(kind, 10 * GiB, SCATTERED);
      const ref = path.join(scratch.dir, `ref-${n++}.raw`);
      run('qemu-img', ['convert', '-f', kind.format, '-O', 'raw', image, ref]);
      const data = qemuMapData(image, kind.format);
      const m = await mountImage(image, { readOnly: true, format: kind.format, backend: 'fuse3' });
      try {
        expect(await seekWalk(m.rawPath)).toEqual(data);
        const want = kind.format === 'raw' ? hostAllocated(image) : extentBytes(data);
        const st = await settledBlocks(m.rawPath, (b) => b === want);
        expect(st.size).toBe(10 * GiB);
        expect(st.blocks * 512).toBe(want);
        const out = path.join(scratch.dir, `cp-${n++}.raw`);
        const cp = await tool('cp', ['--sparse=always', m.rawPath, out]);
        expect(cp.code, cp.out).toBe(0);
        expect(qemuCompare(out, ref, 'raw', 'raw').same).toBe(true);
        expect(hostAllocated(out)).toBeLessThanOrEqual(2 * extentBytes(data));
        fs.rmSync(out);
      } finally {
        await m.unmount();
        fs.rmSync(ref);
      }
    });
  }

  it('a qcow2 overlay: backing data is data, zeros over it are holes', async () => {
    const kind = KINDS[0]!;
    const base = img(kind, GiB, ['write -P 0x77 0 4M', 'write -P 0x78 512M 1M']);
    const top = path.join(scratch.dir, `top-${n++}.qcow2`);
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    qemuIo(top, 'qcow2', ['write -P 0x79 2M 64k', 'write -z 512M 256k', 'write -P 0x7a 900M 64k']);
    const m = await mountImage(top, { readOnly: true, format: 'qcow2', backend: 'fuse3' });
    try {
      const data = qemuMapData(top, 'qcow2');
      expect(await seekWalk(m.rawPath)).toEqual(data);
      // st_blocks: the data each layer stores, summed (top's clusters over base data count twice):
      // at least what the guest sees as data, at most both layers' data.
      const own = (JSON.parse(run('qemu-img', ['map', '--output=json', top]).stdout) as Array<{ length: number; depth: number; data: boolean }>)
        .filter((e) => e.data && e.depth === 0)
        .reduce((sum, e) => sum + e.length, 0);
      const layers = extentBytes(qemuMapData(base, 'qcow2')) + own;
      const blocks = (await settledBlocks(m.rawPath, (b) => b >= extentBytes(data) && b <= layers)).blocks * 512;
      expect(blocks).toBeGreaterThanOrEqual(extentBytes(data));
      expect(blocks).toBeLessThanOrEqual(layers);
    } finally {
      await m.unmount();
    }
  });
});

describe('fuse3: fallocate on disk.raw against a raw reference', () => {
  for (const kind of KINDS) {
    it(`fallocate -p, -z, -d (${kind.name}): identical to the reference, clusters let go of, check clean`, async () => {
      const image = img(kind, 256 * MiB, ['write -P 0x5a 0 64M', 'write -P 0xa5 100M 8M', 'write -P 0x3c 200M 1M']);
      const ref = path.join(scratch.dir, `ref-${n++}.raw`);
      run('qemu-img', ['convert', '-f', kind.format, '-O', 'raw', image, ref]);
      // raw: the host file's allocation (its SEEK_DATA view of unwritten extents follows the page cache).
      const measure = () => (kind.format === 'raw' ? hostAllocated(image) : extentBytes(qemuMapData(image, kind.format)));
      const before = measure();
      const ops = [
        ['-p', '-o', String(MiB), '-l', String(8 * MiB)], // whole clusters
        ['-p', '-o', String(20 * MiB + 1000), '-l', String(3 * MiB + 5)], // ragged ends
        ['-z', '-o', String(30 * MiB), '-l', String(2 * MiB)],
        ['-z', '-o', String(101 * MiB + 77), '-l', String(100 * KiB)],
        ['-p', '-o', String(250 * MiB), '-l', String(20 * MiB)], // past the end (KEEP_SIZE)
      ];
      const m = await mountImage(image, { format: kind.format, backend: 'fuse3' });
      try {
        for (const args of ops) {
          const r = await tool('fallocate', [...args, m.rawPath]);
          expect(r.code, `fallocate ${args.join(' ')}: ${r.out}`).toBe(0);
          run('fallocate', [...args, ref]);
        }
        // Zeros written into data clusters, then dug out.
        const dd = ['if=/dev/zero', 'bs=1M', 'count=4', 'seek=40', 'conv=notrunc,fsync', 'status=none'];
        expect((await tool('dd', [...dd, `of=${m.rawPath}`])).code).toBe(0);
        run('dd', [...dd, `of=${ref}`]);
        const dig = await tool('fallocate', ['-d', m.rawPath]);
        expect(dig.code, dig.out).toBe(0);
        expect((await statBlocks(m.rawPath)).size).toBe(256 * MiB);
      } finally {
        await m.unmount();
      }
      const check = checkCode(kind, image);
      expect(kind.checkOk, check.output).toContain(check.code);
      const cmp = qemuCompare(image, ref, kind.format, 'raw');
      expect(cmp.same, cmp.output).toBe(true);
      // 8 + 3 (whole clusters of the ragged punch) + 2 (zero range) + 4 (dug) MiB are no longer data;
      // raw: 8 + 3 MiB are punched out of the file (zero range and dug zeros stay allocated, unwritten).
      const after = measure();
      expect(before - after).toBeGreaterThanOrEqual(kind.format === 'raw' ? 11 * MiB - 8 * KiB : 16 * MiB);
      fs.rmSync(ref);
    });
  }
});

describe('fuse3: a partition file (pN.raw)', () => {
  it('SEEK walk of p1.raw is disk.raw\'s inside the partition; a punch through p1.raw drops disk.raw\'s cached pages', async () => {
    const kind = KINDS.find((k) => k.format === 'raw')!;
    const image = img(kind, 64 * MiB, []);
    run('sfdisk', ['--no-reread', '--no-tell-kernel', '-q', image], { input: 'label: gpt\nstart=2048, size=65536, type=linux\n' });
    const start = 2048 * 512;
    qemuIo(image, 'raw', [`write -P 0x5a ${start + MiB} 2M`, `write -P 0xa5 ${start + 20 * MiB} 64k`]);
    const m = await mountImage(image, { format: 'raw', backend: 'fuse3' });
    try {
      const p1 = path.join(m.dir, 'p1.raw');
      expect((await statBlocks(p1)).size).toBe(32 * MiB);
      const inDisk = (await seekWalk(m.rawPath)).filter(([a]) => a >= start && a < start + 32 * MiB).map(([a, b]) => [a - start, Math.min(b, start + 32 * MiB) - start]);
      expect(await seekWalk(p1)).toEqual(inDisk);
      expect(inDisk).toContainEqual([MiB, 3 * MiB]);
      // disk.raw's pages of the range are cached by a read, then the range is punched through p1.raw.
      const fd = fs.openSync(m.rawPath, 'r');
      const b = Buffer.alloc(4096);
      fs.readSync(fd, b, 0, 4096, start + 2 * MiB);
      expect(b[0]).toBe(0x5a);
      const r = await tool('fallocate', ['-p', '-o', String(MiB), '-l', String(2 * MiB), p1]);
      expect(r.code, r.out).toBe(0);
      fs.readSync(fd, b, 0, 4096, start + 2 * MiB);
      fs.closeSync(fd);
      expect(b.equals(Buffer.alloc(4096))).toBe(true);
      expect(await seekWalk(p1)).toEqual(inDisk.filter(([a]) => a !== MiB));
    } finally {
      await m.unmount();
    }
  });
});

describe.each(BACKENDS)('%s: --detect-zeroes', (backend) => {
  for (const kind of KINDS.filter((k) => k.name === 'qcow2' || k.name === 'QED' || k.name === 'raw')) {
    it(`zeros written with dd (${kind.name}): on allocates nothing, off stores them, unmap frees data`, async () => {
      // Data as qemu-img map lists it (raw: the host file's allocation; its ZERO_RANGE leaves unwritten
      // extents, which SEEK_DATA calls holes), and the image file's allocation.
      const data = (file: string) => (kind.format === 'raw' ? hostAllocated(file) : extentBytes(qemuMapData(file, kind.format, ['-U'])));
      const zeros = (target: string, seekMiB: number) => tool('dd', ['if=/dev/zero', `of=${target}`, 'bs=1M', 'count=8', `seek=${seekMiB}`, 'conv=notrunc,fsync', 'status=none']);
      for (const mode of ['on', 'off', 'unmap'] as const) {
        const image = img(kind, 256 * MiB, ['write -P 0x5a 0 16M']);
        const d0 = data(image);
        const f0 = hostAllocated(image);
        const m = await mountImage(image, { format: kind.format, backend, extraArgs: ['--detect-zeroes', mode] });
        let d1: number, f1: number, d2: number, f2: number;
        try {
          expect((await zeros(m.rawPath, 100)).code).toBe(0); // over unallocated clusters
          [d1, f1] = [data(image), hostAllocated(image)];
          expect((await zeros(m.rawPath, 4)).code).toBe(0); // over data
          [d2, f2] = [data(image), hostAllocated(image)];
        } finally {
          await m.unmount();
        }
        const what = `${kind.name} --detect-zeroes ${mode}: data ${d0} -> ${d1} -> ${d2}, file ${f0} -> ${f1} -> ${f2}`;
        if (mode === 'off') {
          expect(d1, what).toBe(d0 + 8 * MiB);
          expect(d2, what).toBe(d1);
        } else {
          // Over unallocated: nothing allocated (raw: no clusters; ZERO_RANGE allocates unwritten
          // extents, as QEMU's file driver does: at most what off would store).
          if (kind.format === 'raw') expect(f1, what).toBeLessThanOrEqual(f0 + 8 * MiB + 64 * KiB);
          else {
            expect(d1, what).toBe(d0);
            expect(f1, what).toBeLessThan(f0 + MiB); // metadata at most
          }
          // Over data: on zeros in place (the space kept, whether the map then says data or zero), unmap frees it.
          if (mode === 'on') expect(f2, what).toBeGreaterThanOrEqual(f1 - 64 * KiB);
          else {
            expect(d2, what).toBe(d1 - 8 * MiB);
            expect(f2, what).toBeLessThanOrEqual(f1 - 7 * MiB);
          }
        }
        const check = checkCode(kind, image);
        expect(kind.checkOk, check.output).toContain(check.code);
        const ref = path.join(scratch.dir, `ref-${n++}.raw`);
        run('qemu-img', ['create', '-q', '-f', 'raw', ref, String(256 * MiB)]);
        run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 16M', '-c', 'write -z 4M 8M', ref]);
        expect(qemuCompare(image, ref, kind.format, 'raw').same, what).toBe(true);
        fs.rmSync(ref);
      }
    });
  }
  it('--detect-zeroes unmap needs --discard unmap (usage error, exit 1)', async () => {
    const image = img(KINDS[0]!, MiB, []);
    const r = await tool(process.execPath, [CLI, '-f', '--detect-zeroes', 'unmap', '--discard', 'ignore', image, scratch.dir]);
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/--detect-zeroes unmap needs --discard unmap/);
  });
});

describe('fuse3: --discard ignore', () => {
  it('fallocate -p reads back zeros but keeps the clusters allocated (qcow2)', async () => {
    const kind = KINDS[0]!;
    const image = img(kind, 64 * MiB, ['write -P 0x5a 0 16M']);
    const m = await mountImage(image, { format: kind.format, backend: 'fuse3', extraArgs: ['--discard', 'ignore'] });
    const fileBefore = hostAllocated(image);
    try {
      const r = await tool('fallocate', ['-p', '-o', String(MiB), '-l', String(8 * MiB), m.rawPath]);
      expect(r.code, r.out).toBe(0);
    } finally {
      await m.unmount();
    }
    expect(extentBytes(qemuMapData(image, kind.format))).toBe(8 * MiB);
    expect(hostAllocated(image)).toBeGreaterThanOrEqual(fileBefore);
    expect(qemuCheck(image, kind.format).code).toBe(0);
  });
});

describe.each(BACKENDS)('%s: truncate', (backend) => {
  for (const kind of KINDS.filter((k) => k.name !== 'qcow2 extended L2')) {
    it(`truncate -s +1G ${kind.name}: the new size after a remount, grown part reads zeros; shrinking over data is EPERM`, async () => {
      const image = img(kind, 256 * MiB, ['write -P 0x5a 0 1M', 'write -P 0xa5 255M 1M']);
      const ref = path.join(scratch.dir, `ref-${n++}.raw`);
      run('qemu-img', ['convert', '-f', kind.format, '-O', 'raw', image, ref]);
      let m: MountedImage = await mountImage(image, { format: kind.format, backend });
      try {
        const r = await tool('truncate', ['-s', '+1G', m.rawPath]);
        expect(r.code, r.out).toBe(0);
        run('truncate', ['-s', '+1G', ref]);
        expect((await statBlocks(m.rawPath)).size).toBe(GiB + 256 * MiB);
        const shrink = await tool('truncate', ['-s', String(128 * MiB), m.rawPath]);
        expect(shrink.out).toMatch(/not permitted/i);
        // Data written into the new part survives the remount.
        const pattern = path.join(scratch.dir, `pattern-${n++}`);
        fs.writeFileSync(pattern, patternBytes(64 * KiB, n));
        const dd = [`if=${pattern}`, 'bs=64k', 'count=1', `seek=${(GiB + 200 * MiB) / (64 * KiB)}`, 'conv=notrunc,fsync', 'status=none'];
        expect((await tool('dd', [...dd, `of=${m.rawPath}`])).code).toBe(0);
        run('dd', [...dd, `of=${ref}`]);
      } finally {
        await m.unmount();
      }
      m = await mountImage(image, { format: kind.format, backend, readOnly: true });
      try {
        expect((await statBlocks(m.rawPath)).size).toBe(GiB + 256 * MiB);
      } finally {
        await m.unmount();
      }
      const check = checkCode(kind, image);
      expect([0, 63], check.output).toContain(check.code);
      expect(qemuCompare(image, ref, kind.format, 'raw').same).toBe(true);
      fs.rmSync(ref);
    });
  }
});

function sh(cmd: string, args: string[]): string {
  const r = run(cmd, args);
  return r.stdout;
}

describe('fuse3: ext4 on a loop device, fstrim', () => {
  for (const kind of KINDS.filter((k) => k.name === 'qcow2' || k.name === 'QED')) {
    it(`write and delete a 300 MiB file, fstrim (${kind.name}): map data and the image file shrink, e2fsck clean`, async () => {
      const image = img(kind, 2 * GiB, []);
      const fsDir = path.join(scratch.dir, `ext4-${n++}`);
      fs.mkdirSync(fsDir);
      const m = await mountImage(image, { format: kind.format, backend: 'fuse3' });
      let loop = '';
      let mounted = false;
      try {
        loop = sh('losetup', ['--show', '-f', m.rawPath]).trim();
        // mkfs discards the whole device first (through fallocate PUNCH_HOLE).
        const mk = await tool('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
        expect(mk.code, mk.out).toBe(0);
        sh('mount', ['-t', 'ext4', loop, fsDir]);
        mounted = true;
        const w = await tool('dd', ['if=/dev/urandom', `of=${fsDir}/big`, 'bs=1M', 'count=300', 'conv=fsync', 'status=none']);
        expect(w.code, w.out).toBe(0);
        const dataFull = extentBytes(qemuMapData(image, kind.format, ['-U']));
        const fileFull = hostAllocated(image);
        expect(dataFull).toBeGreaterThan(300 * MiB);
        fs.rmSync(`${fsDir}/big`);
        expect((await tool('sync', [])).code).toBe(0);
        const trim = await tool('fstrim', ['-v', fsDir]);
        expect(trim.code, trim.out).toBe(0);
        expect((await tool('sync', [])).code).toBe(0);
        const dataTrimmed = extentBytes(qemuMapData(image, kind.format, ['-U']));
        expect(dataFull - dataTrimmed).toBeGreaterThanOrEqual(290 * MiB);
        expect(fileFull - hostAllocated(image)).toBeGreaterThanOrEqual(250 * MiB);
        sh('umount', [fsDir]);
        mounted = false;
        const fsck = await tool('e2fsck', ['-fn', loop]);
        expect(fsck.code, fsck.out).toBe(0);
      } finally {
        if (mounted) run('umount', [fsDir], { allowFail: true });
        if (loop) run('losetup', ['-d', loop], { allowFail: true });
        await m.unmount();
      }
      const check = checkCode(kind, image);
      expect(kind.checkOk, check.output).toContain(check.code);
    });
  }
});
