#!/usr/bin/env node
/**
 * `npm run bench -- --check`: `qmount check` beside `qemu-img check` on the
 * same image, wall time and peak RSS of each run (GNU time's %e and %M).
 *
 *   node scripts/bench-check.mjs [--size 1T] [--cluster-size 65536] [--repeat 3] [--out FILE]
 *
 * The image: `qemu-img create -f qcow2 -o preallocation=metadata` of --size
 * (every L2 entry and refcount allocated, the file sparse), made in a
 * scratch directory and removed afterwards. The two tools run alternately,
 * --repeat times each; the table shows the median and the worst. Both
 * exits must be 0 (a clean image) or the run fails. Results also go to
 * bench-results/check.json (or --out).
 *
 * Targets (issue 14): qmount at most 2x qemu-img's time, peak RSS at most 128 MiB.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'dist', 'src', 'cli.js');
const TIME = '/usr/bin/time';

function die(msg) {
  process.stderr.write(`bench-check: ${msg}\n`);
  process.exit(1);
}

function parseArgs(argv) {
  const o = { size: '1T', clusterSize: 65536, repeat: 3, out: path.join(ROOT, 'bench-results', 'check.json') };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => (i + 1 < argv.length ? argv[++i] : die(`${a} needs a value`));
    if (a === '--size') o.size = next();
    else if (a === '--cluster-size') o.clusterSize = Number(next());
    else if (a === '--repeat') o.repeat = Number(next());
    else if (a === '--out') o.out = path.resolve(next());
    else if (a === '--check') continue; // the flag bench.mjs passes on
    else die(`unknown option ${a}`);
  }
  if (!(o.repeat >= 1)) die('--repeat needs a positive number');
  return o;
}

/** One timed run: { seconds, rssKiB, code }. */
function timed(cmd, args) {
  const r = spawnSync(TIME, ['-f', '%e %M', cmd, ...args], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.error) die(`${TIME}: ${r.error.message} (GNU time is needed: apt-get install time)`);
  const last = r.stderr.trim().split('\n').pop() ?? '';
  const m = /^([\d.]+) (\d+)$/.exec(last);
  if (!m) die(`cannot read the timing of ${cmd}: ${last}`);
  return { seconds: Number(m[1]), rssKiB: Number(m[2]), code: r.status };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

export async function main(argv) {
  const o = parseArgs(argv);
  if (!fs.existsSync(CLI)) die(`${CLI} is missing: build first (node scripts/setup.mjs)`);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-bench-check-'));
  try {
    const image = path.join(work, 'prealloc.qcow2');
    process.stderr.write(`bench-check: making a ${o.size} qcow2 with preallocation=metadata in ${work}\n`);
    const made = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `preallocation=metadata,cluster_size=${o.clusterSize}`, image, o.size], { encoding: 'utf8' });
    if (made.status !== 0) die(`qemu-img create failed: ${made.stderr || made.error?.message}`);
    const runs = { 'qemu-img': [], qmount: [] };
    for (let i = 0; i < o.repeat; i++) {
      runs['qemu-img'].push(timed('qemu-img', ['check', image]));
      runs.qmount.push(timed(process.execPath, [CLI, 'check', '--no-progress', image]));
    }
    for (const [name, rs] of Object.entries(runs)) {
      const bad = rs.find((r) => r.code !== 0);
      if (bad) die(`${name} check exited ${bad.code} on a clean image`);
    }
    const sum = (rs) => ({
      medianSeconds: median(rs.map((r) => r.seconds)),
      worstSeconds: Math.max(...rs.map((r) => r.seconds)),
      peakRssMiB: Math.round(Math.max(...rs.map((r) => r.rssKiB)) / 1024),
    });
    const q = sum(runs['qemu-img']);
    const m = sum(runs.qmount);
    const result = {
      date: new Date().toISOString(),
      image: { size: o.size, clusterSize: o.clusterSize, preallocation: 'metadata' },
      repeat: o.repeat,
      loadAverage: os.loadavg(),
      nproc: os.cpus().length,
      'qemu-img': q,
      qmount: m,
      timeRatio: Number((m.medianSeconds / q.medianSeconds).toFixed(2)),
      runs,
    };
    fs.mkdirSync(path.dirname(o.out), { recursive: true });
    fs.writeFileSync(o.out, `${JSON.stringify(result, null, 2)}\n`);
    const row = (name, s) => `${name.padEnd(10)} ${s.medianSeconds.toFixed(2).padStart(7)} s ${s.worstSeconds.toFixed(2).padStart(7)} s ${String(s.peakRssMiB).padStart(6)} MiB`;
    process.stdout.write(
      [
        `check of a ${o.size} qcow2 (preallocation=metadata, ${o.clusterSize}-byte clusters), ${o.repeat} runs each, load average ${os.loadavg()[0].toFixed(2)}`,
        `${'tool'.padEnd(10)} ${'median'.padStart(9)} ${'worst'.padStart(9)} ${'peak RSS'.padStart(10)}`,
        row('qemu-img', q),
        row('qmount', m),
        `qmount/qemu-img time: ${result.timeRatio}x (target <= 2x); qmount peak RSS ${m.peakRssMiB} MiB (target <= 128 MiB)`,
        `results: ${path.relative(process.cwd(), o.out)}`,
        '',
      ].join('\n'),
    );
    return 0;
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exit(await main(process.argv.slice(2)));
}
