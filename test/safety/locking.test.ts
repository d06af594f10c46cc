/**
 * Image locking against real QEMU processes (see src/io/lock.ts).
 *
 * The oracle is QEMU itself: qemu-io holds images open (read-write, read-only,
 * -U) while qmount mounts them, and the other way round, and the lock bytes
 * each holds are read from /proc/PID/fdinfo, so "interoperates with QEMU"
 * means "takes the very bytes qemu-io takes and honours the ones it holds".
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { lockBytes, lockImageFile } from '../../src/io/lock.js';
import { CLI, detach, mountImage, processRunning, qmountDaemon, type MountedImage } from '../helpers/mount.js';
import { patternBytes, qemuImg, qemuIo, run, scratchDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let scratch: { dir: string; cleanup: () => void };
let base: string;
let top: string;
let plain: string;
let qed: string;

/** "fe:00:1234" as /proc prints a file's device and inode. */
function devIno(file: string): string {
  const st = fs.statSync(file);
  const major = Math.floor(st.dev / 256) & 0xfff;
  const minor = (st.dev & 0xff) | (Math.floor(st.dev / 4096) & 0xfff00);
  return `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino}`;
}

/** The lock bytes process `pid` holds on `file`, sorted (from /proc/PID/fdinfo/*). */
function heldBytes(pid: number, file: string): number[] {
  const want = devIno(file);
  const bytes = new Set<number>();
  let fds: string[] = [];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fdinfo`);
  } catch {
    return [];
  }
  for (const fd of fds) {
    let text = '';
    try {
      text = fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n')) {
      const m = /^lock:\s+\d+:\s+OFDLCK\s+\S+\s+READ\s+\S+\s+(\S+)\s+(\d+)\s+(\d+)/.exec(line);
      if (!m || m[1] !== want) continue;
      for (let b = Number(m[2]); b <= Number(m[3]); b++) bytes.add(b);
    }
  }
  return [...bytes].sort((a, b) => a - b);
}

/** Every lock any process holds on `file` (from /proc/locks). */
function anyLocks(file: string): string[] {
  const want = devIno(file);
  return fs.readFileSync('/proc/locks', 'utf8').split('\n').filter((l) => l.includes(` ${want} `));
}

interface Holder {
  pid: number;
  /** The lock bytes it holds on `file` now. */
  held(file: string): number[];
  /** Quit qemu-io (end of its input) and wait for it. */
  close(): Promise<void>;
}

const holders = new Set<ChildProcess>();

/**
 * qemu-io with `image` open (interactive, so it stays open) until close(); resolves once its locks are
 * taken and settled. QEMU locks a backing file after the image and finalizes permissions after the
 * whole chain is open, so "settled" is: every file in `files` (default: the image) holds a lock, and
 * the bytes held on all of them read the same on two polls in a row.
 */
async function holdWithQemuIo(
  image: string,
  format: string,
  extra: string[] = [],
  { files = [image], cwd }: { files?: string[]; cwd?: string } = {},
): Promise<Holder> {
  const child = spawn('qemu-io', ['-f', format, ...extra, image], { cwd, stdio: ['pipe', 'ignore', 'pipe'] });
  holders.add(child);
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const snapshot = () => files.map((f) => heldBytes(child.pid!, f));
  let last = '';
  let settled = false;
  for (let i = 0; i < 250 && !settled; i++) {
    if (child.exitCode !== null) throw new Error(`qemu-io exited early: ${err}`);
    const now = snapshot();
    const key = JSON.stringify(now);
    settled = now.every((b) => b.length > 0) && key === last;
    last = key;
    if (!settled) await sleep(20);
  }
  if (!settled) throw new Error(`qemu-io took no settled lock on ${files.join(', ')}: ${last} ${err}`);
  return {
    pid: child.pid!,
    held: (file) => heldBytes(child.pid!, file),
    close: async () => {
      child.stdin!.end('quit\n');
      const timeout = sleep(10_000).then(() => 'timeout');
      if ((await Promise.race([exited, timeout])) === 'timeout') child.kill('SIGKILL');
      await exited;
      holders.delete(child);
    },
  };
}

function qmountInfo(args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, 'info', ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

async function withMount<T>(m: MountedImage, fn: (m: MountedImage) => Promise<T> | T): Promise<T> {
  try {
    return await fn(m);
  } finally {
    await m.unmount();
  }
}

async function withHolder<T>(h: Holder, fn: (h: Holder) => Promise<T> | T): Promise<T> {
  try {
    return await fn(h);
  } finally {
    await h.close();
  }
}

/** qemu-io's one-shot write: the QEMU error text when it cannot, '' when it could. */
function qemuIoWrite(image: string, format = 'qcow2'): string {
  const r = run('qemu-io', ['-f', format, '-c', 'write -P 0x11 0 512', image], { allowFail: true });
  return r.code === 0 ? '' : (r.stderr + r.stdout).trim();
}

function qemuImgInfo(image: string, extra: string[] = []): string {
  const r = run('qemu-img', ['info', ...extra, image], { allowFail: true });
  return r.code === 0 ? '' : (r.stderr + r.stdout).trim();
}

beforeAll(() => {
  scratch = scratchDir('locking');
  base = path.join(scratch.dir, 'base.qcow2');
  top = path.join(scratch.dir, 'top.qcow2');
  plain = path.join(scratch.dir, 'plain.qcow2');
  qed = path.join(scratch.dir, 'plain.qed');
  const data = path.join(scratch.dir, 'data.bin');
  fs.writeFileSync(data, patternBytes(MiB, 7));
  qemuImg('create', '-q', '-f', 'qcow2', base, String(4 * MiB));
  qemuIo(base, 'qcow2', [`write -s ${data} 0 ${MiB}`]);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top);
  qemuIo(top, 'qcow2', ['write -P 0x5a 65536 65536']);
  qemuImg('create', '-q', '-f', 'qcow2', plain, String(4 * MiB));
  qemuImg('create', '-q', '-f', 'qed', qed, String(4 * MiB));
  qemuIo(qed, 'qed', ['write -P 0x33 0 8192']);
});

afterAll(() => {
  for (const c of holders) c.kill('SIGKILL');
  scratch?.cleanup();
});

describe('lock bytes: qmount takes what qemu-io takes', () => {
  const cases: Array<{ name: string; qmount: string[]; qemuIo: string[]; top: number[]; base: number[] }> = [
    { name: 'read-write', qmount: [], qemuIo: [], top: [100, 101, 103, 201, 203], base: [100, 201, 203] },
    { name: 'read-only', qmount: ['-r'], qemuIo: ['-r'], top: [100, 201, 203], base: [100, 201, 203] },
    { name: 'read-only --force-share', qmount: ['-r', '--force-share'], qemuIo: ['-r', '-U'], top: [100], base: [100] },
  ];
  for (const c of cases) {
    it(`${c.name}: image and backing file`, async () => {
      const q = await holdWithQemuIo(top, 'qcow2', c.qemuIo, { files: [top, base] });
      const fromQemu = await withHolder(q, () => ({ top: q.held(top), base: q.held(base) }));
      expect(fromQemu).toEqual({ top: c.top, base: c.base });
      await withMount(await mountImage(top, { extraArgs: c.qmount }), (m) => {
        expect({ top: heldBytes(m.pid, top), base: heldBytes(m.pid, base) }).toEqual(fromQemu);
      });
    });
  }

  it('the data-file modes are the bytes qemu-io takes on a qcow2 external data file (read-write and read-only)', async () => {
    const dir = path.join(scratch.dir, 'df');
    fs.mkdirSync(dir);
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'data_file=df.data', 'df.qcow2', '1M'], { cwd: dir });
    const image = path.join(dir, 'df.qcow2');
    const data = path.join(dir, 'df.data');
    for (const [args, mode] of [[[], 'data-write'], [['-r'], 'data-read']] as const) {
      // qemu-io resolves the data file name against its working directory: open it from there.
      const q = await holdWithQemuIo('df.qcow2', 'qcow2', [...args], { files: [data], cwd: dir });
      const seen = await withHolder(q, () => q.held(data));
      expect(seen, mode).toEqual(lockBytes(mode));
    }
    expect(heldBytes(process.pid, image)).toEqual([]);
  });

  it('QED images are locked the same way (locking is below the format)', async () => {
    await withMount(await mountImage(qed), (m) => expect(heldBytes(m.pid, qed)).toEqual([100, 101, 103, 201, 203]));
  });

  it('in-process: a second open of the same file conflicts although it is the same process (OFD locks)', () => {
    const a = fs.openSync(plain, 'r');
    const b = fs.openSync(plain, 'r');
    try {
      expect(lockImageFile(a, plain, 'plain', 'write')).toEqual({ locked: true });
      expect(() => lockImageFile(b, plain, 'plain', 'write')).toThrow(/in use by .*does not allow writers; cannot open it read-write/);
      expect(() => lockImageFile(b, plain, 'plain', 'read')).toThrow(/force-share/);
      const shared = lockImageFile(b, plain, 'plain', 'shared-read');
      expect(shared.locked).toBe(true);
      expect(shared.inUseBy).toBeDefined();
    } finally {
      fs.closeSync(a);
      fs.closeSync(b);
    }
    // Closing the descriptors dropped every lock.
    expect(anyLocks(plain)).toEqual([]);
  });
});

describe('a running QEMU writer keeps qmount out', () => {
  it('read-write mount refused, read-only refused, read-only --force-share mounts with a warning', async () => {
    const q = await holdWithQemuIo(top, 'qcow2');
    await withHolder(q, async () => {
      const rw = await qmountDaemon([], top);
      expect(rw.code).toBe(2);
      expect(rw.stderr.trim().split('\n')).toHaveLength(1);
      expect(rw.stderr).toMatch(/^qmount: .*top\.qcow2: image is in use by qemu-io \(pid \d+\), which does not allow writers; cannot open it read-write\n$/);

      const ro = await qmountDaemon(['-r'], top);
      expect(ro.code).toBe(2);
      expect(ro.stderr).toMatch(/^qmount: .*in use by qemu-io \(pid \d+\), which is writing it; to read it anyway, open it read-only with --force-share/);
      expect(ro.stderr.trim().split('\n')).toHaveLength(1);

      // --force-share without -r is a usage error, checked before anything is opened.
      const rwShare = await qmountDaemon(['--force-share'], top);
      expect(rwShare).toEqual({ code: 1, stderr: 'qmount: --force-share needs a read-only mount (-r)\n' });

      // Daemon mode: the warning comes from the parent, the mount succeeds.
      const daemon = await qmountDaemon(['-r', '--force-share'], top);
      expect(daemon.code).toBe(0);
      expect(daemon.stderr).toMatch(/^qmount: warning: .*top\.qcow2 is being written by qemu-io \(pid \d+\); --force-share: the mount may see inconsistent data\n$/);

      // Foreground: the mount itself warns, and reads work (the overlay's data and the backing file's).
      await withMount(await mountImage(top, { extraArgs: ['-r', '--force-share'] }), (m) => {
        expect(m.stderr()).toMatch(/qmount: warning: .*being written by qemu-io/);
        const raw = fs.readFileSync(m.rawPath);
        expect(raw.subarray(65536, 131072).equals(Buffer.alloc(65536, 0x5a))).toBe(true);
        expect(raw.subarray(0, 65536).equals(patternBytes(MiB, 7).subarray(0, 65536))).toBe(true);
      });
    });
  });

  it('qmount info refuses an image being written unless --force-share, as qemu-img info does without -U', async () => {
    const q = await holdWithQemuIo(plain, 'qcow2');
    await withHolder(q, () => {
      const refused = qmountInfo([plain]);
      expect(refused.code).toBe(2);
      expect(refused.stderr).toMatch(/^qmount: .*plain\.qcow2: image is in use by qemu-io .*--force-share/);
      expect(qemuImgInfo(plain)).toMatch(/Failed to get shared "write" lock/);
      const forced = qmountInfo(['--force-share', plain]);
      expect(forced.code).toBe(0);
      expect(forced.stdout).toContain('file format: qcow2');
    });
  });

  it('a QEMU reader keeps a read-write qmount out but lets a read-only one in', async () => {
    const q = await holdWithQemuIo(plain, 'qcow2', ['-r']);
    await withHolder(q, async () => {
      const rw = await qmountDaemon([], plain);
      expect(rw.code).toBe(2);
      expect(rw.stderr).toMatch(/in use by qemu-io \(pid \d+\), which does not allow writers/);
      await withMount(await mountImage(plain, { readOnly: true }), (m) => expect(m.stderr()).not.toMatch(/warning/));
    });
  });

  it('a QEMU writer on the backing file keeps a mount of the overlay out', async () => {
    const q = await holdWithQemuIo(base, 'qcow2');
    await withHolder(q, async () => {
      const r = await qmountDaemon([], top);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/base\.qcow2: image is in use by qemu-io .*which is writing it/);
    });
  });
});

describe('a qmount writer keeps QEMU and other qmounts out', () => {
  it('qemu-img info and qemu-io writes fail with QEMU lock errors; -U reads; the backing file is read-locked', async () => {
    await withMount(await mountImage(top), () => {
      expect(qemuImgInfo(top)).toMatch(/Failed to get shared "write" lock/);
      expect(qemuIoWrite(top)).toMatch(/Failed to get "write" lock/);
      expect(qemuImgInfo(top, ['-U'])).toBe('');
      // The backing file: readers welcome, writers not.
      expect(qemuImgInfo(base)).toBe('');
      expect(qemuIoWrite(base)).toMatch(/Failed to get "write" lock/);
    });
    // After unmount nothing is left locked: QEMU can write both again.
    expect(anyLocks(top)).toEqual([]);
    expect(anyLocks(base)).toEqual([]);
    expect(qemuIoWrite(top)).toBe('');
    expect(qemuIoWrite(base)).toBe('');
  });

  it('a second read-write qmount of the same image is refused, naming qmount; a read-only one too; after unmount both work', async () => {
    await withMount(await mountImage(plain), async (first) => {
      const second = await qmountDaemon([], plain);
      expect(second.code).toBe(2);
      expect(second.stderr).toMatch(new RegExp(`in use by qmount \\(pid ${first.pid}\\), which does not allow writers; cannot open it read-write`));
      const ro = await qmountDaemon(['-r'], plain);
      expect(ro.code).toBe(2);
      expect(ro.stderr).toMatch(/in use by qmount .*which is writing it/);
      expect((await qmountDaemon(['-r', '--force-share'], plain)).code).toBe(0);
    });
    expect(anyLocks(plain)).toEqual([]);
    expect(await qmountDaemon([], plain)).toEqual({ code: 0, stderr: '' });
  });

  it('a read-only qmount keeps QEMU writers away; a --force-share one does not', async () => {
    await withMount(await mountImage(plain, { readOnly: true }), () => {
      expect(qemuIoWrite(plain)).toMatch(/Failed to get "write" lock/);
      expect(qemuImgInfo(plain)).toBe('');
    });
    // The exited process's other threads may still hold its file table (and the locks) a moment.
    for (let i = 0; i < 100 && anyLocks(plain).length > 0; i++) await sleep(50);
    await withMount(await mountImage(plain, { extraArgs: ['-r', '--force-share'] }), () => {
      expect(qemuIoWrite(plain)).toBe('');
    });
  });

  it('SIGKILL of a read-write qmount releases its locks (they belong to its file descriptor)', async () => {
    const m = await mountImage(plain);
    try {
      expect(qemuIoWrite(plain)).toMatch(/Failed to get "write" lock/);
      m.kill('SIGKILL');
      for (let i = 0; i < 100 && processRunning(m.pid); i++) await sleep(50);
      // The thread-group leader can look gone while its other threads are
      // still exiting and holding the file table: give the kernel a moment.
      for (let i = 0; i < 100 && anyLocks(plain).length > 0; i++) await sleep(50);
      expect(anyLocks(plain)).toEqual([]);
      expect(qemuIoWrite(plain)).toBe('');
    } finally {
      detach(m.dir);
      await m.unmount();
    }
  });

  it('QED: a qemu-io writer keeps a read-write qmount out', async () => {
    const q = await holdWithQemuIo(qed, 'qed');
    await withHolder(q, async () => {
      const r = await qmountDaemon([], qed);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/plain\.qed: image is in use by qemu-io/);
    });
  });
});
