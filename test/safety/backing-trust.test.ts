/**
 * Backing-file names are untrusted data (they come from the image): qmount
 * follows them by default (overlays need it), shows where they led in
 * `qmount info` and in the mount log, never loops, refuses protocols, keeps
 * control characters in names out of the terminal, and with --no-backing
 * never opens them at all. disk.raw is for the mounting user only unless
 * -o allow_other.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, mountImage, qmountDaemon, type MountedImage } from '../helpers/mount.js';
import { patternBytes, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const SIZE = 2 * MiB;

let scratch: { dir: string; cleanup: () => void };
let base: string;
let top: string;
let chainTop: string;
const chainFiles: string[] = [];

function qmount(args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

async function withMount<T>(m: MountedImage, fn: (m: MountedImage) => Promise<T> | T): Promise<T> {
  try {
    return await fn(m);
  } finally {
    await m.unmount();
  }
}

/** Real paths of the files process `pid` has open. */
function openFiles(pid: number): string[] {
  return fs.readdirSync(`/proc/${pid}/fd`).map((fd) => {
    try {
      return fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      return '';
    }
  });
}

function logLines(file: string): Array<Record<string, unknown>> {
  return fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.trim() !== '').map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** An overlay whose backing file name is `name` (format `fmt`), written without checking that it exists. */
function overlayNaming(file: string, name: string, fmt = 'qcow2'): string {
  qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', fmt, file, String(SIZE));
  return file;
}

beforeAll(() => {
  scratch = scratchDir('backing-trust');
  base = path.join(scratch.dir, 'base.qcow2');
  top = path.join(scratch.dir, 'top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, String(SIZE));
  qemuIo(base, 'qcow2', [`write -P 0xaa 0 ${SIZE}`]);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
  qemuIo(top, 'qcow2', ['write -P 0x55 65536 65536']);

  // base <- mid <- top in three directories, linked by relative names.
  fs.mkdirSync(path.join(scratch.dir, 'c', 'lower'), { recursive: true });
  fs.mkdirSync(path.join(scratch.dir, 'c', 'upper'), { recursive: true });
  const cBase = path.join(scratch.dir, 'c', 'lower', 'base.qcow2');
  const cMid = path.join(scratch.dir, 'c', 'mid.qcow2');
  chainTop = path.join(scratch.dir, 'c', 'upper', 'top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', cBase, String(SIZE));
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'lower/base.qcow2', '-F', 'qcow2', cMid);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', '../mid.qcow2', '-F', 'qcow2', chainTop);
  chainFiles.push(chainTop, cMid, cBase);
});

afterAll(() => scratch?.cleanup());

describe('the backing chain is shown', () => {
  it('qmount info lists every image of the chain with its name and resolved path, like qemu-img info --backing-chain', () => {
    const want = JSON.parse(qemuImg('info', '--output=json', '--backing-chain', chainTop)) as Array<Record<string, unknown>>;
    const r = qmount(['info', '--output', 'json', '--backing-chain', chainTop]);
    expect(r.code).toBe(0);
    const got = JSON.parse(r.stdout) as Array<Record<string, unknown>>;
    const pick = (i: Record<string, unknown>) => [i['backing-filename'], i.format];
    expect(got.map(pick)).toEqual(want.map(pick));
    // Resolved to the real path (qemu-img shows the unnormalised join, c/upper/../mid.qcow2).
    expect(got.map((i) => i['full-backing-filename'])).toEqual([chainFiles[1], chainFiles[2], undefined]);

    const human = qmount(['info', '--backing-chain', chainTop]);
    expect(human.code).toBe(0);
    expect(human.stdout).toContain(`backing file: ../mid.qcow2 (actual path: ${chainFiles[1]})`);
    expect(human.stdout).toContain(`backing file: lower/base.qcow2 (actual path: ${chainFiles[2]})`);
    expect(human.stdout.match(/^image: /gm)).toHaveLength(3);
  });

  it('the mount log names the chain at info level; with --no-backing it says the backing file was not opened', async () => {
    const log = path.join(scratch.dir, 'chain.log');
    await withMount(await mountImage(chainTop, { readOnly: true, extraArgs: ['--log-level', 'info', '--log-file', log] }), () => {});
    const entry = logLines(log).find((l) => l.msg === 'backing chain');
    expect(entry?.chain).toEqual([
      { image: chainFiles[0], format: 'qcow2', backingName: '../mid.qcow2' },
      { image: chainFiles[1], format: 'qcow2', backingName: 'lower/base.qcow2' },
      { image: chainFiles[2], format: 'qcow2' },
    ]);

    const log2 = path.join(scratch.dir, 'nobacking.log');
    await withMount(await mountImage(chainTop, { readOnly: true, extraArgs: ['--no-backing', '--log-level', 'info', '--log-file', log2] }), () => {});
    const lines = logLines(log2);
    expect(lines.find((l) => l.msg === 'backing chain')?.chain).toEqual([{ image: chainFiles[0], format: 'qcow2', backingName: '../mid.qcow2' }]);
    expect(lines.some((l) => String(l.msg).startsWith('backing file not opened (--no-backing)') && l.backingName === '../mid.qcow2')).toBe(true);
  });
});

describe('--no-backing', () => {
  it('unallocated clusters read as zeros, allocated ones as written; the backing file is not open (and is while followed)', async () => {
    const expected = Buffer.alloc(SIZE);
    expected.fill(0x55, 65536, 131072);
    await withMount(await mountImage(top, { readOnly: true, extraArgs: ['--no-backing'] }), (m) => {
      expect(fs.readFileSync(m.rawPath).equals(expected)).toBe(true);
      expect(openFiles(m.pid)).not.toContain(base);
      expect(openFiles(m.pid)).toContain(top);
    });
    await withMount(await mountImage(top, { readOnly: true }), (m) => {
      const raw = fs.readFileSync(m.rawPath);
      expect(raw.subarray(0, 65536).equals(Buffer.alloc(65536, 0xaa))).toBe(true);
      expect(openFiles(m.pid)).toContain(base);
    });
  });

  it('works when the backing file is missing, where following it fails (mount and info)', async () => {
    const dir = path.join(scratch.dir, 'missing');
    fs.mkdirSync(dir);
    const gone = path.join(dir, 'gone.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', gone, String(SIZE));
    const lone = overlayNaming(path.join(dir, 'lone.qcow2'), 'gone.qcow2');
    qemuIo(lone, 'qcow2', ['write -P 0x66 0 4096']);
    fs.rmSync(gone);
    // Followed read-only (issue 15): it mounts with one warning; what the missing file would supply is EIO, never zeros.
    const followed = await mountImage(lone, { readOnly: true });
    await withMount(followed, (m) => {
      expect(m.stderr()).toMatch(/^qmount: warning: backing file gone\.qcow2 is missing: the ranges it would supply fail with EIO/m);
      const fd = fs.openSync(m.rawPath, 'r');
      try {
        const b = Buffer.alloc(4096);
        fs.readSync(fd, b, 0, 4096, 0);
        expect(b.equals(Buffer.alloc(4096, 0x66))).toBe(true);
        expect(() => fs.readSync(fd, b, 0, 4096, 65536)).toThrow(/EIO/);
      } finally {
        fs.closeSync(fd);
      }
    });
    // A read-write mount still refuses it.
    const rw = await qmountDaemon([], lone);
    expect(rw.code).toBe(2);
    expect(rw.stderr).toMatch(/^qmount: .*gone\.qcow2: cannot open: ENOENT\n$/);
    await withMount(await mountImage(lone, { readOnly: true, extraArgs: ['--no-backing'] }), (m) => {
      const raw = fs.readFileSync(m.rawPath);
      expect(raw.subarray(0, 4096).equals(Buffer.alloc(4096, 0x66))).toBe(true);
      expect(raw.subarray(4096).equals(Buffer.alloc(SIZE - 4096))).toBe(true);
    });
    const info = qmount(['info', '--no-backing', lone]);
    expect(info.code).toBe(0);
    expect(info.stdout).toContain('backing file: gone.qcow2\n'); // named, not resolved
    // Followed, the missing backing file is a warning (as qemu-img info shows such an image), not an error.
    const followedInfo = qmount(['info', lone]);
    expect(followedInfo.code).toBe(0);
    expect(followedInfo.stderr).toMatch(/^qmount: warning: the backing chain cannot be followed: .*gone\.qcow2: cannot open: ENOENT\n$/);
  });

  it('a backing name pointing at any file (here a "secret") is followed by default; --no-backing keeps it out', async () => {
    const secret = path.join(scratch.dir, 'secret.txt');
    fs.writeFileSync(secret, 'TOP SECRET: not part of any disk image\n');
    const evil = overlayNaming(path.join(scratch.dir, 'evil.qcow2'), secret, 'raw');
    await withMount(await mountImage(evil, { readOnly: true }), (m) => {
      expect(fs.readFileSync(m.rawPath).subarray(0, 10).toString()).toBe('TOP SECRET');
    });
    await withMount(await mountImage(evil, { readOnly: true, extraArgs: ['--no-backing'] }), (m) => {
      expect(fs.readFileSync(m.rawPath).equals(Buffer.alloc(SIZE))).toBe(true);
      expect(openFiles(m.pid)).not.toContain(secret);
    });
  });

  it('is refused for a read-write mount (a usage error: writes need the backing data)', async () => {
    expect(await qmountDaemon(['--no-backing'], top)).toEqual({ code: 1, stderr: 'qmount: --no-backing needs a read-only mount (-r): writes need the backing file\n' });
  });
});

describe('hostile backing names', () => {
  it('a chain that loops (an image backing itself, two backing each other) fails with ELOOP for info and mount; --no-backing opens it', async () => {
    const self = overlayNaming(path.join(scratch.dir, 'self.qcow2'), 'self.qcow2');
    const a = path.join(scratch.dir, 'loop-a.qcow2');
    const b = path.join(scratch.dir, 'loop-b.qcow2');
    overlayNaming(a, 'loop-b.qcow2');
    overlayNaming(b, 'loop-a.qcow2');
    for (const [image, loop] of [[self, [self, self]], [a, [a, b, a]]] as const) {
      const want = `qmount: ${image}: backing chain loops: ${loop.join(' -> ')}\n`;
      const info = qmount(['info', '--backing-chain', image]);
      expect(info).toMatchObject({ code: 2, stderr: want });
      expect(qmount(['info', image]).stderr).toMatch(/^qmount: warning: the backing chain cannot be followed: /);
      const m = await qmountDaemon(['-r'], image);
      expect(m).toEqual({ code: 2, stderr: want });
      expect(qmount(['info', '--no-backing', image]).code).toBe(0);
    }
  });

  it('backing names with a protocol (nbd:, http:) are refused, not resolved as files', () => {
    for (const name of ['nbd://127.0.0.1:10809/disk', 'http://example.invalid/disk.qcow2']) {
      const p = overlayNaming(path.join(scratch.dir, `proto-${name.split(':')[0]}.qcow2`), name);
      const r = qmount(['info', '--backing-chain', p]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/uses a protocol qmount does not support\n$/);
      expect(r.stderr.split('\n')).toHaveLength(2);
    }
  });

  it('control characters in a backing name never reach the terminal raw (info output and errors stay one line each)', () => {
    const name = 'evil\n\u001b[31mRED\u001b[0m.qcow2';
    const p = overlayNaming(path.join(scratch.dir, 'ctrl.qcow2'), name);
    const err = qmount(['info', '--backing-chain', p]);
    expect(err.code).toBe(2);
    expect(err.stderr).not.toContain('\u001b');
    expect(err.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(err.stderr).toContain('evil\\x0a\\x1b[31mRED\\x1b[0m.qcow2');
    const info = qmount(['info', '--no-backing', p]);
    expect(info.code).toBe(0);
    expect(info.stdout).not.toContain('\u001b');
    expect(info.stdout).toContain('backing file: evil\\x0a\\x1b[31mRED\\x1b[0m.qcow2\n');
    // JSON keeps the exact name (escaped by JSON itself).
    expect((JSON.parse(qmount(['info', '--no-backing', '--output', 'json', p]).stdout) as Record<string, unknown>)['backing-filename']).toBe(name);
  });
});

describe('disk.raw belongs to the mounting user', () => {
  const asNobody = (args: string[]) => spawnSync('runuser', ['-u', 'nobody', '--', ...args], { encoding: 'utf8' });
  const canRunAsNobody = spawnSync('runuser', ['-u', 'nobody', '--', 'true']).status === 0;

  it('mode 0600 (directory 0700) and unreadable by another user; with -o allow_other 0644 and readable', async () => {
    const data = patternBytes(SIZE, 9);
    const raw = path.join(scratch.dir, 'perm.raw');
    fs.writeFileSync(raw, data);
    await withMount(await mountImage(raw, { readOnly: true, format: 'raw' }), (m) => {
      expect(fs.statSync(m.rawPath).mode & 0o777).toBe(0o600);
      expect(fs.statSync(m.dir).mode & 0o777).toBe(0o700);
      if (canRunAsNobody) {
        const r = asNobody(['cat', m.rawPath]);
        expect(r.status).not.toBe(0);
        expect(r.stderr).toMatch(/Permission denied/);
      }
    });
    await withMount(await mountImage(raw, { readOnly: true, format: 'raw', extraArgs: ['-o', 'allow_other'] }), (m) => {
      expect(fs.statSync(m.rawPath).mode & 0o777).toBe(0o644);
      if (canRunAsNobody) {
        const r = spawnSync('runuser', ['-u', 'nobody', '--', 'sha256sum', m.rawPath], { encoding: 'utf8' });
        expect(r.status, r.stderr).toBe(0);
        expect(r.stdout.split(' ')[0]).toBe(spawnSync('sha256sum', [raw], { encoding: 'utf8' }).stdout.split(' ')[0]);
      }
    });
  });
});
