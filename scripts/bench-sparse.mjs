#!/usr/bin/env node
/**
 * Sparse-image benchmark (`node scripts/bench-sparse.mjs`, or
 * `npm run bench -- --sparse`): qmount on fuse3 beside qemu-storage-daemon's
 * FUSE export, same run, systems taking turns (each round in the other
 * order), median of --repeat runs, on copies of one image.
 *
 * Systems, both with the same sparse semantics:
 *   qmount  node dist/src/cli.js -f --fuse-backend fuse3 (defaults:
 *           --detect-zeroes on, --discard unmap)
 *   qemu    qemu-storage-daemon, file and format nodes with discard=unmap,
 *           the format node with detect-zeroes=on, exported with type=fuse
 *
 * Jobs (time: lower is better; throughput: higher is better):
 *   cp          cp --sparse=always of a 10 GiB disk holding ~5 MiB of data
 *               (SEEK_DATA/SEEK_HOLE; the copy is checked with qemu-img compare)
 *   fstrim      ext4 on a loop device over the disk: after an untimed first
 *               fstrim, write a 1 GiB file (256 MiB with --quick), delete it,
 *               sync; then time `fstrim` (it discards the freed extents)
 *   zero-seq    fio seq write of zeros, 1M qd4, into unallocated space
 *   zero-rand   fio random write of zeros, 64k qd8, into unallocated space
 * Targets (issue 13): cp and fstrim <= 2x qemu's time, zero writes >= 1.0x
 * its throughput.
 *
 * Output: a table on stdout and bench-results/sparse.json (+ sparse.md).
 *
 * Options: --quick, --repeat N (default 3, quick 1), --jobs a,b, --format
 * qcow2|qed, --out FILE, --keep (the scratch directory), --keep-page-reporting
 * (free page reporting is held off and memory touched first, as in bench.mjs:
 * see bench-memory.mjs), --no-warm.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { holdPageReporting, pageReportingLine, reassertPageReporting, warmMemory } from './bench-memory.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'dist', 'src', 'cli.js');
const MiB = 1024 ** 2;
const GiB = 1024 ** 3;
const SYSTEMS = ['qmount', 'qemu'];
process.env.PATH = `${process.env.PATH ?? '/usr/bin:/bin'}:/usr/sbin:/sbin`;

function die(msg) {
  process.stderr.write(`bench-sparse: ${msg}\n`);
  process.exit(1);
}

function parseArgs(argv) {
  const o = { quick: false, repeat: 0, jobs: null, format: 'qcow2', out: null, keep: false, keepPageReporting: false, noWarm: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => (i + 1 < argv.length ? argv[++i] : die(`${a} needs a value`));
    switch (a) {
      case '--quick': o.quick = true; break;
      case '--repeat': o.repeat = Number(next()); break;
      case '--jobs': o.jobs = next().split(','); break;
      case '--format': o.format = next(); break;
      case '--out': o.out = path.resolve(next()); break;
      case '--keep': o.keep = true; break;
      case '--keep-page-reporting': o.keepPageReporting = true; break;
      case '--no-warm': o.noWarm = true; break;
      case '-h': case '--help':
        process.stdout.write(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('*/')[0]);
        process.exit(0);
        break;
      default: die(`unknown option ${a} (see --help)`);
    }
  }
  if (!['qcow2', 'qed'].includes(o.format)) die('--format must be qcow2 or qed');
  if (!o.repeat) o.repeat = o.quick ? 1 : 3;
  return o;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let opts;
let work;
/** Servers, loop devices and ext4 mounts still up: undone at exit. */
const live = new Set();
const loops = new Set();
const fsMounts = new Set();

function run(cmd, args, what = cmd) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.error) throw new Error(`${what}: ${r.error.code === 'ENOENT' ? `${cmd} not found` : r.error.message}`);
  if (r.status !== 0) throw new Error(`${what} failed (exit ${r.status ?? r.signal}): ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' / ')}`);
  return r.stdout;
}

/** Run a command as a child without blocking our event loop; seconds it took. */
function timed(cmd, args) {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d) => (out += d));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      if (code !== 0) reject(new Error(`${cmd} ${args.join(' ')} failed (${code ?? signal}): ${out.trim().split('\n').slice(-2).join(' / ')}`));
      else resolve({ seconds, out });
    });
  });
}

function mounted(p) {
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === p);
}

function running(pid) {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st[st.lastIndexOf(')') + 2] !== 'Z';
  } catch {
    return false;
  }
}

function cleanupSync() {
  for (const d of fsMounts) spawnSync('umount', ['-l', d], { stdio: 'ignore' });
  for (const l of loops) spawnSync('losetup', ['-d', l], { stdio: 'ignore' });
  for (const s of live) {
    spawnSync('fusermount', ['-uz', s.mounted], { stdio: 'ignore' });
    if (running(s.pid)) try { process.kill(s.pid, 'SIGKILL'); } catch { /* gone */ }
  }
  live.clear();
  if (work && !opts?.keep) fs.rmSync(work, { recursive: true, force: true });
}

async function stopServer(s) {
  if (!live.has(s)) return;
  if (running(s.pid)) try { process.kill(s.pid, 'SIGTERM'); } catch { /* gone */ }
  for (let i = 0; i < 1200 && running(s.pid); i++) await sleep(50);
  if (running(s.pid)) try { process.kill(s.pid, 'SIGKILL'); } catch { /* gone */ }
  if (mounted(s.mounted)) spawnSync('fusermount', ['-uz', s.mounted], { stdio: 'ignore' });
  live.delete(s);
}

function spawnServer(name, cmd, args, target, extra = {}) {
  const child = spawn(cmd, args, { detached: true, stdio: extra.stdio ?? ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...extra.env } });
  const s = { name, pid: child.pid, mounted: target, child, stderr: '' };
  child.stderr?.setEncoding('utf8').on('data', (d) => (s.stderr = (s.stderr + d).slice(-4000)));
  child.on('error', () => {});
  live.add(s);
  return s;
}

/** A mounted system serving `image`: { s, target }. */
async function mountSystem(system, image, readOnly) {
  const dir = fs.mkdtempSync(path.join(work, `mnt-${system}-`));
  if (system === 'qmount') {
    const args = [CLI, '-f', '--fuse-backend', 'fuse3', '--format', opts.format, ...(readOnly ? ['-r'] : []), image, dir];
    const s = spawnServer(system, process.execPath, args, dir, { stdio: ['ignore', 'ignore', 'pipe', 'pipe'], env: { QMOUNT_READY_FD: '3' } });
    let line = '';
    const pipe = s.child.stdio[3];
    pipe.setEncoding('utf8').on('data', (d) => (line += d));
    await new Promise((resolve) => pipe.on('end', resolve));
    let msg = {};
    try { msg = JSON.parse(line.trim() || '{}'); } catch { /* below */ }
    if (!msg.ok) {
      await stopServer(s);
      throw new Error(`qmount did not mount: ${msg.message ?? s.stderr.trim()}`);
    }
    return { s, target: path.join(dir, 'disk.raw') };
  }
  const target = path.join(dir, 'disk.raw');
  fs.writeFileSync(target, '');
  const s = spawnServer(system, 'qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=file,filename=${image},discard=unmap`,
    '--blockdev', `driver=${opts.format},node-name=fmt,file=file,discard=unmap,detect-zeroes=on`,
    '--export', `type=fuse,id=exp,node-name=fmt,mountpoint=${target},writable=${readOnly ? 'off' : 'on'}`,
  ], target);
  for (let i = 0; i < 400 && !mounted(target) && running(s.pid); i++) await sleep(25);
  if (!mounted(target)) {
    await stopServer(s);
    throw new Error(`qemu-storage-daemon did not mount: ${s.stderr.trim().split('\n').slice(-2).join(' / ')}`);
  }
  return { s, target };
}

function copyImage(base, name) {
  const dst = path.join(work, name);
  run('cp', ['--sparse=always', base, dst]);
  run('sync', [dst]);
  return dst;
}

function allocated(file) {
  return fs.statSync(file).blocks * 512;
}

// ---- images --------------------------------------------------------------

/** 10 GiB, ~5 MiB of data in a few places (what the cp job copies). */
function makeSparseImage() {
  const img = path.join(work, `sparse.${opts.format}`);
  run('qemu-img', ['create', '-q', '-f', opts.format, img, String(10 * GiB)]);
  const w = ['write -P 0x11 0 1M', 'write -P 0x22 1G 64k', 'write -P 0x33 3G 2M', 'write -P 0x44 5000000000 123457', 'write -P 0x55 7G 1M', `write -P 0x66 ${10 * GiB - 65536} 64k`];
  run('qemu-io', ['-f', opts.format, ...w.flatMap((c) => ['-c', c]), img]);
  const ref = path.join(work, 'sparse-ref.raw');
  run('qemu-img', ['convert', '-f', opts.format, '-O', 'raw', img, ref]);
  return { img, ref };
}

/** 4 GiB, first GiB non-zero data (the zero-write jobs write into [1 GiB, 4 GiB)). */
function makeZeroBase() {
  const img = path.join(work, `zero-base.${opts.format}`);
  run('qemu-img', ['create', '-q', '-f', opts.format, img, String(4 * GiB)]);
  run('qemu-io', ['-f', opts.format, '-c', `write -P 0xa5 0 ${GiB}`, img]);
  return img;
}

function makeFsBase() {
  const img = path.join(work, `fs-base.${opts.format}`);
  run('qemu-img', ['create', '-q', '-f', opts.format, img, String(4 * GiB)]);
  return img;
}

// ---- jobs ------------------------------------------------------------------

async function jobCp(system, ctx, round) {
  const image = copyImage(ctx.sparse.img, `cp-${system}-${round}.${opts.format}`);
  const m = await mountSystem(system, image, true);
  const out = path.join(work, `cp-${system}.raw`);
  try {
    const { seconds } = await timed('cp', ['--sparse=always', m.target, out]);
    const same = spawnSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', out, ctx.sparse.ref]).status === 0;
    if (!same) throw new Error(`${system}: the copy differs from qemu-img convert's`);
    return { seconds, copyAllocated: allocated(out) };
  } finally {
    fs.rmSync(out, { force: true });
    await stopServer(m.s);
    fs.rmSync(image, { force: true });
  }
}

async function jobFstrim(system, ctx, round) {
  const image = copyImage(ctx.fsBase, `fstrim-${system}-${round}.${opts.format}`);
  const m = await mountSystem(system, image, false);
  const fsDir = fs.mkdtempSync(path.join(work, 'ext4-'));
  let loop = '';
  try {
    loop = run('losetup', ['--show', '-f', m.target]).trim();
    loops.add(loop);
    run('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', loop]);
    run('mount', ['-t', 'ext4', loop, fsDir]);
    fsMounts.add(fsDir);
    run('fstrim', [fsDir]); // every group trimmed once: the timed fstrim only has the deleted file's extents to do
    const bytes = opts.quick ? 256 * MiB : GiB;
    await timed('dd', ['if=/dev/urandom', `of=${fsDir}/big`, 'bs=1M', `count=${bytes / MiB}`, 'conv=fsync', 'status=none']);
    const full = allocated(image);
    fs.rmSync(`${fsDir}/big`);
    run('sync', []);
    const { seconds } = await timed('fstrim', [fsDir]);
    run('sync', []);
    return { seconds, imageFreedBytes: full - allocated(image) };
  } finally {
    if (fsMounts.delete(fsDir)) spawnSync('umount', [fsDir]);
    if (loop && loops.delete(loop)) spawnSync('losetup', ['-d', loop]);
    await stopServer(m.s);
    fs.rmSync(image, { force: true });
  }
}

function fioZero(id, target, fio) {
  return timed('fio', [`--name=${id}`, `--filename=${target}`, '--direct=1', '--ioengine=libaio', '--zero_buffers', '--output-format=json', ...fio]).then(({ out }) => {
    const j = JSON.parse(out.slice(out.indexOf('{')));
    const w = j.jobs[0].write;
    return { mbps: w.bw_bytes / 1e6, iops: w.iops };
  });
}

function zeroJob(fio) {
  return async (system, ctx, round) => {
    const image = copyImage(ctx.zeroBase, `zero-${system}-${round}.${opts.format}`);
    const m = await mountSystem(system, image, false);
    try {
      const before = allocated(image);
      const r = await fioZero(`zero-${round}`, m.target, fio);
      return { ...r, imageGrowthBytes: allocated(image) - before };
    } finally {
      await stopServer(m.s);
      fs.rmSync(image, { force: true });
    }
  };
}

function jobs() {
  const seqBytes = opts.quick ? 512 * MiB : 2 * GiB;
  const runtime = opts.quick ? 4 : 8;
  return [
    { id: 'cp', title: 'cp --sparse=always, 10 GiB disk, ~5 MiB data', kind: 'time', target: 2, run: jobCp },
    { id: 'fstrim', title: `fstrim after deleting a ${opts.quick ? '256 MiB' : '1 GiB'} file (ext4 on loop)`, kind: 'time', target: 2, run: jobFstrim },
    { id: 'zero-seq', title: 'seq write zeros 1M qd4, unallocated', kind: 'mbps', target: 1, run: zeroJob(['--rw=write', '--bs=1M', '--iodepth=4', `--offset=${GiB}`, `--size=${seqBytes}`]) },
    { id: 'zero-rand', title: 'rand write zeros 64k qd8, unallocated', kind: 'mbps', target: 1, run: zeroJob(['--rw=randwrite', '--bs=64k', '--iodepth=8', `--offset=${GiB}`, `--size=${3 * GiB}`, '--norandommap', `--runtime=${runtime}`, '--time_based']) },
  ].filter((j) => !opts.jobs || opts.jobs.includes(j.id));
}

/** A time as shown: milliseconds below a second (the cp job takes tens of them), else seconds. */
function secondsText(v) {
  return v < 1 ? `${(v * 1000).toFixed(1)} ms` : `${v.toFixed(2)} s`;
}

function median(values) {
  const v = [...values].sort((a, b) => a - b);
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
}

export async function main(argv) {
  opts = parseArgs(argv);
  if (!fs.existsSync(CLI)) die(`${CLI} is missing: build first (node scripts/setup.mjs --test)`);
  for (const cmd of ['fio', 'qemu-img', 'qemu-io', 'qemu-storage-daemon', 'losetup', 'mkfs.ext4', 'fstrim']) {
    if (spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status !== 0) die(`${cmd} not found`);
  }
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-bench-sparse-'));
  process.on('exit', cleanupSync);
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));
  const started = Date.now();
  const load = os.loadavg();
  process.stderr.write(`bench-sparse: scratch ${work}, format ${opts.format}, repeat ${opts.repeat}\n`);
  if (load[0] > 1) process.stderr.write(`bench-sparse: warning: load average ${load[0].toFixed(2)}: other work skews the numbers\n`);
  const pageReporting = holdPageReporting(opts.keepPageReporting);
  process.stderr.write(`bench-sparse: ${pageReportingLine(pageReporting)}\n`);
  if (!opts.noWarm) warmMemory();
  const list = jobs();
  const ctx = {
    sparse: list.some((j) => j.id === 'cp') ? makeSparseImage() : undefined,
    zeroBase: list.some((j) => j.id.startsWith('zero')) ? makeZeroBase() : undefined,
    fsBase: list.some((j) => j.id === 'fstrim') ? makeFsBase() : undefined,
  };
  const results = [];
  for (const job of list) {
    const samples = { qmount: [], qemu: [] };
    for (let round = 0; round < opts.repeat; round++) {
      for (const system of round % 2 ? [...SYSTEMS].reverse() : SYSTEMS) {
        reassertPageReporting();
        const r = await job.run(system, ctx, round);
        samples[system].push(r);
        const shown = job.kind === 'time' ? secondsText(r.seconds) : `${r.mbps.toFixed(1)} MB/s`;
        process.stderr.write(`  ${job.id.padEnd(10)} ${system.padEnd(7)} ${shown}\n`);
      }
    }
    const key = job.kind === 'time' ? 'seconds' : 'mbps';
    const med = Object.fromEntries(SYSTEMS.map((s) => [s, median(samples[s].map((r) => r[key]))]));
    // Time jobs: qmount's time over qemu's (<= target); throughput: qmount's over qemu's (>= target).
    const ratio = med.qmount / med.qemu;
    const met = job.kind === 'time' ? ratio <= job.target : ratio >= job.target;
    results.push({ id: job.id, title: job.title, unit: key, median: med, ratio, target: job.kind === 'time' ? `<= ${job.target}x` : `>= ${job.target}x`, met, runs: samples });
  }
  const result = { date: new Date().toISOString(), format: opts.format, quick: opts.quick, repeat: opts.repeat, cpus: os.cpus().length, kernel: os.release(), pageReporting, loadAverage: { before: load, after: os.loadavg() }, wallSeconds: Math.round((Date.now() - started) / 1000), jobs: results };
  const head = ['job', 'qmount', 'qemu', 'ratio', 'target', ''];
  const rows = results.map((r) => {
    const f = (v) => (r.unit === 'seconds' ? secondsText(v) : `${v.toFixed(1)} MB/s`);
    return [r.title, f(r.median.qmount), f(r.median.qemu), `${r.ratio.toFixed(2)}x`, r.target, r.met ? 'met' : 'MISSED'];
  });
  const outFile = opts.out ?? path.join(ROOT, 'bench-results', 'sparse.json');
  fs.mkdirSync(path.dirname(outFile), { recursive: true });
  fs.writeFileSync(outFile, `${JSON.stringify(result, null, 2)}\n`);
  const md = [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
  fs.writeFileSync(outFile.replace(/\.json$/, '.md'), `${result.date}, ${opts.format}, median of ${opts.repeat}, ${result.cpus} CPUs, kernel ${result.kernel}; ${pageReportingLine(pageReporting)}\n\n${md}\n`);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r) => r.map((c, i) => c.padEnd(widths[i])).join('  ');
  process.stdout.write(`\n${line(head)}\n${rows.map(line).join('\n')}\n\nratios: qmount over qemu-storage-daemon, same run; written to ${path.relative(process.cwd(), outFile)} (${result.wallSeconds} s)\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    () => process.exit(0),
    (err) => {
      process.stderr.write(`bench-sparse: ${err.message}\n`);
      process.exit(1);
    },
  );
}
