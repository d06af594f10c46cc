#!/usr/bin/env node
/**
 * Scale check (`node scripts/bench.mjs --scale`, or this file directly): a
 * 1 TiB qcow2 image whose L1 table is fully populated (preallocation=metadata:
 * every L2 table and refcount block exists, the file is sparse, ~160 MiB on
 * disk). Shows that mounting reads neither the L2 tables nor the refcount
 * blocks, and that qmount's memory is bounded by its caches however much of
 * the disk is read.
 *
 * For each L2 cache size: qmount runs under `strace -f -e trace=openat,pread64`
 * (to count what it reads from the image, by offset), then reads one 4 KiB
 * block in each of the 2048 L1 ranges (each needs another L2 table), in
 * several passes, sampling VmRSS. Writes bench-results/scale.json.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'dist', 'src', 'cli.js');
const TiB = 1024 ** 4;
const MiB = 1024 ** 2;
const PASSES = [1, 2, 4, 8];
const CACHE_SIZES = ['4M', '32M'];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error || r.status !== 0) throw new Error(`${cmd} failed: ${r.error?.message ?? r.stderr.trim()}`);
  return r.stdout;
}

/** Where the L1 table says the L2 tables are, and the refcount table the refcount blocks. */
function metadataLayout(image) {
  const fd = fs.openSync(image, 'r');
  try {
    const h = Buffer.alloc(104);
    fs.readSync(fd, h, 0, 104, 0);
    const clusterSize = 2 ** h.readUInt32BE(20);
    const l1Size = h.readUInt32BE(36);
    const l1Offset = Number(h.readBigUInt64BE(40));
    const rtOffset = Number(h.readBigUInt64BE(48));
    const rtClusters = h.readUInt32BE(56);
    const offsets = (at, count) => {
      const b = Buffer.alloc(count * 8);
      fs.readSync(fd, b, 0, b.length, at);
      const out = new Set();
      for (let i = 0; i < count; i++) {
        const v = Number(b.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
        if (v) out.add(v);
      }
      return out;
    };
    return { clusterSize, l1Offset, l2Tables: offsets(l1Offset, l1Size), refBlocks: offsets(rtOffset, (rtClusters * clusterSize) / 8) };
  } finally {
    fs.closeSync(fd);
  }
}

/** Image reads in an strace log: how many, how many bytes, how many of them L2 tables / refcount blocks. */
function imageReads(traceFile, image, layout) {
  const text = fs.existsSync(traceFile) ? fs.readFileSync(traceFile, 'utf8') : '';
  const fds = new Set();
  const out = { calls: 0, bytes: 0, l2Tables: new Set(), refBlocks: new Set(), l2Reads: 0 };
  for (const line of text.split('\n')) {
    if (line.includes(`openat(`) && line.includes(`"${image}"`)) {
      const m = /= (\d+)$/.exec(line);
      if (m) fds.add(Number(m[1]));
      continue;
    }
    const m = /pread64\((\d+), .*, (\d+), (\d+)\) = (\d+)/.exec(line);
    if (!m || !fds.has(Number(m[1]))) continue;
    const off = Number(m[3]);
    out.calls++;
    out.bytes += Number(m[4]);
    if (layout.l2Tables.has(off)) {
      out.l2Tables.add(off);
      out.l2Reads++;
    }
    if (layout.refBlocks.has(off)) out.refBlocks.add(off);
  }
  return { calls: out.calls, bytes: out.bytes, distinctL2Tables: out.l2Tables.size, l2TableReads: out.l2Reads, distinctRefcountBlocks: out.refBlocks.size };
}

function rssOf(pid) {
  const st = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (n) => Number(new RegExp(`^${n}:\\s+(\\d+)`, 'm').exec(st)?.[1] ?? 0) * 1024;
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

/** The qmount process (strace's child) serving `dir`. */
function qmountPid(tracerPid) {
  const kids = fs.readFileSync(`/proc/${tracerPid}/task/${tracerPid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
  return Number(kids[0]);
}

async function measure(work, image, layout, cacheSize, live) {
  const dir = path.join(work, `mnt-${cacheSize}`);
  fs.mkdirSync(dir);
  const trace = path.join(work, `trace-${cacheSize}.txt`);
  const t0 = Date.now();
  const child = spawn('strace', ['-f', '-e', 'trace=openat,pread64', '-o', trace, process.execPath, CLI, '-f', '--l2-cache-size', cacheSize, image, dir], {
    stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
    env: { ...process.env, QMOUNT_READY_FD: '3' },
  });
  const entry = { dir, child };
  live.add(entry);
  // One JSON line (src/daemon.ts). Not the pipe's end: strace holds the pipe open too.
  let line = '';
  await new Promise((resolve) => {
    child.stdio[3].setEncoding('utf8').on('data', (d) => {
      line += d;
      if (line.includes('\n')) resolve();
    });
    child.stdio[3].on('end', resolve);
  });
  if (!JSON.parse(line.trim() || '{}').ok) throw new Error(`qmount did not mount ${image}`);
  child.stdio[3].destroy();
  const mountMs = Date.now() - t0;
  const pid = qmountPid(child.pid);
  await sleep(300);
  const atMount = imageReads(trace, image, layout);
  const rssMount = rssOf(pid);
  const passes = [];
  const fd = fs.openSync(path.join(dir, 'disk.raw'), 'r');
  const buf = Buffer.alloc(4096);
  const span = layout.clusterSize * (layout.clusterSize / 8); // guest bytes per L2 table
  const ranges = Math.ceil(TiB / span);
  try {
    for (let pass = 1; pass <= PASSES[PASSES.length - 1]; pass++) {
      // One block in every L1 range, at a different offset each pass (the kernel's page cache must not answer).
      for (let i = 0; i < ranges; i++) fs.readSync(fd, buf, 0, 4096, i * span + (((i * 7919 + pass * 104729) % (span / 4096)) * 4096));
      if (PASSES.includes(pass)) passes.push({ pass, reads: pass * ranges, rssBytes: rssOf(pid).rss });
    }
  } finally {
    fs.closeSync(fd);
  }
  const { hwm } = rssOf(pid);
  spawnSync('fusermount', ['-u', dir]);
  await new Promise((resolve) => (child.exitCode !== null ? resolve() : child.on('exit', resolve)));
  live.delete(entry);
  const total = imageReads(trace, image, layout);
  return {
    l2CacheSize: cacheSize,
    mountMs,
    atMount: { ...atMount, rssBytes: rssMount.rss },
    passes,
    peakRssBytes: hwm,
    afterAllReads: total,
  };
}

export async function runScale() {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-scale-'));
  const live = new Set();
  const cleanup = () => {
    for (const e of live) {
      spawnSync('fusermount', ['-uz', e.dir], { stdio: 'ignore' });
      try { e.child.kill('SIGKILL'); } catch { /* gone */ }
    }
    fs.rmSync(work, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));
  const image = path.join(work, 'big.qcow2');
  process.stderr.write('scale: creating a 1 TiB qcow2 image with preallocation=metadata\n');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', image, String(TiB)]);
  const layout = metadataLayout(image);
  const result = {
    date: new Date().toISOString(),
    image: {
      virtualBytes: TiB,
      fileBytes: fs.statSync(image).size,
      diskBytes: fs.statSync(image).blocks * 512,
      l2Tables: layout.l2Tables.size,
      refcountBlocks: layout.refBlocks.size,
    },
    runs: [],
  };
  for (const cs of CACHE_SIZES) {
    process.stderr.write(`scale: mounting with --l2-cache-size ${cs}\n`);
    result.runs.push(await measure(work, image, layout, cs, live));
  }
  const out = path.join(ROOT, 'bench-results', 'scale.json');
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
  const mb = (b) => `${(b / MiB).toFixed(0)} MiB`;
  const lines = [
    `scale: ${result.date}: 1 TiB qcow2, ${result.image.l2Tables} L2 tables and ${result.image.refcountBlocks} refcount blocks, ${mb(result.image.diskBytes)} on disk`,
  ];
  for (const r of result.runs) {
    const m = r.atMount;
    lines.push(
      `  --l2-cache-size ${r.l2CacheSize}: mounted in ${r.mountMs} ms; image reads at mount: ${m.calls} (${(m.bytes / 1024).toFixed(0)} KiB), ` +
        `L2 tables ${m.distinctL2Tables}, refcount blocks ${m.distinctRefcountBlocks}; RSS after mount ${mb(m.rssBytes)}`,
      `    RSS after ${r.passes.map((p) => `${p.reads} reads ${mb(p.rssBytes)}`).join(', ')}; peak ${mb(r.peakRssBytes)}; ` +
        `L2 table reads ${r.afterAllReads.l2TableReads} (${r.afterAllReads.distinctL2Tables} distinct), refcount blocks read ${r.afterAllReads.distinctRefcountBlocks}`,
    );
  }
  process.stdout.write(`${lines.join('\n')}\nwritten to ${path.relative(process.cwd(), out)}\n`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  runScale().then(
    () => process.exit(0),
    (err) => {
      process.stderr.write(`scale: ${err.message}\n`);
      process.exit(1);
    },
  );
}
