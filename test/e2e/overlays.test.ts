/**
 * Throwaway and persistent overlays, through the kernel:
 *  - `-s`: mkfs.ext4, file writes and e2fsck -fy through a loop device over
 *    disk.raw of an image with mode 0444 that another qmount holds
 *    read-only; afterwards the image is unchanged and no file is left in its
 *    folder or in $TMPDIR; the same when qmount is killed (SIGKILL) midway.
 *  - a dirty ext4 journal (ext4 through a writable qmount, SIGKILL before
 *    unmount) recovered through `-s`: `mount -o ro` replays it, the files
 *    read back, the image is unchanged.
 *  - `--overlay FILE`: created, a write workload, qemu-img check of the
 *    overlay clean and qemu-img compare against a raw reference identical,
 *    the image unchanged; a remount reuses the overlay; an overlay of
 *    another image is refused.
 *
 * Needs root, /dev/fuse and loop devices (see README "Testing").
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, detach, makeMountDir, mountImage, type MountedImage } from '../helpers/mount.js';
import { convertToRaw, patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir, sha256File } from '../helpers/qemu.js';
import { fileTarget, randomWrites } from '../helpers/workload.js';

const MiB = 1024 * 1024;
const PATH = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/sbin:/sbin`;
const O_ACCMODE = 3;

function sh(cmd: string, args: string[], allowFail = false): { code: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, PATH } });
  const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  if (!allowFail && r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${out.trim()}`);
  return { code: r.status ?? -1, out };
}

/** Undo steps, newest first, each run even if an earlier one throws. */
class Undo {
  private steps: Array<() => unknown> = [];
  push(fn: () => unknown): void {
    this.steps.push(fn);
  }
  async run(): Promise<void> {
    for (const fn of this.steps.reverse()) {
      try {
        await fn();
      } catch (err) {
        console.error(`cleanup: ${String(err)}`);
      }
    }
    this.steps = [];
  }
}

let scratch: { dir: string; cleanup: () => void };
let undo: Undo;
beforeAll(() => {
  scratch = scratchDir('overlays');
});
afterAll(async () => {
  await undo?.run();
  scratch.cleanup();
});

function attachLoop(file: string, u: Undo): string {
  const loop = sh('losetup', ['--show', '-f', file]).out.trim();
  u.push(() => sh('losetup', ['-d', loop], true));
  return loop;
}

/** Files written into the ext4 file system, and their content. */
function demoFiles(): Map<string, Buffer> {
  const files = new Map<string, Buffer>();
  files.set('hello.txt', Buffer.from('recovered through qmount -s\n'));
  for (let i = 0; i < 4; i++) files.set(`data/blob-${i}.bin`, patternBytes(300 * 1024 + i * 4096, 40 + i));
  return files;
}

function writeFiles(dir: string, files: Map<string, Buffer>): void {
  for (const [p, data] of files) {
    fs.mkdirSync(path.dirname(path.join(dir, p)), { recursive: true });
    fs.writeFileSync(path.join(dir, p), data);
  }
}

function expectFiles(dir: string, files: Map<string, Buffer>): void {
  for (const [p, data] of files) expect(fs.readFileSync(path.join(dir, p)).equals(data), p).toBe(true);
}

/** The image's file descriptors in process `pid`, with their access modes. */
function imageFds(pid: number, image: string): number[] {
  const real = fs.realpathSync(image);
  const modes: number[] = [];
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue;
    }
    if (target !== real) continue;
    const flags = /flags:\s*([0-7]+)/.exec(fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'))![1]!;
    modes.push(parseInt(flags, 8) & O_ACCMODE);
  }
  return modes;
}

function evidence(name: string, sizeMiB: number): { image: string; folder: string } {
  const folder = path.join(scratch.dir, name);
  fs.mkdirSync(folder);
  const image = path.join(folder, 'evidence.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', image, `${sizeMiB}M`);
  qemuIo(image, 'qcow2', ['write -P 0x5a 0 1M', `write -P 0x6b ${sizeMiB / 2}M 2M`]);
  return { image, folder };
}

describe('-s / --snapshot: throwaway writes', () => {
  it('mkfs.ext4, file writes and e2fsck -fy through a loop device; image (0444, held read-only elsewhere) unchanged, no file left', async () => {
    undo = new Undo();
    const { image, folder } = evidence('s-clean', 64);
    fs.chmodSync(image, 0o444);
    const tmp = path.join(scratch.dir, 's-clean-tmp');
    fs.mkdirSync(tmp);
    const before = sha256File(image);

    const holder = await mountImage(image, { readOnly: true });
    undo.push(() => holder.unmount());
    const m = await mountImage(image, { extraArgs: ['-s'], env: { TMPDIR: tmp } });
    undo.push(() => m.unmount());
    expect(fs.readdirSync(tmp)).toEqual([]);
    const modes = imageFds(m.pid, image);
    expect(modes.length).toBeGreaterThan(0);
    expect(modes.every((mode) => mode === 0)).toBe(true); // O_RDONLY

    const loop = attachLoop(m.rawPath, undo);
    sh('mkfs.ext4', ['-q', '-F', loop]);
    const fsDir = path.join(scratch.dir, 's-clean-fs');
    fs.mkdirSync(fsDir);
    sh('mount', ['-t', 'ext4', loop, fsDir]);
    const files = demoFiles();
    try {
      writeFiles(fsDir, files);
    } finally {
      sh('umount', [fsDir]);
    }
    expect(sh('e2fsck', ['-fy', loop], true).code).toBe(0);
    sh('mount', ['-t', 'ext4', '-o', 'ro', loop, fsDir]);
    try {
      expectFiles(fsDir, files);
    } finally {
      sh('umount', [fsDir]);
    }
    await undo.run();

    expect(sha256File(image)).toBe(before);
    expect(fs.readdirSync(tmp)).toEqual([]);
    expect(fs.readdirSync(folder)).toEqual(['evidence.qcow2']);
  });

  it('a temporary overlay left by a dead qmount is removed by the next -s; one of a live process is kept', async () => {
    undo = new Undo();
    const { image } = evidence('s-sweep', 8);
    const tmp = path.join(scratch.dir, 's-sweep-tmp');
    fs.mkdirSync(tmp);
    const dead = spawnSync('true').pid!; // exited: its pid names no running process
    const stale = path.join(tmp, `qmount-snapshot-${dead}-0123456789ab.qcow2`);
    const alive = path.join(tmp, `qmount-snapshot-${process.pid}-0123456789ab.qcow2`);
    const other = path.join(tmp, 'unrelated.qcow2');
    for (const f of [stale, alive, other]) fs.writeFileSync(f, 'x');
    const m = await mountImage(image, { extraArgs: ['-s'], env: { TMPDIR: tmp } });
    undo.push(() => m.unmount());
    expect(fs.readdirSync(tmp).sort()).toEqual([path.basename(alive), 'unrelated.qcow2'].sort());
    await undo.run();
  });

  it('SIGKILL midway: the image is unchanged and no file is left', async () => {
    undo = new Undo();
    const { image, folder } = evidence('s-kill', 64);
    const tmp = path.join(scratch.dir, 's-kill-tmp');
    fs.mkdirSync(tmp);
    const before = sha256File(image);
    const m = await mountImage(image, { extraArgs: ['-s'], env: { TMPDIR: tmp } });
    undo.push(() => m.unmount());
    undo.push(() => detach(m.dir));
    const loop = attachLoop(m.rawPath, undo);
    sh('mkfs.ext4', ['-q', '-F', loop]);
    const fd = fs.openSync(loop, 'r+');
    fs.writeSync(fd, patternBytes(MiB, 3), 0, MiB, 20 * MiB);
    fs.closeSync(fd);
    m.kill('SIGKILL');
    expect((await m.exited).signal).toBe('SIGKILL');
    await undo.run();
    expect(sha256File(image)).toBe(before);
    expect(fs.readdirSync(tmp)).toEqual([]);
    expect(fs.readdirSync(folder)).toEqual(['evidence.qcow2']);
  });

  it('a dirty ext4 journal (qmount killed before unmount) is replayed through -s; the image stays as it was', async () => {
    undo = new Undo();
    const { image } = evidence('journal', 64);
    const files = demoFiles();
    // Writable qmount, ext4 with files, synced; then qmount dies with ext4 still mounted.
    const inner = new Undo();
    const w: MountedImage = await mountImage(image);
    inner.push(() => w.unmount());
    inner.push(() => detach(w.dir));
    const loop = attachLoop(w.rawPath, inner);
    sh('mkfs.ext4', ['-q', '-F', loop]);
    const fsDir = path.join(scratch.dir, 'journal-fs');
    fs.mkdirSync(fsDir);
    sh('mount', ['-t', 'ext4', loop, fsDir]);
    inner.push(() => sh('umount', ['-l', fsDir], true));
    writeFiles(fsDir, files);
    sh('sync', ['-f', path.join(fsDir, 'hello.txt')]);
    w.kill('SIGKILL');
    await w.exited;
    await inner.run();

    // The file system needs its journal replayed.
    const raw = convertToRaw(image, path.join(scratch.dir, 'journal-before.raw'));
    expect(sh('dumpe2fs', ['-h', raw]).out).toMatch(/features:.*needs_recovery/);
    fs.rmSync(raw);
    const before = sha256File(image);

    const m = await mountImage(image, { extraArgs: ['-s'] });
    undo.push(() => m.unmount());
    const loop2 = attachLoop(m.rawPath, undo);
    const roDir = path.join(scratch.dir, 'journal-ro');
    fs.mkdirSync(roDir);
    sh('mount', ['-t', 'ext4', '-o', 'ro', loop2, roDir]);
    try {
      expectFiles(roDir, files);
    } finally {
      sh('umount', [roDir]);
    }
    // The replay went to the throwaway overlay: the overlay's disk no longer needs recovery.
    expect(sh('dumpe2fs', ['-h', loop2]).out).not.toMatch(/needs_recovery/);
    await undo.run();
    expect(sha256File(image)).toBe(before);
  });
});

describe('--overlay FILE: persistent overlay', () => {
  it('created, written, clean for qemu-img check, identical to a raw reference; the image unchanged; reused on remount', async () => {
    undo = new Undo();
    const { image, folder } = evidence('ovl', 32);
    const before = sha256File(image);
    const overlay = path.join(scratch.dir, 'ovl-writes.qcow2');
    const model = convertToRaw(image, path.join(scratch.dir, 'ovl-model.raw'));

    const m = await mountImage(image, { extraArgs: ['--overlay', overlay] });
    undo.push(() => m.unmount());
    const t = fileTarget(m.rawPath, 32 * MiB);
    await randomWrites(t, model, { count: 120, maxLength: 256 * 1024, seed: 15, verifyEvery: 20 });
    t.fsync();
    t.close();
    await undo.run();

    expect(qemuCheck(overlay, 'qcow2').code).toBe(0);
    expect(qemuCompare(overlay, model, 'qcow2', 'raw').output).toMatch(/Images are identical/);
    const info = JSON.parse(qemuImg('info', '--output=json', overlay)) as Record<string, unknown>;
    expect(info['backing-filename']).toBe(fs.realpathSync(image));
    expect(info['backing-filename-format']).toBe('qcow2');
    expect(sha256File(image)).toBe(before);
    expect(fs.readdirSync(folder)).toEqual(['evidence.qcow2']);

    // Remount: the overlay is reused (its writes are there) and takes more.
    const m2 = await mountImage(image, { extraArgs: ['--overlay', overlay] });
    undo.push(() => m2.unmount());
    expect(sha256File(m2.rawPath)).toBe(sha256File(model));
    const t2 = fileTarget(m2.rawPath, 32 * MiB);
    await randomWrites(t2, model, { count: 40, maxLength: 128 * 1024, seed: 16 });
    t2.fsync();
    t2.close();
    await undo.run();
    expect(qemuCheck(overlay, 'qcow2').code).toBe(0);
    expect(qemuCompare(overlay, model, 'qcow2', 'raw').output).toMatch(/Images are identical/);
    expect(sha256File(image)).toBe(before);
  });

  it('an overlay whose backing file is another image is refused with one line', () => {
    const { image } = evidence('ovl-other', 8);
    const other = path.join(scratch.dir, 'other-base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', other, '8M');
    const foreign = path.join(scratch.dir, 'foreign-overlay.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', other, '-F', 'qcow2', foreign);
    const before = [sha256File(image), sha256File(foreign)];
    const dir = makeMountDir();
    try {
      const r = spawnSync(process.execPath, [CLI, '-f', '--overlay', foreign, image, dir], { encoding: 'utf8', timeout: 60_000 });
      expect(r.status).toBe(2);
      expect(r.stderr).toMatch(/^qmount: [^\n]*has backing file [^\n]*other-base\.qcow2, not [^\n]*evidence\.qcow2[^\n]*\n$/);
    } finally {
      fs.rmdirSync(dir);
    }
    expect([sha256File(image), sha256File(foreign)]).toEqual(before);
  });

  it('-s and --overlay do not combine with -r', () => {
    const { image } = evidence('ovl-ro', 8);
    for (const args of [['-r', '-s'], ['-r', '--overlay', path.join(scratch.dir, 'x.qcow2')], ['-s', '--overlay', path.join(scratch.dir, 'y.qcow2')]]) {
      const r = spawnSync(process.execPath, [CLI, ...args, image, scratch.dir], { encoding: 'utf8', timeout: 60_000 });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^qmount: [^\n]+\n$/);
    }
  });
});
