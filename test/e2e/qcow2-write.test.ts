/**
 * qcow2 writes through a real FUSE mount (issue 3). For every image kind:
 * a few hundred writes of odd sizes go both to disk.raw and to a plain raw
 * model; read-backs in between must match. After unmount QEMU judges:
 * `qemu-img check` exits 0, `qemu-img compare` says identical, no dirty
 * flag, internal snapshots and backing files unchanged.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mountImage } from '../helpers/mount.js';
import { convertToRaw, qemuCheck, qemuCompare, qemuImg, qemuIo, run, scratchDir, sha256File } from '../helpers/qemu.js';
import { compareAll, fileTarget, randomWrites } from '../helpers/workload.js';

const MiB = 1024 * 1024;

interface Kind {
  name: string;
  size: number;
  /** builds the image in dir; returns the image path and files that must stay unchanged */
  build(dir: string): { image: string; frozen: string[]; snapshots?: string[] };
  count?: number;
  maxLength?: number;
  after?(image: string): void;
}

function create(dir: string, opts: string, size = 64 * MiB, backing?: [string, string]): string {
  const image = path.join(dir, 'disk.qcow2');
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts) args.push('-o', opts);
  if (backing) args.push('-b', backing[0], '-F', backing[1]);
  qemuImg(...args, image, String(size));
  return image;
}

function withData(image: string, cmds: string[]): void {
  qemuIo(image, 'qcow2', cmds);
}

function header32(image: string, at: number): number {
  const fd = fs.openSync(image, 'r');
  const b = Buffer.alloc(4);
  fs.readSync(fd, b, 0, 4, at);
  fs.closeSync(fd);
  return b.readUInt32BE(0);
}

const KINDS: Kind[] = [
  { name: 'v2 (compat=0.10)', size: 64 * MiB, build: (d) => ({ image: create(d, 'compat=0.10'), frozen: [] }) },
  { name: 'v3 64k clusters', size: 64 * MiB, build: (d) => ({ image: create(d, '') , frozen: [] }) },
  {
    name: '512-byte clusters, refcount table grows several times',
    size: 48 * MiB,
    count: 250,
    maxLength: 3 * MiB,
    build: (d) => ({ image: create(d, 'cluster_size=512', 48 * MiB), frozen: [] }),
    after: (image) => expect(header32(image, 56)).toBeGreaterThanOrEqual(3), // refcount_table_clusters: 1 at creation
  },
  { name: '2M clusters', size: 64 * MiB, build: (d) => ({ image: create(d, 'cluster_size=2M'), frozen: [] }) },
  { name: 'refcount_bits=1', size: 64 * MiB, build: (d) => ({ image: create(d, 'refcount_bits=1,cluster_size=4k'), frozen: [] }) },
  { name: 'refcount_bits=2', size: 64 * MiB, build: (d) => ({ image: create(d, 'refcount_bits=2'), frozen: [] }) },
  { name: 'refcount_bits=64', size: 64 * MiB, build: (d) => ({ image: create(d, 'refcount_bits=64'), frozen: [] }) },
  ...(['zlib', 'zstd'] as const).map((ct): Kind => ({
    name: `compressed (${ct})`,
    size: 64 * MiB,
    build: (d) => {
      const src = create(d, '');
      withData(src, ['write -P 0x5a 0 24M', 'write -P 0x21 30M 3M']);
      const image = path.join(d, 'compressed.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', `compression_type=${ct},cluster_size=4k`, src, image);
      fs.rmSync(src);
      return { image, frozen: [] };
    },
  })),
  {
    name: 'two internal snapshots',
    size: 64 * MiB,
    build: (d) => {
      const image = create(d, '');
      withData(image, ['write -P 0x11 0 20M']);
      qemuImg('snapshot', '-c', 's1', image);
      withData(image, ['write -P 0x22 10M 20M']);
      qemuImg('snapshot', '-c', 's2', image);
      return { image, frozen: [], snapshots: ['s1', 's2'] };
    },
  },
  {
    name: 'qcow2 backing file (shorter than the overlay)',
    size: 64 * MiB,
    build: (d) => {
      const base = path.join(d, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(40 * MiB));
      qemuIo(base, 'qcow2', ['write -P 0x33 0 40M']);
      return { image: create(d, '', 64 * MiB, ['base.qcow2', 'qcow2']), frozen: [base] };
    },
  },
  {
    name: 'raw backing file',
    size: 64 * MiB,
    build: (d) => {
      const base = path.join(d, 'base.raw');
      qemuImg('create', '-q', '-f', 'raw', base, String(64 * MiB));
      qemuIo(base, 'raw', ['write -P 0x44 1M 50M']);
      return { image: create(d, '', 64 * MiB, ['base.raw', 'raw']), frozen: [base] };
    },
  },
  {
    name: 'QED backing file',
    size: 48 * MiB,
    build: (d) => {
      const base = path.join(d, 'base.qed');
      qemuImg('create', '-q', '-f', 'qed', base, String(32 * MiB));
      qemuIo(base, 'qed', ['write -P 0x3c 0 20M']);
      return { image: create(d, '', 48 * MiB, ['base.qed', 'qed']), frozen: [base] };
    },
  },
  { name: 'extended_l2 without backing', size: 64 * MiB, build: (d) => ({ image: create(d, 'extended_l2=on,cluster_size=128k'), frozen: [] }) },
  {
    name: 'extended_l2 with backing',
    size: 64 * MiB,
    build: (d) => {
      const base = path.join(d, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(64 * MiB));
      qemuIo(base, 'qcow2', ['write -P 0x55 0 64M']);
      return { image: create(d, 'extended_l2=on', 64 * MiB, ['base.qcow2', 'qcow2']), frozen: [base] };
    },
  },
  { name: 'lazy_refcounts', size: 64 * MiB, build: (d) => ({ image: create(d, 'lazy_refcounts=on'), frozen: [] }) },
  { name: 'preallocation=metadata', size: 64 * MiB, build: (d) => ({ image: create(d, 'preallocation=metadata'), frozen: [] }) },
  {
    name: 'persistent bitmap',
    size: 64 * MiB,
    build: (d) => {
      const image = create(d, '');
      qemuImg('bitmap', '--add', image, 'b0');
      withData(image, ['write -P 0x66 0 4M']);
      return { image, frozen: [] };
    },
  },
  {
    name: 'external data file',
    size: 64 * MiB,
    build: (d) => ({ image: create(d, `data_file=${path.join(d, 'disk.data')}`), frozen: [] }),
  },
];

describe.each(KINDS)('qcow2 writes through a mount: $name', (kind) => {
  let scratch: { dir: string; cleanup: () => void };
  let built: ReturnType<Kind['build']>;
  let frozenHashes: string[];
  let snapshotRaw: Record<string, string>;

  beforeAll(() => {
    scratch = scratchDir('qw');
    built = kind.build(scratch.dir);
    frozenHashes = built.frozen.map(sha256File);
    snapshotRaw = {};
    for (const s of built.snapshots ?? []) {
      snapshotRaw[s] = sha256File(convertToRaw(built.image, path.join(scratch.dir, `snap-${s}.raw`), ['-l', `snapshot.name=${s}`]));
    }
  });
  afterAll(() => scratch?.cleanup());

  it('matches a raw model and QEMU finds the image clean', async () => {
    const model = convertToRaw(built.image, path.join(scratch.dir, 'model.raw'));
    const m = await mountImage(built.image);
    try {
      const t = fileTarget(m.rawPath, kind.size);
      try {
        expect(fs.statSync(m.rawPath).size).toBe(kind.size);
        await randomWrites(t, model, { count: kind.count ?? 200, maxLength: kind.maxLength ?? 4 * MiB, seed: 42, verifyEvery: 25 });
        t.fsync();
        await compareAll(t, model);
      } finally {
        t.close();
      }
    } finally {
      await m.unmount();
    }
    const st = await m.exited;
    expect(st.code).toBe(0);

    const check = qemuCheck(built.image);
    expect(check.output).toContain('No errors were found');
    expect(check.code).toBe(0);
    const cmp = qemuCompare(built.image, model, 'qcow2', 'raw');
    expect(cmp.output).toContain('Images are identical');
    const info = JSON.parse(qemuImg('info', '--output=json', built.image)) as { 'dirty-flag'?: boolean; 'format-specific'?: { data?: { corrupt?: boolean } } };
    expect(info['dirty-flag']).toBe(false);
    expect(info['format-specific']?.data?.corrupt ?? false).toBe(false);
    expect(built.frozen.map(sha256File)).toEqual(frozenHashes);
    for (const s of built.snapshots ?? []) {
      const out = convertToRaw(built.image, path.join(scratch.dir, `snap-${s}-after.raw`), ['-l', `snapshot.name=${s}`]);
      expect(sha256File(out), `snapshot ${s} content`).toBe(snapshotRaw[s]);
    }
    kind.after?.(built.image);
  });
});

describe('concurrent requests through a mount', () => {
  it('fio iodepth 16 random writes with verification on an unallocated image, then QEMU finds it clean', async () => {
    const s = scratchDir('qfio');
    try {
      const image = create(s.dir, 'cluster_size=64k');
      const m = await mountImage(image);
      try {
        const r = run('fio', [
          '--name=overlap', `--filename=${m.rawPath}`, '--ioengine=libaio', '--direct=1', '--iodepth=32',
          '--rw=randwrite', '--bsrange=512-32k', '--size=24M', '--verify=crc32c', '--do_verify=1',
          '--numjobs=1', '--randrepeat=1', '--output-format=terse', '--verify_state_save=0',
        ], { allowFail: true });
        expect(r.stderr + r.stdout).not.toMatch(/verify: bad|crc32c: verify failed|error=/i);
        expect(r.code).toBe(0);
        // Overlapping writers: two jobs on the same range, no verification possible, only consistency.
        // Global options first: fio applies them to every job named after them.
        const r2 = run('fio', [
          `--filename=${m.rawPath}`, '--ioengine=libaio', '--direct=1', '--iodepth=16',
          '--rw=randrw', '--bsrange=4k-256k', '--offset=24M', '--size=16M', '--io_size=64M', '--output-format=terse',
          '--name=a', '--name=b',
        ], { allowFail: true });
        expect(r2.code, r2.stderr).toBe(0);
        expect(r2.stdout.trim().split('\n')).toHaveLength(2);
      } finally {
        await m.unmount();
      }
      const check = qemuCheck(image);
      expect(check.code, check.output).toBe(0);
    } finally {
      s.cleanup();
    }
  });
});
