/**
 * qcow2 sparse-image operations at driver level (issue 13): blockStatus,
 * writeZeroes (with and without unmap), resize and allocatedBytes, on every
 * image kind qemu-img makes: v2, v3, extended L2, compressed (convert -c),
 * with an internal snapshot, over a backing file.
 *
 * QEMU is the oracle: blockStatus must equal `qemu-img map --output=json`
 * (data/zero/present/depth, and the host offset of data), before and after
 * our changes; after the workload `qemu-img check` exits 0 and `qemu-img
 * compare` against a raw model that got the same writes and zeroings says
 * identical; snapshots and backing files are unchanged.
 */
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import type { BlockDriver, BlockExtent } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { errnoOf } from '../../src/errors.js';
import { ImageFile } from '../../src/io/file.js';
import { convertToRaw, patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, run, scratchDir, sha256File } from '../helpers/qemu.js';
import { rng } from '../helpers/workload.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const log = pino({ level: 'silent' });
const cleanups: Array<() => void> = [];
afterAll(() => cleanups.forEach((c) => c()));

interface Extent {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** Merge neighbours that are equal once offsets of non-data extents are dropped. */
function normalize(list: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e0 of list) {
    const e = { ...e0 };
    if (!e.data) delete e.offset;
    const last = out[out.length - 1];
    if (
      last && last.start + last.length === e.start && last.depth === e.depth && last.present === e.present &&
      last.zero === e.zero && last.data === e.data &&
      (last.offset === undefined ? e.offset === undefined : e.offset !== undefined && last.offset + last.length === e.offset)
    ) {
      last.length += e.length;
    } else {
      out.push(e);
    }
  }
  return out;
}

function qemuMap(image: string): Extent[] {
  const r = run('qemu-img', ['map', '-U', '--output=json', image]);
  const raw = JSON.parse(r.stdout) as Array<Extent & { compressed?: boolean }>;
  // QEMU also asks the image file whether a data cluster's host bytes are a hole (then data and zero);
  // qmount does not probe the image file: data is never zero there.
  return normalize(raw.map(({ start, length, depth, present, zero, data, offset }) => ({ start, length, depth, present, zero: zero && !data, data, offset })));
}

function ours(extents: BlockExtent[]): Extent[] {
  return normalize(extents.map((e) => ({
    start: e.guestOffset, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data,
    offset: e.hostOffset,
  })));
}

async function statusOf(image: string): Promise<Extent[]> {
  const d = await openImage(image, { readOnly: true, log });
  try {
    const all = await d.blockStatus(0, d.virtualSize);
    // Covering exactly the range, in order.
    let pos = 0;
    for (const e of all) {
      expect(e.guestOffset).toBe(pos);
      expect(e.length).toBeGreaterThan(0);
      pos += e.length;
    }
    expect(pos).toBe(d.virtualSize);
    return ours(all);
  } finally {
    await d.close();
  }
}

interface Kind {
  name: string;
  size: number;
  /** the image, its files that must never change, and snapshots to keep */
  build(dir: string): { image: string; frozen: string[]; snapshot?: string };
  /** whole-disk unit for aligned requests */
  unit: number;
}

function create(dir: string, name: string, size: number, opts: string[], backing?: string): string {
  const p = path.join(dir, name);
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  if (backing) args.push('-b', backing, '-F', 'qcow2');
  qemuImg(...args, p, String(size));
  return p;
}

/** qemu-io commands that put data, zero clusters and holes on an image. */
const MIXED = (cs: number): string[] => [
  `write -P 0x11 0 ${8 * cs}`,
  `write -P 0x12 ${20 * cs + 512} ${3 * cs}`,
  `write -z ${40 * cs} ${4 * cs}`,
  `write -P 0x13 ${60 * cs} ${6 * cs}`,
  `discard ${62 * cs} ${2 * cs}`,
  `write -P 0x14 ${3 * MiB} ${MiB}`,
];

const KINDS: Kind[] = [
  { name: 'v2 (compat=0.10)', size: 8 * MiB, unit: 65536, build: (d) => {
    const image = create(d, 'disk.qcow2', 8 * MiB, ['compat=0.10']);
    qemuIo(image, 'qcow2', MIXED(65536).filter((c) => !c.startsWith('write -z')));
    return { image, frozen: [] };
  } },
  { name: 'v3, 4 KiB clusters', size: 8 * MiB, unit: 4096, build: (d) => {
    const image = create(d, 'disk.qcow2', 8 * MiB, ['cluster_size=4096']);
    qemuIo(image, 'qcow2', MIXED(4096));
    return { image, frozen: [] };
  } },
  { name: 'extended_l2', size: 8 * MiB, unit: 2048, build: (d) => {
    const image = create(d, 'disk.qcow2', 8 * MiB, ['extended_l2=on', 'cluster_size=65536']);
    qemuIo(image, 'qcow2', [...MIXED(65536), 'write -P 0x15 2048 2048', 'write -z 8192 4096', 'discard 69632 2048']);
    return { image, frozen: [] };
  } },
  { name: 'compressed (convert -c)', size: 8 * MiB, unit: 65536, build: (d) => {
    const src = path.join(d, 'src.raw');
    const b = Buffer.alloc(8 * MiB);
    for (let i = 0; i < 5 * MiB; i += 64) b.write(`compressible line ${i % 7777} of text........................\n`, i);
    patternBytes(MiB, 3).copy(b, 6 * MiB); // incompressible: stored uncompressed
    fs.writeFileSync(src, b);
    const image = path.join(d, 'disk.qcow2');
    qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, image);
    return { image, frozen: [] };
  } },
  { name: 'with an internal snapshot', size: 8 * MiB, unit: 65536, build: (d) => {
    const image = create(d, 'disk.qcow2', 8 * MiB, []);
    qemuIo(image, 'qcow2', MIXED(65536));
    qemuImg('snapshot', '-c', 's1', image);
    const snap = path.join(d, 's1.raw');
    qemuImg('convert', '-l', 'snapshot.name=s1', '-O', 'raw', image, snap);
    return { image, frozen: [snap], snapshot: snap };
  } },
  { name: 'over a backing file (shorter than the overlay)', size: 8 * MiB, unit: 65536, build: (d) => {
    const base = create(d, 'base.qcow2', 6 * MiB, []);
    qemuIo(base, 'qcow2', [`write -P 0x21 0 ${5 * MiB}`, `write -z ${MiB} 65536`]);
    const image = create(d, 'disk.qcow2', 8 * MiB, [], 'base.qcow2');
    qemuIo(image, 'qcow2', [`write -P 0x22 ${2 * MiB} ${MiB}`, `write -z ${4 * MiB} 131072`]);
    return { image, frozen: [base] };
  } },
  { name: 'v2 over a backing file', size: 8 * MiB, unit: 65536, build: (d) => {
    const base = create(d, 'base.qcow2', 8 * MiB, []);
    qemuIo(base, 'qcow2', [`write -P 0x31 0 ${6 * MiB}`]);
    const image = create(d, 'disk.qcow2', 8 * MiB, ['compat=0.10'], 'base.qcow2');
    qemuIo(image, 'qcow2', [`write -P 0x32 ${MiB} ${MiB}`]);
    return { image, frozen: [base] };
  } },
];

/** Zeroings and writes: whole units, odd ranges, some over data, some over holes, some past backing data. */
function workload(size: number, unit: number, seed: number): Array<{ kind: 'zero' | 'write'; offset: number; length: number; unmap: boolean }> {
  const r = rng(seed);
  const ops: Array<{ kind: 'zero' | 'write'; offset: number; length: number; unmap: boolean }> = [];
  for (let i = 0; i < 40; i++) {
    const aligned = r() < 0.6;
    let offset = Math.floor(r() * size);
    let length = 1 + Math.floor(r() ** 2 * 600 * KiB);
    if (aligned) {
      offset -= offset % unit;
      length = Math.max(unit, length - (length % unit));
    }
    length = Math.min(length, size - offset);
    if (length <= 0) continue;
    ops.push({ kind: r() < 0.7 ? 'zero' : 'write', offset, length, unmap: r() < 0.5 });
  }
  return ops;
}

describe.each(KINDS)('qcow2 sparse operations: $name', (kind) => {
  it('blockStatus equals qemu-img map; writeZeroes keeps the image valid and reads zeros; resize grows and shrinks', async () => {
    const { dir, cleanup } = scratchDir('qcow2-sparse');
    cleanups.push(cleanup);
    const { image, frozen, snapshot } = kind.build(dir);
    const frozenHashes = frozen.map(sha256File);
    expect(await statusOf(image)).toEqual(qemuMap(image));

    const model = fs.readFileSync(convertToRaw(image, path.join(dir, 'model.raw')));
    const d: BlockDriver = await openImage(image, { readOnly: false, log });
    try {
      let n = 0;
      for (const op of workload(kind.size, kind.unit, 7 + KINDS.indexOf(kind))) {
        if (op.kind === 'zero') {
          await d.writeZeroes(op.offset, op.length, { unmap: op.unmap });
          model.fill(0, op.offset, op.offset + op.length);
        } else {
          const data = patternBytes(op.length, 100 + n++);
          await d.write(data, 0, data.length, op.offset);
          data.copy(model, op.offset);
        }
        if (n % 7 === 3) await d.flush();
      }
      const back = Buffer.alloc(kind.size);
      await d.read(back, 0, kind.size, 0);
      expect(back.equals(model), 'the driver reads what it was told').toBe(true);
      // Extents agree with the content: nothing outside data extents reads non-zero.
      for (const e of await d.blockStatus(0, kind.size)) {
        if (e.zero) expect(model.subarray(e.guestOffset, e.guestOffset + e.length).every((b) => b === 0)).toBe(true);
      }
    } finally {
      await d.close();
    }
    const c = qemuCheck(image);
    expect(c.code, c.output).toBe(0);
    const modelPath = path.join(dir, 'model.raw');
    fs.writeFileSync(modelPath, model);
    expect(qemuCompare(image, modelPath, 'qcow2', 'raw').same).toBe(true);
    expect(await statusOf(image)).toEqual(qemuMap(image));

    // Resize: grow (the new part reads zeros, also where the backing file has data), then shrink back.
    const grown = kind.size + 40 * MiB + 512;
    const d2 = await openImage(image, { readOnly: false, log });
    try {
      if (snapshot && !(await isV3(image))) {
        expect(errnoOf(await d2.resize(grown).catch((e: unknown) => e))).toBe('EPERM');
      } else {
        await d2.resize(grown);
        expect(d2.virtualSize).toBe(grown);
        const tail = Buffer.alloc(grown - kind.size, 1);
        await d2.read(tail, 0, tail.length, kind.size);
        expect(tail.every((b) => b === 0)).toBe(true);
        await d2.write(Buffer.alloc(4096, 0x77), 0, 4096, grown - 4096);
        // Data past the old end: shrinking there is refused, after a discard it is allowed.
        // Data past the old end: shrinking there is refused (also with snapshots); once zeroed it is allowed.
        expect(errnoOf(await d2.resize(kind.size).catch((e: unknown) => e))).toBe('EPERM');
        if (!snapshot) {
          await d2.writeZeroes(grown - 4096, 4096, { unmap: true });
          await d2.resize(kind.size);
          expect(d2.virtualSize).toBe(kind.size);
          // Grown again: what was stored past the end reads as zeros.
          await d2.resize(kind.size + MiB);
          const again = Buffer.alloc(MiB, 1);
          await d2.read(again, 0, MiB, kind.size);
          expect(again.every((b) => b === 0)).toBe(true);
          await d2.resize(kind.size);
        }
      }
    } finally {
      await d2.close();
    }
    const c2 = qemuCheck(image);
    expect(c2.code, c2.output).toBe(0);
    const info = JSON.parse(qemuImg('info', '-U', '--output=json', image)) as { 'virtual-size': number };
    const size = info['virtual-size'];
    const expected = Buffer.alloc(size);
    model.copy(expected, 0, 0, Math.min(size, model.length));
    if (size > kind.size) expected.fill(0x77, size - 4096);
    fs.writeFileSync(modelPath, expected);
    expect(qemuCompare(image, modelPath, 'qcow2', 'raw').same).toBe(true);
    expect(await statusOf(image)).toEqual(qemuMap(image));
    expect(frozen.map(sha256File)).toEqual(frozenHashes);
    if (snapshot) {
      const now = path.join(dir, 's1-now.raw');
      qemuImg('convert', '-l', 'snapshot.name=s1', '-O', 'raw', image, now);
      // qemu-img convert -l exports a snapshot at the image's current size (QEMU's own resize does the same).
      const want = fs.readFileSync(snapshot);
      const got = fs.readFileSync(now);
      expect(got.subarray(0, want.length).equals(want)).toBe(true);
      expect(got.subarray(want.length).every((b) => b === 0)).toBe(true);
    }
  });
});

async function isV3(image: string): Promise<boolean> {
  const b = Buffer.alloc(8);
  const fd = await fs.promises.open(image, 'r');
  try {
    await fd.read(b, 0, 8, 0);
  } finally {
    await fd.close();
  }
  return b.readUInt32BE(4) === 3;
}

// The fast path's invariant (src/formats/qcow2/direct.ts): a direct write
// still in flight on a cluster that a discard freed keeps that cluster out of
// the allocator (and unpunched) until a flush finds it idle. The write is
// held in flight by a gate on ImageFile.write; without the count the
// allocation below would get the freed cluster (as the one after the gate
// opens shows it does), and the late write would land in another cluster's
// data.
describe('qcow2: a discard while a direct write is in flight', () => {
  it('the freed cluster is not reused until the write settled and a flush ran', async () => {
    const { dir, cleanup } = scratchDir('qcow2-sparse-race');
    cleanups.push(cleanup);
    const image = create(dir, 'disk.qcow2', 8 * MiB, []);
    qemuIo(image, 'qcow2', ['write -P 0x51 0 64k']);
    const d = await openImage(image, { readOnly: false, log });
    const proto = ImageFile.prototype as unknown as { write: (...a: unknown[]) => Promise<void> };
    const orig = proto.write;
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    let held = 0;
    try {
      await d.write(Buffer.alloc(512, 0x52), 0, 512, 4 * MiB); // the first write prepares the image for writing
      const [first] = await d.blockStatus(0, 65536);
      const host = first.hostOffset!;
      proto.write = function (this: ImageFile, ...a: unknown[]) {
        if (a[0] === 'data_write' && held++ === 0) return gate.then(() => orig.apply(this, a));
        return orig.apply(this, a);
      };
      const direct = d.write(Buffer.alloc(4096, 0x53), 0, 4096, 0);
      expect(held).toBe(1); // in flight on the fast path
      await d.writeZeroes(0, 65536, { unmap: true });
      await d.flush();
      await d.write(Buffer.alloc(65536, 0x54), 0, 65536, MiB);
      const [busyTime] = await d.blockStatus(MiB, 65536);
      expect(busyTime.hostOffset).not.toBe(host);
      open();
      await direct;
      await d.flush();
      await d.write(Buffer.alloc(65536, 0x55), 0, 65536, 2 * MiB);
      const [later] = await d.blockStatus(2 * MiB, 65536);
      expect(later.hostOffset, 'once idle and flushed, the freed cluster is reused').toBe(host);
      const back = Buffer.alloc(3 * MiB);
      await d.read(back, 0, back.length, 0);
      expect(back.subarray(0, 65536).every((b) => b === 0)).toBe(true);
      expect(back.subarray(MiB, MiB + 65536).every((b) => b === 0x54)).toBe(true);
      expect(back.subarray(2 * MiB, 2 * MiB + 65536).every((b) => b === 0x55)).toBe(true);
    } finally {
      proto.write = orig;
      open();
      await d.close();
    }
    const c = qemuCheck(image);
    expect(c.code, c.output).toBe(0);
  });
});
