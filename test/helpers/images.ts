/**
 * Image factory: every kind of image the read tests cover, built at test
 * time in a scratch directory with qemu-img and qemu-io (QEMU is the oracle,
 * so whatever it writes is by definition a valid image of that kind).
 *
 * Images are small (a few MiB of data, at most ~100 MiB virtual, mostly
 * sparse) so the whole matrix builds and reads in seconds.
 *
 * Usage:
 *   const img = kind.build(dir);   // for each kind of QCOW2_KINDS
 *   img.path, img.format, img.files (image + backing chain + data file)
 */
import fs from 'node:fs';
import path from 'node:path';
import { patternBytes, qemuImg, qemuIo, run, sha256File } from './qemu.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

export interface TestImage {
  kind: string;
  /** absolute path of the image to open */
  path: string;
  format: 'qcow2' | 'raw' | 'qed';
  /** what this image exercises, for test names and failure messages */
  note: string;
  /** every file the image reads: itself, its backing chain, its data file */
  files: string[];
  virtualSize: number;
}

export interface ImageKind {
  name: string;
  note: string;
  /** Build into `dir` (which must exist and be empty of this kind's files). */
  build(dir: string): TestImage;
}

/** A file of deterministic random (incompressible) bytes for `qemu-io write -s`. */
function randomFile(dir: string, seed: number, length: number): string {
  const p = path.join(dir, `rand-${seed}-${length}.bin`);
  if (!fs.existsSync(p)) fs.writeFileSync(p, patternBytes(length, seed));
  return p;
}

function create(img: string, size: number, opts: string[] = [], backing?: { name: string; format: string }): void {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  if (backing) args.push('-b', backing.name, '-F', backing.format);
  args.push(img, String(size));
  qemuImg(...args);
}

/**
 * The common workload: pattern writes at unaligned offsets crossing cluster
 * boundaries, incompressible data, zero writes (allocating and unmapping),
 * discards at unaligned offsets, overwrites, and a write touching the very
 * end of the disk. Offsets beyond `size` are skipped so small disks work.
 */
function workload(dir: string, size: number, seed: number): string[] {
  const rnd = randomFile(dir, seed, 1_200_000);
  const cmds: Array<[number, number, string]> = [
    [0, 70_000, `write -s ${rnd} 0 70000`],
    [1_234_567, 300_000, 'write -P 0xab 1234567 300000'],
    [2_000_001, 1_200_000, `write -s ${rnd} 2000001 1200000`],
    [4 * MiB, MiB, `write -P 0x5c ${4 * MiB} ${MiB}`],
    [4_500_000, 100_000, 'write -z 4500000 100000'],
    [4_700_000, 200_000, 'write -z -u 4700000 200000'],
    [4_900_001, 65_536, 'discard 4900001 65536'],
    [8_000_000, 300_000, 'write -z 8000000 300000'],
    [1_300_000, 5_000, 'write -P 0x3e 1300000 5000'],
    [1_235_567, 3_000, 'discard 1235567 3000'],
    [9 * MiB + 4096, 20_000, `write -P 0x77 ${9 * MiB + 4096} 20000`],
  ];
  const out = cmds.filter(([off, len]) => off + len <= size).map(([, , c]) => c);
  out.push(`write -P 0xee ${size - 5000} 5000`);
  return out;
}

function io(img: string, cmds: string[], format = 'qcow2'): void {
  if (cmds.length) qemuIo(img, format, cmds);
}

function result(kind: string, note: string, p: string, virtualSize: number, files: string[] = [p], format: TestImage['format'] = 'qcow2'): TestImage {
  return { kind, note, path: p, format, files, virtualSize };
}

/** A plain qcow2 with the common workload. */
function simple(name: string, note: string, size: number, opts: string[], seed: number): ImageKind {
  return {
    name,
    note,
    build(dir) {
      const p = path.join(dir, `${name}.qcow2`);
      create(p, size, opts);
      io(p, workload(dir, size, seed));
      return result(name, note, p, size);
    },
  };
}

/**
 * Raw source data for compression: incompressible random runs, highly
 * compressible text, zero runs (left unallocated by convert) and clusters
 * that are half random, half constant.
 */
function compressibleSource(dir: string, size: number): string {
  const src = path.join(dir, 'compress-src.raw');
  if (fs.existsSync(src)) return src;
  const fd = fs.openSync(src, 'w');
  try {
    fs.ftruncateSync(fd, size);
    const text = Buffer.from('qmount compressible line of text 0123456789\n'.repeat(4000));
    fs.writeSync(fd, patternBytes(300_000, 11), 0, 300_000, 0);
    fs.writeSync(fd, text, 0, text.length, 300_000);
    fs.writeSync(fd, patternBytes(500_000, 12), 0, 500_000, 1_000_003);
    // 16 KiB units: 8 KiB random then 8 KiB of one byte, over 2 MiB
    for (let off = 3 * MiB; off < 5 * MiB; off += 16 * KiB) {
      fs.writeSync(fd, patternBytes(8 * KiB, off), 0, 8 * KiB, off);
      fs.writeSync(fd, Buffer.alloc(8 * KiB, 0x42), 0, 8 * KiB, off + 8 * KiB);
    }
    fs.writeSync(fd, text, 0, 100_000, size - 100_000);
  } finally {
    fs.closeSync(fd);
  }
  return src;
}

function compressed(type: 'zlib' | 'zstd', cluster: number): ImageKind {
  const name = `compressed-${type}-${cluster / KiB}k`;
  const note = `qemu-img convert -c, compression_type=${type}, ${cluster / KiB} KiB clusters, then partly overwritten`;
  return {
    name,
    note,
    build(dir) {
      const size = 16 * MiB;
      const src = compressibleSource(dir, size);
      const p = path.join(dir, `${name}.qcow2`);
      qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type},cluster_size=${cluster}`, src, p);
      // Partial overwrites and a discard inside compressed clusters (QEMU decompresses and rewrites them).
      io(p, ['write -P 0x61 310007 3000', 'write -z 1100001 5000', 'discard 3200000 70000', `write -P 0x62 ${size - 777} 777`]);
      return result(name, note, p, size);
    },
  };
}

function extendedL2(withBacking: boolean): ImageKind {
  const name = withBacking ? 'extended-l2-backing' : 'extended-l2';
  const note = `extended_l2=on, 64 KiB clusters, subcluster writes and zero writes at 2 KiB offsets${withBacking ? ', over a qcow2 backing file' : ''}`;
  return {
    name,
    note,
    build(dir) {
      const size = 32 * MiB;
      const files: string[] = [];
      let backing: { name: string; format: string } | undefined;
      if (withBacking) {
        const base = path.join(dir, `${name}-base.qcow2`);
        create(base, size);
        io(base, [`write -s ${randomFile(dir, 21, 1_200_000)} 0 1200000`, `write -P 0x99 ${2 * MiB} ${MiB}`]);
        files.push(base);
        backing = { name: path.basename(base), format: 'qcow2' };
      }
      const p = path.join(dir, `${name}.qcow2`);
      create(p, size, ['extended_l2=on', 'cluster_size=65536'], backing);
      io(p, [
        'write -P 0x61 2048 2048', // subcluster 1 of cluster 0
        'write -P 0x62 6144 10240', // subclusters 3..7
        'write -z 4096 2048', // zero subcluster 2
        'write -P 0x63 67584 1000', // partial subcluster in cluster 1
        'write -z 133120 4096', // zero subclusters in an unallocated cluster (reads zero, hides backing)
        'discard 200704 2048', // discard one subcluster
        'write -P 0x64 1050624 2048', // inside the backing's random area
        'write -z 1054720 6144',
        `write -P 0x65 ${2 * MiB + 30 * KiB} 2048`,
        ...workload(dir, size, 22).slice(3),
      ]);
      files.unshift(p);
      return result(name, note, p, size, files);
    },
  };
}

function snapshots(): ImageKind {
  const name = 'snapshots';
  const note = 'internal snapshots s1 and s2 with writes and discards after each (shared clusters, refcount > 1)';
  return {
    name,
    note,
    build(dir) {
      const size = 32 * MiB;
      const p = path.join(dir, `${name}.qcow2`);
      create(p, size);
      io(p, workload(dir, size, 31));
      qemuImg('snapshot', '-c', 's1', p);
      io(p, ['write -P 0x71 1234000 100000', 'discard 2100000 300000', 'write -z 4194304 65536']);
      qemuImg('snapshot', '-c', 's2', p);
      io(p, ['write -P 0x72 0 4096', 'write -P 0x73 2000000 70000', `write -s ${randomFile(dir, 32, 200_000)} 12000001 200000`]);
      return result(name, note, p, size);
    },
  };
}

/** base <- mid <- top, each in its own directory, linked by relative names. */
function chain3(): ImageKind {
  const name = 'chain-qcow2-3';
  const note = 'qcow2 <- qcow2 <- qcow2 chain with relative backing names across directories';
  return {
    name,
    note,
    build(dir) {
      const size = 32 * MiB;
      fs.mkdirSync(path.join(dir, 'c3base'), { recursive: true });
      fs.mkdirSync(path.join(dir, 'c3top'), { recursive: true });
      const base = path.join(dir, 'c3base', 'base.qcow2');
      const mid = path.join(dir, 'c3mid.qcow2');
      const top = path.join(dir, 'c3top', 'top.qcow2');
      create(base, size, ['cluster_size=4096']);
      io(base, workload(dir, size, 41));
      create(mid, size, [], { name: 'c3base/base.qcow2', format: 'qcow2' });
      io(mid, ['write -P 0x81 1200000 200000', 'write -z 2100000 100000', 'discard 2300000 131072', `write -P 0x82 ${20 * MiB} 1000`]);
      create(top, size, ['cluster_size=16384'], { name: '../c3mid.qcow2', format: 'qcow2' });
      io(top, ['write -P 0x91 1250000 10000', 'write -z 2000001 30000', 'discard 4194304 65536', 'write -P 0x92 0 512']);
      return result(name, note, top, size, [top, mid, base]);
    },
  };
}

function rawBacking(): ImageKind {
  const name = 'chain-raw-base';
  const note = 'raw <- qcow2, backing format raw';
  return {
    name,
    note,
    build(dir) {
      const size = 24 * MiB;
      const base = path.join(dir, 'rawbase.raw');
      const fd = fs.openSync(base, 'w');
      fs.ftruncateSync(fd, size);
      fs.writeSync(fd, patternBytes(2 * MiB, 51), 0, 2 * MiB, 1_000_000);
      fs.writeSync(fd, Buffer.alloc(100_000, 0x5b), 0, 100_000, size - 100_000);
      fs.closeSync(fd);
      const top = path.join(dir, 'rawtop.qcow2');
      create(top, size, [], { name: 'rawbase.raw', format: 'raw' });
      io(top, ['write -P 0xa1 1500000 70000', 'write -z 2500000 4096', 'discard 1000000 65536', `write -P 0xa2 ${size - 3000} 3000`]);
      return result(name, note, top, size, [top, base]);
    },
  };
}

function backingSized(shorter: boolean): ImageKind {
  const name = shorter ? 'backing-shorter' : 'backing-longer';
  const note = shorter
    ? 'backing file (16 MiB + 512) shorter than the overlay (32 MiB): beyond it reads zeros'
    : 'backing file (48 MiB, data past 32 MiB) longer than the overlay (32 MiB)';
  return {
    name,
    note,
    build(dir) {
      const size = 32 * MiB;
      const baseSize = shorter ? 16 * MiB + 512 : 48 * MiB;
      const base = path.join(dir, `${name}-base.qcow2`);
      create(base, baseSize);
      io(base, [
        `write -s ${randomFile(dir, 61, 1_200_000)} ${baseSize - 1_200_000} 1200000`,
        `write -P 0xb1 ${16 * MiB - 65536} 65536`,
        'write -P 0xb2 0 1000000',
      ]);
      const top = path.join(dir, `${name}.qcow2`);
      create(top, size, [], { name: path.basename(base), format: 'qcow2' });
      io(top, ['write -P 0xb3 500000 10000', `write -P 0xb4 ${16 * MiB - 300} 1000`, `write -P 0xb5 ${size - 100} 100`]);
      return result(name, note, top, size, [top, base]);
    },
  };
}

function v2Overlay(): ImageKind {
  const name = 'chain-v2-overlay';
  const note = 'compat=0.10 overlay on a v3 base: discards and zero writes in a v2 overlay';
  return {
    name,
    note,
    build(dir) {
      const size = 16 * MiB;
      const base = path.join(dir, 'v2o-base.qcow2');
      create(base, size);
      io(base, workload(dir, size, 71));
      const top = path.join(dir, 'v2o-top.qcow2');
      create(top, size, ['compat=0.10'], { name: 'v2o-base.qcow2', format: 'qcow2' });
      io(top, ['write -P 0xc1 1234000 70000', 'write -z 2000000 100000', 'discard 4194304 131072']);
      return result(name, note, top, size, [top, base]);
    },
  };
}

function dataFile(rawFlag: boolean): ImageKind {
  const name = rawFlag ? 'data-file-raw' : 'data-file';
  const note = `external data file (data_file=..., data_file_raw=${rawFlag ? 'on' : 'off'})`;
  return {
    name,
    note,
    build(dir) {
      const size = 32 * MiB;
      const p = path.join(dir, `${name}.qcow2`);
      const data = path.join(dir, `${name}.data`);
      create(p, size, [`data_file=${data}`, `data_file_raw=${rawFlag ? 'on' : 'off'}`]);
      io(p, workload(dir, size, rawFlag ? 81 : 82));
      return result(name, note, p, size, [p, data]);
    },
  };
}

function lazyDirty(): ImageKind {
  const name = 'lazy-refcounts-dirty';
  const note = 'lazy_refcounts=on, writer killed by SIGKILL: dirty bit set, refcounts stale';
  return {
    name,
    note,
    build(dir) {
      const size = 32 * MiB;
      const p = path.join(dir, `${name}.qcow2`);
      create(p, size, ['lazy_refcounts=on']);
      io(p, workload(dir, size, 91));
      // qemu-io dies by the signal it raises: that is the point, so its exit status is not checked.
      const r = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 0 1M', '-c', `write -P 0x56 ${5 * MiB + 123} 70000`, '-c', 'sigraise 9', p], { allowFail: true });
      if (r.code === 0) throw new Error(`${name}: qemu-io was expected to die by SIGKILL`);
      const info = JSON.parse(qemuImg('info', '--output=json', '-U', p)) as { 'dirty-flag'?: boolean };
      if (!info['dirty-flag']) throw new Error(`${name}: image is not dirty after the killed writer`);
      return result(name, note, p, size);
    },
  };
}

/** Every qcow2 kind the read matrix covers. */
export const QCOW2_KINDS: ImageKind[] = [
  simple('v3-64k', 'qcow2 v3 (compat=1.1), 64 KiB clusters', 32 * MiB, [], 1),
  simple('v2-64k', 'qcow2 v2 (compat=0.10), 64 KiB clusters', 32 * MiB, ['compat=0.10'], 2),
  simple('v2-4k', 'qcow2 v2 (compat=0.10), 4 KiB clusters', 16 * MiB, ['compat=0.10', 'cluster_size=4096'], 3),
  simple('v3-512', 'qcow2 v3, 512-byte clusters', 16 * MiB, ['cluster_size=512'], 4),
  simple('v3-4k', 'qcow2 v3, 4 KiB clusters', 32 * MiB, ['cluster_size=4096'], 5),
  simple('v3-2M', 'qcow2 v3, 2 MiB clusters', 32 * MiB, ['cluster_size=2097152'], 6),
  simple('refcount-1', 'refcount_bits=1', 32 * MiB, ['refcount_bits=1'], 7),
  simple('refcount-64', 'refcount_bits=64', 32 * MiB, ['refcount_bits=64'], 8),
  simple('size-100M+512', 'virtual size 100 MiB + 512, not a multiple of the 64 KiB cluster', 100 * MiB + 512, [], 9),
  simple('size-2M-unaligned', 'virtual size 33 MiB + 512 with 2 MiB clusters', 33 * MiB + 512, ['cluster_size=2097152'], 10),
  simple('prealloc-metadata', 'preallocation=metadata', 32 * MiB, ['preallocation=metadata'], 11),
  simple('prealloc-falloc', 'preallocation=falloc', 16 * MiB, ['preallocation=falloc'], 12),
  simple('prealloc-full', 'preallocation=full', 16 * MiB, ['preallocation=full'], 13),
  compressed('zlib', 4 * KiB),
  compressed('zlib', 64 * KiB),
  compressed('zstd', 4 * KiB),
  compressed('zstd', 64 * KiB),
  extendedL2(false),
  extendedL2(true),
  snapshots(),
  chain3(),
  rawBacking(),
  backingSized(true),
  backingSized(false),
  v2Overlay(),
  dataFile(true),
  dataFile(false),
  lazyDirty(),
];

/** sha256 of each file, keyed by path (to prove a read-only open wrote nothing). */
export function hashFiles(files: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of files) out[f] = sha256File(f);
  return out;
}

/** qemu-img info --output=json (with --backing-chain: an array, top first). */
export function qemuInfo(image: string, chain = false): QemuInfo[] {
  const args = ['info', '--output=json', '-U'];
  if (chain) args.push('--backing-chain');
  args.push(image);
  const parsed = JSON.parse(qemuImg(...args)) as QemuInfo | QemuInfo[];
  return Array.isArray(parsed) ? parsed : [parsed];
}

export interface QemuInfo {
  'virtual-size': number;
  filename: string;
  format: string;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  snapshots?: Array<{ id: string; name: string; 'vm-state-size': number; 'date-sec': number; 'vm-clock-sec': number; 'vm-clock-nsec': number }>;
  'format-specific'?: {
    type: string;
    data: {
      compat?: string;
      'compression-type'?: string;
      'lazy-refcounts'?: boolean;
      'refcount-bits'?: number;
      corrupt?: boolean;
      'extended-l2'?: boolean;
      'data-file'?: string;
      'data-file-raw'?: boolean;
    };
  };
}
