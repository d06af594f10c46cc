/**
 * FUSE-level behaviour, run against both backends (fuse3: native/fuse3 on
 * libfuse 3; fuse-native: libfuse 2): request sizes and offsets checked
 * against qemu-img's view of a qcow2 image, O_DIRECT at queue depth 16 with
 * fio, SIGKILL, two mounts in one process, a full
 * request-buffer pool (fuse3), and a short fio --verify soak with
 * `qemu-img check` after (QMOUNT_SOAK_SECONDS=N for a longer one).
 * lseek/fallocate/truncate on both backends: test/e2e/sparse-fuse.test.ts.
 */
import { findMount, readMountsSync } from '../../mount/mountinfo.js';
import { execFile, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BACKENDS, detach, isMounted, makeMountDir, mountImage, logLines } from '../helpers/mount.js';
import { convertToRaw, qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';
import { MemDriver } from '../helpers/mem-driver.js';
import { mulberry32 } from '../helpers/workload.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const execFileP = promisify(execFile);
const SOAK_SECONDS = Number(process.env.QMOUNT_SOAK_SECONDS ?? 25);

let scratch: { dir: string; cleanup: () => void };

beforeAll(() => {
  scratch = scratchDir('fuse-backends');
});
afterAll(() => scratch.cleanup());


/** The 'closed' log line of a mount (stats, backend, fuse counters). */
function closedLine(log: string): Record<string, unknown> {
  const closed = logLines(log).find((l) => l.msg === 'closed');
  expect(closed, 'no closed line in the log').toBeDefined();
  return closed!;
}

/** A qcow2 image (64 KiB clusters) with data in some places, zeros and unallocated space elsewhere. */
function makeQcow2(name: string): string {
  const img = path.join(scratch.dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', img, String(SIZE));
  qemuIo(img, 'qcow2', ['write -P 0x5a 0 3M', 'write -P 0xa5 5M 1536k', 'write -z 8M 1M', 'write -P 0x33 12345678 777777', `write -P 0x77 ${SIZE - 70000} 70000`]);
  return img;
}

function fio(args: string[]): { status: number | null; out: string } {
  const r = spawnSync('fio', ['--output-format=normal', '--verify_state_save=0', ...args], { encoding: 'utf8' });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

describe.each(BACKENDS)('%s backend', (backend) => {
  const maxIo = backend === 'fuse3' ? MiB : 128 * 1024;

  it('reads and writes at many offsets and sizes up to 1 MiB match qemu-img (buffered and O_DIRECT)', async () => {
    const img = makeQcow2(`rw-${backend}.qcow2`);
    const model = convertToRaw(img, path.join(scratch.dir, `rw-${backend}.raw`));
    const log = path.join(scratch.dir, `rw-${backend}.log`);
    const m = await mountImage(img, { backend, extraArgs: ['--log-level', 'info', '--log-file', log] });
    const rand = mulberry32(11);
    const sizes = [1, 511, 512, 4095, 4096, 4097, 65535, 65536, 65537, 131072, 131073, 300000, MiB - 1, MiB];
    const mfd = fs.openSync(model, 'r+');
    try {
      const fd = fs.openSync(m.rawPath, 'r+');
      try {
        for (let i = 0; i < 120; i++) {
          const len = sizes[i % sizes.length]!;
          const pos = i % 7 === 0 ? SIZE - len + (i % 3) : Math.floor(rand() * (SIZE - len));
          const a = Buffer.alloc(len);
          const b = Buffer.alloc(len);
          const n = fs.readSync(fd, a, 0, len, pos);
          const nm = fs.readSync(mfd, b, 0, len, pos);
          expect(n, `read ${len} at ${pos}`).toBe(nm);
          expect(a.subarray(0, n).equals(b.subarray(0, nm)), `read ${len} at ${pos}`).toBe(true);
          if (i % 2 === 0 && pos + len <= SIZE) {
            const data = Buffer.alloc(len, (i * 37) & 0xff);
            for (let k = 0; k + 4 <= len; k += 4096) data.writeUInt32LE(i * 100000 + k, k);
            expect(fs.writeSync(fd, data, 0, len, pos)).toBe(len);
            fs.writeSync(mfd, data, 0, len, pos);
          }
        }
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.closeSync(mfd);
    }
    // O_DIRECT reads of 1 MiB bypass the page cache: each arrives as requests of the backend's largest size.
    const dd = spawnSync('dd', [`if=${m.rawPath}`, 'of=/dev/null', 'bs=1M', 'count=16', 'iflag=direct'], { encoding: 'utf8' });
    expect(dd.status, dd.stderr).toBe(0);
    const direct = spawnSync('sh', ['-c', `dd if=${m.rawPath} bs=1M count=64 iflag=direct status=none | cmp - ${model}`], { encoding: 'utf8' });
    expect(direct.status, direct.stdout + direct.stderr).toBe(0);
    await m.unmount();
    expect(await m.exited).toEqual({ code: 0, signal: null });
    const closed = closedLine(log);
    expect(closed.backend).toBe(backend);
    expect((closed.stats as { maxRead: number }).maxRead).toBe(maxIo);
    expect(qemuCheck(img).code).toBe(0);
    const cmp = qemuCompare(img, model, 'qcow2', 'raw');
    expect(cmp.same, cmp.output).toBe(true);
  });

  it('O_DIRECT random I/O at queue depth 16 (fio libaio, mixed sizes, crc32c verify)', () => {
    const img = makeQcow2(`qd16-${backend}.qcow2`);
    const log = path.join(scratch.dir, `qd16-${backend}.log`);
    return (async () => {
      const m = await mountImage(img, { backend, extraArgs: ['--log-level', 'info', '--log-file', log] });
      try {
        const r = fio([
          '--name=qd16', `--filename=${m.rawPath}`, '--direct=1', '--ioengine=libaio', '--iodepth=16',
          '--rw=randwrite', '--bssplit=4k/50:64k/30:1m/20', '--size=48M', '--verify=crc32c', '--verify_fatal=1',
          '--do_verify=1', '--randseed=7',
        ]);
        expect(r.status, r.out).toBe(0);
        expect(r.out).toMatch(/err= 0/);
        expect(r.out).not.toMatch(/verify: bad/);
      } finally {
        await m.unmount();
      }
      const closed = closedLine(log);
      expect((closed.stats as { writeErrors: number; readErrors: number }).writeErrors).toBe(0);
      if (backend === 'fuse3') {
        // Asynchronous direct I/O: the kernel queued several requests at once (libfuse 2 sends one at a time).
        expect((closed.fuse as { maxBatch: number }).maxBatch).toBeGreaterThan(1);
      }
      expect(qemuCheck(img).code).toBe(0);
    })();
  });

  it('the mount\'s read-ahead is raised to the largest request on fuse3 (left at the kernel default on fuse-native)', async () => {
    const img = makeQcow2(`ra-${backend}.qcow2`);
    const m = await mountImage(img, { backend, readOnly: true });
    try {
      const dev = findMount(readMountsSync(), fs.realpathSync(m.dir))!.device;
      const ra = () => Number(fs.readFileSync(`/sys/class/bdi/${dev}/read_ahead_kb`, 'utf8'));
      // Raised before the mount is reported ready: a reader started at once gets it.
      if (backend === 'fuse3') expect(ra()).toBe(1024);
      else expect(ra()).toBeLessThanOrEqual(128);
    } finally {
      await m.unmount();
    }
  });

  it('SIGKILL leaves a stale mount point; fsync\'d data survives and the image checks clean', async () => {
    const img = makeQcow2(`kill-${backend}.qcow2`);
    const m = await mountImage(img, { backend });
    const data = Buffer.alloc(MiB, 0xc3);
    const fd = fs.openSync(m.rawPath, 'r+');
    fs.writeSync(fd, data, 0, data.length, 20 * MiB);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    m.kill('SIGKILL');
    const st = await m.exited;
    expect(st.signal).toBe('SIGKILL');
    expect(() => fs.statSync(m.rawPath)).toThrow(/ENOTCONN/);
    await m.unmount(); // detaches the stale mount
    expect(isMounted(m.dir)).toBe(false);
    const check = qemuCheck(img);
    expect(check.code === 0 || check.code === 3, check.output).toBe(true);
    const back = Buffer.alloc(MiB);
    const raw = convertToRaw(img, path.join(scratch.dir, `kill-${backend}.raw`));
    const rfd = fs.openSync(raw, 'r');
    fs.readSync(rfd, back, 0, MiB, 20 * MiB);
    fs.closeSync(rfd);
    expect(back.equals(data)).toBe(true);
  });

  it('two mounts in one process serve at the same time and close cleanly', async () => {
    // This test process mounts both (the event loop serves them; the I/O below runs in child processes).
    const { MountSession } = await import('../../mount/session.js');
    const { openImage } = await import('../../src/formats/open.js');
    const { configureLogging, logger } = await import('../../src/log.js');
    const { parseMountOptions } = await import('../../mount/options.js');
    configureLogging({ level: 'silent' });
    const imgs = [makeQcow2(`two-a-${backend}.qcow2`), makeQcow2(`two-b-${backend}.qcow2`)];
    const dirs = imgs.map(() => fs.realpathSync(makeMountDir()));
    const sessions: Array<Awaited<ReturnType<typeof MountSession.mount>>> = [];
    try {
      for (let i = 0; i < 2; i++) {
        const driver = await openImage(imgs[i]!, { readOnly: false, log: logger('image') });
        sessions.push(await MountSession.mount(driver, dirs[i]!, { readOnly: false, mount: parseMountOptions([]), log: logger('mount'), backend }));
        expect(sessions[i]!.backendName).toBe(backend);
      }
      await Promise.all(
        dirs.map((d, i) =>
          execFileP('sh', ['-c', `dd if=/dev/zero bs=64k count=32 status=none | tr '\\0' '${String.fromCharCode(65 + i)}' | dd of=${d}/disk.raw bs=64k seek=16 conv=notrunc,fsync status=none`]),
        ),
      );
      const reads = await Promise.all(dirs.map((d) => execFileP('sh', ['-c', `dd if=${d}/disk.raw bs=64k skip=16 count=32 iflag=direct status=none | sha256sum`])));
      const want = (c: string) => spawnSync('sh', ['-c', `dd if=/dev/zero bs=64k count=32 status=none | tr '\\0' '${c}' | sha256sum`], { encoding: 'utf8' }).stdout;
      expect(reads[0]!.stdout).toBe(want('A'));
      expect(reads[1]!.stdout).toBe(want('B'));
      const codes = await Promise.all(sessions.map((s) => s.close('test done')));
      expect(codes).toEqual([0, 0]);
      for (const d of dirs) expect(isMounted(d)).toBe(false);
    } finally {
      for (const s of sessions) await s.close('cleanup');
      for (const d of dirs) {
        if (isMounted(d)) detach(d);
        fs.rmSync(d, { recursive: true, force: true });
      }
    }
    for (const img of imgs) expect(qemuCheck(img).code).toBe(0);
  });

  it('a request interrupted by killing its caller: the late answer is dropped, the mount goes on', async () => {
    // In this process, over a driver whose flush waits until released: fsync(2) is a synchronous,
    // interruptible FUSE request (unlike O_DIRECT and buffered reads, which go as background requests).
    const { MountSession } = await import('../../mount/session.js');
    const { configureLogging, logger } = await import('../../src/log.js');
    const { parseMountOptions } = await import('../../mount/options.js');
    configureLogging({ level: 'silent' });
    let release!: () => void;
    let flushes = 0;
    const held = new Promise<void>((r) => (release = r));
    const disk = Buffer.alloc(4 * MiB, 0x42);
    const driver = {
      format: 'raw', filename: 'fake', virtualSize: disk.length, readOnly: false,
      read: (buf: Buffer, off: number, len: number, pos: number) => Promise.resolve(void disk.copy(buf, off, pos, pos + len)),
      write: (buf: Buffer, off: number, len: number, pos: number) => Promise.resolve(void buf.copy(disk, pos, off, off + len)),
      flush: () => (++flushes === 1 ? held : Promise.resolve()),
      close: () => Promise.resolve(),
      info: () => ({}),
      allocatedBytes: () => disk.length,
    };
    const dir = fs.realpathSync(makeMountDir());
    const session = await MountSession.mount(driver as never, dir, { readOnly: false, mount: parseMountOptions([]), log: logger('mount'), backend });
    try {
      const py = `import os\nfd = os.open(${JSON.stringify(`${dir}/disk.raw`)}, os.O_RDWR)\nprint("syncing", flush=True)\nos.fsync(fd)`;
      const child = execFile('python3', ['-c', py]);
      const exited = new Promise<NodeJS.Signals | null>((r) => child.on('exit', (_c, sig) => r(sig)));
      await new Promise<void>((r) => child.stdout!.once('data', () => r()));
      // eslint-disable-next-line no-unmodified-loop-condition -- the driver's flush callback counts up
      while (flushes === 0) await new Promise((r) => setTimeout(r, 10));
      child.kill('SIGTERM');
      if (backend === 'fuse3') {
        const stats = () => (session as unknown as { backend: { stats(): { interrupts: number } } }).backend.stats();
        while (stats().interrupts === 0) await new Promise((r) => setTimeout(r, 10));
      }
      release(); // the answer to the interrupted fsync
      expect(await exited).toBe('SIGTERM');
      const r = await execFileP('sh', ['-c', `dd if=${dir}/disk.raw bs=4k count=1 skip=5 iflag=direct status=none | od -An -tx1 | head -1`]);
      expect(r.stdout.trim().split(/\s+/)[0]).toBe('42');
      expect(await session.close('test done')).toBe(0);
    } finally {
      release();
      await session.close('cleanup');
      if (isMounted(dir)) detach(dir);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it(`fio --verify=crc32c soak, mixed sizes and depths, ${SOAK_SECONDS} s: no errors, qemu-img check clean`, async () => {
    const img = path.join(scratch.dir, `soak-${backend}.qcow2`);
    qemuImg('create', '-q', '-f', 'qcow2', img, '256M');
    const log = path.join(scratch.dir, `soak-${backend}.log`);
    const m = await mountImage(img, { backend, extraArgs: ['--log-level', 'info', '--log-file', log] });
    try {
      const common = [`--filename=${m.rawPath}`, '--ioengine=libaio', '--verify=crc32c', '--verify_fatal=1', '--time_based', `--runtime=${SOAK_SECONDS}`, '--size=64M'];
      const r = fio([
        ...common,
        '--name=direct-mixed', '--direct=1', '--iodepth=16', '--rw=randrw', '--bssplit=4k/40:16k/20:128k/20:1m/20', '--offset=0',
        '--name=buffered-seq', '--direct=0', '--iodepth=1', '--rw=write', '--bs=256k', '--offset=64M',
        '--name=direct-qd1', '--direct=1', '--iodepth=1', '--rw=randwrite', '--bs=4k', '--offset=128M',
        '--name=direct-qd4-1m', '--direct=1', '--iodepth=4', '--rw=randwrite', '--bs=1m', '--offset=192M',
      ]);
      expect(r.status, r.out.slice(-3000)).toBe(0);
      expect(r.out).not.toMatch(/err= *[1-9]/);
      expect(r.out).not.toMatch(/verify: bad/);
    } finally {
      await m.unmount();
    }
    expect(await m.exited).toEqual({ code: 0, signal: null });
    const stats = closedLine(log).stats as { readErrors: number; writeErrors: number; handlerErrors: number; unanswered: number };
    expect(stats).toMatchObject({ readErrors: 0, writeErrors: 0, handlerErrors: 0, unanswered: 0 });
    const check = qemuCheck(img);
    expect(check.code, check.output).toBe(0);
  });
});

/**
 * Mount `driver` (a fake BlockDriver) in this process on the fuse3 backend, with `env` set in the
 * environment while mounting (the addon reads it then); stats() reads the addon's counters.
 */
async function mountInProcess(driver: object, readOnly: boolean, env: Record<string, string>) {
  const { MountSession } = await import('../../mount/session.js');
  const { configureLogging, logger } = await import('../../src/log.js');
  const { parseMountOptions } = await import('../../mount/options.js');
  configureLogging({ level: 'silent' });
  const dir = fs.realpathSync(makeMountDir());
  Object.assign(process.env, env);
  let session;
  try {
    session = await MountSession.mount(driver as never, dir, { readOnly, mount: parseMountOptions([]), log: logger('mount'), backend: 'fuse3' });
  } finally {
    for (const k of Object.keys(env)) delete process.env[k];
  }
  const stats = () => (session as unknown as { backend: { stats(): Record<string, number> } }).backend.stats();
  const cleanup = async (): Promise<void> => {
    await session.close('cleanup');
    if (isMounted(dir)) detach(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return { session, dir, stats, cleanup };
}

/** fio as a child process, without blocking this process's event loop (which serves the mount). */
function fioChild(args: string[]): Promise<{ stdout: string; failed?: true }> {
  return execFileP('fio', args).catch((err: { stdout?: string; stderr?: string }) => ({ stdout: `${err.stdout ?? ''}${err.stderr ?? ''}`, failed: true as const }));
}

/** fio O_DIRECT random writes then a crc32c verify of them over the mount in `dir` (as a child process); fails the test on any error. */
async function fioVerified(dir: string, args: string[]): Promise<void> {
  const r = await fioChild([
    '--output-format=normal', '--verify_state_save=0', '--name=verify', `--filename=${dir}/disk.raw`, '--direct=1', '--ioengine=libaio',
    '--rw=randwrite', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', ...args,
  ]);
  expect('failed' in r, r.stdout).toBe(false);
  expect(r.stdout).toMatch(/err= 0/);
}

describe('fuse3 request-buffer pool', () => {
  it('a pool of 2 buffers under O_DIRECT qd16: receiving pauses while it is full, every request is still answered', async () => {
    // In this process, over a driver that holds each request until two are waiting (or 50 ms passed,
    // for the tail), so both buffers are certainly taken at once; fio runs as a child process.
    const disk = Buffer.alloc(32 * MiB);
    let waiting: Array<() => void> = [];
    let timer: NodeJS.Timeout | undefined;
    const releaseAll = () => {
      clearTimeout(timer);
      const w = waiting;
      waiting = [];
      for (const f of w) f();
    };
    const hold = (work: () => void) =>
      new Promise<void>((resolve) => {
        waiting.push(() => {
          work();
          resolve();
        });
        if (waiting.length >= 2) setImmediate(releaseAll);
        else timer = setTimeout(releaseAll, 50);
      });
    const driver = {
      format: 'raw', filename: 'fake', virtualSize: disk.length, readOnly: false,
      read: (buf: Buffer, off: number, len: number, pos: number) => hold(() => disk.copy(buf, off, pos, pos + len)),
      write: (buf: Buffer, off: number, len: number, pos: number) => hold(() => buf.copy(disk, pos, off, off + len)),
      flush: () => Promise.resolve(),
      close: () => Promise.resolve(),
      info: () => ({}),
      allocatedBytes: () => disk.length,
    };
    const { session, dir, stats, cleanup } = await mountInProcess(driver, false, { QMOUNT_FUSE3_BUFFERS: '2' });
    try {
      await fioVerified(dir, ['--iodepth=16', '--bssplit=4k/50:1m/50', '--size=32M', '--randseed=3']);
      expect(stats().buffers).toBe(2);
      expect(stats().poolFull).toBeGreaterThan(0);
      expect(await session.close('test done')).toBe(0);
      expect(stats().pending).toBe(0);
    } finally {
      releaseAll();
      await cleanup();
    }
  });
});

describe('fuse3 reads answered from the image file (splice)', () => {
  it('reads of contiguous cached data up to fileReplyMax are spliced from the image, at any alignment; 1 MiB reads and the rest go through the buffer; every byte equals qemu-img', async () => {
    const { openImage } = await import('../../src/formats/open.js');
    const { InlinePolicy } = await import('../../src/io/file.js');
    const img = makeQcow2('splice.qcow2');
    const model = fs.readFileSync(convertToRaw(img, path.join(scratch.dir, 'splice.raw')));
    const d = await openImage(img, { readOnly: true });
    // Deterministic: inline calls always look fast (a busy machine would otherwise send some to the thread pool).
    (d as unknown as { s: { file: { policy: InstanceType<typeof InlinePolicy> } } }).s.file.policy = new InlinePolicy(() => 0);
    const { dir, stats, cleanup } = await mountInProcess(d, true, {});
    try {
      // Through a child (the event loop here serves the mount): O_DIRECT, so every request reaches us at its size and offset.
      const out = path.join(scratch.dir, 'splice.out');
      const K = 1024;
      // [bs, count, skip in bytes]. Data at [0, 3M) and [5M, 6.5M) lies contiguous in the file.
      const reads: Array<[number, number, number]> = [
        [MiB, 3, 0], // 1 MiB: does not fit the pipe (257 buffers with the header): pread
        [128 * K, 8, 0],
        [256 * K, 6, 5 * MiB],
        [66048, 16, 66048], // 64.5 KiB: every offset 512 past a page boundary
        [1016 * K, 1, 1016 * K], // fileReplyMax, page-aligned
        [1016 * K, 1, 512], // fileReplyMax at 512 past a page: 255 pages and the header fill the pipe exactly
        [256 * K, 4, 7 * MiB], // zeros / holes: not data, not spliced
      ];
      for (const [bs, count, skip] of reads) {
        await execFileP('dd', [`if=${dir}/disk.raw`, `of=${out}`, `bs=${bs}`, `count=${count}`, `skip=${skip}`, 'iflag=direct,skip_bytes', 'status=none']);
        const want = model.subarray(skip, skip + count * bs);
        expect(fs.readFileSync(out).equals(want), `dd bs=${bs} skip=${skip}B`).toBe(true);
      }
      const st = stats();
      // The pipe holds pipe-max-size (1 MiB unless raised: 256 pages); two pages stay for the header and a misaligned start.
      const pipeMax = Number(fs.readFileSync('/proc/sys/fs/pipe-max-size', 'utf8'));
      if (pipeMax >= MiB) expect(st.fileReplyMax).toBeGreaterThanOrEqual(1016 * K);
      const spliced = reads.filter(([bs], i) => bs <= st.fileReplyMax && i !== reads.length - 1).reduce((n, [, count]) => n + count, 0);
      expect(st.fileReplies).toBe(spliced);
      expect(st.fileReadErrors).toBe(0);
      expect(st.fileSendErrors).toBe(0);
      expect(st.toJs).toBeGreaterThanOrEqual(st.fileReplies + 3 + 4);
    } finally {
      await cleanup();
      await d.close();
    }
  });

  // A driver whose sendNow points the sink at the wrong file: past the end of an empty one (the splice reads nothing:
  // every read refused), or a directory (no splice_read: EINVAL, and splicing is off for the session after the first).
  it.each([
    { what: 'when reading the file fails, nothing is sent and the read is answered through the buffer instead', open: 'empty', refusals: 4 },
    { what: 'a file its file system cannot splice from (EINVAL) turns splicing off for the session after the first try', open: 'dir', refusals: 1 },
  ] as const)('$what', async ({ open, refusals }) => {
    let target = scratch.dir;
    if (open === 'empty') {
      target = path.join(scratch.dir, 'splice-empty');
      fs.writeFileSync(target, '');
    }
    const tfd = fs.openSync(target, 'r');
    const driver = new (class extends MemDriver {
      sendNow(length: number, _pos: number, sink: { send(fd: number, position: number, length: number): boolean }): boolean {
        return sink.send(tfd, 0, length);
      }
    })(8 * MiB);
    const want = Buffer.alloc(256 * 1024, 0x6b);
    await driver.write(want, 0, want.length, MiB);
    const { dir, stats, cleanup } = await mountInProcess(driver, true, {});
    try {
      const out = path.join(scratch.dir, `splice-${open}.out`);
      await execFileP('dd', [`if=${dir}/disk.raw`, `of=${out}`, 'bs=64k', 'count=4', 'skip=16', 'iflag=direct', 'status=none']);
      expect(fs.readFileSync(out).equals(want)).toBe(true);
      expect(stats().fileReadErrors).toBe(refusals);
      expect(stats().fileReplies).toBe(0);
    } finally {
      await cleanup();
      fs.closeSync(tfd);
    }
  });
});

describe('fuse3 request placement', () => {
  it("a write's data and a read's reply buffer start on a page boundary (and the data is right)", async () => {
    const misaligned = { writes: 0, reads: 0 };
    let writes = 0;
    const pageAligned = (buf: Buffer, off: number): boolean => (buf.byteOffset + off) % 4096 === 0;
    // The in-memory driver, noting where each request's buffer lies.
    const driver = new (class extends MemDriver {
      override read(buf: Buffer, off: number, len: number, pos: number): Promise<void> {
        if (!pageAligned(buf, off)) misaligned.reads++;
        return super.read(buf, off, len, pos);
      }
      override write(buf: Buffer, off: number, len: number, pos: number): Promise<void> {
        writes++;
        if (!pageAligned(buf, off)) misaligned.writes++;
        return super.write(buf, off, len, pos);
      }
    })(16 * MiB);
    const { dir, cleanup } = await mountInProcess(driver, false, {});
    try {
      await fioVerified(dir, ['--iodepth=4', '--bssplit=4k/30:64k/30:1m/40', '--size=16M', '--randseed=5']);
      expect(writes).toBeGreaterThan(10);
      expect(misaligned).toEqual({ writes: 0, reads: 0 });
    } finally {
      await cleanup();
    }
  });
});

describe('fuse3 adaptive polling', () => {
  it('a stream of requests answered in the same tick is caught by polling and never starves the event loop', async () => {
    // In this process, over a driver answering every request at once, so the receive loop could
    // go on polling for as long as fio keeps asking; a 5 ms timer must keep firing meanwhile.
    const disk = Buffer.alloc(32 * MiB, 0x5a);
    const driver = {
      format: 'raw', filename: 'fake', virtualSize: disk.length, readOnly: true,
      read: (buf: Buffer, off: number, len: number, pos: number) => {
        disk.copy(buf, off, pos, pos + len);
        return Promise.resolve();
      },
      write: () => Promise.reject(new Error('read-only')),
      flush: () => Promise.resolve(),
      close: () => Promise.resolve(),
      info: () => ({}),
      allocatedBytes: () => disk.length,
      blockStatus: (guestOffset: number, length: number) => Promise.resolve([{ guestOffset, length, data: true, zero: false, present: true, depth: 0 }]),
    };
    // A 5 ms window: every gap between fio's requests is caught, so only the loop's time budget gives the event loop its turn.
    const { session, dir, stats, cleanup } = await mountInProcess(driver, true, { QMOUNT_FUSE_POLL_US: '5000' });
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);
    try {
      const r = await fioChild([
        '--output-format=normal', '--name=poll', `--filename=${dir}/disk.raw`, '--direct=1', '--ioengine=psync', '--readonly',
        '--rw=randread', '--bs=4k', '--runtime=2', '--time_based',
      ]);
      clearInterval(timer);
      expect('failed' in r, r.stdout).toBe(false);
      expect(r.stdout).toMatch(/err= 0/);
      const st = stats();
      expect(st.received).toBeGreaterThan(1000);
      expect(st.pollHits).toBeGreaterThan(st.received / 2); // polling caught most requests
      // 2 s of a 5 ms timer is ~400 ticks (measured: ~450); without the time budget about 60.
      expect(ticks).toBeGreaterThan(150);
      expect(await session.close('test done')).toBe(0);
    } finally {
      clearInterval(timer);
      await cleanup();
    }
  });
});

describe('--fuse-backend auto without the fuse3 addon', () => {
  it('auto falls back to fuse-native with one warning saying why; fuse3 refuses to mount', async () => {
    // A copy of the built tree without native/fuse3 (node_modules and the locking addon linked in).
    const ROOT = path.resolve(import.meta.dirname, '..', '..');
    const tree = path.join(scratch.dir, 'no-fuse3');
    fs.mkdirSync(path.join(tree, 'native'), { recursive: true });
    fs.cpSync(path.join(ROOT, 'dist'), path.join(tree, 'dist'), { recursive: true });
    fs.copyFileSync(path.join(ROOT, 'package.json'), path.join(tree, 'package.json'));
    fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(tree, 'node_modules'));
    fs.symlinkSync(path.join(ROOT, 'native', 'ofd-lock'), path.join(tree, 'native', 'ofd-lock'));
    const cli = path.join(tree, 'dist', 'src', 'cli.js');
    const img = path.join(scratch.dir, 'fallback.raw');
    fs.writeFileSync(img, Buffer.alloc(MiB, 0x61));
    const dir = makeMountDir();
    const log = path.join(scratch.dir, 'fallback.log');
    const pidFile = path.join(scratch.dir, 'fallback.pid');
    try {
      const forced = spawnSync(process.execPath, [cli, '-f', '--fuse-backend', 'fuse3', img, dir], { encoding: 'utf8', timeout: 60_000 });
      expect(forced.status).toBe(2);
      expect(forced.stderr).toMatch(/^qmount: .*fuse3.*not built/m);
      expect(isMounted(dir)).toBe(false);
      const r = spawnSync(process.execPath, [cli, '--log-level', 'info', '--log-file', log, '--pid-file', pidFile, img, dir], { encoding: 'utf8', timeout: 60_000 });
      expect(r.status, r.stderr).toBe(0);
      expect(fs.readFileSync(path.join(dir, 'disk.raw')).equals(Buffer.alloc(MiB, 0x61))).toBe(true);
      const pid = Number(fs.readFileSync(pidFile, 'utf8'));
      expect(spawnSync('fusermount', ['-u', dir]).status).toBe(0);
      while (fs.existsSync(`/proc/${pid}`) && !/\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'))) await new Promise((res) => setTimeout(res, 20));
      const lines = logLines(log);
      const warnings = lines.filter((l) => typeof l.msg === 'string' && l.msg.includes('fuse3 backend unavailable'));
      expect(warnings).toHaveLength(1);
      expect(String(warnings[0]!.why)).toMatch(/not built/);
      expect(closedLine(log).backend).toBe('fuse-native');
    } finally {
      if (isMounted(dir)) detach(dir);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
