/**
 * QED sparse-image workloads for the crash-point, fault-injection and
 * close-fault tests (appended to SCENARIOS in crash-scenarios.ts):
 * writeZeroes and discard over data, zero and unallocated clusters, with and
 * without a backing file, mixed with ordinary writes and flushes.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { IoPoint } from '../../src/io/points.js';
import type { Scenario } from './crash-scenarios.js';
import { genZeroOps } from './crash-workload.js';
import { patternBytes, qemuImg, qemuIo } from './qemu.js';

const KiB = 1024;
const MiB = 1024 * 1024;

const needs = (points: IoPoint[], want: IoPoint[]): string | null => {
  const missing = want.filter((p) => !points.includes(p));
  return missing.length ? `the workload never reached ${missing.join(', ')}` : null;
};

export const QED_SPARSE_SCENARIOS: Scenario[] = [
  {
    name: 'qed-discard-backing',
    note: 'QED, 4 KiB clusters over a raw backing file, data written by qemu-io: discards free data clusters (leaked, punched), zeroes over backing data become zero entries, partial clusters copy-on-write',
    leaks: true,
    build(dir) {
      const base = path.join(dir, 'base.raw');
      fs.writeFileSync(base, patternBytes(8 * MiB, 21));
      const image = path.join(dir, 'img.qed');
      qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', image, String(16 * MiB));
      qemuIo(image, 'qed', [`write -P 0x31 0 ${3 * MiB}`, `write -z ${5 * MiB} ${512 * KiB}`, `write -P 0x32 ${10 * MiB} ${MiB}`]);
      return { image, format: 'qed', written: [image], frozen: [base] };
    },
    ops: [
      { kind: 'zero', offset: 256 * KiB, length: 200 * KiB, unmap: true }, // data clusters freed
      { kind: 'zero', offset: 1 * MiB + 100, length: 9000, unmap: false }, // partial data, in place
      { kind: 'flush' },
      { kind: 'zero', offset: 6 * MiB + 2048, length: 64 * KiB, unmap: true }, // over backing data: zero entries, partial COW
      { kind: 'zero', offset: 10 * MiB, length: 128 * KiB, unmap: false }, // data zeroed in place
      ...genZeroOps(1111, { count: 30, start: 0, end: 16 * MiB, maxLength: 96 * KiB, flushEvery: 6, align: 4096, groups: true, zeroShare: 0.5 }),
    ],
    exercised: (_b, pts) => needs(pts, ['header_update', 'punch_hole', 'zero_write', 'qed_l2_update', 'cow_write']),
  },
  {
    name: 'qed-zero-nobacking',
    note: 'QED, 64 KiB clusters, no backing file: zeroes over unallocated clusters allocate nothing, over data clusters are written in place (or freed with unmap); new L2 tables for ordinary writes',
    leaks: true,
    build(dir) {
      const image = path.join(dir, 'img.qed');
      qemuImg('create', '-q', '-f', 'qed', image, String(64 * MiB));
      qemuIo(image, 'qed', [`write -P 0x41 0 ${4 * MiB}`, `write -P 0x42 ${40 * MiB} ${2 * MiB}`]);
      return { image, format: 'qed', written: [image], frozen: [] };
    },
    ops: [
      { kind: 'zero', offset: 1 * MiB, length: 1 * MiB, unmap: true },
      { kind: 'zero', offset: 40 * MiB + 1000, length: 300 * KiB, unmap: false },
      { kind: 'flush' },
      { kind: 'zero', offset: 20 * MiB, length: 512 * KiB, unmap: true }, // unallocated: nothing to do
      ...genZeroOps(2222, { count: 26, start: 0, end: 64 * MiB, maxLength: 512 * KiB, flushEvery: 5, align: 65536, groups: true, zeroShare: 0.5 }),
    ],
    exercised: (_b, pts) => needs(pts, ['punch_hole', 'zero_write', 'qed_l2_update']),
  },
];
