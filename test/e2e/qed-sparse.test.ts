/**
 * QED sparse-image calls against QEMU: blockStatus equals `qemu-img map
 * --output=json` (images made by qemu-io, with data, zero clusters and
 * backing chains), and after write-zeroes / discard / resize workloads
 * the image still matches a raw reference given the same writes
 * (`qemu-img compare`), `qemu-img map` agrees with blockStatus, `qemu-img
 * check` exits 0 (3 = leaked clusters only where discard freed data
 * clusters, which QED cannot record), backing files are unchanged, and the
 * image file's allocated size drops after a discard.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { BlockDriver, BlockExtent } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir, sha256File } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => void;
const opened: BlockDriver[] = [];
beforeEach(() => {
  ({ dir, cleanup } = scratchDir('qed-sparse'));
});
afterEach(async () => {
  for (const d of opened.splice(0)) await d.close().catch(() => {});
  cleanup();
});

const KiB = 1024;
const MiB = 1024 * KiB;
const p = (name: string): string => path.join(dir, name);

async function openRW(image: string, readOnly = false): Promise<BlockDriver> {
  const d = await openImage(image, { readOnly });
  opened.push(d);
  return d;
}
async function closeIt(d: BlockDriver): Promise<void> {
  opened.splice(opened.indexOf(d), 1);
  await d.close();
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

function qemuMap(image: string): MapEntry[] {
  return (JSON.parse(qemuImg('map', '--output=json', image)) as MapEntry[]).map((e) => ({ ...e }));
}

function asMap(ext: BlockExtent[]): MapEntry[] {
  return ext.map((e) => ({
    start: e.guestOffset,
    length: e.length,
    depth: e.depth,
    present: e.present,
    zero: e.zero,
    data: e.data,
    ...(e.hostOffset !== undefined ? { offset: e.hostOffset } : {}),
  }));
}

async function expectMapParity(image: string): Promise<void> {
  const d = await openRW(image, true);
  try {
    expect(asMap(await d.blockStatus(0, d.virtualSize))).toEqual(qemuMap(image));
  } finally {
    await closeIt(d);
  }
}

describe('QED blockStatus equals qemu-img map', () => {
  it('data, zero clusters, unallocated; 4 KiB and 64 KiB clusters', async () => {
    for (const cs of [4096, 65536]) {
      const img = p(`a-${cs}.qed`);
      qemuImg('create', '-q', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(64 * MiB));
      qemuIo(img, 'qed', ['write -P 1 0 192k', 'write -z 1M 256k', 'write -P 2 3M 4k', 'write -P 3 40M 1M', 'write -z 63M 1M']);
      await expectMapParity(img);
    }
  });

  it('through a backing chain (qed over qed over a sparse raw file), past the backing file\'s end too', async () => {
    const raw = p('base.raw');
    fs.writeFileSync(raw, Buffer.alloc(0));
    fs.truncateSync(raw, 8 * MiB);
    qemuIo(raw, 'raw', ['write -P 9 1M 1M']);
    const mid = p('mid.qed');
    qemuImg('create', '-q', '-f', 'qed', '-b', raw, '-F', 'raw', mid, String(16 * MiB));
    qemuIo(mid, 'qed', ['write -P 4 0 64k', 'write -z 1536k 128k']);
    const top = p('top.qed');
    qemuImg('create', '-q', '-f', 'qed', '-b', mid, '-F', 'qed', top, String(24 * MiB));
    qemuIo(top, 'qed', ['write -P 5 4M 64k', 'write -z 12M 64k']);
    await expectMapParity(mid);
    await expectMapParity(top);
  });
});

describe('QED writeZeroes, discard and resize against QEMU', () => {
  it('zeroes over data, zero and unallocated clusters, partial clusters, with and without unmap: compare, map, check, du', async () => {
    const img = p('z.qed');
    const ref = p('z.raw');
    qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=65536', img, String(32 * MiB));
    const setup = ['write -P 1 0 8M', 'write -z 9M 1M', 'write -P 2 12M 3M'];
    qemuIo(img, 'qed', setup);
    fs.writeFileSync(ref, Buffer.alloc(0));
    fs.truncateSync(ref, 32 * MiB);
    qemuIo(ref, 'raw', setup);
    fs.copyFileSync(img, p('before.qed'));
    const blocksBefore = fs.statSync(img).blocks;

    const d = await openRW(img);
    const ops: Array<[number, number, boolean]> = [
      [512 * KiB, 4 * MiB, true], // whole data clusters: freed and punched
      [5 * MiB + 1000, 70 * KiB, false], // partial + in place
      [9 * MiB, 1 * MiB, true], // zero clusters already
      [20 * MiB - 4096, 2 * MiB, true], // unallocated, partial head: nothing allocated
      [12 * MiB + 4096, 64 * KiB, true], // partial-whole-partial inside data
      [14 * MiB, 1 * MiB, false], // whole data clusters, zeroed in place
    ];
    const allocBefore = (await d.flush(), d.allocatedBytes());
    for (const [off, len, unmap] of ops) await d.writeZeroes(off, len, { unmap });
    await d.flush();
    expect(d.allocatedBytes()).toBeLessThanOrEqual(allocBefore - 4 * MiB);
    const st = await d.blockStatus(20 * MiB - 4096, 2 * MiB);
    expect(st.every((e) => !e.data)).toBe(true); // no cluster allocated for zeros over unallocated ones
    await closeIt(d);
    for (const [off, len] of ops) qemuIo(ref, 'raw', [`write -z ${off} ${len}`]);

    expect(qemuCompare(img, ref, 'qed', 'raw').same).toBe(true);
    const check = qemuCheck(img, 'qed');
    expect(check.code, check.output).toBe(3); // the freed data clusters are leaks (QED records no free space)
    expect(check.output).toMatch(/leaked clusters/);
    expect(check.output).not.toMatch(/ERROR/);
    await expectMapParity(img);
    expect(fs.statSync(img).blocks).toBeLessThan(blocksBefore - (4 * MiB) / 512 + 64);
    // Without unmap nothing is leaked.
    const img2 = p('z2.qed');
    fs.copyFileSync(p('before.qed'), img2);
    const d2 = await openRW(img2);
    for (const [off, len] of ops) await d2.writeZeroes(off, len, { unmap: false });
    await closeIt(d2);
    expect(qemuCheck(img2, 'qed').code).toBe(0);
    expect(qemuCompare(img2, ref, 'qed', 'raw').same).toBe(true);
  });

  it('over a backing file: zeroed ranges never show backing data, the backing file is untouched', async () => {
    const base = p('base.qed');
    qemuImg('create', '-q', '-f', 'qed', base, String(16 * MiB));
    qemuIo(base, 'qed', ['write -P 7 0 16M']);
    const baseHash = sha256File(base);
    const img = p('ov.qed');
    qemuImg('create', '-q', '-f', 'qed', '-b', base, '-F', 'qed', img, String(16 * MiB));
    qemuIo(img, 'qed', ['write -P 8 2M 1M']);
    const ref = p('ov.raw');
    qemuImg('convert', '-O', 'raw', img, ref);
    const d = await openRW(img);
    const ops: Array<[number, number, boolean]> = [
      [0, 1 * MiB, true], // unallocated over backing data: zero entries
      [1 * MiB + 100, 4000, false], // partial, over backing: copy-on-write
      [2 * MiB, 512 * KiB, true], // data: freed
      [2 * MiB + 768 * KiB, 256 * KiB, false],
      [15 * MiB, 1 * MiB, true],
    ];
    for (const [off, len, unmap] of ops) await d.writeZeroes(off, len, { unmap });
    const st = await d.blockStatus(0, 1 * MiB);
    expect(st).toEqual([{ guestOffset: 0, length: MiB, data: false, zero: true, present: true, depth: 0 }]);
    await closeIt(d);
    for (const [off, len] of ops) qemuIo(ref, 'raw', [`write -z ${off} ${len}`]);
    expect(qemuCompare(img, ref, 'qed', 'raw').same).toBe(true);
    expect([0, 3]).toContain(qemuCheck(img, 'qed').code);
    await expectMapParity(img);
    expect(sha256File(base)).toBe(baseHash);
  });

  it('resize: grow reads zeros (also over a larger backing file), qemu-img info sees it; shrink over data EPERM, over nothing allowed', async () => {
    const base = p('big.raw');
    fs.writeFileSync(base, patternBytes(8 * MiB, 3));
    const img = p('r.qed');
    qemuImg('create', '-q', '-f', 'qed', '-b', base, '-F', 'raw', img, String(4 * MiB));
    qemuIo(img, 'qed', ['write -P 1 1M 64k']);
    const d = await openRW(img);
    await d.resize(12 * MiB + 512);
    const tail = Buffer.alloc(8 * MiB + 512, 0x55);
    await d.read(tail, 0, tail.length, 4 * MiB);
    expect(tail.every((b) => b === 0)).toBe(true);
    await d.write(Buffer.alloc(4096, 9), 0, 4096, 11 * MiB);
    await closeIt(d);
    const info = JSON.parse(qemuImg('info', '--output=json', img)) as { 'virtual-size': number };
    expect(info['virtual-size']).toBe(12 * MiB + 512);
    expect(qemuCheck(img, 'qed').code).toBe(0);
    const ref = p('r.raw');
    qemuImg('convert', '-O', 'raw', img, ref);
    const refBytes = fs.readFileSync(ref);
    expect(refBytes.subarray(4 * MiB, 11 * MiB).every((b) => b === 0)).toBe(true);
    await expectMapParity(img);

    const d2 = await openRW(img);
    expect(await d2.resize(4 * MiB).then(() => 'ok', (e: { errno?: string }) => e.errno)).toBe('EPERM');
    await d2.writeZeroes(4 * MiB, 8 * MiB + 512, { unmap: true });
    await d2.resize(4 * MiB);
    expect(d2.virtualSize).toBe(4 * MiB);
    await closeIt(d2);
    expect((JSON.parse(qemuImg('info', '--output=json', img)) as { 'virtual-size': number })['virtual-size']).toBe(4 * MiB);
    expect([0, 3]).toContain(qemuCheck(img, 'qed').code);
    const ref2 = p('r2.raw');
    qemuImg('convert', '-O', 'raw', img, ref2);
    expect(fs.readFileSync(ref2).equals(refBytes.subarray(0, 4 * MiB))).toBe(true);
  });
});
