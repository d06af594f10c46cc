/**
 * What scripts and admins rely on: `qmount list`, `qmount umount DIR` (which
 * returns only once the image is closed and unlocked), the image path as
 * the mount's source (df, findmnt), -o umask, the generic mount options
 * mount(8) passes, and `mount -t fuse.qmount` / an fstab line (through
 * mount.fuse, in a private mount namespace so the machine's fstab and PATH
 * are untouched).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BACKENDS, CLI, isMounted, mountImage, processRunning, useBackend } from '../helpers/mount.js';
import { patternBytes, qemuCheck, qemuImg, scratchDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const PATH = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/sbin:/sbin`;

function qmount(...args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

interface Listed {
  image: string;
  mountPoint: string;
  pid: number | null;
  mode: string;
  backend: string | null;
  state: string;
}

function listed(): Listed[] {
  const r = qmount('list', '--output', 'json');
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Listed[];
}

let scratch: { dir: string; cleanup: () => void };
beforeAll(() => {
  scratch = scratchDir('admin');
});
afterAll(() => scratch.cleanup());

function makeQcow2(name: string): string {
  const p = path.join(scratch.dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', p, '16M');
  return fs.realpathSync(p);
}

function writeThrough(raw: string, data: Buffer, pos: number): void {
  const fd = fs.openSync(raw, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, pos);
  } finally {
    fs.closeSync(fd);
  }
}

describe.each(BACKENDS)('%s backend', (backend) => {
  beforeAll(() => useBackend(backend));
  afterAll(() => useBackend(undefined));

  it('qmount list names the mount; qmount umount DIR && qemu-img check IMG works (no lock error)', async () => {
    const image = makeQcow2(`list-${backend}.qcow2`);
    const m = await mountImage(image, { foreground: false });
    try {
      const dir = fs.realpathSync(m.dir);
      const mine = listed().filter((e) => e.mountPoint === dir);
      expect(mine).toEqual([expect.objectContaining({ image, mountPoint: dir, pid: m.pid, mode: 'rw', backend, state: 'serving' })]);
      const human = qmount('list');
      expect(human.stdout).toMatch(/^IMAGE\s+DIR\s+PID\s+MODE\s+STATE$/m);
      expect(human.stdout).toContain(dir);
      // Written without fsync: the close at unmount must flush it.
      writeThrough(m.rawPath, patternBytes(MiB, 3), MiB);
      const r = qmount('umount', m.dir);
      expect(r.code, r.stderr).toBe(0);
      // Right away, no waiting: the process is gone and the image unlocked and clean.
      expect(processRunning(m.pid)).toBe(false);
      expect(isMounted(m.dir)).toBe(false);
      const check = qemuCheck(image);
      expect(check.code, check.output).toBe(0);
      expect(listed().filter((e) => e.mountPoint === dir)).toEqual([]);
    } finally {
      await m.unmount();
    }
    const back = spawnSync('qemu-img', ['convert', '-O', 'raw', image, `${image}.raw`]);
    expect(back.status).toBe(0);
    const raw = fs.readFileSync(`${image}.raw`);
    expect(raw.subarray(MiB, 2 * MiB).equals(patternBytes(MiB, 3))).toBe(true);
  });

  it('qmount umount of a busy mount names the process, changes nothing, and works once the file is closed; --force closes anyway', async () => {
    const image = makeQcow2(`busy-${backend}.qcow2`);
    const m = await mountImage(image, { foreground: false, readOnly: true });
    let fd = fs.openSync(m.rawPath, 'r');
    try {
      expect(listed().find((e) => e.pid === m.pid)?.mode).toBe('ro');
      const r = qmount('umount', m.dir);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`busy: in use by pid ${process.pid} \\(`));
      expect(isMounted(m.dir)).toBe(true);
      expect(processRunning(m.pid)).toBe(true);
      fs.readSync(fd, Buffer.alloc(512), 0, 512, 0); // still served
      fs.closeSync(fd);
      fd = -1;
      const r2 = qmount('umount', m.dir);
      expect(r2.code, r2.stderr).toBe(0);
      expect(processRunning(m.pid)).toBe(false);
    } finally {
      if (fd >= 0) fs.closeSync(fd);
      await m.unmount();
    }

    const m2 = await mountImage(image, { foreground: false, readOnly: true });
    const fd2 = fs.openSync(m2.rawPath, 'r');
    try {
      const r = qmount('umount', '--force', m2.dir);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toMatch(/--force: .*I\/O errors/);
      expect(processRunning(m2.pid)).toBe(false);
      expect(isMounted(m2.dir)).toBe(false);
      expect(() => fs.readSync(fd2, Buffer.alloc(512), 0, 512, 0)).toThrow();
    } finally {
      try {
        fs.closeSync(fd2);
      } catch {
        // the connection is gone
      }
      await m2.unmount();
    }
    expect(qmount('umount', m2.dir).code).toBe(1); // not a qmount mount any more
  });

  it('df and findmnt show the image as the source; -o umask=027 gives disk.raw 0640; generic mount options are accepted', async () => {
    const image = makeQcow2(`df-${backend}.qcow2`);
    const m = await mountImage(image, { extraArgs: ['-o', 'umask=027', '-o', 'rw,dev,suid,nofail,noatime,_netdev,x-systemd.automount,defaults'] });
    try {
      expect(fs.statSync(m.rawPath).mode & 0o777).toBe(0o640);
      expect(fs.statSync(m.dir).mode & 0o777).toBe(0o750);
      const df = spawnSync('df', ['--output=source', m.dir], { encoding: 'utf8' });
      expect(df.stdout.trim().split('\n').pop()).toBe(image);
      const fm = spawnSync('findmnt', ['-n', '-o', 'SOURCE,FSTYPE', m.dir], { encoding: 'utf8' });
      expect(fm.stdout.trim().split(/\s+/)).toEqual([image, 'fuse.qmount']);
    } finally {
      await m.unmount();
    }
    const bad = qmount('-f', '-o', 'nodev,bogus', image, scratch.dir);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/unknown mount option "bogus"/);
  });
});

describe('mount -t fuse.qmount and fstab (through mount.fuse)', () => {
  it('an fstab line (ro,noauto,nofail,_netdev,noatime) and mount -t fuse.qmount IMAGE DIR -o ro mount read-only; qmount umount ends them', () => {
    const image = makeQcow2('fstab.qcow2');
    spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 0 1M', image], { stdio: 'ignore' });
    const dir = fs.mkdtempSync(path.join(scratch.dir, 'mnt-'));
    const bin = fs.mkdtempSync(path.join(scratch.dir, 'bin-'));
    // What `npm link` gives: a qmount the helper finds on mount(8)'s fixed PATH (/usr/local/sbin is on it).
    fs.writeFileSync(path.join(bin, 'qmount'), `#!/bin/sh\nexec ${process.execPath} ${CLI} "$@"\n`, { mode: 0o755 });
    const fstab = path.join(scratch.dir, 'fstab');
    fs.writeFileSync(fstab, `${image} ${dir} fuse.qmount ro,noauto,nofail,_netdev,noatime 0 0\n`);
    // A private mount namespace: the bind mount over /usr/local/sbin and the FUSE mounts stay in it.
    const script = `
set -e
trap 'fusermount -uz ${dir} 2>/dev/null || true' EXIT
mount --bind ${bin} /usr/local/sbin
mount -T ${fstab} ${dir}
echo "fstab: $(findmnt -n -o SOURCE,FSTYPE,OPTIONS ${dir})"
echo "first: $(head -c 4 ${dir}/disk.raw)"
if dd if=/dev/zero of=${dir}/disk.raw bs=512 count=1 conv=notrunc status=none 2>/dev/null; then echo "write: ok"; else echo "write: refused"; fi
qmount umount ${dir}; echo "umount1: $?"
mount -t fuse.qmount ${image} ${dir} -o ro
echo "mount-t: $(findmnt -n -o SOURCE,FSTYPE,OPTIONS ${dir})"
echo "list: $(qmount list | grep -c ${dir})"
qmount umount ${dir}; echo "umount2: $?"
echo "after: $(findmnt -n ${dir} | wc -l)"
`;
    const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script], { encoding: 'utf8', env: { ...process.env, PATH }, timeout: 120_000 });
    const out = `${r.stdout}${r.stderr}`;
    expect(r.status, out).toBe(0);
    expect(out).toMatch(new RegExp(`^fstab: ${image} fuse\\.qmount ro,`, 'm'));
    expect(out).toMatch(/^first: aaaa$/m);
    expect(out).toMatch(/^write: refused$/m);
    expect(out).toMatch(/^umount1: 0$/m);
    expect(out).toMatch(new RegExp(`^mount-t: ${image} fuse\\.qmount ro,`, 'm'));
    expect(out).toMatch(/^list: 1$/m);
    expect(out).toMatch(/^umount2: 0$/m);
    expect(out).toMatch(/^after: 0$/m);
    const check = qemuCheck(image);
    expect(check.code, check.output).toBe(0);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
