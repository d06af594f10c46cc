/**
 * qcow2 header features on write, corruption handling and `qmount check`
 * agreement with `qemu-img check` (engine level; QEMU judges the result).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/formats/open.js';
import { checkImage } from '../../src/formats/check.js';
import { parseHeader, serializeHeader } from '../../src/formats/qcow2/header.js';
import { logger } from '../../src/log.js';
import { qemuCheck, qemuImg, qemuIo, run, scratchDir, sha256File, readAt, writeAt } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
let s: { dir: string; cleanup: () => void };
beforeAll(() => (s = scratchDir('qfeat')));
afterAll(() => s.cleanup());

let n = 0;
function create(opts = '', size = 16 * MiB): string {
  const image = path.join(s.dir, `f${n++}.qcow2`);
  qemuImg('create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), image, String(size));
  return image;
}
const incompat = (f: string): bigint => readAt(f, 72, 8).readBigUInt64BE();
const autoclear = (f: string): bigint => readAt(f, 88, 8).readBigUInt64BE();
const u64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};

describe('header features on write', () => {
  it('lazy_refcounts: dirty bit on disk after the first write, cleared on clean close', async () => {
    const image = create('lazy_refcounts=on');
    const d = await openImage(image, { readOnly: false });
    expect(incompat(image) & 1n).toBe(0n);
    await d.write(Buffer.alloc(70000, 7), 0, 70000, 12345);
    await d.flush();
    expect(incompat(image) & 1n).toBe(1n);
    await d.close();
    expect(incompat(image) & 1n).toBe(0n);
    expect(qemuCheck(image).code).toBe(0);
  });

  it('a read-write open of a dirty image left by a killed writer repairs it; read-only changes nothing', async () => {
    const image = create('lazy_refcounts=on,cluster_size=4k');
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 0 2M', '-c', 'sigraise 9', image], { allowFail: true });
    expect(incompat(image) & 1n).toBe(1n);
    expect(qemuCheck(image).code).not.toBe(0);
    const before = sha256File(image);
    const ro = await openImage(image, { readOnly: true });
    const b = Buffer.alloc(4096);
    await ro.read(b, 0, 4096, 0);
    await ro.close();
    expect(b.every((x) => x === 0x55)).toBe(true);
    expect(sha256File(image)).toBe(before);
    const rw = await openImage(image, { readOnly: false });
    await rw.close();
    expect(incompat(image) & 1n).toBe(0n);
    const c = qemuCheck(image);
    expect(c.code, c.output).toBe(0);
  });

  it('unknown autoclear bits and persistent bitmaps are cleared before the first write; unknown extensions survive', async () => {
    const image = create();
    qemuImg('bitmap', '--add', image, 'b0');
    // Add an unknown header extension and an unknown autoclear bit.
    const head = readAt(image, 0, 65536);
    const h = parseHeader(head, fs.statSync(image).size);
    h.extensions.push({ type: 0x0badcafe, data: Buffer.from('keep me') });
    h.autoclear |= 1n << 5n;
    writeAt(image, 0, serializeHeader(h, 65536));
    expect(autoclear(image)).toBe(0b100001n);

    const d = await openImage(image, { readOnly: false });
    await d.write(Buffer.alloc(512, 1), 0, 512, 0);
    expect(autoclear(image)).toBe(0n); // on disk before the write returned
    await d.close();
    const after = parseHeader(readAt(image, 0, 65536), fs.statSync(image).size);
    const ext = after.extensions.find((e) => e.type === 0x0badcafe);
    expect(ext?.data.toString()).toBe('keep me');
    expect(after.extensions.some((e) => e.type === 0x23852875)).toBe(false);
    const c = qemuCheck(image);
    expect(c.code, c.output).toBe(0);
    const info = JSON.parse(qemuImg('info', '--output=json', image)) as { 'format-specific': { data: { bitmaps?: unknown[] } } };
    expect(info['format-specific'].data.bitmaps ?? []).toEqual([]);
  });
});

describe('corruption', () => {
  it('a write that would overlap metadata sets the corrupt bit, fails with EIO, and reads go on', async () => {
    const image = create('cluster_size=4k');
    qemuIo(image, 'qcow2', ['write -P 0x42 0 64k']);
    // Lie about the L2 table: refcount 0. The allocator still never offers a
    // cluster it knows as metadata, so a new cluster lands elsewhere.
    const h = parseHeader(readAt(image, 0, 4096), fs.statSync(image).size);
    const l2 = Number(readAt(image, h.l1TableOffset, 8).readBigUInt64BE() & 0x00fffffffffffe00n);
    const block = Number(readAt(image, h.refcountTableOffset, 8).readBigUInt64BE());
    writeAt(image, block + (l2 / 4096) * 2, Buffer.alloc(2));
    // And an L2 entry (guest cluster 20) that names the L2 table itself as its own data cluster.
    writeAt(image, l2 + 20 * 8, Buffer.from((0x8000000000000000n | BigInt(l2)).toString(16).padStart(16, '0'), 'hex'));
    const d = await openImage(image, { readOnly: false });
    await d.write(Buffer.alloc(4096, 9), 0, 4096, 8 * MiB);
    const back = Buffer.alloc(4096);
    await d.read(back, 0, 4096, 8 * MiB);
    expect(back.every((x) => x === 9)).toBe(true);
    // The in-place write into "cluster 20" would overwrite the L2 table: refused, image marked corrupt.
    await expect(d.write(Buffer.alloc(4096, 9), 0, 4096, 20 * 4096)).rejects.toMatchObject({ errno: 'EIO' });
    const b = Buffer.alloc(65536);
    await d.read(b, 0, b.length, 0);
    expect(b.every((x) => x === 0x42)).toBe(true);
    await expect(d.write(Buffer.alloc(512, 9), 0, 512, 0)).rejects.toMatchObject({ errno: 'EIO' });
    await d.close();
    expect(incompat(image) & 2n).toBe(2n);
    await expect(openImage(image, { readOnly: false })).rejects.toMatchObject({ errno: 'EROFS' });
    const ro = await openImage(image, { readOnly: true });
    await ro.read(b, 0, b.length, 0);
    await ro.close();
    expect(b.every((x) => x === 0x42)).toBe(true);
  });

  it('clusters of a refcount table that grew away are reused without a false overlap (the image stays healthy)', async () => {
    // 512-byte clusters: the first table (cluster 1) covers 8 MiB of file; 10 MiB of data moves it.
    const image = create('cluster_size=512', 24 * MiB);
    const tableBefore = readAt(image, 48, 8).readBigUInt64BE();
    const d = await openImage(image, { readOnly: false });
    const b = Buffer.alloc(65536, 7);
    for (let off = 0; off < 10 * MiB; off += b.length) await d.write(b, 0, b.length, off);
    await d.flush(); // the old table's clusters leave quarantine: the next single cluster is one of them
    await d.write(b, 0, 512, 20 * MiB);
    const got = Buffer.alloc(512);
    await d.read(got, 0, 512, 20 * MiB);
    await d.close();
    expect(got.equals(b.subarray(0, 512))).toBe(true);
    expect(readAt(image, 48, 8).readBigUInt64BE()).not.toBe(tableBefore);
    expect(incompat(image) & 2n).toBe(0n); // not marked corrupt
    const c = qemuCheck(image);
    expect(c.code, c.output).toBe(0);
  });

  it('a refcount that would overflow refcount_bits=1 fails cleanly and changes nothing', async () => {
    const image = create('refcount_bits=1,cluster_size=4k');
    qemuIo(image, 'qcow2', ['write -P 1 0 4k']);
    const d = await openImage(image, { readOnly: false });
    const rc = (d as unknown as { writer: { refcounts: { change(c: number, delta: number): Promise<number>; get(c: number): Promise<number> } } }).writer.refcounts;
    expect(await rc.get(0)).toBe(1);
    await expect(rc.change(0, 1)).rejects.toMatchObject({ errno: 'EOVERFLOW' });
    expect(await rc.get(0)).toBe(1);
    await d.close();
    expect(qemuCheck(image).code).toBe(0);
  });
});

describe('qmount check agrees with qemu-img check', () => {
  const log = logger('test');
  function qemuCounts(image: string): { code: number; leaks: number; errors: number } {
    const r = run('qemu-img', ['check', '--output=json', image], { allowFail: true });
    const j = JSON.parse(r.stdout) as { leaks?: number; corruptions?: number };
    return { code: r.code, leaks: j.leaks ?? 0, errors: j.corruptions ?? 0 };
  }
  function damaged(kind: 'leak' | 'low' | 'copied'): string {
    const image = create('cluster_size=4k');
    qemuIo(image, 'qcow2', ['write -P 3 0 256k']);
    qemuImg('snapshot', '-c', 'snap', image);
    const h = parseHeader(readAt(image, 0, 4096), fs.statSync(image).size);
    const block = Number(readAt(image, h.refcountTableOffset, 8).readBigUInt64BE());
    const end = Math.floor(fs.statSync(image).size / 4096);
    if (kind === 'leak') {
      // Three clusters appended to the file, referenced by nothing, claim refcount 1.
      fs.truncateSync(image, (end + 3) * 4096);
      for (let c = end; c < end + 3; c++) writeAt(image, block + c * 2, Buffer.from([0, 1]));
    } else if (kind === 'low') {
      const l2 = Number(readAt(image, h.l1TableOffset, 8).readBigUInt64BE() & 0x00fffffffffffe00n);
      const first = Number(readAt(image, l2, 8).readBigUInt64BE() & 0x00fffffffffffe00n);
      writeAt(image, block + (first / 4096) * 2, Buffer.from([0, 1])); // 2 references, refcount 1
    } else {
      const l1 = readAt(image, h.l1TableOffset, 8).readBigUInt64BE();
      writeAt(image, h.l1TableOffset, u64(l1 | (1n << 63n))); // COPIED on a shared L2 table
    }
    return image;
  }

  for (const kind of ['leak', 'low', 'copied'] as const) {
    it(`same counts and exit code on an image with damage "${kind}", and --repair all makes both clean`, async () => {
      const image = damaged(kind);
      const q = qemuCounts(image);
      const r = await checkImage(image, { repair: 'none', log });
      expect({ leaks: r.leaks, errors: r.corruptions }).toEqual({ leaks: q.leaks, errors: q.errors });
      expect(q.leaks + q.errors).toBeGreaterThan(0);
      const cli = run('node', ['dist/src/cli.js', 'check', image], { allowFail: true });
      expect(cli.code).toBe(q.code);
      const fixed = await checkImage(image, { repair: 'all', log });
      expect(fixed.corruptions + fixed.leaks).toBe(0);
      expect(qemuCheck(image).code).toBe(0);
    });
  }
});

describe('locks held by check and on external data files', () => {
  const log = logger('test');
  /** A qemu-io holding `file` open read-write (format fmt) until killed. */
  async function qemuHolds(file: string, fmt: string): Promise<() => void> {
    const { spawn } = await import('node:child_process');
    // Interactive qemu-io keeps the image open while its standard input is.
    const p = spawn('qemu-io', ['-f', fmt, file], { stdio: ['pipe', 'ignore', 'ignore'] });
    // Wait until its OFD locks on the file show in /proc/locks.
    const ino = fs.statSync(file).ino;
    const locked = (): boolean => fs.readFileSync('/proc/locks', 'utf8').split('\n').some((l) => l.includes('OFDLCK') && l.includes(`:${ino} `));
    for (let i = 0; i < 200 && !locked(); i++) await new Promise((r) => setTimeout(r, 25));
    if (!locked()) throw new Error('qemu-io took no lock');
    return () => p.kill('SIGKILL');
  }

  it('check --repair is refused while QEMU writes the image; a plain check is refused too, like qemu-img check', async () => {
    const image = create('cluster_size=4k');
    const release = await qemuHolds(image, 'qcow2');
    try {
      await expect(checkImage(image, { repair: 'all', log })).rejects.toMatchObject({ errno: 'EBUSY' });
      await expect(checkImage(image, { repair: 'none', log })).rejects.toMatchObject({ errno: 'EBUSY' });
    } finally {
      release();
    }
    await new Promise((r) => setTimeout(r, 200));
    expect((await checkImage(image, { repair: 'none', log })).corruptions).toBe(0);
  });

  it('an external data file in use by a QEMU writer of another image keeps a read-write open out', async () => {
    // Two qcow2 images naming one data file: QEMU locks the data file as a
    // data child (it does not share resize), and so does qmount.
    const data = path.join(s.dir, `shared-${n}.data`);
    const a = create(`data_file=${data}`);
    const b = create(`data_file=${data}`);
    const release = await qemuHolds(a, 'qcow2');
    try {
      await expect(openImage(b, { readOnly: false })).rejects.toMatchObject({ errno: 'EBUSY' });
    } finally {
      release();
    }
    await new Promise((r) => setTimeout(r, 200));
    const d = await openImage(b, { readOnly: false });
    await d.close();
  });
});
