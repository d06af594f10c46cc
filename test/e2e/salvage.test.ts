/**
 * --salvage on five damages made with plain writes into images qemu-img
 * made: an L2 table past the end of the file, a misaligned L1 entry, a data
 * cluster past the end, a compressed cluster that does not decompress, a
 * missing backing file. For each: the damage report (`qmount info
 * --salvage`, the mount's log) names exactly the damaged guest ranges; a
 * --salvage mount reads them as zeros and everything else exactly like the
 * undamaged original (and like `qemu-img convert --salvage` where QEMU opens
 * the image); a plain read-only mount fails reads of damaged ranges with EIO
 * and serves the rest; the image file is never changed.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, logLines, mountImage } from '../helpers/mount.js';
import { lseekOnce } from '../helpers/sparse-tools.js';
import { convertToRaw, qemuImg, qemuIo, readAt, run, scratchDir, sha256File, writeAt } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const CLUSTER = 4096;
/** guest bytes one L2 table maps with 4 KiB clusters */
const SPAN = (CLUSTER / 8) * CLUSTER;
const SIZE = 16 * MiB;
const OFFSET_MASK = 0x00fffffffffffe00n;

let scratch: { dir: string; cleanup: () => void };

function qmount(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const u64 = (v: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
};
const l1Offset = (p: string): number => Number(readAt(p, 40, 8).readBigUInt64BE(0));
const l1Entry = (p: string, i: number): bigint => readAt(p, l1Offset(p) + 8 * i, 8).readBigUInt64BE(0);
const l2EntryAt = (p: string, guest: number): number => Number(l1Entry(p, Math.floor(guest / SPAN)) & OFFSET_MASK) + 8 * ((guest % SPAN) / CLUSTER);

interface Range {
  start: number;
  length: number;
  reason: RegExp;
}

interface Case {
  name: string;
  image: string;
  /** the undamaged guest content */
  reference: string;
  expected: Range[];
  /** QEMU opens the image: compare with qemu-img convert --salvage */
  qemuOpens: boolean;
}

const cases: Case[] = [];

/** Every MiB a different byte, so a misplaced range shows. */
function fillPattern(image: string): void {
  const cmds: string[] = [];
  for (let i = 0; i < SIZE / MiB; i++) cmds.push(`write -P ${i + 1} ${i * MiB} 1M`);
  qemuIo(image, 'qcow2', cmds);
}

beforeAll(() => {
  scratch = scratchDir('salvage');
  const d = (n: string) => path.join(scratch.dir, n);
  const orig = d('orig.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, orig, String(SIZE));
  fillPattern(orig);
  const ref = convertToRaw(orig, d('orig.raw'));

  const l2 = d('l2-past-eof.qcow2');
  fs.copyFileSync(orig, l2);
  writeAt(l2, l1Offset(l2) + 8 * 2, u64((1n << 63n) | (1n << 32n)));
  cases.push({ name: 'L2 table past the end of the file', image: l2, reference: ref, qemuOpens: true, expected: [{ start: 2 * SPAN, length: SPAN, reason: /L2 table offset 0x100000000 lies past the end of the file/ }] });

  const l1 = d('l1-misaligned.qcow2');
  fs.copyFileSync(orig, l1);
  writeAt(l1, l1Offset(l1) + 8 * 3, u64(l1Entry(l1, 3) + 512n));
  cases.push({ name: 'misaligned L1 entry', image: l1, reference: ref, qemuOpens: true, expected: [{ start: 3 * SPAN, length: SPAN, reason: /L2 table offset 0x[0-9a-f]+ is not aligned/ }] });

  const data = d('data-past-eof.qcow2');
  fs.copyFileSync(orig, data);
  const guest = 5 * SPAN + 7 * CLUSTER;
  writeAt(data, l2EntryAt(data, guest), u64((1n << 63n) | (1n << 33n)));
  cases.push({ name: 'data cluster past the end', image: data, reference: ref, qemuOpens: true, expected: [{ start: guest, length: CLUSTER, reason: /cluster at host offset 8589934592 lies past the end/ }] });

  const comp = d('compressed-garbage.qcow2');
  run('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', `cluster_size=${CLUSTER}`, orig, comp]);
  const cguest = SPAN + 9 * CLUSTER;
  const e = readAt(comp, l2EntryAt(comp, cguest), 8).readBigUInt64BE(0);
  expect(e & (1n << 62n)).not.toBe(0n);
  const csizeShift = 62n - (12n - 8n);
  writeAt(comp, Number(e & ((1n << csizeShift) - 1n)), Buffer.alloc(4, 0xff)); // BTYPE 11: invalid deflate block
  cases.push({ name: 'compressed cluster that does not decompress', image: comp, reference: ref, qemuOpens: true, expected: [{ start: cguest, length: CLUSTER, reason: /compressed cluster cannot be decompressed/ }] });

  const base = d('gone-base.qcow2');
  const top = d('top-of-gone.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, base, String(SIZE));
  fillPattern(base);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, '-b', 'gone-base.qcow2', '-F', 'qcow2', top);
  qemuIo(top, 'qcow2', ['write -P 0xaa 1M 1M', 'write -P 0xbb 5M 4k']);
  const topRef = convertToRaw(top, d('top.raw'));
  fs.rmSync(base);
  const gone = /backing file gone-base\.qcow2 is missing/;
  cases.push({
    name: 'missing backing file',
    image: top,
    reference: topRef,
    qemuOpens: false,
    expected: [
      { start: 0, length: MiB, reason: gone },
      { start: 2 * MiB, length: 3 * MiB, reason: gone },
      { start: 5 * MiB + CLUSTER, length: SIZE - 5 * MiB - CLUSTER, reason: gone },
    ],
  });
});
afterAll(() => scratch.cleanup());

function inDamage(off: number, ranges: Range[]): boolean {
  return ranges.some((r) => off >= r.start && off < r.start + r.length);
}

const NAMES = ['L2 table past the end of the file', 'misaligned L1 entry', 'data cluster past the end', 'compressed cluster that does not decompress', 'missing backing file'];

describe.each(NAMES.map((name, i) => ({ name, i })))('salvage: $name', ({ name, i }) => {
  const c = (): Case => {
    expect(cases[i]!.name).toBe(name);
    return cases[i]!;
  };

  it('qmount info --salvage names exactly the damaged ranges', () => {
    const before = sha256File(c().image);
    const r = qmount(['info', '--salvage', '--output', 'json', c().image]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const report = (JSON.parse(r.stdout) as { damage: { ranges: Array<{ start: number; length: number; reason: string }>; 'damaged-bytes': number } }).damage;
    expect(report.ranges.map(({ start, length }) => ({ start, length }))).toEqual(c().expected.map(({ start, length }) => ({ start, length })));
    report.ranges.forEach((got, k) => expect(got.reason).toMatch(c().expected[k]!.reason));
    expect(report['damaged-bytes']).toBe(c().expected.reduce((n, x) => n + x.length, 0));
    const human = qmount(['info', '--salvage', c().image]);
    expect(human.stdout).toMatch(new RegExp(`^Damage \\(--salvage\\): ${c().expected.length} ranges?`, 'm'));
    expect(sha256File(c().image)).toBe(before);
  });

  it('--salvage mount: damaged ranges zeros, the rest as the original; the log names the damage', async () => {
    const before = sha256File(c().image);
    const log = path.join(scratch.dir, `salvage-${i}.log`);
    const m = await mountImage(c().image, { extraArgs: ['--salvage', '--log-file', log] });
    let got: Buffer;
    try {
      got = fs.readFileSync(m.rawPath);
      expect(fs.readdirSync(m.dir).sort()).toEqual(['damage.json', 'disk.raw']);
      const report = JSON.parse(fs.readFileSync(path.join(m.dir, 'damage.json'), 'utf8')) as { ranges: Array<{ start: number; length: number; reason: string }>; complete: boolean };
      expect(report.complete).toBe(true);
      expect(report.ranges.map(({ start, length }) => ({ start, length }))).toEqual(c().expected.map(({ start, length }) => ({ start, length })));
      report.ranges.forEach((r, k) => expect(r.reason).toMatch(c().expected[k]!.reason));
      // read-only: --salvage implies -r
      expect(() => fs.openSync(m.rawPath, 'r+')).toThrow(/EROFS|EACCES/);
    } finally {
      await m.unmount();
    }
    const want = fs.readFileSync(c().reference);
    for (const r of c().expected) want.fill(0, r.start, r.start + r.length);
    expect(got.equals(want)).toBe(true);
    if (c().qemuOpens) {
      const q = path.join(scratch.dir, `qemu-salvage-${i}.raw`);
      run('qemu-img', ['convert', '--salvage', '-O', 'raw', c().image, q]);
      expect(got.equals(fs.readFileSync(q))).toBe(true);
    }
    const warned = logLines(log).filter((l) => l.msg === 'damaged range: reads as zeros (--salvage)');
    for (const r of c().expected) expect(warned.some((l) => l.start === r.start && r.reason.test(String(l.reason)))).toBe(true);
    expect(sha256File(c().image)).toBe(before);
  });

  it('without --salvage: EIO on damaged ranges, the rest served exactly', async () => {
    const before = sha256File(c().image);
    const ref = fs.readFileSync(c().reference);
    const m = await mountImage(c().image, { readOnly: true });
    try {
      const fd = fs.openSync(m.rawPath, 'r');
      const buf = Buffer.alloc(CLUSTER);
      try {
        for (const r of c().expected) {
          for (const off of [r.start, r.start + r.length - CLUSTER]) {
            expect(() => fs.readSync(fd, buf, 0, CLUSTER, off)).toThrow(/EIO/);
          }
        }
        const chunk = 64 * 1024;
        for (let off = 0; off < SIZE; off += CLUSTER) {
          if (inDamage(off, c().expected)) continue;
          let len = CLUSTER;
          while (off + len < SIZE && len < chunk && !inDamage(off + len, c().expected)) len += CLUSTER;
          const b = Buffer.alloc(len);
          expect(fs.readSync(fd, b, 0, len, off)).toBe(len);
          if (!b.equals(ref.subarray(off, off + len))) throw new Error(`guest [${off}, +${len}) differs from the original`);
          off += len - CLUSTER;
        }
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      await m.unmount();
    }
    expect(sha256File(c().image)).toBe(before);
  });
});

describe('holes over a missing backing file', () => {
  it('SEEK_HOLE/SEEK_DATA count what the missing backing file would show as data (never a hole: reads there fail)', async () => {
    const gone = cases.find((x) => x.name === 'missing backing file')!;
    const m = await mountImage(gone.image, { readOnly: true });
    try {
      expect(await lseekOnce(m.rawPath, 0, 'SEEK_DATA')).toBe(0);
      expect(await lseekOnce(m.rawPath, 0, 'SEEK_HOLE')).toBe(SIZE);
    } finally {
      await m.unmount();
    }
  });
});

describe('--salvage refusals', () => {
  it('cannot be combined with -s', () => {
    const r = qmount(['--salvage', '-s', cases[0]!.image, scratch.dir]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^qmount: --salvage is read-only[^\n]*\n$/);
  });
});
