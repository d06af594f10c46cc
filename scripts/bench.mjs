#!/usr/bin/env node
/**
 * `npm run bench`: qmount side by side with the systems a user would pick
 * instead, in one run, on copies of one image.
 *
 *   node scripts/bench.mjs [--quick] [--format qcow2|qed] [options]
 *
 * Systems (each serves DIR/disk.raw, or a file, over FUSE in its own process):
 *   qmount-fuse3        node dist/src/cli.js -f --fuse-backend fuse3 IMAGE DIR
 *   qmount-fuse-native  the same with --fuse-backend fuse-native
 *   qemu                qemu-storage-daemon's FUSE export of a copy of the same image
 *   noop-fuse3          scripts/noop-fs.mjs on native/fuse3, and
 *   noop-fuse-native    on fuse-native, each with qmount's FUSE options for
 *                       that backend, answering every request at once: the
 *                       ceilings (what each binding allows)
 *
 * Image: 4 GiB, the first GiB written with non-zero data by qemu-io. Every
 * write job gets a fresh copy per system, so "unallocated" holds for each.
 * The systems take turns job by job (read jobs on three mounts side by side),
 * each round in another order, so load that drifts during a run (this is a
 * shared 2-core machine) hits all of them alike; --repeat N takes the median.
 * Jobs are fio (O_DIRECT, libaio), see JOBS; plus a buffered dd of the whole
 * disk on a fresh mount, two real workloads through a loop device over the
 * disk (mkfs.ext4 + extracting a tar + umount; then reading every file back
 * on a fresh mount; root only, not on the no-ops), an RSS check (1 MiB
 * requests at qd16 on a fresh mount, peak RSS against 128 MiB), and the
 * servers' peak RSS (VmHWM) and CPU time.
 *
 * Output: one table on stdout, bench-results/latest.json (and latest.md,
 * the table as Markdown for the README). Every mount and process started
 * here is stopped on success, failure, Ctrl-C or SIGTERM.
 *
 * Options:
 *   --quick               short runs (~2 minutes)
 *   --full                the whole benchmark: every job at full length, --repeat 3 (unless given),
 *                         once per format (qcow2, then qed), each to bench-results/full-FORMAT.json
 *                         and .md (other options are passed on; about an hour and a half)
 *   --format F            qcow2 (default) or qed
 *   --runtime S           seconds per time-based job (default 8, quick 4)
 *   --repeat N            run every job N times per system, report the median (default 2, quick 1)
 *   --jobs a,b            only these job ids (dd is a job id too)
 *   --systems a,b         only these systems (qmount-fuse3, qmount-fuse-native, qemu, noop-fuse3,
 *                         noop-fuse-native; qmount and noop name both of a kind)
 *   --qmount-node-args S  extra node arguments for qmount, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof"
 *   --qmount-env K=V,...  extra environment for qmount, e.g. UV_THREADPOOL_SIZE=4
 *   --cold                drop the image file's page cache before each job (reads then
 *                         come from the disk; qmount and qemu alike)
 *   --pin CPU             run every server, fio and dd on this one CPU (shows what
 *                         cross-CPU wake-ups cost; not how anyone runs it)
 *   --variant NAME:K=V,.. one more system, qmount-fuse3~NAME: qmount on fuse3 with this extra
 *                         environment (e.g. pool:QMOUNT_POOL_FROM=0), taking turns with the others;
 *                         the table adds NAME/fuse3 and NAME/qemu ratios. Repeatable. The key
 *                         NODE_ARGS is not environment but node arguments (space-separated),
 *                         e.g. 'sp:NODE_ARGS=--always-sparkplug'
 *   --baseline DIR        one more system, qmount-fuse3~base: qmount on fuse3 from another
 *                         checkout's build (DIR/dist/src/cli.js, with its own native addons),
 *                         e.g. a git worktree of the commit before a change, taking turns with the
 *                         others: the before/after check of a change (base/fuse3 ratio)
 *   --strace              attach `strace -c -f` to qmount during each job (slows it; numbers
 *                         are then not comparable) and report syscalls per request
 *   --scale               instead: the scale check (scripts/bench-scale.mjs, bench-results/scale.json)
 *   --out FILE            JSON output (default bench-results/latest.json)
 *   --no-warm             skip touching a few GiB of memory before the jobs (bench-memory.mjs)
 *   --keep-page-reporting leave the VM's free page reporting on (by default, as root, it is
 *                         held off for the run: bench-memory.mjs says why)
 *   --keep                keep the scratch directory
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { holdPageReporting, pageReportingLine, reassertPageReporting, warmMemory } from './bench-memory.mjs';
if (process.argv.includes('--sparse')) await import('./bench-sparse.mjs').then((m) => m.main(process.argv.slice(2).filter((a) => a !== '--sparse'))).then(() => process.exit(0), (e) => { process.stderr.write(`bench: ${e.message}\n`); process.exit(1); });

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
if (process.argv.includes('--check')) process.exit(await (await import('./bench-check.mjs')).main(process.argv.slice(2))); // the check benchmark (bench-check.mjs)
const CLI = path.join(ROOT, 'dist', 'src', 'cli.js');
const NOOP = path.join(ROOT, 'scripts', 'noop-fs.mjs');
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const IMAGE_SIZE = 4 * GiB;
const WRITTEN = 1 * GiB;
const CLUSTER = 64 * 1024;
const CLK_TCK = 100;
/** Each backend's largest request (mount/options.ts): the kernel splits larger I/O. */
const { MAX_IO_FUSE3, MAX_IO_FUSE_NATIVE } = await import(path.join(ROOT, 'dist', 'mount', 'options.js')).catch(() => ({ MAX_IO_FUSE3: MiB, MAX_IO_FUSE_NATIVE: 128 * 1024 }));
/** The one mountinfo parser (mount/mountinfo.ts); the benchmark runs after the build. */
const { readMountsSync } = await import(path.join(ROOT, 'dist', 'mount', 'mountinfo.js')).catch((err) =>
  die(`cannot load dist/mount/mountinfo.js (build first: node scripts/setup.mjs --test): ${err.message}`),
);

// ---- options -----------------------------------------------------------

function parseArgs(argv) {
  const o = { quick: false, full: false, noWarm: false, keepPageReporting: false, format: 'qcow2', runtime: 0, jobs: null, systems: null, nodeArgs: [], env: {}, variants: [], strace: false, cold: false, scale: false, repeat: 0, pin: null, out: null, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) die(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case '--quick': o.quick = true; break;
      case '--full': o.full = true; break;
      case '--no-warm': o.noWarm = true; break;
      case '--keep-page-reporting': o.keepPageReporting = true; break;
      case '--format': o.format = next(); break;
      case '--runtime': o.runtime = Number(next()); break;
      case '--jobs': o.jobs = next().split(','); break;
      case '--systems': o.systems = next().split(','); break;
      case '--qmount-node-args': o.nodeArgs = next().split(/\s+/).filter(Boolean); break;
      case '--qmount-env':
        for (const kv of next().split(',')) {
          const eq = kv.indexOf('=');
          if (eq > 0) o.env[kv.slice(0, eq)] = kv.slice(eq + 1);
        }
        break;
      case '--variant': {
        // NAME:K=V,K2=V2 -> an extra system qmount-fuse3~NAME with that environment
        const v = next();
        const colon = v.indexOf(':');
        const name = colon < 0 ? v : v.slice(0, colon);
        if (!/^[\w.-]+$/.test(name)) die(`--variant ${v}: the name must be letters, digits, . _ -`);
        const env = {};
        for (const kv of colon < 0 ? [] : v.slice(colon + 1).split(',')) {
          const eq = kv.indexOf('=');
          if (eq > 0) env[kv.slice(0, eq)] = kv.slice(eq + 1);
        }
        const nodeArgs = (env.NODE_ARGS ?? '').split(/\s+/).filter(Boolean);
        delete env.NODE_ARGS;
        o.variants.push({ name, env, nodeArgs });
        break;
      }
      case '--baseline': {
        const cli = path.join(path.resolve(next()), 'dist', 'src', 'cli.js');
        if (!fs.existsSync(cli)) die(`--baseline: ${cli} is missing (build that checkout first: node scripts/setup.mjs --test)`);
        o.variants.push({ name: 'base', env: {}, cli });
        break;
      }
      case '--strace': o.strace = true; break;
      case '--cold': o.cold = true; break;
      case '--scale': o.scale = true; break;
      case '--repeat': o.repeat = Number(next()); break;
      case '--pin': o.pin = Number(next()); break;
      case '--out': o.out = path.resolve(next()); break;
      case '--keep': o.keep = true; break;
      case '-h': case '--help':
        process.stdout.write(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('*/')[0]);
        process.exit(0);
        break;
      default: die(`unknown option ${a} (see --help)`);
    }
  }
  if (!['qcow2', 'qed'].includes(o.format)) die('--format must be qcow2 or qed');
  if (!o.runtime) o.runtime = o.quick ? 4 : 8;
  if (!o.repeat) o.repeat = o.quick ? 1 : 2;
  if (!(o.repeat >= 1 && o.runtime >= 1)) die('--repeat and --runtime need a positive number');
  return o;
}

function die(msg) {
  process.stderr.write(`bench: ${msg}\n`);
  process.exit(1);
}

const opts = parseArgs(process.argv.slice(2));
const ALL_SYSTEMS = ['qmount-fuse3', 'qmount-fuse-native', 'qemu', 'noop-fuse3', 'noop-fuse-native'];
const SYSTEMS = ALL_SYSTEMS.filter((s) => !opts.systems || opts.systems.includes(s) || opts.systems.includes(s.split('-')[0]));
/** --variant NAME:ENV: qmount on fuse3 again with other environment (same run, taking turns with the rest). */
const VARIANT_ENV = Object.fromEntries(opts.variants.map((v) => [`qmount-fuse3~${v.name}`, v.env]));
/** --baseline: the variant's own build of qmount. */
const VARIANT_CLI = Object.fromEntries(opts.variants.filter((v) => v.cli).map((v) => [`qmount-fuse3~${v.name}`, v.cli]));
/** --variant NAME:NODE_ARGS=..: the variant's node arguments. */
const VARIANT_NODE_ARGS = Object.fromEntries(opts.variants.map((v) => [`qmount-fuse3~${v.name}`, v.nodeArgs ?? []]));
SYSTEMS.push(...Object.keys(VARIANT_ENV));
if (SYSTEMS.length === 0) die(`no system selected (systems: ${ALL_SYSTEMS.join(', ')})`);
const isQmount = (system) => system.startsWith('qmount-');
const isNoop = (system) => system.startsWith('noop-');
/** 'fuse3' or 'fuse-native' for qmount and no-op systems. */
const backendOf = (system) => system.replace(/^(qmount|noop)-/, '').replace(/~.*/, '');
const maxIoOf = (system) => (backendOf(system) === 'fuse3' ? MAX_IO_FUSE3 : MAX_IO_FUSE_NATIVE);

/**
 * The jobs. `fresh`: a new image copy per system. Random writes into
 * unallocated space replay a fixed list (fio iolog) of 4 KiB writes, each
 * into a different unallocated cluster of [1 GiB, 4 GiB), so every write
 * allocates; the other write jobs are size-capped, reads are time-based.
 * All of them also stop at the runtime.
 */
const SEQ_WRITE_BYTES = opts.quick ? 512 * MiB : 2 * GiB;
const UNALLOC_WRITES = opts.quick ? 4096 : 16384;
const K = 1024;
const JOBS = [
  { id: 'dd', title: 'dd whole disk, buffered 1M', bs: MiB, dd: true, fresh: true },
  { id: 'seq-read-1m', title: 'seq read 1M qd4', bs: MiB, fio: ['--rw=read', '--iodepth=4', `--size=${WRITTEN}`, '--time_based'] },
  { id: 'rand-read-4k-qd1', title: 'rand read 4k qd1', bs: 4 * K, fio: ['--rw=randread', '--iodepth=1', `--size=${WRITTEN}`, '--norandommap', '--time_based'] },
  { id: 'rand-read-4k', title: 'rand read 4k qd16', bs: 4 * K, fio: ['--rw=randread', '--iodepth=16', `--size=${WRITTEN}`, '--norandommap', '--time_based'] },
  { id: 'rand-read-64k', title: 'rand read 64k qd8', bs: 64 * K, fio: ['--rw=randread', '--iodepth=8', `--size=${WRITTEN}`, '--norandommap', '--time_based'] },
  { id: 'seq-write-1m-unalloc', title: 'seq write 1M qd4 unalloc', bs: MiB, fresh: true, fio: ['--rw=write', '--iodepth=4', `--offset=${WRITTEN}`, `--size=${SEQ_WRITE_BYTES}`] },
  { id: 'rand-write-4k-alloc', title: 'rand write 4k qd16 alloc', bs: 4 * K, fresh: true, fio: ['--rw=randwrite', '--iodepth=16', `--size=${WRITTEN}`, '--norandommap', '--time_based'] },
  { id: 'rand-write-4k-unalloc', title: 'rand write 4k qd16 unalloc', bs: 4 * K, fresh: true, iolog: true, fio: ['--iodepth=16', '--replay_no_stall=1'] },
  // Peak RSS at qd16 with 1 MiB requests (each run on a fresh mount, so VmHWM is this job's): RSS_LIMIT.
  { id: 'rss-1m-qd16', title: 'rand rw 1M qd16 (RSS)', bs: MiB, fresh: true, rss: true, fio: ['--rw=randrw', '--iodepth=16', `--size=${IMAGE_SIZE}`, `--io_size=${opts.quick ? GiB / 2 : 2 * GiB}`, '--norandommap'] },
  // Real workloads through a loop device over the disk (buffered, as losetup sets it up):
  // mkfs.ext4 + mount + extracting TAR_SOURCE + umount; then, on a fresh mount, reading every file back.
  { id: 'ext4-tar', title: 'loop: mkfs.ext4 + tar x + umount', bs: MiB, fresh: true, loop: 'tar' },
  { id: 'ext4-read', title: 'loop: read every file back', bs: MiB, fresh: true, loop: 'read' },
]
  .filter((j) => (!opts.jobs || opts.jobs.includes(j.id)) && !(j.loop === 'read' && opts.jobs && !opts.jobs.includes('ext4-tar')));
/** The loop jobs need root (losetup, mount) and a system that stores what is written (not the no-ops). */
const LOOP_OK = process.getuid?.() === 0;
const runsOn = (job, system) => !(job.loop && (isNoop(system) || !LOOP_OK));
/** Peak RSS allowed at qd16 with 1 MiB requests (issue 11). */
const RSS_LIMIT = 128 * MiB;
/** What the tar workload extracts: a tar of this directory, made once per run. */
const TAR_SOURCE = opts.quick ? '/usr/include' : '/usr/share';
/** FUSE requests per fio I/O: the kernel splits at max_read/max_write (each backend's largest by default). */
const fuseRequestsPerIo = (job, system) => Math.max(1, job.bs / maxIoOf(system));
if (JOBS.length === 0) die('no job selected');

// ---- processes and cleanup ---------------------------------------------

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-bench-'));
/** Servers still running: { name, pid, mounted: path, child } */
const live = new Set();
/** Loop devices and ext4 mounts of the loop jobs still set up: { dev, mnt } */
const loops = new Set();
let fioChild = null;
let interrupted = false;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function mountedPaths() {
  return new Set(readMountsSync().map((e) => e.mountPoint));
}

function running(pid) {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st[st.lastIndexOf(')') + 2] !== 'Z';
  } catch {
    return false;
  }
}

/** Last resort, synchronous (runs at exit): detach mounts, kill servers, remove scratch files. */
function cleanupSync() {
  if (fioChild) try { fioChild.kill('SIGKILL'); } catch { /* gone */ }
  for (const l of loops) {
    spawnSync('umount', ['-l', l.mnt], { stdio: 'ignore' });
    if (l.dev) spawnSync('losetup', ['-d', l.dev], { stdio: 'ignore' });
    loops.delete(l);
  }
  for (const s of live) {
    spawnSync('fusermount', ['-uz', s.mounted], { stdio: 'ignore' });
    if (running(s.pid)) try { process.kill(s.pid, 'SIGKILL'); } catch { /* gone */ }
    live.delete(s);
  }
  if (!opts.keep) {
    try {
      fs.rmSync(work, { recursive: true, force: true });
    } catch {
      // a mount point still busy: reported by the next run's leftovers, nothing more to do
    }
  }
}

process.on('exit', cleanupSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    if (interrupted) return;
    interrupted = true;
    process.stderr.write(`\nbench: ${sig}: stopping every mount\n`);
    if (fioChild) try { fioChild.kill('SIGTERM'); } catch { /* gone */ }
    Promise.all([...live].map((s) => stopServer(s))).finally(() => process.exit(130));
  });
}

function run(cmd, args, what) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  if (r.error) throw new Error(`${what}: ${r.error.code === 'ENOENT' ? `${cmd} not found` : r.error.message}`);
  if (r.status !== 0) throw new Error(`${what} failed (exit ${r.status ?? r.signal}): ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' / ')}`);
  return r.stdout;
}

/** CPU seconds (user + system, all threads) and peak RSS of a process. */
function procSample(pid) {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
    const cpu = (Number(f[11]) + Number(f[12])) / CLK_TCK;
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (name) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0) * 1024;
    return { cpu, hwm: kb('VmHWM'), rss: kb('VmRSS') };
  } catch {
    return { cpu: 0, hwm: 0, rss: 0 };
  }
}

/** Wait for a child to exit; SIGKILL after `ms`. */
async function waitExit(s, ms) {
  const t0 = Date.now();
  while (running(s.pid) && Date.now() - t0 < ms) await sleep(50);
  if (running(s.pid)) {
    try { process.kill(s.pid, 'SIGKILL'); } catch { /* gone */ }
    await sleep(100);
    return false;
  }
  return true;
}

/** Stop a server: SIGTERM (each one unmounts itself on it), then make sure the mount is gone. */
async function stopServer(s) {
  if (!live.has(s)) return;
  if (running(s.pid)) try { process.kill(s.pid, 'SIGTERM'); } catch { /* gone */ }
  const clean = await waitExit(s, 60_000);
  if (mountedPaths().has(s.mounted)) spawnSync('fusermount', ['-uz', s.mounted], { stdio: 'ignore' });
  live.delete(s);
  if (!clean) process.stderr.write(`bench: ${s.name} (pid ${s.pid}) did not exit on SIGTERM; killed\n`);
}

function spawnServer(name, cmd, args, mounted, extra = {}) {
  // taskset execs the server: the pid stays the server's.
  if (opts.pin !== null) [cmd, args] = ['taskset', ['-c', String(opts.pin), cmd, ...args]];
  const child = spawn(cmd, args, { detached: true, stdio: extra.stdio ?? ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...extra.env } });
  const s = { name, pid: child.pid, mounted, child, stderr: '' };
  child.stderr?.setEncoding('utf8').on('data', (d) => (s.stderr = (s.stderr + d).slice(-4000)));
  child.on('error', () => {});
  live.add(s);
  return s;
}

/** qmount -f with the readiness pipe (src/daemon.ts). */
async function startQmount(system, image, dir, logFile) {
  const args = [...opts.nodeArgs, ...(VARIANT_NODE_ARGS[system] ?? []), VARIANT_CLI[system] ?? CLI, '-f', '--fuse-backend', backendOf(system), '--format', opts.format, '--log-level', 'info', '--log-file', logFile, image, dir];
  const s = spawnServer(system, process.execPath, args, dir, {
    stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
    env: { ...opts.env, ...VARIANT_ENV[system], QMOUNT_READY_FD: '3' },
  });
  let line = '';
  const pipe = s.child.stdio[3];
  pipe.setEncoding('utf8');
  pipe.on('data', (d) => (line += d));
  await new Promise((resolve) => pipe.on('end', resolve));
  let msg = {};
  try {
    msg = JSON.parse(line.trim() || '{}');
  } catch { /* below */ }
  if (!msg.ok) {
    await stopServer(s);
    throw new Error(`qmount did not mount: ${msg.message ?? s.stderr.trim()}`);
  }
  return s;
}

async function waitMounted(s, target, what) {
  for (let i = 0; i < 400; i++) {
    if (mountedPaths().has(target)) return;
    if (!running(s.pid)) break;
    await sleep(25);
  }
  await stopServer(s);
  throw new Error(`${what} did not mount ${target}: ${s.stderr.trim().split('\n').slice(-2).join(' / ')}`);
}

/** qemu-storage-daemon exporting the image on the regular file `file`. */
async function startQemu(image, file) {
  fs.writeFileSync(file, '');
  const s = spawnServer('qemu', 'qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=file,filename=${image}`,
    '--blockdev', `driver=${opts.format},node-name=fmt,file=file`,
    '--export', `type=fuse,id=exp,node-name=fmt,mountpoint=${file},writable=on`,
  ], file);
  await waitMounted(s, file, 'qemu-storage-daemon');
  return s;
}

async function startCeiling(system, dir) {
  const s = spawnServer(system, process.execPath, [NOOP, dir, String(IMAGE_SIZE), '--backend', backendOf(system)], dir);
  await waitMounted(s, dir, 'noop-fs');
  return s;
}

// ---- images --------------------------------------------------------------

function makeBaseImage() {
  const base = path.join(work, `base.${opts.format}`);
  run('qemu-img', ['create', '-q', '-f', opts.format, base, String(IMAGE_SIZE)], 'qemu-img create');
  // Non-zero data, two patterns so neither half is mistaken for the other.
  run('qemu-io', ['-f', opts.format, '-c', `write -P 0xa5 0 ${WRITTEN / 2}`, '-c', `write -P 0x5a ${WRITTEN / 2} ${WRITTEN / 2}`, base], 'qemu-io write');
  return base;
}

function copyImage(base, name) {
  const dst = path.join(work, name);
  run('cp', ['--sparse=always', base, dst], 'copying the image');
  // The copy's dirty pages are set-up, not the system's work: write them back
  // now, or the first fdatasync of whoever runs next pays for a gigabyte.
  run('sync', [dst], 'sync');
  return dst;
}

/** fio iolog: UNALLOC_WRITES 4 KiB writes, each in a different cluster of [1 GiB, 4 GiB), fixed order. */
function makeUnallocLog() {
  const first = WRITTEN / CLUSTER;
  const count = (IMAGE_SIZE - WRITTEN) / CLUSTER;
  const idx = Array.from({ length: count }, (_, i) => first + i);
  let seed = 0x9e3779b9;
  const rnd = () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  for (let i = count - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [idx[i], idx[j]] = [idx[j], idx[i]];
  }
  const lines = ['fio version 2 iolog', 'disk add', 'disk open'];
  for (let i = 0; i < UNALLOC_WRITES; i++) lines.push(`disk write ${idx[i] * CLUSTER + 4096 * (i % 16)} 4096`);
  lines.push('disk close');
  const file = path.join(work, 'unalloc.iolog');
  fs.writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}

// ---- measurements --------------------------------------------------------

function runFio(job, target, iolog) {
  const args = [`--name=${job.id}`, `--filename=${target}`, '--direct=1', '--ioengine=libaio', '--numjobs=1', `--bs=${job.bs}`,
    `--runtime=${opts.runtime}`, '--output-format=json', ...job.fio];
  if (iolog) args.push(`--read_iolog=${iolog}`, `--replay_redirect=${target}`);
  if (opts.pin !== null) args.push(`--cpus_allowed=${opts.pin}`);
  return new Promise((resolve, reject) => {
    const child = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    fioChild = child;
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d) => (err += d));
    child.on('error', (e) => reject(e));
    child.on('exit', (code, signal) => {
      fioChild = null;
      if (code !== 0) return reject(new Error(`fio ${job.id} failed (${code ?? signal}): ${err.trim().split('\n').slice(-2).join(' / ')}`));
      try {
        const j = JSON.parse(out.slice(out.indexOf('{')));
        const r = j.jobs[0];
        const side = r.write.io_bytes > r.read.io_bytes ? r.write : r.read;
        resolve({ mbps: side.bw_bytes / 1e6, iops: side.iops, ios: side.total_ios, latUs: side.lat_ns.mean / 1000, seconds: r.job_runtime / 1000 });
      } catch (e) {
        reject(new Error(`fio ${job.id}: unreadable output: ${e.message}`));
      }
    });
  });
}

function runDd(target) {
  const t0 = process.hrtime.bigint();
  if (opts.pin !== null) run('taskset', ['-c', String(opts.pin), 'dd', `if=${target}`, 'of=/dev/null', 'bs=1M'], 'dd');
  else run('dd', [`if=${target}`, 'of=/dev/null', 'bs=1M'], 'dd');
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { mbps: IMAGE_SIZE / seconds / 1e6, iops: undefined, seconds };
}

/** A tar of TAR_SOURCE for the loop jobs: { file, bytes, files }. */
function makeTar() {
  const file = path.join(work, 'source.tar');
  run('tar', ['-cf', file, '--warning=no-file-changed', '-C', path.dirname(TAR_SOURCE), path.basename(TAR_SOURCE)], 'making the tar');
  const files = Number(run('sh', ['-c', `tar -tf '${file}' | grep -vc '/$'`], 'counting the tar'));
  return { file, bytes: fs.statSync(file).size, files };
}

/** losetup the disk, mount its ext4 (made first when `mkfs`); returns { dev, mnt } (in `loops`). */
function loopMount(target, mkfs, readOnly) {
  const dev = run('losetup', ['--find', '--show', ...(readOnly ? ['--read-only'] : []), target], 'losetup').trim();
  const l = { dev, mnt: path.join(work, `ext4-${path.basename(dev)}`) };
  loops.add(l);
  fs.mkdirSync(l.mnt, { recursive: true });
  // Inode tables and journal written now (not by the kernel's lazy init later), no discard: the same work every run.
  if (mkfs) run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0,nodiscard', dev], 'mkfs.ext4');
  run('mount', ['-t', 'ext4', '-o', readOnly ? 'ro,noload' : 'rw', dev, l.mnt], 'mounting the ext4');
  return l;
}

/** umount (which writes everything back) and detach. */
function loopUnmount(l) {
  run('umount', [l.mnt], 'umount of the ext4');
  run('losetup', ['-d', l.dev], 'losetup -d');
  loops.delete(l);
}

/**
 * A loop job: 'tar' times mkfs.ext4, mounting, extracting the tar and the
 * umount that writes it all back; 'read' times mounting it read-only and
 * reading every file (find | xargs cat; GNU tar skips reading when its
 * output is /dev/null). MB/s is of the tar's bytes.
 */
function runLoop(job, target, tar) {
  const t0 = process.hrtime.bigint();
  const l = loopMount(target, job.loop === 'tar', job.loop === 'read');
  try {
    if (job.loop === 'tar') run('tar', ['-xf', tar.file, '-C', l.mnt], 'tar -x');
    else run('sh', ['-c', `find '${l.mnt}' -type f -print0 | xargs -0 cat > /dev/null`], 'reading the files back');
  } finally {
    loopUnmount(l);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { mbps: tar.bytes / seconds / 1e6, iops: undefined, seconds, files: tar.files };
}

/** Write the file's dirty pages back, then drop its cached pages (GNU dd: nocache with count=0). */
function dropCache(file) {
  run('sync', [file], 'sync');
  run('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'], 'dropping the page cache');
}

function startStrace(pid, file) {
  const child = spawn('strace', ['-c', '-f', '-p', String(pid), '-o', file], { stdio: 'ignore' });
  child.on('error', () => {});
  return child;
}

/** `strace -c` output: calls per syscall and the total. */
function parseStrace(file) {
  const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
  const calls = {};
  for (const line of text.split('\n')) {
    // % time, seconds, usecs/call, calls, [errors], syscall
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$/.exec(line);
    if (m) calls[m[2]] = Number(m[1]);
  }
  return calls;
}

/** Syscalls per FUSE request: all of them, the image I/O ones, and the busiest. */
function syscallsPerRequest(calls, requests) {
  const per = (n) => (requests ? Number(((n ?? 0) / requests).toFixed(2)) : undefined);
  const top = Object.entries(calls).filter(([k]) => k !== 'total').sort((a, b) => b[1] - a[1]).slice(0, 8);
  return {
    requests,
    total: per(calls.total),
    imageIo: per((calls.pread64 ?? 0) + (calls.pwrite64 ?? 0) + (calls.preadv ?? 0) + (calls.pwritev ?? 0)),
    fdatasync: per(calls.fdatasync),
    top: Object.fromEntries(top.map(([k, v]) => [k, per(v)])),
  };
}

/** qmount's request statistics from its log (the 'closed' line). */
function qmountStats(logFile) {
  try {
    const lines = fs.readFileSync(logFile, 'utf8').trim().split('\n');
    for (let i = lines.length - 1; i >= 0; i--) {
      const rec = JSON.parse(lines[i]);
      if (rec.stats) return { ...rec.stats, imageCalls: rec.io };
    }
  } catch { /* no log */ }
  return undefined;
}

/** Mount one system on a fresh directory: { system, s (the server), target, image, logFile }. */
async function mountSystem(system, image, tag) {
  const dir = path.join(work, `mnt-${system}-${tag}`);
  fs.mkdirSync(dir);
  const target = path.join(dir, 'disk.raw');
  const logFile = path.join(work, `${system}-${tag}.log`);
  let s;
  if (isQmount(system)) s = await startQmount(system, image, dir, logFile);
  else if (system === 'qemu') s = await startQemu(image, target);
  else s = await startCeiling(system, dir);
  return { system, s, target, image, logFile };
}

/** Unmount; returns qmount's request counters for the whole mount (undefined for the others). */
async function unmountSystem(m, keepImage = false) {
  await stopServer(m.s);
  if (m.image && !keepImage) fs.rmSync(m.image, { force: true });
  return isQmount(m.system) ? qmountStats(m.logFile) : undefined;
}

/**
 * qmount's request counters now: SIGUSR1 makes it log them (a 'live' line);
 * wait for that line. undefined when it does not come within 3 s.
 */
async function liveStats(m) {
  const count = () => {
    try {
      return fs.readFileSync(m.logFile, 'utf8').split('\n').filter((l) => l.includes('"live":true'));
    } catch {
      return [];
    }
  };
  const seen = count().length;
  try {
    process.kill(m.s.pid, 'SIGUSR1');
  } catch {
    return undefined;
  }
  for (let i = 0; i < 300; i++) {
    const lines = count();
    if (lines.length > seen) return JSON.parse(lines[lines.length - 1]).stats;
    await sleep(10);
  }
  return undefined;
}

/**
 * Where a job's time went in qmount: FUSE requests, and the microseconds per
 * request between the driver call and its answer (the engine: qcow2/QED
 * logic and the image I/O), from the counters around the job.
 */
function engineTime(before, after) {
  if (!before || !after) return undefined;
  const requests = after.reads - before.reads + after.writes - before.writes;
  const micros = after.readMicros - before.readMicros + after.writeMicros - before.writeMicros;
  return requests > 0 ? { requests, engineMicrosPerRequest: micros / requests } : undefined;
}

/** One job on one mounted system, with the server's CPU time and peak RSS around it. */
async function runJob(m, job, iolog, tar) {
  reassertPageReporting();
  if (opts.cold && m.image) dropCache(m.image);
  const statsBefore = isQmount(m.system) ? await liveStats(m) : undefined;
  const before = procSample(m.s.pid);
  const straceFile = path.join(work, `strace-${job.id}.txt`);
  const tracer = opts.strace && isQmount(m.system) ? startStrace(m.s.pid, straceFile) : null;
  if (tracer) await sleep(500);
  let r;
  try {
    if (job.dd) r = runDd(m.target);
    else if (job.loop) r = runLoop(job, m.target, tar);
    else r = await runFio(job, m.target, job.iolog ? iolog : undefined);
  } catch (err) {
    r = { error: err.message };
  }
  if (tracer) {
    tracer.kill('SIGINT');
    await new Promise((res) => tracer.on('exit', res));
    r.syscallsPerRequest = syscallsPerRequest(parseStrace(straceFile), r.ios ? r.ios * fuseRequestsPerIo(job, m.system) : undefined);
  }
  const after = procSample(m.s.pid);
  if (isQmount(m.system)) r.engine = engineTime(statsBefore, await liveStats(m));
  if (r.engine && r.seconds) r.engine.microsPerRequest = (1e6 * r.seconds) / r.engine.requests;
  r.cpuSeconds = after.cpu - before.cpu;
  r.cpuPercent = r.seconds ? (100 * r.cpuSeconds) / r.seconds : undefined;
  r.cpuMicrosPerIo = r.ios ? (1e6 * r.cpuSeconds) / r.ios : undefined;
  r.peakRssBytes = after.hwm;
  report(m.system, job, r);
  return r;
}

function report(system, job, r) {
  if (interrupted) return;
  const what = r.error ? `error: ${r.error}` : `${fmt(r.mbps)} MB/s ${fmt(r.iops)} IOPS cpu ${fmt(r.cpuPercent ?? 0)}%`;
  process.stderr.write(`  ${job.id.padEnd(22)} ${system.padEnd(18)} ${what}\n`);
}

function fmt(v) {
  if (v === undefined || Number.isNaN(v)) return '-';
  return v >= 100 ? String(Math.round(v)) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

// ---- report ----------------------------------------------------------------

function machine() {
  const cpu = /model name\s*:\s*(.*)/.exec(fs.readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? 'unknown';
  const ver = (cmd, args) => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8' }).split('\n')[0].trim();
    } catch {
      return 'unknown';
    }
  };
  return {
    nproc: os.cpus().length, cpu, kernel: os.release(), memGiB: Math.round(os.totalmem() / GiB),
    node: process.version, fio: ver('fio', ['--version']), qemu: ver('qemu-storage-daemon', ['--version']),
  };
}

function ratio(a, b) {
  return a && b ? a / b : undefined;
}

/** Throughput in the unit that fits the job: IOPS for small blocks, MB/s for large ones. */
const unitOf = (job) => (job.bs <= 64 * K ? 'IOPS' : 'MB/s');
const valueOf = (job, r) => (unitOf(job) === 'IOPS' ? r.iops : r.mbps);
const fmtIops = (v) => (v === undefined ? '-' : v >= 10000 ? `${(v / 1000).toFixed(1)}k` : String(Math.round(v)));
/** [numerator, denominator, label]: ratios of MB/s within one run. */
const RATIOS = [
  ['qmount-fuse3', 'qemu', 'fuse3/qemu'],
  ['qmount-fuse-native', 'qemu', 'fuse-native/qemu'],
  ['qmount-fuse3', 'noop-fuse3', 'fuse3/no-op'],
  ['qmount-fuse-native', 'noop-fuse-native', 'fuse-native/no-op'],
  ['noop-fuse3', 'noop-fuse-native', 'no-op fuse3/fuse-native'],
  ...Object.keys(VARIANT_ENV).flatMap((v) => [[v, 'qmount-fuse3', `${v.slice(13)}/fuse3`], [v, 'qemu', `${v.slice(13)}/qemu`]]),
].filter(([a, b]) => SYSTEMS.includes(a) && SYSTEMS.includes(b));

function jobRatios(results) {
  const ok = (sys) => (results[sys] && !results[sys].error ? results[sys].mbps : undefined);
  return Object.fromEntries(RATIOS.map(([a, b, label]) => [label, ratio(ok(a), ok(b))]));
}

/**
 * The spread of each ratio: round i of one system against round i of the
 * other (they took turns in that round), [min, max] over the rounds.
 */
function ratioSpread(results) {
  const runs = (sys) => results[sys]?.runs ?? [];
  return Object.fromEntries(RATIOS.map(([a, b, label]) => {
    const rs = runs(a).map((r, i) => ratio(r.mbps, runs(b)[i]?.mbps)).filter((v) => v !== undefined);
    return [label, rs.length > 1 ? [Math.min(...rs), Math.max(...rs)] : undefined];
  }));
}

function table(result) {
  const head = ['job', 'unit', ...SYSTEMS, ...RATIOS.map((r) => r[2])];
  const rows = result.jobs.map((j) => {
    const job = JOBS.find((x) => x.id === j.id);
    const cells = [j.title, unitOf(job)];
    for (const s of SYSTEMS) {
      const r = j.results[s];
      if (!r) cells.push('');
      else if (r.error) cells.push('error');
      else cells.push(unitOf(job) === 'IOPS' ? fmtIops(valueOf(job, r)) : fmt(valueOf(job, r)));
    }
    for (const [, , label] of RATIOS) {
      const sp = j.ratioSpread?.[label];
      cells.push(j.ratios[label] === undefined ? '-' : `${j.ratios[label].toFixed(2)}x${sp ? ` (${sp[0].toFixed(2)}-${sp[1].toFixed(2)})` : ''}`);
    }
    return cells;
  });
  return { head, rows };
}

/**
 * Where qmount's time goes, per FUSE request and per backend: the no-op's
 * time per request is the binding and the kernel alone (for queued jobs the
 * wall time divided by the requests, so concurrency shows as a shorter time);
 * qmount's splits into its engine (driver call to answer) and the rest.
 */
function timeTable(result) {
  const backends = ['fuse3', 'fuse-native'].filter((b) => SYSTEMS.includes(`qmount-${b}`) || SYSTEMS.includes(`noop-${b}`));
  const head = ['job', ...backends.flatMap((b) => [`${b} no-op µs/req`, `${b} qmount µs/req`, `${b} engine µs/req`, `${b} other µs/req`])];
  const us = (v) => (v === undefined ? '-' : v.toFixed(0));
  const rows = result.jobs.map((j) => {
    const job = JOBS.find((x) => x.id === j.id);
    const cells = [j.title];
    for (const b of backends) {
      const c = j.results[`noop-${b}`];
      const q = j.results[`qmount-${b}`];
      const ceilingUs = c && !c.error && c.ios ? (1e6 * c.seconds) / (c.ios * fuseRequestsPerIo(job, `noop-${b}`)) : undefined;
      const e = q && !q.error ? q.engine : undefined;
      cells.push(us(ceilingUs), us(e?.microsPerRequest), us(e?.engineMicrosPerRequest), us(e ? e.microsPerRequest - e.engineMicrosPerRequest : undefined));
    }
    return cells;
  });
  return { head, rows };
}

/**
 * Server CPU (user + system, all threads) per I/O for the fio jobs, and CPU
 * seconds for dd and the loop jobs: on a shared machine a steadier measure
 * of the work each system does than its throughput, which also depends on
 * how much of the CPU it got.
 */
function cpuTable(result) {
  const head = ['job', 'unit', ...SYSTEMS];
  const rows = result.jobs.map((j) => {
    const job = JOBS.find((x) => x.id === j.id);
    const perIo = !job.dd && !job.loop;
    return [j.title, perIo ? 'CPU µs/IO' : 'CPU s', ...SYSTEMS.map((sys) => {
      const r = j.results[sys];
      if (!r || r.error) return '';
      const v = perIo ? r.cpuMicrosPerIo : r.cpuSeconds;
      return v === undefined ? '-' : perIo ? v.toFixed(0) : v.toFixed(1);
    })];
  });
  return { head, rows };
}

function textTable({ head, rows }) {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells) => cells.map((c, i) => (i === 0 ? c.padEnd(w[i]) : c.padStart(w[i]))).join('  ');
  return [line(head), w.map((n) => '-'.repeat(n)).join('  '), ...rows.map(line)].join('\n');
}

function markdownTable({ head, rows }) {
  return [`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

function summary(result) {
  const m = result.machine;
  const lines = [
    `qmount benchmark, ${result.date}, format ${result.format}${result.quick ? ' (--quick)' : ''}${result.coldCache ? ', cold page cache' : ''}${result.pinnedCpu !== null ? `, all on CPU ${result.pinnedCpu}` : ''}, ${result.runtimeSeconds} s per timed job, median of ${result.repeat}`,
    `machine: ${m.nproc} cores, ${m.cpu}, ${m.memGiB} GiB, kernel ${m.kernel}, node ${m.node}, ${m.fio}, ${m.qemu}`,
  ];
  const rss = result.peakRss;
  const mb = (b) => (b ? `${Math.round(b / MiB)} MiB` : '-');
  if (result.pageReporting) lines.push(pageReportingLine(result.pageReporting));
  lines.push(`peak RSS: ${SYSTEMS.map((s) => `${s} ${mb(rss[s])}`).join(', ')}; load average before ${result.loadAverage.before[0].toFixed(2)}`);
  if (result.rssCheck) {
    const c = result.rssCheck;
    lines.push(`RSS check (${c.job}, fresh mount each run, limit ${mb(c.limitBytes)}): ${Object.entries(c.peakBytes).map(([s, b]) => `${s} ${mb(b)} ${b <= c.limitBytes ? 'ok' : 'OVER'}`).join(', ')}`);
  }
  if (result.tar) lines.push(`loop jobs: a tar of ${result.tar.source}, ${mb(result.tar.bytes)}, ${result.tar.files} files; MB/s of the tar's bytes`);
  return lines.join('\n');
}

/** The qmount systems' peak RSS in the RSS job (the highest of its runs). */
function rssCheck(samples) {
  const job = JOBS.find((j) => j.rss);
  if (!job) return undefined;
  const peakBytes = Object.fromEntries(SYSTEMS.filter(isQmount).map((s) => [s, Math.max(0, ...samples[job.id][s].map((r) => r.peakRssBytes ?? 0))]));
  return { job: job.title, limitBytes: RSS_LIMIT, peakBytes };
}

// ---- main ----------------------------------------------------------------

/** --full: this script again per format, in turn (never side by side: they would share the CPUs). */
function runFull() {
  const passOn = process.argv.slice(2).filter((a) => a !== '--full');
  const drop = new Set(['--format', '--out']);
  const rest = passOn.filter((a, i) => !drop.has(a) && !drop.has(passOn[i - 1]));
  if (!rest.includes('--repeat')) rest.push('--repeat', '3');
  let failed = 0;
  for (const format of ['qcow2', 'qed']) {
    const out = path.join(ROOT, 'bench-results', `full-${format}.json`);
    process.stderr.write(`bench --full: ${format} -> ${path.relative(process.cwd(), out)}\n`);
    const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), ...rest, '--format', format, '--out', out], { stdio: 'inherit' });
    if (r.status !== 0) failed++;
    if (r.signal || r.status === 130) break;
  }
  return failed;
}

async function main() {
  if (!fs.existsSync(CLI)) die(`${CLI} is missing: build first (node scripts/setup.mjs)`);
  if (opts.full) {
    fs.rmSync(work, { recursive: true, force: true });
    process.exitCode = runFull() > 0 ? 1 : 0;
    return;
  }
  if (opts.scale) {
    const { runScale } = await import('./bench-scale.mjs');
    await runScale();
    return;
  }
  for (const [cmd, arg] of [['fio', '--version'], ['qemu-img', '--version'], ['qemu-storage-daemon', '--version'], ['fusermount', '-V']]) {
    if (spawnSync(cmd, [arg], { stdio: 'ignore' }).error) die(`${cmd} not found (node scripts/setup.mjs --test installs it)`);
  }
  const started = Date.now();
  const loadBefore = os.loadavg();
  process.stderr.write(`bench: scratch ${work}, format ${opts.format}, ${opts.runtime} s per timed job\n`);
  if (loadBefore[0] > 1) process.stderr.write(`bench: warning: load average ${loadBefore[0].toFixed(2)} before starting: other work will skew the numbers\n`);
  const pageReporting = holdPageReporting(opts.keepPageReporting);
  if (!opts.noWarm) warmMemory();
  const base = makeBaseImage();
  const iolog = JOBS.some((j) => j.iolog) ? makeUnallocLog() : undefined;
  /** job id -> system -> every run's result (--repeat) */
  const samples = Object.fromEntries(JOBS.map((j) => [j.id, Object.fromEntries(SYSTEMS.map((sys) => [sys, []]))]));
  /** Each round runs the systems in another order, so drifting load favours none of them. */
  const order = (round) => SYSTEMS.map((_, i) => SYSTEMS[(i + round) % SYSTEMS.length]);

  // Read jobs: all systems mounted side by side, every job on every system in turn.
  const readJobs = JOBS.filter((j) => !j.fresh);
  if (readJobs.length > 0) {
    const mounts = [];
    try {
      for (const system of SYSTEMS) {
        const image = isNoop(system) ? undefined : copyImage(base, `read-${system}.${opts.format}`);
        mounts.push(await mountSystem(system, image, 'read'));
      }
      for (let round = 0; round < opts.repeat; round++) {
        for (const job of readJobs) {
          for (const system of order(round)) {
            if (interrupted) break;
            const m = mounts.find((x) => x.system === system);
            samples[job.id][system].push(await runJob(m, job, iolog));
          }
        }
      }
    } finally {
      for (const m of mounts) {
        const stats = await unmountSystem(m);
        if (stats) for (const job of readJobs) for (const r of samples[job.id][m.system]) r.mountRequestStats = stats;
      }
    }
  }
  // Write jobs and dd (a fresh mount has nothing in its page cache): a fresh copy and a fresh mount for every run.
  // The read-back loop job runs right after the tar job, on a fresh mount of the image it filled.
  const readBack = JOBS.find((j) => j.loop === 'read');
  const tar = JOBS.some((j) => j.loop) && LOOP_OK ? makeTar() : undefined;
  if (JOBS.some((j) => j.loop) && !LOOP_OK) process.stderr.write('bench: the loop jobs need root (losetup, mount): skipped\n');
  for (let round = 0; round < opts.repeat; round++) {
    for (const job of JOBS.filter((j) => j.fresh && j !== readBack)) {
      for (const system of order(round)) {
        if (interrupted) break;
        if (!runsOn(job, system)) continue;
        const image = isNoop(system) ? undefined : copyImage(base, `${job.id}-${system}.${opts.format}`);
        const then = job.loop === 'tar' && readBack ? readBack : undefined;
        let m = await mountSystem(system, image, `${job.id}-${round}`);
        let r;
        try {
          r = await runJob(m, job, iolog, tar);
        } finally {
          const stats = await unmountSystem(m, then !== undefined);
          if (r && stats) r.mountRequestStats = stats;
        }
        samples[job.id][system].push(r);
        if (!then || interrupted) continue;
        m = await mountSystem(system, image, `${then.id}-${round}`);
        try {
          r = await runJob(m, then, iolog, tar);
        } finally {
          const stats = await unmountSystem(m);
          if (r && stats) r.mountRequestStats = stats;
        }
        samples[then.id][system].push(r);
      }
    }
  }
  /**
   * A job on a system is reported by its median run (MB/s and IOPS: the mean of the middle
   * two for an even count; the other fields from the lower of them); all runs stay in the JSON.
   */
  const results = Object.fromEntries(JOBS.map((j) => [j.id, Object.fromEntries(SYSTEMS.filter((sys) => samples[j.id][sys].length > 0).map((sys) => {
    const runs = samples[j.id][sys];
    const ok = runs.filter((r) => !r.error).sort((a, b) => a.mbps - b.mbps);
    const all = runs.map((r) => (r.error ? { error: r.error } : { mbps: r.mbps, iops: r.iops }));
    if (ok.length === 0) return [sys, { ...runs[0], runs: all }];
    const lo = ok[Math.floor((ok.length - 1) / 2)];
    const hi = ok[Math.floor(ok.length / 2)];
    const mid = (k) => (lo[k] === undefined ? undefined : (lo[k] + hi[k]) / 2);
    return [sys, { ...lo, mbps: mid('mbps'), iops: mid('iops'), runs: all }];
  }))]));
  if (interrupted) return;

  const peak = (sys) => Math.max(0, ...Object.values(samples).flatMap((bySys) => bySys[sys].map((r) => r.peakRssBytes ?? 0)));
  const result = {
    date: new Date().toISOString(),
    machine: machine(),
    format: opts.format,
    quick: opts.quick,
    runtimeSeconds: opts.runtime,
    repeat: opts.repeat,
    imageBytes: IMAGE_SIZE,
    writtenBytes: WRITTEN,
    strace: opts.strace,
    coldCache: opts.cold,
    pageReporting,
    pinnedCpu: opts.pin,
    qmountNodeArgs: opts.nodeArgs,
    qmountEnv: opts.env,
    peakRss: Object.fromEntries(SYSTEMS.map((s) => [s, peak(s)])),
    rssCheck: rssCheck(samples),
    tar: tar ? { source: TAR_SOURCE, bytes: tar.bytes, files: tar.files } : undefined,
    jobs: JOBS.map((j) => ({ id: j.id, title: j.title, results: results[j.id], ratios: jobRatios(results[j.id]), ratioSpread: ratioSpread(results[j.id]) })),
    wallSeconds: Math.round((Date.now() - started) / 1000),
    loadAverage: { before: loadBefore, after: os.loadavg() },
  };
  const t = table(result);
  const tt = timeTable(result);
  const ct = cpuTable(result);
  const outFile = opts.out ?? path.join(ROOT, 'bench-results', 'latest.json');
  fs.mkdirSync(path.dirname(outFile), { recursive: true });
  fs.writeFileSync(outFile, `${JSON.stringify(result, null, 2)}\n`);
  fs.writeFileSync(outFile.replace(/\.json$/, '') + '.md', `${summary(result)}\n\n${markdownTable(t)}\n\n${markdownTable(tt)}\n\n${markdownTable(ct)}\n`);
  process.stdout.write(`\n${summary(result)}\n\n${textTable(t)}\n\n${textTable(tt)}\n\n${textTable(ct)}\n\nratios are of MB/s, same run; written to ${path.relative(process.cwd(), outFile)} (${result.wallSeconds} s)\n`);
}

main().then(
  () => {
    cleanupSync();
    process.exit(interrupted ? 130 : (process.exitCode ?? 0));
  },
  (err) => {
    process.stderr.write(`bench: ${err.message}\n`);
    cleanupSync();
    process.exit(1);
  },
);
