/**
 * Partitions as files (DIR/pN.raw), on both FUSE backends: disks partitioned
 * by sfdisk on a raw file and converted to qcow2 (and QED; also mounted
 * raw) by qemu-img. Every pN.raw equals the slice `sfdisk --json` gives;
 * mkfs.ext4 and `e2fsck -fn` work on
 * a partition file; a write through p2.raw lands in disk.raw at the
 * partition's offset (also seen through a disk.raw opened before it, on
 * fuse3 which invalidates aliased pages); writes at or past a partition's end
 * fail with ENOSPC and one crossing it is cut short; read-only mounts give
 * read-only partition files; --no-partitions hides them; a table rewritten
 * while mounted changes the files only at the next mount; writers on both
 * aliases at once neither fail nor hang.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BACKENDS, mountImage } from '../helpers/mount.js';
import { convertToRaw, patternBytes, qemuCheck, qemuImg, run, scratchDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

interface Part {
  number: number;
  /** bytes */
  start: number;
  length: number;
}

let scratch: { dir: string; cleanup: () => void };
beforeAll(() => {
  scratch = scratchDir('partitions');
});
afterAll(() => scratch.cleanup());

/** sfdisk's view of a partitioned file: its partitions (extended containers left out) in bytes. */
function sfdiskParts(file: string): Part[] {
  const json = JSON.parse(run('sfdisk', ['--json', file]).stdout) as { partitiontable: { partitions: Array<{ node: string; start: number; size: number; type: string }> } };
  return json.partitiontable.partitions
    .filter((p) => !['5', 'f', '85'].includes(p.type))
    .map((p) => ({ number: Number(/(\d+)$/.exec(p.node)![1]), start: p.start * 512, length: p.size * 512 }));
}

/** A qcow2 image of a disk partitioned with `script`, each partition filled with its own pattern; and its partitions. */
function makeDisk(name: string, script: string): { image: string; parts: Part[] } {
  const raw = path.join(scratch.dir, `${name}.raw`);
  fs.writeFileSync(raw, '');
  fs.truncateSync(raw, SIZE);
  run('sfdisk', ['-q', raw], { input: script });
  const parts = sfdiskParts(raw);
  const fd = fs.openSync(raw, 'r+');
  for (const p of parts) {
    fs.writeSync(fd, patternBytes(256 * 1024, p.number), 0, 256 * 1024, p.start);
    fs.writeSync(fd, patternBytes(4096, 100 + p.number), 0, 4096, p.start + p.length - 4096);
  }
  fs.closeSync(fd);
  const image = path.join(scratch.dir, `${name}.qcow2`);
  qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, image);
  return { image, parts };
}

const GPT_SCRIPT = 'label: gpt\nsize=12MiB, type=linux\nsize=8MiB, type=linux\nsize=10MiB\n';
const MBR_SCRIPT = 'label: dos\nsize=12MiB, type=83\nsize=8MiB, type=83\ntype=5\nsize=6MiB, type=83\nsize=7MiB, type=83\n';

const partFiles = (dir: string): string[] => fs.readdirSync(dir).filter((n) => /^p\d+\.raw$/.test(n)).sort();

function errnoOfSync(fn: () => unknown): string | null {
  try {
    fn();
    return null;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  }
}

describe.each(BACKENDS)('%s backend', (backend) => {
  it.each([
    ['GPT with three partitions', GPT_SCRIPT, [1, 2, 3]],
    ['MBR with two primaries and two logical partitions in an extended one', MBR_SCRIPT, [1, 2, 5, 6]],
  ] as const)('%s: every pN.raw equals the slice sfdisk --json gives', async (what, script, numbers) => {
    const { image, parts } = makeDisk(`${backend}-${what.slice(0, 3)}`, script);
    expect(parts.map((p) => p.number)).toEqual(numbers);
    const model = fs.readFileSync(convertToRaw(image, `${image}.model`));
    const m = await mountImage(image, { backend, readOnly: true });
    try {
      expect(partFiles(m.dir)).toEqual(numbers.map((n) => `p${n}.raw`).sort());
      for (const p of parts) {
        const file = path.join(m.dir, `p${p.number}.raw`);
        expect(fs.statSync(file).size, file).toBe(p.length);
        expect(fs.readFileSync(file).equals(model.subarray(p.start, p.start + p.length)), `${file} content`).toBe(true);
      }
      expect(fs.readFileSync(m.rawPath).equals(model)).toBe(true);
    } finally {
      await m.unmount();
    }
  });

  it('raw and QED images show the same partition files (every kind of mount)', async () => {
    const { image, parts } = makeDisk(`${backend}-kinds`, MBR_SCRIPT);
    const model = fs.readFileSync(convertToRaw(image, `${image}.model`));
    const qed = `${image}.qed`;
    qemuImg('convert', '-q', '-f', 'qcow2', '-O', 'qed', image, qed);
    for (const [img, format] of [[`${image}.model`, 'raw'], [qed, 'qed']] as const) {
      const m = await mountImage(img, { backend, format, readOnly: format === 'raw' });
      try {
        expect(partFiles(m.dir), format).toEqual(['p1.raw', 'p2.raw', 'p5.raw', 'p6.raw']);
        for (const p of parts) {
          expect(fs.readFileSync(path.join(m.dir, `p${p.number}.raw`)).equals(model.subarray(p.start, p.start + p.length)), `${format} p${p.number}`).toBe(true);
        }
      } finally {
        await m.unmount();
      }
    }
  });

  it('read-write: mkfs.ext4 and e2fsck -fn on p1.raw; a write through p2.raw lands in disk.raw; writes at the end fail with ENOSPC', async () => {
    const { image, parts } = makeDisk(`${backend}-rw`, GPT_SCRIPT);
    const before = fs.readFileSync(convertToRaw(image, `${image}.before`));
    const [p1, p2] = [parts[0]!, parts[1]!];
    const m = await mountImage(image, { backend });
    try {
      const f1 = path.join(m.dir, 'p1.raw');
      const f2 = path.join(m.dir, 'p2.raw');
      run('mkfs.ext4', ['-q', '-F', '-L', 'part1', f1]);
      const fsck = spawnSync('e2fsck', ['-fn', f1], { encoding: 'utf8' });
      expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
      expect(run('dumpe2fs', ['-h', f1]).stdout).toMatch(/Filesystem volume name:\s+part1/);

      // disk.raw opened (and cached) before the write through p2.raw
      const disk = fs.openSync(m.rawPath, 'r');
      const OFF = 3 * MiB + 512;
      const cachedBefore = Buffer.alloc(8192);
      fs.readSync(disk, cachedBefore, 0, 8192, p2.start + OFF);
      const data = patternBytes(8192, 77);
      const fd2 = fs.openSync(f2, 'r+');
      expect(fs.writeSync(fd2, data, 0, data.length, OFF)).toBe(data.length);
      // at the end: ENOSPC; crossing it: cut short at the end
      expect(errnoOfSync(() => fs.writeSync(fd2, data, 0, 512, p2.length))).toBe('ENOSPC');
      expect(errnoOfSync(() => fs.writeSync(fd2, data, 0, 512, p2.length + MiB))).toBe('ENOSPC');
      const tail = Buffer.alloc(4096, 0xee);
      expect(fs.writeSync(fd2, tail, 0, 4096, p2.length - 1024)).toBe(1024);
      fs.fsyncSync(fd2);
      fs.closeSync(fd2);

      if (backend === 'fuse3') {
        // the disk.raw opened before: its cached pages were invalidated (asynchronously, see native/fuse3/inval.c);
        // checked before any new open, which drops the inode's whole page cache anyway (no keep_cache for aliases)
        const seen = Buffer.alloc(8192);
        for (let i = 0; i < 200; i++) {
          fs.readSync(disk, seen, 0, 8192, p2.start + OFF);
          if (seen.equals(data)) break;
          await new Promise((r) => setTimeout(r, 50));
        }
        expect(seen.equals(data), 'the already-open disk.raw shows the write through p2.raw').toBe(true);
      }
      // a fresh open of disk.raw sees it at the partition's offset
      const fresh = Buffer.alloc(8192);
      const fd = fs.openSync(m.rawPath, 'r');
      fs.readSync(fd, fresh, 0, 8192, p2.start + OFF);
      fs.closeSync(fd);
      expect(fresh.equals(data)).toBe(true);
      fs.closeSync(disk);
      expect(cachedBefore.equals(before.subarray(p2.start + OFF, p2.start + OFF + 8192))).toBe(true);
    } finally {
      await m.unmount();
    }
    expect(qemuCheck(image).code).toBe(0);
    const after = fs.readFileSync(convertToRaw(image, `${image}.after`));
    // outside p1 and p2's written ranges nothing changed
    const OFF = 3 * MiB + 512;
    const same = (a: number, b: number): boolean => after.subarray(a, b).equals(before.subarray(a, b));
    expect(same(0, p1.start), 'before p1 (the GPT)').toBe(true);
    expect(same(p1.start + p1.length, p2.start + OFF), 'between p1 and the write').toBe(true);
    expect(after.subarray(p2.start + OFF, p2.start + OFF + 8192).equals(patternBytes(8192, 77))).toBe(true);
    expect(same(p2.start + OFF + 8192, p2.start + p2.length - 1024)).toBe(true);
    expect(after.subarray(p2.start + p2.length - 1024, p2.start + p2.length).every((b) => b === 0xee)).toBe(true);
    expect(same(p2.start + p2.length, SIZE), 'after p2 (p3 and the backup GPT)').toBe(true);
    // the file system on p1 checks clean from the image too
    const p1img = path.join(scratch.dir, `${backend}-p1.img`);
    fs.writeFileSync(p1img, after.subarray(p1.start, p1.start + p1.length));
    expect(spawnSync('e2fsck', ['-fn', p1img]).status).toBe(0);
  });

  it('concurrent writers through p2.raw and disk.raw over the same bytes, with readers: no request hangs or fails, the image checks clean', async () => {
    const { image, parts } = makeDisk(`${backend}-race`, GPT_SCRIPT);
    const p2 = parts[1]!;
    const m = await mountImage(image, { backend });
    try {
      const seek = p2.start / 65536;
      // Both writers cover p2's first 1 MiB (disk.raw at p2's offset); each loop is a shell in its own process.
      const script = `
        w1() { for i in $(seq 1 60); do dd if=/dev/urandom of=${m.dir}/p2.raw bs=64k count=16 seek=$((i % 4)) conv=notrunc status=none || echo FAIL; done; }
        w2() { for i in $(seq 1 60); do dd if=/dev/urandom of=${m.rawPath} bs=64k count=16 seek=$((${seek} + i % 4)) conv=notrunc status=none || echo FAIL; done; }
        r() { for i in $(seq 1 60); do dd if=${m.dir}/p2.raw bs=1M count=2 status=none >/dev/null || echo FAIL; dd if=${m.rawPath} bs=64k skip=${seek} count=32 status=none >/dev/null || echo FAIL; done; }
        w1 & w2 & r & wait; echo done`;
      const r = spawnSync('sh', ['-c', script], { encoding: 'utf8', timeout: 100_000 }); // a hang fails here, not in vitest's timeout
      expect(r.stdout.trim(), r.stderr).toBe('done');
    } finally {
      await m.unmount();
    }
    expect(qemuCheck(image).code).toBe(0);
  });

  it('read-only mount: partition files are read-only; e2fsck -fn still works', async () => {
    const { image } = makeDisk(`${backend}-ro`, MBR_SCRIPT);
    // put an ext4 into p5 of the image first (read-write mount), then check it read-only
    const w = await mountImage(image, { backend });
    try {
      run('mkfs.ext4', ['-q', '-F', path.join(w.dir, 'p5.raw')]);
    } finally {
      await w.unmount();
    }
    const m = await mountImage(image, { backend, readOnly: true });
    try {
      for (const n of partFiles(m.dir)) {
        const f = path.join(m.dir, n);
        expect(errnoOfSync(() => fs.openSync(f, 'r+')), n).toBe('EROFS');
      }
      const fsck = spawnSync('e2fsck', ['-fn', path.join(m.dir, 'p5.raw')], { encoding: 'utf8' });
      expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
    } finally {
      await m.unmount();
    }
  });

  it('--no-partitions shows disk.raw alone; a table rewritten while mounted changes the files at the next mount', async () => {
    const { image } = makeDisk(`${backend}-retable`, MBR_SCRIPT);
    const hidden = await mountImage(image, { backend, extraArgs: ['--no-partitions'] });
    try {
      expect(fs.readdirSync(hidden.dir)).toEqual(['disk.raw']);
    } finally {
      await hidden.unmount();
    }
    const m = await mountImage(image, { backend });
    const p6Size = fs.statSync(path.join(m.dir, 'p6.raw')).size;
    try {
      run('sfdisk', ['-q', '--delete', m.rawPath, '6']);
      expect(sfdiskParts(m.rawPath).map((p) => p.number)).toEqual([1, 2, 5]);
      // the files keep the bounds read at mount time
      expect(partFiles(m.dir)).toEqual(['p1.raw', 'p2.raw', 'p5.raw', 'p6.raw']);
      expect(fs.statSync(path.join(m.dir, 'p6.raw')).size).toBe(p6Size);
    } finally {
      await m.unmount();
    }
    const again = await mountImage(image, { backend, readOnly: true });
    try {
      expect(partFiles(again.dir)).toEqual(['p1.raw', 'p2.raw', 'p5.raw']);
    } finally {
      await again.unmount();
    }
  });
});
