#!/usr/bin/env node
/**
 * Builds a small qcow2 image holding a partitioned disk with one ext4
 * filesystem of known files, without loop devices or mounting:
 *
 *   1. write the files into a staging directory,
 *   2. make a sparse raw disk and partition it with sfdisk (GPT or MBR),
 *   3. make the filesystem in a partition-sized file (mkfs.ext4 -d staging),
 *   4. copy that file into the disk at the partition's offset,
 *   5. qemu-img convert the disk to qcow2 (optionally compressed).
 *
 * Used by `npm start` (the demo) and by the end-to-end tests, which import
 * makeDemoImage() and check the files they read back against its manifest.
 *
 *   node scripts/make-demo.mjs TARGET.qcow2 [--size-mib N] [--label gpt|dos]
 *                              [--compress] [--cluster-size BYTES] [--json]
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';

const SECTOR = 512;
const TOOL_PATH = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/sbin:/sbin`;

function run(cmd, args, input) {
  const r = spawnSync(cmd, args, { input, encoding: 'utf8', env: { ...process.env, PATH: TOOL_PATH } });
  if (r.error) {
    throw new Error(r.error.code === 'ENOENT' ? `${cmd} not found (run: node scripts/setup.mjs)` : `${cmd}: ${r.error.message}`);
  }
  if (r.status !== 0) {
    const why = `${r.stderr ?? ''}${r.stdout ?? ''}`.trim().split('\n').slice(-3).join('; ');
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${why}`);
  }
  return r.stdout;
}

/** Deterministic pseudo-random bytes (xorshift32), so a bad byte reproduces. */
export function demoBytes(length, seed) {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** The demo's files: relative path -> content. */
export function demoFiles() {
  const lines = [];
  for (let i = 1; i <= 20000; i++) lines.push(`line ${String(i).padStart(5, '0')}: the quick brown fox jumps over the lazy dog`);
  return {
    'README.txt':
      'This ext4 filesystem lives in the first partition of a qcow2 image.\n' +
      'qmount shows the image as one raw disk file; the kernel reads the\n' +
      'partition table and the filesystem from it through a loop device.\n' +
      'Check every file: sha256sum -c SHA256SUMS\n',
    'hello.txt': 'Hello from inside a qcow2 image!\n',
    'docs/nested/deep.txt': 'A file two directories down.\n',
    'data/random-4MiB.bin': demoBytes(4 * 1024 * 1024, 7),
    'data/lines.txt': `${lines.join('\n')}\n`,
    'data/tiny.bin': Buffer.from([0, 1, 2, 3, 0xfe, 0xff]),
  };
}

function sha256(data) {
  return crypto.createHash('sha256').update(data).digest('hex');
}

/** Copy `src` into `dst` at byte `offset`, skipping all-zero chunks so the disk stays sparse. */
function copyInto(src, dst, offset) {
  const chunk = Buffer.alloc(1024 * 1024);
  const zero = Buffer.alloc(chunk.length);
  const fin = fs.openSync(src, 'r');
  const fout = fs.openSync(dst, 'r+');
  try {
    for (let pos = 0; ; ) {
      const n = fs.readSync(fin, chunk, 0, chunk.length, pos);
      if (n === 0) break;
      if (chunk.compare(zero, 0, n, 0, n) !== 0) {
        for (let done = 0; done < n; ) done += fs.writeSync(fout, chunk, done, n - done, offset + pos + done);
      }
      pos += n;
    }
  } finally {
    fs.closeSync(fin);
    fs.closeSync(fout);
  }
}

/**
 * Build the image at `target` (replaced if it exists; written under a
 * temporary name and renamed, so an interrupted run never leaves a
 * half-made image behind). Returns where the partition is and what it holds.
 */
export function makeDemoImage(target, opts = {}) {
  const sizeMiB = opts.sizeMiB ?? 256;
  const label = opts.label ?? 'gpt';
  if (sizeMiB < 8) throw new Error('the demo disk needs at least 8 MiB');
  if (label !== 'gpt' && label !== 'dos') throw new Error(`label must be gpt or dos, not ${label}`);
  const abs = path.resolve(target);
  const work = `${abs}.work`;
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(path.join(work, 'root'), { recursive: true });
  try {
    // 1. the files, plus a checksum list the user can verify inside the guest
    const files = demoFiles();
    const manifest = [];
    for (const [rel, content] of Object.entries(files)) {
      const p = path.join(work, 'root', rel);
      fs.mkdirSync(path.dirname(p), { recursive: true });
      fs.writeFileSync(p, content);
      const buf = Buffer.isBuffer(content) ? content : Buffer.from(content);
      manifest.push({ path: rel, size: buf.length, sha256: sha256(buf) });
    }
    const sums = `${manifest.map((f) => `${f.sha256}  ${f.path}`).join('\n')}\n`;
    fs.writeFileSync(path.join(work, 'root', 'SHA256SUMS'), sums);
    manifest.push({ path: 'SHA256SUMS', size: sums.length, sha256: sha256(sums) });

    // 2. the partitioned disk; the partition starts at 1 MiB
    const disk = path.join(work, 'disk.raw');
    fs.writeFileSync(disk, '');
    fs.truncateSync(disk, sizeMiB * 1024 * 1024);
    const type = label === 'gpt' ? 'linux' : '83';
    run('sfdisk', ['-q', '--no-reread', '--no-tell-kernel', disk], `label: ${label}\nstart=2048, type=${type}\n`);
    const table = JSON.parse(run('sfdisk', ['-J', disk])).partitiontable;
    const part = table.partitions[0];
    const partOffset = part.start * SECTOR;
    const partSize = part.size * SECTOR;

    // 3. + 4. the filesystem, made in a file and copied into place
    const fsImage = path.join(work, 'part.ext4');
    fs.writeFileSync(fsImage, '');
    fs.truncateSync(fsImage, partSize);
    run('mkfs.ext4', ['-q', '-F', '-L', 'qmount-demo', '-E', 'root_owner=0:0', '-d', path.join(work, 'root'), fsImage]);
    copyInto(fsImage, disk, partOffset);
    fs.rmSync(fsImage);

    // 5. qcow2
    const tmp = `${abs}.tmp`;
    const args = ['convert', '-q', '-f', 'raw', '-O', 'qcow2'];
    if (opts.compress) args.push('-c');
    if (opts.clusterSize) args.push('-o', `cluster_size=${opts.clusterSize}`);
    run('qemu-img', [...args, disk, tmp]);
    run('qemu-img', ['check', '-q', tmp]);
    fs.renameSync(tmp, abs);
    return {
      image: abs,
      label,
      virtualSize: sizeMiB * 1024 * 1024,
      partition: { offset: partOffset, size: partSize },
      files: manifest,
    };
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
    fs.rmSync(`${abs}.tmp`, { force: true });
  }
}

function main(argv) {
  const opts = {};
  let target;
  let json = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--size-mib') opts.sizeMiB = Number(argv[++i]);
    else if (a === '--label') opts.label = argv[++i];
    else if (a === '--compress') opts.compress = true;
    else if (a === '--cluster-size') opts.clusterSize = Number(argv[++i]);
    else if (a === '--json') json = true;
    else if (!a.startsWith('-') && !target) target = a;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!target) throw new Error('usage: make-demo.mjs TARGET.qcow2 [--size-mib N] [--label gpt|dos] [--compress] [--cluster-size BYTES] [--json]');
  fs.mkdirSync(path.dirname(path.resolve(target)), { recursive: true });
  const result = makeDemoImage(target, opts);
  if (json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  else process.stdout.write(`made ${result.image} (${result.label} partition at ${result.partition.offset}, ${result.files.length} files)\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    main(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`make-demo: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  }
}
