/**
 * Stopping a busy mount never loses data (mount/session.ts): ext4 on a loop
 * device over disk.raw of a qcow2 mount, a writer in that ext4 that writes
 * and fsyncs in a loop, then SIGTERM, SIGINT or a lazy unmount
 * (fusermount -uz). qmount must say who uses the mount, keep serving (the
 * writer sees no error), and exit 0 only after the loop device is gone; the
 * image then passes qemu-img check and holds every block the writer wrote.
 * Against both FUSE backends. Needs root, /dev/fuse and loop devices.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BACKENDS, isMounted, mountImage, processRunning, useBackend, type MountedImage } from '../helpers/mount.js';
import { qemuCheck, qemuImg, scratchDir } from '../helpers/qemu.js';

const PATH = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/sbin:/sbin`;
const BLOCK = 4096;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function sh(cmd: string, args: string[], allowFail = false): { code: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, PATH } });
  const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  if (!allowFail && r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${out.trim()}`);
  return { code: r.status ?? -1, out };
}

/** Block i of the writer's file: its number and a pattern derived from it. */
function block(i: number): Buffer {
  const b = Buffer.alloc(BLOCK, i % 251);
  b.writeUInt32LE(i, 0);
  return b;
}

/**
 * A child that writes block after block to FILE, fsyncing each, until STOP
 * exists; prints "started" after its first fsync and "wrote N" at the end,
 * or "error ..." and exits 1 on the first failure.
 */
const WRITER = `
const fs = require('fs');
const [file, stop] = process.argv.slice(1);
const fd = fs.openSync(file, 'w');
let i = 0;
try {
  for (;;) {
    const b = Buffer.alloc(${BLOCK}, i % 251);
    b.writeUInt32LE(i, 0);
    fs.writeSync(fd, b, 0, b.length, i * ${BLOCK});
    fs.fsyncSync(fd);
    i++;
    if (i === 1) console.log('started');
    if (fs.existsSync(stop)) break;
  }
  fs.closeSync(fd);
  console.log('wrote ' + i);
} catch (err) {
  console.log('error at block ' + i + ': ' + err.message);
  process.exit(1);
}
`;

interface Writer {
  child: ChildProcess;
  output: () => string;
  finished: Promise<number | null>;
}

async function startWriter(file: string, stop: string): Promise<Writer> {
  const child = spawn(process.execPath, ['-e', WRITER, file, stop], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const finished = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  while (!out.includes('started') && child.exitCode === null) await sleep(20);
  return { child, output: () => out, finished };
}

async function waitFor(what: string, cond: () => boolean, m: MountedImage): Promise<void> {
  while (!cond()) {
    if (!processRunning(m.pid)) throw new Error(`qmount ended while waiting for ${what}; stderr: ${m.stderr()}`);
    await sleep(20);
  }
}

/** Blocks written, as the writer saw them, read back from a fresh read-only mount of the image. */
async function verifyFile(image: string, name: string, blocks: number): Promise<void> {
  const m = await mountImage(image, { readOnly: true });
  const ext = fs.mkdtempSync(path.join(path.dirname(image), 'ro-'));
  let loop = '';
  try {
    loop = sh('losetup', ['-r', '-f', '--show', m.rawPath]).out.trim();
    sh('mount', ['-o', 'ro', loop, ext]);
    try {
      const data = fs.readFileSync(path.join(ext, name));
      expect(data.length).toBe(blocks * BLOCK);
      for (let i = 0; i < blocks; i++) {
        if (!data.subarray(i * BLOCK, (i + 1) * BLOCK).equals(block(i))) throw new Error(`block ${i} of ${blocks} differs`);
      }
    } finally {
      sh('umount', [ext]);
    }
  } finally {
    if (loop) sh('losetup', ['-d', loop], true);
    await m.unmount();
    fs.rmSync(ext, { recursive: true, force: true });
  }
}

let scratch: { dir: string; cleanup: () => void };
beforeAll(() => {
  scratch = scratchDir('busy');
});
afterAll(() => scratch.cleanup());

type Stop = 'SIGTERM' | 'SIGINT' | 'lazy unmount';

describe.each(BACKENDS)('%s backend', (backend) => {
  beforeAll(() => useBackend(backend));
  afterAll(() => useBackend(undefined));

  for (const how of ['SIGTERM', 'SIGINT', 'lazy unmount'] as Stop[]) {
    it(`${how} with ext4 on a loop device over disk.raw: no write lost, exit 0 only after the loop device is detached`, async () => {
      const image = path.join(scratch.dir, `busy-${backend}-${how.replace(/\W+/g, '-')}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', image, '64M');
      const ext = fs.mkdtempSync(path.join(scratch.dir, 'ext4-'));
      const stop = path.join(scratch.dir, `stop-${backend}-${how.replace(/\W+/g, '-')}`);
      const m = await mountImage(image);
      let loop = '';
      let extMounted = false;
      let writer: Writer | undefined;
      try {
        loop = sh('losetup', ['-f', '--show', m.rawPath]).out.trim();
        sh('mkfs.ext4', ['-q', '-F', loop]);
        sh('mount', [loop, ext]);
        extMounted = true;
        writer = await startWriter(path.join(ext, 'data'), stop);

        if (how === 'lazy unmount') {
          sh('fusermount', ['-uz', m.dir]);
          expect(isMounted(m.dir)).toBe(false);
          // A signal now must not end it either: it names the loop device and goes on serving.
          m.kill('SIGTERM');
        } else {
          m.kill(how);
        }
        await waitFor('the busy notice', () => m.stderr().includes(`in use by ${loop}`), m);
        // A second signal changes nothing.
        m.kill(how === 'SIGINT' ? 'SIGINT' : 'SIGTERM');
        const notices = () => m.stderr().split(`in use by ${loop}`).length - 1;
        await waitFor('the second busy notice', () => notices() >= 2, m);
        expect(m.stderr()).toMatch(how === 'lazy unmount' ? /unmounted lazily and is still in use/ : /is still in use by .*still serving it/);

        // The writer keeps going through all of it.
        const before = writer.output();
        expect(before).not.toMatch(/error/);
        fs.writeFileSync(stop, '');
        expect(await writer.finished).toBe(0);
        const wrote = /wrote (\d+)/.exec(writer.output());
        expect(wrote, writer.output()).not.toBeNull();
        const blocks = Number(wrote![1]);

        sh('umount', [ext]);
        extMounted = false;
        // ext4 is gone but the loop device still holds disk.raw: qmount must still be serving.
        expect(processRunning(m.pid)).toBe(true);
        sh('losetup', ['-d', loop]);
        loop = '';
        const st = await m.exited;
        expect(st, m.stderr()).toEqual({ code: 0, signal: null });
        expect(m.stderr()).not.toMatch(/I\/O error|EIO|\n\s+at /);
        expect(isMounted(m.dir)).toBe(false);

        const check = qemuCheck(image);
        expect(check.code, check.output).toBe(0);
        await verifyFile(image, 'data', blocks);
        qemuImg('convert', '-O', 'raw', image, `${image}.raw`);
        const fsck2 = sh('e2fsck', ['-fn', `${image}.raw`], true);
        expect(fsck2.code, fsck2.out).toBe(0);
      } finally {
        if (writer && writer.child.exitCode === null) writer.child.kill('SIGKILL');
        if (extMounted) sh('umount', ['-l', ext], true);
        if (loop) sh('losetup', ['-d', loop], true);
        await m.unmount();
        fs.rmSync(ext, { recursive: true, force: true });
        fs.rmSync(stop, { force: true });
      }
    });
  }
});
