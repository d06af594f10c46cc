/**
 * The crash-point and fault-injection workloads: each builds an image with
 * qemu-img/qemu-io that puts one risky engine path in play (refcount block
 * allocation, refcount table growth, L2 allocation, snapshot COW, compressed
 * overwrite, backing COW, extended L2 subclusters, lazy refcounts, external
 * data file, QED need-check) and carries a fixed, seeded list of guest writes
 * and flushes for it.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { IoPoint } from '../../src/io/points.js';
import { genOps, type Op } from './crash-workload.js';
import { convertToRaw, patternBytes, qemuImg, qemuIo } from './qemu.js';

const KiB = 1024;
const MiB = 1024 * 1024;

export interface Built {
  image: string;
  format: 'qcow2' | 'qed';
  /** files the engine may write (image, external data file), real paths */
  written: string[];
  /** files that must never change (backing files) */
  frozen: string[];
}

export interface Scenario {
  name: string;
  note: string;
  build(dir: string): Built;
  ops: Op[];
  /** extra per-state judgement (e.g. a snapshot's content); returns a problem or null */
  extraCheck?(b: Built, dir: string): string | null;
  /** after recording: the workload reached what it is meant to exercise */
  exercised?(b: Built, points: IoPoint[]): string | null;
  /** the largest guest size the ops resize to (the model spans it from the start; see guestMismatch) */
  guestSize?: number;
}

/** The guest content a workload starts from, as the model of a scenario that may grow the disk. */
export function initialModel(sc: Scenario, raw: Buffer): Buffer {
  if (!sc.guestSize || sc.guestSize <= raw.length) return raw;
  const out = Buffer.alloc(sc.guestSize);
  raw.copy(out);
  return out;
}

/** extraCheck: internal snapshot `name` still reads as `dir/<name>.raw` did when the image was built. */
function snapshotUnchanged(name: string): (b: Built, dir: string) => string | null {
  return (b, dir) => {
    const out = path.join(dir, `${name}-now.raw`);
    try {
      qemuImg('convert', '-l', `snapshot.name=${name}`, '-O', 'raw', b.image, out);
      const want = fs.readFileSync(path.join(dir, `${name}.raw`));
      const got = fs.readFileSync(out);
      // Exported at the image's current size (also QEMU's): the part past the snapshot's reads as zeros.
      const same = got.subarray(0, want.length).equals(want) && got.subarray(want.length).every((x) => x === 0);
      return same ? null : `snapshot ${name} content changed`;
    } catch (err) {
      return `snapshot ${name} unreadable: ${(err as Error).message.split('\n')[0]}`;
    } finally {
      fs.rmSync(out, { force: true });
    }
  };
}

/** The header's virtual size (qcow2). */
function qcow2Size(image: string): number {
  return be32(image, 24) * 2 ** 32 + be32(image, 28);
}

function qcow2(dir: string, name: string, size: number, opts: string[], backing?: [string, string]): string {
  const p = path.join(dir, name);
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  if (backing) args.push('-b', backing[0], '-F', backing[1]);
  qemuImg(...args, p, String(size));
  return p;
}

function be32(file: string, at: number): number {
  const b = Buffer.alloc(4);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, 4, at);
  } finally {
    fs.closeSync(fd);
  }
  return b.readUInt32BE(0);
}

/** qcow2 dirty bit (incompatible bit 0) or QED need-check bit (features bit 1). */
export function flaggedUnclean(image: string, format: 'qcow2' | 'qed'): boolean {
  const b = Buffer.alloc(80);
  const fd = fs.openSync(image, 'r');
  try {
    fs.readSync(fd, b, 0, 80, 0);
  } finally {
    fs.closeSync(fd);
  }
  if (format === 'qed') return (b.readBigUInt64LE(16) & 2n) !== 0n;
  if (b.readUInt32BE(4) < 3) return false;
  return (b.readBigUInt64BE(72) & 1n) !== 0n;
}

const needs = (points: IoPoint[], want: IoPoint[]): string | null => {
  const missing = want.filter((p) => !points.includes(p));
  return missing.length ? `the workload never reached ${missing.join(', ')}` : null;
};

/** Compressible source data: text lines with a varying number, so clusters differ. */
function textData(len: number, seed: number): Buffer {
  const parts: string[] = [];
  let n = 0;
  for (let i = 0; n < len; i++) {
    const s = `line ${seed}:${i} of qmount compressible text ${(i * 7919) % 1000}\n`;
    parts.push(s);
    n += s.length;
  }
  return Buffer.from(parts.join('')).subarray(0, len);
}

export const SCENARIOS: Scenario[] = [
  {
    name: 'refblock-alloc',
    note: '4 KiB clusters, 16-bit refcounts: the image is filled to just below 8 MiB (what one refcount block covers), the workload allocates past it',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 24 * MiB, ['cluster_size=4096']);
      qemuIo(image, 'qcow2', [`write -P 0x11 0 ${7900 * KiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(101, { count: 30, start: 7 * MiB, end: 24 * MiB, maxLength: 160 * KiB, flushEvery: 6, align: 4096 }),
    exercised: (_b, pts) => needs(pts, ['refblock_alloc', 'reftable_update', 'l2_alloc', 'l1_update']),
  },
  {
    name: 'reftable-grow',
    note: '512-byte clusters: the image is filled to just below 8 MiB (what a one-cluster refcount table covers), the workload grows the table',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 10 * MiB, ['cluster_size=512']);
      qemuIo(image, 'qcow2', [`write -P 0x22 0 ${7600 * KiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(202, { count: 36, start: 7400 * KiB, end: 10 * MiB, maxLength: 40 * KiB, flushEvery: 7, align: 512 }),
    exercised: (b, pts) => needs(pts, ['reftable_grow', 'header_update', 'refblock_alloc']) ?? (be32(b.image, 56) > 1 ? null : 'the refcount table did not grow'),
  },
  {
    name: 'l2-alloc',
    note: '4 KiB clusters (an L2 table maps 2 MiB), empty 32 MiB disk, writes everywhere, some issued concurrently',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 32 * MiB, ['cluster_size=4096']);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(303, { count: 36, start: 0, end: 32 * MiB, maxLength: 24 * KiB, flushEvery: 6, align: 4096, groups: true }),
    exercised: (_b, pts) => needs(pts, ['l2_alloc', 'l1_update', 'l2_update', 'refblock_update']),
  },
  {
    name: 'snapshot-cow',
    note: '64 KiB clusters, data then an internal snapshot (qemu-img snapshot -c): the L2 table and clusters are shared and copied on write',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, []);
      qemuIo(image, 'qcow2', [`write -P 0x33 0 ${6 * MiB}`, `write -P 0x34 ${7 * MiB} 70000`]);
      qemuImg('snapshot', '-c', 's1', image);
      convertToRaw(image, path.join(dir, 's1.raw'));
      return { image, format: 'qcow2', written: [image], frozen: [path.join(dir, 's1.raw')] };
    },
    ops: genOps(404, { count: 30, start: 0, end: 8 * MiB, maxLength: 100 * KiB, flushEvery: 5, align: 65536 }),
    extraCheck(b, dir) {
      const out = path.join(dir, 's1-now.raw');
      try {
        qemuImg('convert', '-l', 'snapshot.name=s1', '-O', 'raw', b.image, out);
        const same = fs.readFileSync(out).equals(fs.readFileSync(path.join(dir, 's1.raw')));
        return same ? null : 'snapshot s1 content changed';
      } catch (err) {
        return `snapshot s1 unreadable: ${(err as Error).message.split('\n')[0]}`;
      } finally {
        fs.rmSync(out, { force: true });
      }
    },
    exercised: (_b, pts) => needs(pts, ['l2_alloc', 'l1_update', 'cow_write', 'refblock_update']),
  },
  {
    name: 'compressed-overwrite',
    note: '64 KiB clusters from qemu-img convert -c (several compressed clusters share a host cluster), overwritten in part',
    build(dir) {
      const src = path.join(dir, 'src.raw');
      const bytes = Buffer.alloc(8 * MiB);
      textData(6 * MiB, 5).copy(bytes);
      fs.writeFileSync(src, bytes);
      const image = path.join(dir, 'img.qcow2');
      qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, image);
      fs.rmSync(src);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(505, { count: 30, start: 0, end: 7 * MiB, maxLength: 80 * KiB, flushEvery: 5, align: 65536 }),
    exercised: (_b, pts) => needs(pts, ['cow_write', 'l2_update', 'refblock_update']),
  },
  {
    name: 'backing-cow',
    note: '64 KiB clusters over a qcow2 backing file: partial-cluster writes copy head and tail from the backing file',
    build(dir) {
      const base = qcow2(dir, 'base.qcow2', 8 * MiB, []);
      qemuIo(base, 'qcow2', [`write -P 0x44 0 ${5 * MiB}`, `write -P 0x45 ${6 * MiB} ${MiB}`]);
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, [], ['base.qcow2', 'qcow2']);
      return { image, format: 'qcow2', written: [image], frozen: [base] };
    },
    ops: genOps(606, { count: 30, start: 0, end: 8 * MiB, maxLength: 30 * KiB, flushEvery: 5, align: 65536, groups: true }),
    exercised: (_b, pts) => needs(pts, ['cow_write', 'l2_alloc', 'l1_update']),
  },
  {
    name: 'extended-l2-backing',
    note: 'extended_l2=on, 64 KiB clusters (2 KiB subclusters) over a qcow2 backing file: subcluster allocation, zero and unallocated subclusters, COW from the backing file',
    build(dir) {
      const base = qcow2(dir, 'base.qcow2', 8 * MiB, []);
      qemuIo(base, 'qcow2', [`write -P 0x46 0 ${6 * MiB}`]);
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, ['extended_l2=on', 'cluster_size=65536'], ['base.qcow2', 'qcow2']);
      qemuIo(image, 'qcow2', ['write -P 0x47 2048 2048', 'write -z 8192 4096', 'write -P 0x48 65536 70000', 'discard 69632 2048']);
      return { image, format: 'qcow2', written: [image], frozen: [base] };
    },
    ops: genOps(1111, { count: 36, start: 0, end: 8 * MiB, maxLength: 20 * KiB, flushEvery: 5, align: 2048, groups: true }),
    exercised: (_b, pts) => needs(pts, ['cow_write', 'data_write', 'l2_update']),
  },
  {
    name: 'lazy-refcounts',
    note: 'lazy_refcounts=on, 4 KiB clusters, with data: refcounts are written lazily behind the dirty bit',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 16 * MiB, ['cluster_size=4096', 'lazy_refcounts=on']);
      qemuIo(image, 'qcow2', [`write -P 0x55 0 ${3 * MiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(707, { count: 30, start: 0, end: 16 * MiB, maxLength: 60 * KiB, flushEvery: 6, align: 4096, groups: true }),
    exercised: (_b, pts) => needs(pts, ['header_update', 'l2_alloc', 'cow_write']),
  },
  {
    name: 'lazy-reftable-grow',
    note: 'lazy_refcounts=on with 512-byte clusters filled to just below what the refcount table covers: table growth behind the dirty bit, and repairs that must grow it',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 10 * MiB, ['cluster_size=512', 'lazy_refcounts=on']);
      qemuIo(image, 'qcow2', [`write -P 0x23 0 ${7600 * KiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(1010, { count: 36, start: 7400 * KiB, end: 10 * MiB, maxLength: 40 * KiB, flushEvery: 7, align: 512, groups: true }),
    exercised: (b, pts) => needs(pts, ['reftable_grow', 'header_update', 'refblock_alloc']) ?? (be32(b.image, 56) > 1 ? null : 'the refcount table did not grow'),
  },
  {
    name: 'external-data-file',
    note: 'data_file=data.raw, 4 KiB clusters: data goes to the data file, metadata to the image; flushes sync both',
    build(dir) {
      // An absolute name: qemu-img create resolves a relative one against its working directory.
      const data = path.join(dir, 'data.raw');
      const image = qcow2(dir, 'img.qcow2', 16 * MiB, ['cluster_size=4096', `data_file=${data}`]);
      return { image, format: 'qcow2', written: [image, data], frozen: [] };
    },
    ops: genOps(808, { count: 30, start: 0, end: 16 * MiB, maxLength: 40 * KiB, flushEvery: 5, align: 4096 }),
    exercised: (_b, pts) => needs(pts, ['data_write', 'l2_alloc', 'l1_update']),
  },
  // ---- qcow2 sparse operations (issue 13): writeZeroes with and without unmap, resize ----
  {
    name: 'zero-v3',
    note: 'v3, 4 KiB clusters, with data: writeZeroes with and without unmap (zero flags, freed clusters reused by later writes), beside writes',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 16 * MiB, ['cluster_size=4096']);
      qemuIo(image, 'qcow2', [`write -P 0x71 0 ${6 * MiB}`, `write -P 0x72 ${10 * MiB} ${MiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(1212, { count: 36, start: 0, end: 16 * MiB, maxLength: 200 * KiB, flushEvery: 5, align: 4096, groups: true, zeroes: 0.45 }),
    exercised: (_b, pts) => needs(pts, ['l2_update', 'refblock_update', 'cow_write']),
  },
  {
    name: 'zero-v2',
    note: 'v2 (compat=0.10), 4 KiB clusters, no backing file: discard unallocates, zeroing without unmap writes zeros in place',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 16 * MiB, ['cluster_size=4096', 'compat=0.10']);
      qemuIo(image, 'qcow2', [`write -P 0x73 0 ${8 * MiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(1313, { count: 36, start: 0, end: 16 * MiB, maxLength: 200 * KiB, flushEvery: 5, align: 4096, zeroes: 0.5 }),
    exercised: (_b, pts) => needs(pts, ['l2_update', 'refblock_update', 'zero_write']),
  },
  {
    name: 'zero-snapshot',
    note: '64 KiB clusters, data then an internal snapshot: zeroing shared clusters copies the L2 table and only drops a reference',
    build(dir) {
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, []);
      qemuIo(image, 'qcow2', [`write -P 0x74 0 ${6 * MiB}`, `write -P 0x75 ${7 * MiB} 70000`]);
      qemuImg('snapshot', '-c', 's1', image);
      convertToRaw(image, path.join(dir, 's1.raw'));
      return { image, format: 'qcow2', written: [image], frozen: [path.join(dir, 's1.raw')] };
    },
    ops: genOps(1414, { count: 30, start: 0, end: 8 * MiB, maxLength: 300 * KiB, flushEvery: 5, align: 65536, zeroes: 0.5 }),
    extraCheck: snapshotUnchanged('s1'),
    exercised: (_b, pts) => needs(pts, ['l2_alloc', 'l1_update', 'refblock_update']),
  },
  {
    name: 'zero-compressed',
    note: '64 KiB clusters from qemu-img convert -c (compressed clusters share host clusters): discard and zeroing drop each entry\'s reference',
    build(dir) {
      const src = path.join(dir, 'src.raw');
      const bytes = Buffer.alloc(8 * MiB);
      textData(6 * MiB, 6).copy(bytes);
      fs.writeFileSync(src, bytes);
      const image = path.join(dir, 'img.qcow2');
      qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, image);
      fs.rmSync(src);
      return { image, format: 'qcow2', written: [image], frozen: [] };
    },
    ops: genOps(1515, { count: 30, start: 0, end: 7 * MiB, maxLength: 300 * KiB, flushEvery: 5, align: 65536, zeroes: 0.5 }),
    exercised: (_b, pts) => needs(pts, ['l2_update', 'refblock_update']),
  },
  {
    name: 'zero-extl2-backing',
    note: 'extended_l2=on, 64 KiB clusters over a qcow2 backing file: zero bits per subcluster, backing data never shows through',
    build(dir) {
      const base = qcow2(dir, 'base.qcow2', 8 * MiB, []);
      qemuIo(base, 'qcow2', [`write -P 0x76 0 ${7 * MiB}`]);
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, ['extended_l2=on', 'cluster_size=65536'], ['base.qcow2', 'qcow2']);
      qemuIo(image, 'qcow2', [`write -P 0x77 0 ${MiB}`, 'write -z 1048576 8192', `write -P 0x78 ${3 * MiB} 70000`]);
      return { image, format: 'qcow2', written: [image], frozen: [base] };
    },
    ops: genOps(1616, { count: 36, start: 0, end: 8 * MiB, maxLength: 150 * KiB, flushEvery: 5, align: 2048, groups: true, zeroes: 0.45 }),
    exercised: (_b, pts) => needs(pts, ['l2_update', 'cow_write', 'data_write']),
  },
  {
    name: 'resize-grow',
    note: '4 KiB clusters (an L2 table maps 2 MiB), 8 MiB over a 12 MiB backing file, grown to 40 MiB mid-workload: the L1 table moves, the grown range hides the backing data, the size is written last',
    guestSize: 40 * MiB,
    build(dir) {
      const base = qcow2(dir, 'base.qcow2', 12 * MiB, []);
      qemuIo(base, 'qcow2', [`write -P 0x79 0 ${12 * MiB}`]);
      const image = qcow2(dir, 'img.qcow2', 8 * MiB, ['cluster_size=4096'], ['base.qcow2', 'qcow2']);
      qemuIo(image, 'qcow2', [`write -P 0x7a 0 ${MiB}`]);
      return { image, format: 'qcow2', written: [image], frozen: [base] };
    },
    ops: [
      ...genOps(1717, { count: 12, start: 0, end: 8 * MiB, maxLength: 40 * KiB, flushEvery: 4, align: 4096, zeroes: 0.3 }),
      { kind: 'resize', size: 40 * MiB },
      ...genOps(1718, { count: 24, start: 6 * MiB, end: 40 * MiB, maxLength: 100 * KiB, flushEvery: 5, align: 4096, zeroes: 0.3 }),
    ],
    exercised: (b, pts) => needs(pts, ['l1_grow', 'l1_switch', 'header_resize', 'l2_alloc']) ?? (qcow2Size(b.image) === 40 * MiB ? null : `the disk is ${qcow2Size(b.image)} bytes, not 40 MiB`),
  },
  {
    name: 'qed-need-check',
    note: 'QED, 4 KiB clusters over a raw backing file: appending allocation behind the need-check bit',
    build(dir) {
      const base = path.join(dir, 'base.raw');
      fs.writeFileSync(base, patternBytes(4 * MiB, 9));
      const image = path.join(dir, 'img.qed');
      qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', image, String(24 * MiB));
      qemuIo(image, 'qed', [`write -P 0x66 ${MiB} ${MiB}`]);
      return { image, format: 'qed', written: [image], frozen: [base] };
    },
    ops: genOps(909, { count: 30, start: 0, end: 24 * MiB, maxLength: 40 * KiB, flushEvery: 6, align: 4096, groups: true }),
    exercised: (_b, pts) => needs(pts, ['header_update', 'cow_write', 'qed_l2_alloc', 'qed_l1_update', 'qed_l2_update']),
  },
];

