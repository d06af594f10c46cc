/**
 * Offsets at or above 2^52 in every kind of 64-bit entry (issue 10), and
 * `qmount check` parity with `qemu-img check` on entries that break the
 * format's rules.
 *
 * Before the fix, an L2 entry pointing at 2^55 made a read-write mount write
 * the guest's data over the qcow2 header (Node's fs takes an unsafe position
 * as the current file position, 0). The rules checked here:
 *  - the header still says qcow2/QED after any write;
 *  - a write that needs such a mapping fails (EIO) and marks a qcow2 v3 image
 *    corrupt; QED has no corrupt bit, so there the write only fails;
 *  - reads of the bad range fail with EIO, the rest of the disk reads right;
 *  - `qemu-img check` after our write is no worse than after QEMU's own
 *    write (qemu-io) of the same data to a copy of the same damaged image.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmountError } from '../../src/errors.js';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { CLI, mountImage } from '../helpers/mount.js';
import { patternBytes, qemuImg, qemuIo, readAt, run, scratchDir, writeAt } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let scratch: { dir: string; cleanup: () => void };
let n = 0;
beforeAll(() => (scratch = scratchDir('hostile')));
afterAll(() => scratch?.cleanup());

const be64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};
const le64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
};
const hdr64 = (p: string, off: number): number => Number(readAt(p, off, 8).readBigUInt64BE(0));

function fresh(tag: string, createOpts: string[], size = '64M', format = 'qcow2'): string {
  const p = path.join(scratch.dir, `${tag}-${n++}.${format}`);
  qemuImg('create', '-q', '-f', format, ...createOpts, p, size);
  return p;
}

/** File offset of the L2 entry of guest cluster `gc` (L1 index 0's table; standard entries). */
function l2EntryAt(p: string, gc: number, entryBytes = 8): number {
  const l1 = hdr64(p, 40);
  const l2 = Number(readAt(p, l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
  if (l2 === 0) throw new Error('no L2 table for L1 index 0');
  return l2 + gc * entryBytes;
}

interface CheckResult {
  code: number;
  corruptions: number;
}
function qemuCheckJson(p: string, format = 'qcow2'): CheckResult {
  const r = run('qemu-img', ['check', '-f', format, '--output=json', p], { allowFail: true });
  let corruptions = -1;
  try {
    corruptions = (JSON.parse(r.stdout) as { corruptions?: number }).corruptions ?? 0;
  } catch {
    // not JSON: qemu-img could not open the image
  }
  return { code: r.code, corruptions };
}

function headerOk(p: string, format: 'qcow2' | 'qed'): void {
  const magic = readAt(p, 0, 4);
  if (format === 'qcow2') {
    expect(magic.toString('latin1')).toBe('QFI\xfb');
    expect([2, 3]).toContain(readAt(p, 4, 4).readUInt32BE(0));
  } else {
    expect(magic.toString('latin1')).toBe('QED\0');
  }
  const info = JSON.parse(run('qemu-img', ['info', '-U', '--output=json', p]).stdout) as { format: string };
  expect(info.format).toBe(format);
}

function corruptBit(p: string): boolean {
  return (readAt(p, 72, 8).readBigUInt64BE(0) & 2n) !== 0n;
}

/** Write through a real mount; returns the errno the writer saw, or null. */
async function writeThroughMount(image: string, offset: number, data: Buffer, format?: 'qcow2' | 'qed'): Promise<string | null> {
  const m = await mountImage(image, { format, extraArgs: ['--log-level', 'silent'] });
  let errno: string | null = null;
  try {
    const fd = fs.openSync(m.rawPath, 'r+');
    try {
      fs.writeSync(fd, data, 0, data.length, offset);
      fs.fsyncSync(fd);
    } catch (err) {
      errno = (err as NodeJS.ErrnoException).code ?? 'unknown';
    } finally {
      fs.closeSync(fd);
    }
  } finally {
    await m.unmount();
  }
  return errno;
}

/** The same write done by QEMU on a copy; its check result is the bar ours must meet. */
function qemuBar(damaged: string, offset: number, length: number, format = 'qcow2'): CheckResult {
  const copy = `${damaged}.qemu`;
  fs.copyFileSync(damaged, copy);
  run('qemu-io', ['-f', format, '-c', `write -P 0x5a ${offset} ${length}`, copy], { allowFail: true });
  return qemuCheckJson(copy, format);
}

function expectNoWorse(ours: CheckResult, bar: CheckResult): void {
  // exit 0 (clean) < 3 (leaks only) < 2 (corruptions) < 1 (cannot check)
  const rank = (c: number): number => ({ 0: 0, 3: 1, 2: 2 })[c] ?? 3;
  expect(rank(ours.code), `qemu-img check exit ${ours.code} after qmount, ${bar.code} after qemu-io`).toBeLessThanOrEqual(rank(bar.code));
  if (bar.corruptions >= 0) expect(ours.corruptions).toBeLessThanOrEqual(bar.corruptions);
}

async function readRange(d: BlockDriver, offset: number, length: number): Promise<string | Buffer> {
  const buf = Buffer.alloc(length);
  try {
    await d.read(buf, 0, length, offset);
    return buf;
  } catch (err) {
    return (err as QmountError).errno ?? 'thrown';
  }
}

describe('the reproductions of issue 10 (real mounts)', () => {
  const cases: Array<{ name: string; create: string[]; poke: (p: string) => number; touchesMapping: boolean }> = [
    { name: 'L2[0] -> 2^55, 64 KiB clusters', create: [], poke: () => 262144, touchesMapping: true },
    { name: 'L1 entry 64 -> 2^55, 512-byte clusters (offset 2048, iotest 138)', create: ['-o', 'cluster_size=512'], poke: () => 2048, touchesMapping: false },
    { name: 'L2[0] -> 2^55, 512-byte clusters', create: ['-o', 'cluster_size=512'], poke: (p) => l2EntryAt(p, 0), touchesMapping: true },
    { name: 'iotest 080 entry 0xbfffffffffff0000 at 262144', create: [], poke: () => 262144, touchesMapping: true },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const p = fresh('repro', c.create);
      qemuIo(p, 'qcow2', ['write 0 512']);
      const at = c.poke(p);
      writeAt(p, at, c.name.includes('0xbfff') ? be64(0xbfffffffffff0000n) : be64(0x8080000000000000n));
      const bar = qemuBar(p, 0, 64 * KiB);
      const errno = await writeThroughMount(p, 0, Buffer.alloc(64 * KiB, 0x5a));
      headerOk(p, 'qcow2');
      if (c.touchesMapping) {
        expect(errno).toBe('EIO');
        expect(corruptBit(p)).toBe(true);
      } else {
        expect(errno).toBeNull();
      }
      expectNoWorse(qemuCheckJson(p), bar);
    });
  }
});

describe('every entry kind at or above 2^52 (engine)', () => {
  it('L1 entry: reads of its range fail with EIO, a write there marks the image corrupt, the rest works', async () => {
    const p = fresh('l1', [], '1G'); // L1 entry 0 maps the first 512 MiB
    qemuIo(p, 'qcow2', ['write -P 0x11 0 64k', 'write -P 0x22 600M 64k']);
    writeAt(p, hdr64(p, 40), be64(0x8010000000000000n)); // L1[0] -> 2^52
    const d = await openImage(p, { readOnly: false });
    try {
      expect(await readRange(d, 0, 4096)).toBe('EIO');
      expect(await readRange(d, 600 * MiB, 4096)).toEqual(Buffer.alloc(4096, 0x22));
      await expect(d.write(Buffer.alloc(4096, 1), 0, 4096, 4096)).rejects.toMatchObject({ errno: 'EIO' });
      await expect(d.write(Buffer.alloc(4096, 1), 0, 4096, 600 * MiB)).rejects.toMatchObject({ errno: 'EIO' }); // corrupt now: refused
    } finally {
      await d.close();
    }
    headerOk(p, 'qcow2');
    expect(corruptBit(p)).toBe(true);
  });

  it('compressed descriptor: reads fail with EIO, an overwrite marks the image corrupt and releases nothing', async () => {
    const p = fresh('comp', []);
    const src = path.join(scratch.dir, `comp-${n++}.raw`);
    fs.writeFileSync(src, patternBytes(64 * KiB, 5));
    qemuIo(p, 'qcow2', [`write -c -s ${src} 0 64k`, `write -c -s ${src} 64k 64k`]);
    writeAt(p, l2EntryAt(p, 0), be64(0x4000000000000000n | (1n << 53n))); // offset bits: 2^53
    const d = await openImage(p, { readOnly: false });
    try {
      expect(await readRange(d, 0, 4096)).toBe('EIO');
      expect(await readRange(d, 64 * KiB, 64 * KiB)).toEqual(patternBytes(64 * KiB, 5));
      await expect(d.write(Buffer.alloc(64 * KiB, 1), 0, 64 * KiB, 0)).rejects.toMatchObject({ errno: 'EIO' });
    } finally {
      await d.close();
    }
    headerOk(p, 'qcow2');
    expect(corruptBit(p)).toBe(true);
  });

  it('extended L2 entry: the same as a standard one', async () => {
    const p = fresh('extl2', ['-o', 'extended_l2=on']);
    qemuIo(p, 'qcow2', ['write -P 0x33 0 64k']);
    writeAt(p, l2EntryAt(p, 0, 16), be64(0x8080000000000000n));
    const bar = qemuBar(p, 0, 4096);
    const d = await openImage(p, { readOnly: false });
    try {
      expect(await readRange(d, 0, 4096)).toBe('EIO');
      await expect(d.write(Buffer.alloc(4096, 1), 0, 4096, 0)).rejects.toMatchObject({ errno: 'EIO' });
    } finally {
      await d.close();
    }
    headerOk(p, 'qcow2');
    expectNoWorse(qemuCheckJson(p), bar);
  });

  it('refcount table entry: an allocating write marks the image corrupt; check reports it like qemu-img', async () => {
    const p = fresh('reftable', []);
    qemuIo(p, 'qcow2', ['write -P 0x44 0 64k']);
    writeAt(p, hdr64(p, 48), be64(1n << 55n)); // refcount table entry 0
    const ours = spawnSync(process.execPath, [CLI, 'check', p], { encoding: 'utf8' });
    expect(ours.status).toBe(qemuCheckJson(p).code);
    expect(ours.stdout).toMatch(/refcount table entry 0/);
    const d = await openImage(p, { readOnly: false });
    try {
      expect(await readRange(d, 0, 4096)).toEqual(Buffer.alloc(4096, 0x44)); // reads need no refcounts
      await expect(d.write(Buffer.alloc(4096, 1), 0, 4096, 32 * MiB)).rejects.toMatchObject({ errno: 'EIO' });
    } finally {
      await d.close();
    }
    headerOk(p, 'qcow2');
    expect(corruptBit(p)).toBe(true);
  });

  it('64-bit refcount: check reports what qemu-img does (a leak and a COPIED mismatch)', () => {
    const p = fresh('rc64', ['-o', 'refcount_bits=64']);
    qemuIo(p, 'qcow2', ['write -P 0x55 0 64k']);
    const block = hdr64(p, hdr64(p, 48)); // refcount block 0
    const dataCluster = Number(readAt(p, l2EntryAt(p, 0), 8).readBigUInt64BE(0) & 0x00fffffffffffe00n) / 65536;
    writeAt(p, block + dataCluster * 8, be64(1n << 60n));
    const ours = spawnSync(process.execPath, [CLI, 'check', p], { encoding: 'utf8' });
    // qemu-img: the leak, and the COPIED flag that no longer matches "refcount is 1"
    expect(qemuCheckJson(p)).toEqual({ code: 2, corruptions: 1 });
    expect(ours.status).toBe(2);
    expect(ours.stdout).toMatch(/Leaked cluster/);
    expect(ours.stdout).toMatch(/OFLAG_COPIED/);
  });

  it('snapshot table: an L1 offset at 2^52 fails the open with one line', async () => {
    const p = fresh('snap', []);
    qemuIo(p, 'qcow2', ['write 0 64k']);
    qemuImg('snapshot', '-c', 's1', p);
    writeAt(p, hdr64(p, 64), be64(1n << 52n));
    const r = spawnSync(process.execPath, [CLI, 'info', p], { encoding: 'utf8' });
    expect(r.status).not.toBe(0);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^qmount: .*snapshot 0: l1_table_offset 0x10000000000000 is too large/);
  });

  it('QED L2 entry: reads and writes of the cluster fail with EIO, nothing is written, check agrees with qemu-img', async () => {
    const p = fresh('qed', [], '64M', 'qed');
    qemuIo(p, 'qed', ['write -P 0x66 0 128k']);
    const l1 = Number(readAt(p, 40, 8).readBigUInt64LE(0));
    const l2 = Number(readAt(p, l1, 8).readBigUInt64LE(0));
    writeAt(p, l2, le64(1n << 55n));
    const before = fs.readFileSync(p);
    const d = await openImage(p, { readOnly: false, format: 'qed' });
    try {
      expect(await readRange(d, 0, 4096)).toBe('EIO');
      expect(await readRange(d, 64 * KiB, 4096)).toEqual(Buffer.alloc(4096, 0x66));
      await expect(d.write(Buffer.alloc(4096, 1), 0, 4096, 0)).rejects.toMatchObject({ errno: 'EIO' });
    } finally {
      await d.close();
    }
    headerOk(p, 'qed');
    // Only the need-check bit may have changed (set and cleared again): the tables are as they were.
    expect(fs.readFileSync(p).subarray(64)).toEqual(before.subarray(64));
    const ours = spawnSync(process.execPath, [CLI, 'check', p], { encoding: 'utf8' });
    expect(ours.status).toBe(qemuCheckJson(p, 'qed').code);
  });
});

describe('qmount check agrees with qemu-img check', () => {
  const ext = (p: string): number => l2EntryAt(p, 0, 16);
  const cases: Array<{ name: string; build(): string; message: RegExp }> = [
    {
      name: 'extended L2: subclusters both allocated and zero',
      build: () => {
        const p = fresh('c-az', ['-o', 'extended_l2=on'], '4M');
        qemuIo(p, 'qcow2', ['write -P 1 0 64k']);
        writeAt(p, ext(p) + 8, Buffer.from([0, 0, 0, 1]));
        return p;
      },
      message: /both allocated and zero/,
    },
    {
      name: 'extended L2: allocation bit in an unallocated cluster',
      build: () => {
        const p = fresh('c-ua', ['-o', 'extended_l2=on'], '4M');
        qemuIo(p, 'qcow2', ['write -P 1 0 64k']);
        writeAt(p, ext(p) + 16 + 12, Buffer.from([0, 0, 0, 1]));
        return p;
      },
      message: /unallocated cluster has subclusters marked allocated/,
    },
    {
      name: 'extended L2: compressed cluster with a subcluster bitmap (iotest 271)',
      build: () => {
        const p = fresh('c-cb', ['-o', 'extended_l2=on'], '4M');
        qemuIo(p, 'qcow2', ['write -c -P 1 0 64k']);
        writeAt(p, ext(p) + 12, Buffer.from([0, 0, 0, 1]));
        return p;
      },
      message: /non-zero subcluster bitmap/,
    },
    {
      name: 'v3 snapshot with 8 bytes of extra data (iotest 261)',
      build: () => {
        const p = fresh('c-sn', [], '4M');
        qemuIo(p, 'qcow2', ['write -P 1 0 64k']);
        qemuImg('snapshot', '-c', 'snap1', p);
        const so = hdr64(p, 64);
        const e = readAt(p, so, 256);
        const extra = e.readUInt32BE(36);
        const ids = e.readUInt16BE(12) + e.readUInt16BE(14);
        const entry = Buffer.concat([e.subarray(0, 36), Buffer.from([0, 0, 0, 8]), e.subarray(40, 48), e.subarray(40 + extra, 40 + extra + ids)]);
        writeAt(p, so, Buffer.concat([entry, Buffer.alloc(256 - entry.length)]));
        return p;
      },
      message: /snapshot table entry 0 is incomplete/,
    },
    {
      name: 'L2 entry with reserved bits set',
      build: () => {
        const p = fresh('c-rb', [], '4M');
        qemuIo(p, 'qcow2', ['write -P 1 0 64k']);
        const at = l2EntryAt(p, 0);
        writeAt(p, at + 7, Buffer.from([readAt(p, at + 7, 1)[0]! | 0x02]));
        return p;
      },
      message: /reserved bits/,
    },
  ];
  for (const c of cases) {
    it(c.name, () => {
      const p = c.build();
      const theirs = qemuCheckJson(p);
      expect(theirs.code).toBe(2);
      const ours = spawnSync(process.execPath, [CLI, 'check', p], { encoding: 'utf8' });
      expect(ours.status).toBe(2);
      expect(ours.stdout).toMatch(c.message);
    });
  }

  const unopenable: Array<{ name: string; format: 'qcow2' | 'qed'; at: number; bytes: Buffer; message: RegExp }> = [
    { name: 'unknown incompatible bit', format: 'qcow2', at: 72, bytes: be64(1n << 8n), message: /unsupported incompatible feature/ },
    { name: 'encryption', format: 'qcow2', at: 32, bytes: Buffer.from([0, 0, 0, 1]), message: /encrypted/ },
    { name: 'data-file bit without a name', format: 'qcow2', at: 72, bytes: be64(4n), message: /external data file/ },
    { name: 'unknown QED feature', format: 'qed', at: 16, bytes: le64(1n << 40n), message: /unsupported incompatible features/ },
  ];
  for (const c of unopenable) {
    it(`exits 1 with the reason, as qemu-img does, on an image it cannot open: ${c.name}`, () => {
      const p = fresh('u', [], '4M', c.format);
      writeAt(p, c.at, c.bytes);
      expect(qemuCheckJson(p, c.format).code).toBe(1);
      const ours = spawnSync(process.execPath, [CLI, 'check', p], { encoding: 'utf8' });
      expect(ours.status).toBe(1);
      expect(ours.stderr.trim().split('\n')).toHaveLength(1);
      expect(ours.stderr).toMatch(c.message);
    });
  }

  it('exits 63 only for raw images', () => {
    const p = path.join(scratch.dir, `raw-${n++}.img`);
    fs.writeFileSync(p, Buffer.alloc(MiB));
    const ours = spawnSync(process.execPath, [CLI, 'check', p], { encoding: 'utf8' });
    expect(ours.status).toBe(63);
  });
});

describe('one line on refusal', () => {
  it('a read-write mount of a dirty image whose refcount table entry is invalid prints exactly one qmount: line', () => {
    const p = fresh('dirty', ['-o', 'lazy_refcounts=on']);
    qemuIo(p, 'qcow2', ['write -P 1 0 64k']);
    writeAt(p, 72, be64(BigInt(hdr64(p, 72)) | 1n)); // dirty
    writeAt(p, hdr64(p, 48), be64((1n << 52n) + 65536n));
    const dir = fs.mkdtempSync(path.join(scratch.dir, 'mnt-'));
    const before = fs.readFileSync(p);
    const r = spawnSync(process.execPath, [CLI, '-f', p, dir], { encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(2);
    const lines = r.stderr.trim().split('\n');
    expect(lines, r.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/^qmount: .*not closed cleanly.*refcount table entry 0/);
    expect(fs.readFileSync(p).equals(before)).toBe(true);
  });
});
