/**
 * The FUSE adapter and mount lifecycle, end to end with real FUSE mounts of
 * raw images (raw goes through the same adapter as every other format).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readMountsSync } from '../../mount/mountinfo.js';
import { BACKENDS, CLI, detach, isMounted, makeMountDir, mountImage, processRunning, useBackend, type MountedImage, logLines } from '../helpers/mount.js';
import { patternBytes, qemuImg, qemuIo, scratchDir, sha256File } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB + 4096 + 512; // not a multiple of the page size: exercises the short read at the end

let scratch: { dir: string; cleanup: () => void };
let original: Buffer;

/** A fresh raw image with known content. */
function makeImage(name: string): string {
  const p = path.join(scratch.dir, name);
  fs.writeFileSync(p, original);
  return p;
}

function readAll(p: string): Buffer {
  return fs.readFileSync(p);
}

function pread(p: string, len: number, pos: number): Buffer {
  const fd = fs.openSync(p, 'r');
  try {
    const b = Buffer.alloc(len);
    const n = fs.readSync(fd, b, 0, len, pos);
    return b.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

function pwrite(p: string, data: Buffer, pos: number): void {
  const fd = fs.openSync(p, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, pos);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}


async function withMount<T>(m: MountedImage, fn: (m: MountedImage) => Promise<T> | T): Promise<T> {
  try {
    return await fn(m);
  } finally {
    await m.unmount();
  }
}

beforeAll(() => {
  scratch = scratchDir('lifecycle');
  original = patternBytes(SIZE, 7);
});
afterAll(() => scratch.cleanup());

// Everything that goes through FUSE runs against both backends.
describe.each(BACKENDS)('%s backend', (backend) => {
  beforeAll(() => useBackend(backend));
  afterAll(() => useBackend(undefined));

  describe('reading and writing disk.raw', () => {
    it('a read-write mount shows exactly one file, disk.raw, 0600, with the image bytes', async () => {
      const img = makeImage('rw.raw');
      await withMount(await mountImage(img, { format: 'raw' }), (m) => {
        expect(fs.readdirSync(m.dir)).toEqual(['disk.raw']);
        const st = fs.statSync(m.rawPath);
        expect(st.isFile()).toBe(true);
        expect(st.size).toBe(SIZE);
        expect(st.mode & 0o777).toBe(0o600);
        expect(st.uid).toBe(process.getuid!());
        expect(fs.statSync(m.dir).mode & 0o777).toBe(0o700);
        expect(readAll(m.rawPath).equals(original)).toBe(true);
        // Reads reaching past the end are short; at the end they return nothing.
        expect(pread(m.rawPath, 8192, SIZE - 100).equals(original.subarray(SIZE - 100))).toBe(true);
        expect(pread(m.rawPath, 4096, SIZE).length).toBe(0);
        expect(() => fs.statSync(path.join(m.dir, 'other'))).toThrow(/ENOENT/);
      });
    });

    it('probes a file without magic as raw', async () => {
      const img = makeImage('probe.raw');
      await withMount(await mountImage(img, { readOnly: true }), (m) => {
        expect(sha256File(m.rawPath)).toBe(sha256File(img));
      });
    });

    it('writes through disk.raw land in the image (unaligned, across pages, at the end)', async () => {
      const img = makeImage('write.raw');
      const a = patternBytes(10_000, 1);
      const b = patternBytes(777, 2);
      const c = patternBytes(300, 3);
      await withMount(await mountImage(img, { format: 'raw' }), (m) => {
        pwrite(m.rawPath, a, 4095);
        pwrite(m.rawPath, b, 3 * MiB + 1);
        pwrite(m.rawPath, c, SIZE - c.length);
        expect(pread(m.rawPath, a.length, 4095).equals(a)).toBe(true);
        // A write crossing the end is cut short; one at the end gets ENOSPC.
        const fd = fs.openSync(m.rawPath, 'r+');
        try {
          expect(fs.writeSync(fd, Buffer.alloc(100, 0xee), 0, 100, SIZE - 10)).toBe(10);
          expect(() => fs.writeSync(fd, Buffer.alloc(10), 0, 10, SIZE)).toThrow(/ENOSPC/);
        } finally {
          fs.closeSync(fd);
        }
      });
      const want = Buffer.from(original);
      a.copy(want, 4095);
      b.copy(want, 3 * MiB + 1);
      c.copy(want, SIZE - c.length);
      want.fill(0xee, SIZE - 10);
      expect(fs.statSync(img).size).toBe(SIZE);
      expect(readAll(img).equals(want)).toBe(true);
    });

    it('truncate to the same size succeeds, shrinking over data fails (EPERM; EINVAL off 512); utimens is accepted, chmod is not', async () => {
      const img = makeImage('trunc.raw');
      await withMount(await mountImage(img, { format: 'raw' }), (m) => {
        fs.truncateSync(m.rawPath, SIZE);
        expect(() => fs.truncateSync(m.rawPath, SIZE - 1)).toThrow(/EINVAL/);
        expect(() => fs.truncateSync(m.rawPath, SIZE - 512)).toThrow(/EPERM/);
        expect(() => fs.truncateSync(m.rawPath, 0)).toThrow(/EPERM/);
        // dd without conv=notrunc opens with O_TRUNC and fails the same way.
        expect(() => fs.writeFileSync(m.rawPath, 'x')).toThrow(/EPERM/);
        fs.utimesSync(m.rawPath, new Date(), new Date());
        expect(() => fs.chmodSync(m.rawPath, 0o644)).toThrow(/ENOTSUP|EOPNOTSUPP/);
        expect(fs.statSync(m.rawPath).size).toBe(SIZE);
      });
      expect(readAll(img).equals(original)).toBe(true);
    });

    it('a read-only mount refuses writes with EROFS and leaves the image untouched', async () => {
      const img = makeImage('ro.raw');
      const before = fs.statSync(img).mtimeMs;
      await withMount(await mountImage(img, { format: 'raw', readOnly: true }), (m) => {
        expect(readAll(m.rawPath).equals(original)).toBe(true);
        expect(() => fs.openSync(m.rawPath, 'r+')).toThrow(/EROFS/);
        expect(() => fs.truncateSync(m.rawPath, SIZE)).toThrow(/EROFS/);
        expect(fs.statSync(m.rawPath).mode & 0o777).toBe(0o600);
      });
      expect(readAll(img).equals(original)).toBe(true);
      expect(fs.statSync(img).mtimeMs).toBe(before);
    });

    it('-o allow_other makes disk.raw 0644', async () => {
      const img = makeImage('other.raw');
      await withMount(await mountImage(img, { format: 'raw', readOnly: true, extraArgs: ['-o', 'allow_other'] }), (m) => {
        expect(fs.statSync(m.rawPath).mode & 0o777).toBe(0o644);
      });
    });

    it('a 1 MiB dd write arrives as requests larger than 4 KiB (big_writes, max_write)', async () => {
      const img = makeImage('dd.raw');
      const log = path.join(scratch.dir, `dd-${backend}.log`);
      const src = path.join(scratch.dir, 'dd.src');
      fs.writeFileSync(src, patternBytes(MiB, 9));
      await withMount(await mountImage(img, { format: 'raw', extraArgs: ['--log-level', 'info', '--log-file', log] }), (m) => {
        const r = spawnSync('dd', [`if=${src}`, `of=${m.rawPath}`, 'bs=1M', 'count=1', 'seek=1', 'conv=notrunc,fsync'], { encoding: 'utf8' });
        expect(r.status, r.stderr).toBe(0);
      });
      const closed = logLines(log).find((l) => l.msg === 'closed');
      const stats = closed?.stats as { writes: number; writeBytes: number; maxWrite: number; smallWrites: number };
      expect(closed?.backend).toBe(backend);
      expect(stats.writeBytes).toBe(MiB);
      expect(stats.smallWrites).toBe(0);
      expect(stats.maxWrite).toBeGreaterThan(4096);
      expect(stats.writes).toBeLessThanOrEqual(MiB / 65536);
      expect(readAll(img).subarray(MiB, 2 * MiB).equals(fs.readFileSync(src))).toBe(true);
    });

    it('SIGUSR1 logs the request counters so far (with the engine time) and the mount goes on', async () => {
      const img = makeImage('usr1.raw');
      const log = path.join(scratch.dir, `usr1-${backend}.log`);
      await withMount(await mountImage(img, { format: 'raw', extraArgs: ['--log-file', log] }), async (m) => {
        expect(pread(m.rawPath, 65536, 0).equals(original.subarray(0, 65536))).toBe(true);
        m.kill('SIGUSR1');
        let live: Record<string, unknown> | undefined;
        for (let i = 0; i < 200 && !live; i++) {
          await new Promise((r) => setTimeout(r, 25));
          live = fs.existsSync(log) ? logLines(log).find((l) => l.live === true) : undefined;
        }
        const stats = live?.stats as { reads: number; readBytes: number; readMicros: number; writes: number } | undefined;
        expect(stats, 'no counters line in the log').toBeDefined();
        expect(stats!.reads).toBeGreaterThan(0);
        expect(stats!.readBytes).toBeGreaterThanOrEqual(65536);
        expect(stats!.readMicros).toBeGreaterThan(0);
        expect(stats!.writes).toBe(0);
        expect(isMounted(m.dir)).toBe(true);
        expect(pread(m.rawPath, 4096, 8192).equals(original.subarray(8192, 12288))).toBe(true);
      });
    });

    it('a failing write answers that request with EIO; the mount goes on working', async () => {
      const img = makeImage('fault.raw');
      const env = { QMOUNT_FAULTS: JSON.stringify([{ point: 'data_write', errno: 'EIO', times: 1 }]) };
      await withMount(await mountImage(img, { format: 'raw', env, extraArgs: ['-o', 'direct_io'] }), (m) => {
        const fd = fs.openSync(m.rawPath, 'r+');
        try {
          expect(() => fs.writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 0)).toThrow(/EIO/);
          expect(fs.writeSync(fd, Buffer.alloc(4096, 2), 0, 4096, 8192)).toBe(4096);
        } finally {
          fs.closeSync(fd);
        }
        expect(pread(m.rawPath, 4096, 8192).equals(Buffer.alloc(4096, 2))).toBe(true);
      });
      const got = readAll(img);
      expect(got.subarray(0, 4096).equals(original.subarray(0, 4096))).toBe(true);
      expect(got.subarray(8192, 12288).equals(Buffer.alloc(4096, 2))).toBe(true);
    });
  });

  describe('read errors', () => {
    it('an unreadable cluster fails only its own reads with EIO, logged once; the rest stays readable', async () => {
      const CL = 65536;
      const img = path.join(scratch.dir, 'bad.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CL}`, img, '4M');
      qemuIo(img, 'qcow2', ['write -P 0x11 0 64k', 'write -P 0x22 64k 64k', 'write -P 0x33 128k 64k']);
      // Point guest cluster 1's L2 entry far past the end of the file: the driver must answer EIO.
      const fd = fs.openSync(img, 'r+');
      const hdr = Buffer.alloc(48);
      fs.readSync(fd, hdr, 0, 48, 0);
      const l1 = Number(hdr.readBigUInt64BE(40));
      const e = Buffer.alloc(8);
      fs.readSync(fd, e, 0, 8, l1);
      const l2 = Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
      e.writeBigUInt64BE(0x8000000000000000n | (1n << 40n));
      fs.writeSync(fd, e, 0, 8, l2 + 8);
      fs.closeSync(fd);
      const log = path.join(scratch.dir, `bad-${backend}.log`);
      await withMount(await mountImage(img, { readOnly: true, extraArgs: ['--log-level', 'error', '--log-file', log] }), (m) => {
        expect(() => pread(m.rawPath, 4096, CL)).toThrow(/EIO/);
        expect(() => pread(m.rawPath, 4096, CL)).toThrow(/EIO/);
        expect(pread(m.rawPath, CL, 0).equals(Buffer.alloc(CL, 0x11))).toBe(true);
        expect(pread(m.rawPath, CL, 2 * CL).equals(Buffer.alloc(CL, 0x33))).toBe(true);
        expect(pread(m.rawPath, 4096, 3 * CL).equals(Buffer.alloc(4096))).toBe(true);
      });
      const failed = logLines(log).filter((l) => l.msg === 'read failed');
      expect(failed.length).toBeGreaterThan(0);
      const offsets = failed.map((l) => l.guestOffset as number);
      expect(new Set(offsets).size).toBe(offsets.length);
      for (const o of offsets) expect(o).toBeLessThan(2 * CL);
    });
  });

  describe('ending a mount', () => {
    const ENDINGS: Array<[string, (m: MountedImage) => void]> = [
      ['umount DIR', (m) => expect(spawnSync('umount', [m.dir]).status).toBe(0)],
      ['fusermount -u DIR', (m) => expect(spawnSync('fusermount', ['-u', m.dir]).status).toBe(0)],
      ['SIGINT', (m) => m.kill('SIGINT')],
      ['SIGTERM', (m) => m.kill('SIGTERM')],
      ['SIGTERM twice and SIGINT during close', (m) => {
        m.kill('SIGTERM');
        m.kill('SIGTERM');
        m.kill('SIGINT');
      }],
    ];

    for (const [name, end] of ENDINGS) {
      it(`${name}: exit code 0, mount gone, data written before is in the image`, async () => {
        const img = makeImage(`end-${name.replace(/\W+/g, '-')}.raw`);
        const data = patternBytes(64 * 1024, 11);
        const m = await mountImage(img, { format: 'raw' });
        try {
          // No fsync: closing the mount must make this durable by itself.
          const fd = fs.openSync(m.rawPath, 'r+');
          fs.writeSync(fd, data, 0, data.length, MiB);
          fs.closeSync(fd);
          end(m);
          const st = await m.exited;
          expect(st).toEqual({ code: 0, signal: null });
          expect(isMounted(m.dir)).toBe(false);
          expect(m.stderr()).not.toMatch(/\n\s+at /);
        } finally {
          await m.unmount();
        }
        expect(readAll(img).subarray(MiB, MiB + data.length).equals(data)).toBe(true);
      });
    }

    it('SIGTERM while a file is open: names the process, keeps serving, ends cleanly once the file is closed', async () => {
      const img = makeImage('busy.raw');
      const m = await mountImage(img, { format: 'raw' });
      const fd = fs.openSync(m.rawPath, 'r+');
      let open = true;
      try {
        fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 0);
        m.kill('SIGTERM');
        // The busy notice itself (the JSON log line before it says 'still in use' too, and may come first).
        const notice = `in use by pid ${process.pid} (`;
        while (!m.stderr().includes(notice) && processRunning(m.pid)) await new Promise((r) => setTimeout(r, 20));
        expect(m.stderr()).toContain(notice);
        // Still served: a write and a read after the signal work.
        fs.writeSync(fd, Buffer.alloc(4096, 0x6b), 0, 4096, 4096);
        fs.fsyncSync(fd);
        const back = Buffer.alloc(4096);
        fs.readSync(fd, back, 0, 4096, 4096);
        expect(back.equals(Buffer.alloc(4096, 0x6b))).toBe(true);
        expect(processRunning(m.pid)).toBe(true);
        fs.closeSync(fd);
        open = false;
        // The retried plain unmount now succeeds.
        expect(await m.exited).toEqual({ code: 0, signal: null });
        expect(isMounted(m.dir)).toBe(false);
      } finally {
        if (open) fs.closeSync(fd);
        await m.unmount();
      }
      expect(readAll(img).subarray(0, 4096).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
      expect(readAll(img).subarray(4096, 8192).equals(Buffer.alloc(4096, 0x6b))).toBe(true);
    });

    it('daemon mode returns once the mount is ready and exits after unmount', async () => {
      const img = makeImage('daemon.raw');
      const m = await mountImage(img, { format: 'raw', foreground: false });
      try {
        // Ready means ready: no waiting here.
        expect(isMounted(m.dir)).toBe(true);
        expect(fs.statSync(m.rawPath).size).toBe(SIZE);
        pwrite(m.rawPath, Buffer.alloc(512, 0x77), 512);
        expect(processRunning(m.pid)).toBe(true);
        // The daemon left its start directory.
        expect(fs.readlinkSync(`/proc/${m.pid}/cwd`)).toBe('/');
      } finally {
        await m.unmount();
      }
      expect(processRunning(m.pid)).toBe(false);
      expect(readAll(img).subarray(512, 1024).equals(Buffer.alloc(512, 0x77))).toBe(true);
    });

    it('a stale FUSE mount point is named as such', async () => {
      const img = makeImage('stale.raw');
      const m = await mountImage(img, { format: 'raw', readOnly: true });
      try {
        m.kill('SIGKILL');
        await m.exited;
        expect(() => fs.statSync(m.dir)).toThrow(/ENOTCONN/);
        const dir2 = m.dir;
        const r = spawnSync(process.execPath, [CLI, '-f', img, dir2], { encoding: 'utf8' });
        expect(r.status).toBe(1);
        expect(r.stderr).toMatch(/^qmount: .*stale FUSE mount.*\n$/);
      } finally {
        detach(m.dir);
        await m.unmount();
      }
      expect(isMounted(m.dir)).toBe(false);
    });

    it('mounting on a directory already mounted or not empty is refused', async () => {
      const img = makeImage('busy2.raw');
      const m = await mountImage(img, { format: 'raw', readOnly: true });
      const other = makeMountDir();
      try {
        const r = spawnSync(process.execPath, [CLI, '-f', '-r', img, m.dir], { encoding: 'utf8' });
        expect(r.status).toBe(1);
        expect(r.stderr).toMatch(/^qmount: .*(already mounted|not empty).*\n$/);
        fs.writeFileSync(path.join(other, 'x'), 'x');
        const r2 = spawnSync(process.execPath, [CLI, img, other], { encoding: 'utf8' });
        expect(r2.status).toBe(1);
        expect(r2.stderr).toBe(`qmount: ${other}: mount point is not empty\n`);
        expect(isMounted(other)).toBe(false);
      } finally {
        await m.unmount();
        fs.rmSync(other, { recursive: true, force: true });
      }
    });
  });
});

it('leaves no qmount mounts behind', () => {
  const prefix = path.join(os.tmpdir(), `qmount-mnt-${process.pid}-`);
  const ours = readMountsSync().filter((e) => e.fsType === 'fuse.qmount' && e.mountPoint.startsWith(prefix));
  expect(ours).toEqual([]);
});
