/**
 * Raw sparse-image calls against QEMU: blockStatus equals `qemu-img map
 * --output=json` on a sparse file (holes from truncate and from punching),
 * writeZeroes with unmap leaves holes qemu-img map sees and frees the
 * file's blocks, without unmap keeps them; resize grows as qemu-img info
 * reports, and a raw file as backing of a QED overlay shows its holes at
 * depth 1.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { BlockExtent } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: string;
let cleanup: () => void;
beforeEach(() => ({ dir, cleanup } = scratchDir('raw-sparse')));
afterEach(() => cleanup());

interface MapEntry { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; offset?: number }
const asMap = (ext: BlockExtent[]): MapEntry[] =>
  ext.map((e) => ({ start: e.guestOffset, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data, ...(e.hostOffset !== undefined ? { offset: e.hostOffset } : {}) }));
const qemuMap = (image: string, fmt: string): MapEntry[] => JSON.parse(qemuImg('map', '--output=json', '-f', fmt, image)) as MapEntry[];

async function statusOf(image: string, fmt: 'raw' | 'qed'): Promise<MapEntry[]> {
  const d = await openImage(image, { readOnly: true, format: fmt });
  try {
    return asMap(await d.blockStatus(0, d.virtualSize));
  } finally {
    await d.close();
  }
}

describe('raw blockStatus, writeZeroes and resize against QEMU', () => {
  it('holes and data equal qemu-img map; discard punches holes, zeroing without unmap keeps the space', async () => {
    const img = path.join(dir, 'disk.raw');
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 16 * MiB);
    qemuIo(img, 'raw', ['write -P 1 1M 3M', 'write -P 2 8M 64k', 'write -P 3 15M 1M']);
    expect(await statusOf(img, 'raw')).toEqual(qemuMap(img, 'raw'));

    const d = await openImage(img, { readOnly: false, format: 'raw' });
    const before = fs.statSync(img).blocks * 512;
    await d.writeZeroes(1 * MiB + 256 * KiB, 2 * MiB, { unmap: true });
    await d.writeZeroes(15 * MiB, 512 * KiB, { unmap: false });
    await d.flush();
    expect(d.allocatedBytes()).toBe(fs.statSync(img).blocks * 512);
    expect(d.allocatedBytes()).toBeLessThanOrEqual(before - 2 * MiB + 64 * KiB); // the file system may add an extent block
    const st = asMap(await d.blockStatus(0, d.virtualSize));
    await d.close();
    expect(st).toEqual(qemuMap(img, 'raw'));
    expect(st.find((e) => e.start <= 2 * MiB && e.start + e.length > 2 * MiB)).toMatchObject({ data: false, zero: true });
    const back = fs.readFileSync(img);
    expect(back.subarray(1 * MiB + 256 * KiB, 3 * MiB + 256 * KiB).every((b) => b === 0)).toBe(true);
    expect(back.subarray(15 * MiB, 15 * MiB + 512 * KiB).every((b) => b === 0)).toBe(true);
    expect(back.subarray(15 * MiB + 512 * KiB).every((b) => b === 3)).toBe(true);
  });

  it('resize grows (qemu-img info agrees, the new part a hole) and shrinks only over holes', async () => {
    const img = path.join(dir, 'r.raw');
    fs.writeFileSync(img, Buffer.alloc(4 * MiB, 7));
    const d = await openImage(img, { readOnly: false, format: 'raw' });
    await d.resize(8 * MiB);
    expect((JSON.parse(qemuImg('info', '--output=json', '-U', img)) as { 'virtual-size': number })['virtual-size']).toBe(8 * MiB);
    expect(asMap(await d.blockStatus(4 * MiB, 4 * MiB))).toEqual([{ start: 4 * MiB, length: 4 * MiB, depth: 0, present: true, zero: true, data: false, offset: 4 * MiB }]);
    await expect(d.resize(2 * MiB)).rejects.toMatchObject({ errno: 'EPERM' });
    await d.resize(4 * MiB); // the tail is all hole
    await d.close();
    expect(fs.statSync(img).size).toBe(4 * MiB);
  });

  it('as the backing file of a QED overlay: its holes and data at depth 1, as qemu-img map shows', async () => {
    const base = path.join(dir, 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(0));
    fs.truncateSync(base, 8 * MiB);
    qemuIo(base, 'raw', ['write -P 5 2M 1M']);
    const top = path.join(dir, 'top.qed');
    qemuImg('create', '-q', '-f', 'qed', '-b', base, '-F', 'raw', top, String(8 * MiB));
    qemuIo(top, 'qed', ['write -P 6 4M 64k']);
    expect(await statusOf(top, 'qed')).toEqual(qemuMap(top, 'qed'));
  });
});
