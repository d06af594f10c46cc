/**
 * QED through a real FUSE mount (the built CLI): random writes to disk.raw
 * against a raw model, then QEMU checks and compares the image; SIGKILL of
 * qmount during writes, then a read-only mount serves the fsync'd data and
 * changes no byte, and a read-write mount repairs and clears the need-check
 * bit.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { detach, mountImage, type MountedImage } from '../helpers/mount.js';
import { convertToRaw, patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir, sha256File, readAt } from '../helpers/qemu.js';
import { compareAll, fileTarget, randomWrites } from '../helpers/workload.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => void;
const mounts: MountedImage[] = [];

beforeEach(() => {
  ({ dir, cleanup } = scratchDir('qed-mount'));
});
afterEach(async () => {
  for (const m of mounts.splice(0)) {
    detach(m.dir);
    await m.unmount().catch(() => {});
  }
  cleanup();
});

async function mount(image: string, readOnly = false): Promise<MountedImage> {
  const m = await mountImage(image, { readOnly, format: 'qed' });
  mounts.push(m);
  return m;
}

async function unmount(m: MountedImage): Promise<void> {
  mounts.splice(mounts.indexOf(m), 1);
  await m.unmount();
}

function needCheck(img: string): boolean {
  const b = Buffer.alloc(8);
  const fd = fs.openSync(img, 'r');
  fs.readSync(fd, b, 0, 8, 16);
  fs.closeSync(fd);
  return (b.readBigUInt64LE(0) & 2n) !== 0n;
}

describe.each([4096, 65536])('QED through a mount, cluster size %i', (cs) => {
  it('random writes through disk.raw, then qemu-img check and compare', async () => {
    const base = path.join(dir, 'base.raw');
    const size = (cs === 4096 ? 12 : 40) * MiB; // 4 KiB: below qemu-img's 4095-cluster leak miscount
    fs.writeFileSync(base, patternBytes(size / 2 + 1536, 21));
    const img = path.join(dir, 'm.qed');
    qemuImg('create', '-q', '-f', 'qed', '-o', `cluster_size=${cs}`, '-b', base, '-F', 'raw', img, String(size));
    qemuIo(img, 'qed', [`write -z ${3 * cs} ${2 * cs}`, `write -P 0x12 ${size / 2} ${cs + 100}`]);
    const model = convertToRaw(img, path.join(dir, 'model.raw'));
    const m = await mount(img);
    const t = fileTarget(m.rawPath, size);
    try {
      await randomWrites(t, model, { count: 200, maxLength: 3 * MiB, seed: cs + 11, zeroFraction: 0.1, verifyEvery: 20 });
      t.fsync();
      await compareAll(t, model);
      expect(needCheck(img)).toBe(true);
    } finally {
      t.close();
    }
    await unmount(m);
    expect(needCheck(img)).toBe(false);
    const c = qemuCheck(img, 'qed');
    expect(c.code, c.output).toBe(0);
    const cmp = qemuCompare(img, model, 'qed', 'raw');
    expect(cmp.same, cmp.output).toBe(true);
  });
});

describe('QED mount killed with SIGKILL during writes', () => {
  it('read-only mount serves fsynced data and changes nothing; read-write mount repairs', async () => {
    const cs = 65536;
    const img = path.join(dir, 'k.qed');
    const size = 64 * MiB;
    qemuImg('create', '-q', '-f', 'qed', '-o', `cluster_size=${cs}`, img, String(size));
    const durable = patternBytes(3 * MiB + 777, 31);
    const m = await mount(img);
    const fd = fs.openSync(m.rawPath, 'r+');
    fs.writeSync(fd, durable, 0, durable.length, 5 * MiB + 123);
    fs.fsyncSync(fd);
    // More allocating writes in flight, not fsynced, when the process dies.
    const inflight: Promise<unknown>[] = [];
    const fh = await fs.promises.open(m.rawPath, 'r+');
    for (let i = 0; i < 64; i++) {
      inflight.push(fh.write(patternBytes(256 * 1024, 100 + i), 0, 256 * 1024, 20 * MiB + i * 300 * 1024).catch((e: unknown) => e));
    }
    await new Promise((r) => setTimeout(r, 5));
    m.kill('SIGKILL');
    await m.exited;
    await Promise.all(inflight); // some completed, some failed with the connection
    await fh.close().catch(() => {});
    try {
      fs.closeSync(fd);
    } catch {
      // the connection is gone
    }
    detach(m.dir);
    await unmount(m);
    expect(needCheck(img)).toBe(true);

    const hash = sha256File(img);
    const ro = await mount(img, true);
    expect(readAt(ro.rawPath, 5 * MiB + 123, durable.length).equals(durable)).toBe(true);
    await unmount(ro);
    expect(sha256File(img)).toBe(hash);

    const rw = await mount(img);
    expect(needCheck(img)).toBe(false); // checked, repaired, cleared at open
    expect(readAt(rw.rawPath, 5 * MiB + 123, durable.length).equals(durable)).toBe(true);
    await unmount(rw);
    expect(needCheck(img)).toBe(false);
    const c = qemuCheck(img, 'qed');
    expect([0, 3], c.output).toContain(c.code);
  });
});
