/**
 * Concurrent requests on the qcow2 engine, interleaved at every await:
 * each file read/write/flush yields to other requests a random number of
 * times first, so every ordering of metadata steps gets a chance to occur.
 *  - writes to disjoint slices of the same unallocated clusters: the final
 *    content is exactly the union, and no cluster is allocated twice;
 *  - reads racing allocating writes see, per byte, the old or the new value;
 *  - overlapping writes end with each byte from one of the writers;
 *  - after all of it, `qemu-img check` finds no error.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ImageFile } from '../../src/io/file.js';
import { openImage } from '../../src/formats/open.js';
import { qemuCheck, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';
import { rng } from '../helpers/workload.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const proto = ImageFile.prototype as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
const originals = { read: proto.read, write: proto.write, writeZeroes: proto.writeZeroes, flush: proto.flush };
let rand = rng(1);

function yieldRandomly(): Promise<void> {
  const n = Math.floor(rand() * 4);
  let p = Promise.resolve();
  for (let i = 0; i < n; i++) p = p.then(() => new Promise<void>((r) => setImmediate(r)));
  return p;
}

function interleave(seed: number): void {
  rand = rng(seed);
  for (const k of ['read', 'write', 'writeZeroes', 'flush'] as const) {
    const orig = originals[k];
    proto[k] = async function (this: unknown, ...args: unknown[]) {
      await yieldRandomly();
      return orig.apply(this, args);
    };
  }
}

afterEach(() => Object.assign(proto, originals));

describe('qcow2 engine under interleaved concurrent requests', () => {
  let s: { dir: string; cleanup: () => void };
  beforeAll(() => (s = scratchDir('qconc')));
  afterAll(() => s.cleanup());

  const variants = [
    { name: 'plain, 4k clusters', opts: 'cluster_size=4k', backing: false },
    { name: 'backing file, 64k clusters', opts: 'cluster_size=64k', backing: true },
    { name: 'extended L2 with backing', opts: 'extended_l2=on,cluster_size=64k', backing: true },
    { name: '512-byte clusters', opts: 'cluster_size=512', backing: false },
  ];

  for (const v of variants) {
    it(`disjoint slices of shared clusters: exact result, clean image (${v.name})`, async () => {
      const image = path.join(s.dir, `slices-${v.opts.replace(/\W/g, '')}.qcow2`);
      let base: Buffer | null = null;
      if (v.backing) {
        const b = path.join(s.dir, `base-${v.opts.replace(/\W/g, '')}.raw`);
        qemuImg('create', '-q', '-f', 'raw', b, String(8 * MiB));
        qemuIo(b, 'raw', ['write -P 0x77 0 8M']);
        base = fs.readFileSync(b);
        qemuImg('create', '-q', '-f', 'qcow2', '-o', v.opts, '-b', b, '-F', 'raw', image, String(8 * MiB));
      } else {
        qemuImg('create', '-q', '-f', 'qcow2', '-o', v.opts, image, String(8 * MiB));
      }
      interleave(7);
      const d = await openImage(image, { readOnly: false });
      const model = base ? Buffer.from(base) : Buffer.alloc(8 * MiB);
      const r = rng(99);
      const writes: Promise<void>[] = [];
      // 512 writers, each a distinct 1.5 KiB slice inside the first 768 KiB:
      // many share a cluster, none overlaps another.
      for (let i = 0; i < 512; i++) {
        const off = i * 1536;
        const buf = Buffer.alloc(1536, (i % 250) + 1);
        buf.copy(model, off);
        writes.push(d.write(buf, 0, buf.length, off));
        if (r() < 0.2) writes.push(d.flush());
      }
      await Promise.all(writes);
      const got = Buffer.alloc(8 * MiB);
      await d.read(got, 0, got.length, 0);
      expect(got.equals(model)).toBe(true);
      await d.close();
      Object.assign(proto, originals);
      const check = qemuCheck(image);
      expect(check.code, check.output).toBe(0);
      const d2 = await openImage(image, { readOnly: true });
      const again = Buffer.alloc(8 * MiB);
      await d2.read(again, 0, again.length, 0);
      await d2.close();
      expect(again.equals(model)).toBe(true);
    });
  }

  it('reads racing allocating writes return old or new bytes, never anything else', async () => {
    const image = path.join(s.dir, 'race.qcow2');
    const b = path.join(s.dir, 'race-base.raw');
    qemuImg('create', '-q', '-f', 'raw', b, String(4 * MiB));
    qemuIo(b, 'raw', ['write -P 0x5a 0 4M']);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', b, '-F', 'raw', image, String(4 * MiB));
    interleave(11);
    const d = await openImage(image, { readOnly: false });
    const r = rng(5);
    const ops: Promise<void>[] = [];
    let bad = 0;
    for (let i = 0; i < 300; i++) {
      const off = Math.floor(r() * (4 * MiB - 20 * KiB));
      if (i % 2 === 0) {
        ops.push(d.write(Buffer.alloc(3000 + (i % 7) * 1000, 0xa5), 0, 3000 + (i % 7) * 1000, off));
      } else {
        const buf = Buffer.alloc(16 * KiB);
        ops.push(
          d.read(buf, 0, buf.length, off).then(() => {
            for (const x of buf) if (x !== 0x5a && x !== 0xa5) bad++;
          }),
        );
      }
    }
    await Promise.all(ops);
    await d.close();
    Object.assign(proto, originals);
    expect(bad).toBe(0);
    expect(qemuCheck(image).code).toBe(0);
  });

  it('overlapping writes leave each byte from one writer, metadata consistent (with a snapshot to COW)', async () => {
    const image = path.join(s.dir, 'overlap.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', image, String(4 * MiB));
    qemuIo(image, 'qcow2', ['write -P 0x01 0 4M']);
    qemuImg('snapshot', '-c', 'snap', image);
    interleave(23);
    const d = await openImage(image, { readOnly: false });
    const r = rng(8);
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 400; i++) {
      const len = 1 + Math.floor(r() * 40 * KiB);
      const off = Math.floor(r() * (1 * MiB - len));
      ops.push(d.write(Buffer.alloc(len, 0x10 + (i % 16)), 0, len, off));
    }
    await Promise.all(ops);
    const got = Buffer.alloc(1 * MiB);
    await d.read(got, 0, got.length, 0);
    await d.close();
    Object.assign(proto, originals);
    let foreign = 0;
    for (const x of got) if (!(x === 0x01 || (x >= 0x10 && x < 0x20))) foreign++;
    expect(foreign).toBe(0);
    const check = qemuCheck(image);
    expect(check.code, check.output).toBe(0);
  });
});
