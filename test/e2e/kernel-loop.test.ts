/**
 * End to end through the kernel: a qcow2 image holding a partitioned ext4
 * filesystem is mounted with qmount, disk.raw is attached to a loop device,
 * the partition is mounted by the kernel's ext4 driver, and the files read
 * back must match what was put in. Every step registers its undo first-in,
 * last-out, and the undo list runs even when an assertion fails.
 *
 * Needs root, /dev/fuse and loop devices (see README "Testing").
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { demoFiles, makeDemoImage } from '../../scripts/make-demo.mjs';
import { mountImage } from '../helpers/mount.js';
import { convertToRaw, qemuCheck, qemuImg, scratchDir, sha256File } from '../helpers/qemu.js';

const PATH = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/sbin:/sbin`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function sh(cmd: string, args: string[], allowFail = false, input?: string): { code: number; out: string } {
  const r = spawnSync(cmd, args, { input, encoding: 'utf8', env: { ...process.env, PATH } });
  const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  if (!allowFail && r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${out.trim()}`);
  return { code: r.status ?? -1, out };
}

/** Undo steps, run newest first; every step runs even if an earlier one throws. */
class Undo {
  private steps: Array<{ what: string; fn: () => unknown }> = [];
  push(what: string, fn: () => unknown): void {
    this.steps.push({ what, fn });
  }
  async run(): Promise<void> {
    const errors: string[] = [];
    for (const { what, fn } of this.steps.reverse()) {
      try {
        await fn();
      } catch (err) {
        errors.push(`${what}: ${err instanceof Error ? err.message : String(err)}`);
      }
    }
    this.steps = [];
    if (errors.length) throw new Error(`cleanup failed: ${errors.join('; ')}`);
  }
}

/**
 * Run `body`, then its undo steps whatever happened. A failure of the body
 * wins over a failure of the clean-up (which is then only printed).
 */
async function withUndo(body: (undo: Undo) => Promise<void>): Promise<void> {
  const undo = new Undo();
  try {
    await body(undo);
  } catch (err) {
    await undo.run().catch((e) => console.error(String(e)));
    throw err;
  }
  await undo.run();
}

async function waitForBlockDevice(p: string, ms: number): Promise<boolean> {
  for (const end = Date.now() + ms; ; await sleep(50)) {
    try {
      if (fs.statSync(p).isBlockDevice()) return true;
    } catch {
      // not there yet
    }
    if (Date.now() >= end) return false;
  }
}

/**
 * The first partition of `file` as a block device. The kernel scans the
 * table while `losetup -P` runs, so /sys shows at once whether it found the
 * partition; the /dev node may come a little later (or never, without
 * devtmpfs or udev), hence the polling. A kernel without the GPT/MBR parser
 * finds nothing: then partx -a reads the table in user space, and when no
 * node appears at all, a loop device over just the partition's byte range.
 */
async function attachPartition(
  file: string,
  part: { offset: number; size: number },
  readOnly: boolean,
  undo: Undo,
): Promise<{ dev: string; how: string }> {
  const ro = readOnly ? ['-r'] : [];
  const loop = sh('losetup', ['-P', '--show', '-f', ...ro, file]).out.trim();
  undo.push(`losetup -d ${loop}`, () => sh('losetup', ['-d', loop]));
  const name = path.basename(loop);
  const p1 = `${loop}p1`;
  let how = 'losetup -P';
  if (!fs.existsSync(`/sys/class/block/${name}p1`)) {
    sh('partx', ['-a', loop], true);
    how = 'partx -a';
  }
  if (fs.existsSync(`/sys/class/block/${name}p1`) && (await waitForBlockDevice(p1, 3000))) return { dev: p1, how };
  const ranged = sh('losetup', ['--show', '-f', ...ro, '-o', String(part.offset), '--sizelimit', String(part.size), file]).out.trim();
  undo.push(`losetup -d ${ranged}`, () => sh('losetup', ['-d', ranged]));
  return { dev: ranged, how: 'losetup -o' };
}

async function mountExt4(dev: string, dir: string, readOnly: boolean, undo: Undo): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  sh('mount', ['-t', 'ext4', '-o', readOnly ? 'ro' : 'rw', dev, dir]);
  undo.push(`umount ${dir}`, () => sh('umount', [dir]));
}

async function mountQmount(image: string, readOnly: boolean, undo: Undo): Promise<{ dir: string; rawPath: string }> {
  const m = await mountImage(image, { readOnly, format: 'qcow2' });
  undo.push(`unmount qmount ${m.dir}`, () => m.unmount());
  return m;
}

const sha = (b: Buffer | string) => crypto.createHash('sha256').update(b).digest('hex');

/** Every file of the manifest is in `dir` with the same size and content. */
function expectFiles(dir: string, files: Array<{ path: string; size: number; sha256: string }>): void {
  expect(files.length).toBeGreaterThan(3);
  for (const f of files) {
    const data = fs.readFileSync(path.join(dir, f.path));
    expect({ path: f.path, size: data.length, sha256: sha(data) }).toEqual(f);
  }
}

const VARIANTS = [
  { name: 'GPT, 64 KiB clusters', opts: { sizeMiB: 64, label: 'gpt' } },
  { name: 'MBR, compressed clusters', opts: { sizeMiB: 64, label: 'dos', compress: true } },
  { name: 'GPT, 4 KiB clusters', opts: { sizeMiB: 64, label: 'gpt', clusterSize: 4096 } },
] as const;

describe('kernel ext4 on a loop device over qmount', () => {
  for (const v of VARIANTS) {
    it(`reads back every file (${v.name})`, async () => {
      const scratch = scratchDir('kloop');
      await withUndo(async (undo) => {
        undo.push('remove scratch dir', () => scratch.cleanup());
        const image = path.join(scratch.dir, 'disk.qcow2');
        const made = makeDemoImage(image, v.opts);
        expect(qemuImg('info', '--output=json', image)).toContain('"format": "qcow2"');

        const m = await mountQmount(image, true, undo);
        expect(fs.statSync(m.rawPath).size).toBe(made.virtualSize);
        // The whole guest disk, byte for byte, against QEMU's own reading.
        const oracle = convertToRaw(image, path.join(scratch.dir, 'oracle.raw'));
        expect(sha256File(m.rawPath)).toBe(sha256File(oracle));
        fs.rmSync(oracle);

        const part = await attachPartition(m.rawPath, made.partition, true, undo);
        const fsDir = path.join(scratch.dir, 'fs');
        await mountExt4(part.dev, fsDir, true, undo);
        expectFiles(fsDir, made.files);
        expect(fs.readFileSync(path.join(fsDir, 'hello.txt'), 'utf8')).toBe('Hello from inside a qcow2 image!\n');
        expect(fs.readdirSync(fsDir).sort()).toEqual(['README.txt', 'SHA256SUMS', 'data', 'docs', 'hello.txt', 'lost+found']);
      });
      expect(fs.existsSync(scratch.dir)).toBe(false);
    });
  }

  it('mkfs, writes files and reads them back after a remount (read-write)', async () => {
    const scratch = scratchDir('kloop-rw');
    await withUndo(async (undo) => {
      undo.push('remove scratch dir', () => scratch.cleanup());
      const image = path.join(scratch.dir, 'blank.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', image, '64M');
      const files = Object.entries(demoFiles()).map(([p, c]) => {
        const b = Buffer.isBuffer(c) ? c : Buffer.from(c);
        return { path: p, size: b.length, sha256: sha(b), data: b };
      });
      const manifest = files.map(({ data: _data, ...f }) => f);
      let partition = { offset: 0, size: 0 };

      // Write pass: partition table, filesystem and files, all through qmount.
      // Leaving it runs umount ext4 (writes back), losetup -d, unmount qmount (flush, close).
      await withUndo(async (writes) => {
        const m = await mountQmount(image, false, writes);
        sh('sfdisk', ['--no-reread', '--no-tell-kernel', m.rawPath], false, 'label: gpt\nstart=2048, type=linux\n');
        const table = JSON.parse(sh('sfdisk', ['-J', m.rawPath]).out) as { partitiontable: { partitions: Array<{ start: number; size: number }> } };
        const p1 = table.partitiontable.partitions[0]!;
        partition = { offset: p1.start * 512, size: p1.size * 512 };
        expect(partition.offset).toBe(1024 * 1024);
        const part = await attachPartition(m.rawPath, partition, false, writes);
        sh('mkfs.ext4', ['-q', '-F', '-L', 'qmount-rw', part.dev]);
        const fsDir = path.join(scratch.dir, 'fs-rw');
        await mountExt4(part.dev, fsDir, false, writes);
        for (const f of files) {
          fs.mkdirSync(path.dirname(path.join(fsDir, f.path)), { recursive: true });
          fs.writeFileSync(path.join(fsDir, f.path), f.data);
        }
        expectFiles(fsDir, manifest);
      });

      // The image is consistent for QEMU, and the filesystem for e2fsck.
      expect(qemuCheck(image, 'qcow2').code).toBe(0);
      const m2 = await mountQmount(image, true, undo);
      // What qmount wrote reads back the same through QEMU.
      const oracle = convertToRaw(image, path.join(scratch.dir, 'oracle.raw'));
      expect(sha256File(m2.rawPath)).toBe(sha256File(oracle));
      fs.rmSync(oracle);
      const part2 = await attachPartition(m2.rawPath, partition, true, undo);
      const fsck = sh('e2fsck', ['-fn', part2.dev], true);
      expect(fsck.code, fsck.out).toBe(0);
      const fsDir2 = path.join(scratch.dir, 'fs-ro');
      await mountExt4(part2.dev, fsDir2, true, undo);
      expectFiles(fsDir2, manifest);
    });
    expect(fs.existsSync(scratch.dir)).toBe(false);
  });
});
