/**
 * Concurrent requests at engine level, as FUSE delivers them: many writes to
 * the same and neighbouring unallocated clusters (and across an L2 boundary
 * whose table does not exist yet) issued together with Promise.all, reads
 * racing them. Writes cover disjoint byte ranges so the final content is
 * defined; each racing read must see, byte by byte, the old or the new
 * content. Afterwards the content equals the model and `qemu-img check`
 * exits 0: a cluster allocated twice would show up as a leak.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { checkQed } from '../../src/formats/qed/check.js';
import { logger } from '../../src/log.js';
import { convertToRaw, patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';
import { rng } from '../helpers/workload.js';

let dir: string;
let cleanup: () => void;
let driver: BlockDriver | null = null;

beforeEach(() => {
  ({ dir, cleanup } = scratchDir('qed-conc'));
});
afterEach(async () => {
  await driver?.close().catch(() => {});
  driver = null;
  cleanup();
});

const MiB = 1024 * 1024;
const cs = 4096;

interface Piece {
  off: number;
  data: Buffer;
}

/** Cut [start, end) into disjoint pieces of 1..maxLen bytes with fresh content, shuffled. */
function pieces(start: number, end: number, maxLen: number, seed: number): Piece[] {
  const r = rng(seed);
  const out: Piece[] = [];
  for (let off = start; off < end; ) {
    const len = Math.min(end - off, 1 + Math.floor(r() ** 2 * maxLen));
    out.push({ off, data: patternBytes(len, seed * 7919 + out.length) });
    off += len;
  }
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

async function runRound(opts: { seed: number; l2CacheBytes?: number; maxLen: number }): Promise<void> {
  const base = path.join(dir, 'base.raw');
  const size = 16 * MiB;
  fs.writeFileSync(base, patternBytes(size, opts.seed));
  const img = path.join(dir, 'c.qed');
  qemuImg('create', '-q', '-f', 'qed', '-o', `cluster_size=${cs}`, '-b', base, '-F', 'raw', img, String(size));
  // A mix of allocated, zero and unallocated clusters in the first L2 range; the
  // second L2 table (from 8 MiB, table_size 4 -> 2048 entries) does not exist yet.
  qemuIo(img, 'qed', [`write -P 0x10 ${3 * cs} ${2 * cs}`, `write -z ${9 * cs} ${2 * cs}`, `write -P 0x11 ${20 * cs + 100} 10`]);
  const model = fs.readFileSync(convertToRaw(img, path.join(dir, 'before.raw')));
  const old = Buffer.from(model);

  const regions: Array<[number, number]> = [
    [0, 32 * cs], // mixed clusters
    [8 * MiB - 24 * cs, 8 * MiB + 24 * cs], // across the boundary to an unallocated L2 table
    [12 * MiB + 5 * cs, 12 * MiB + 6 * cs], // one cluster, many tiny writes
  ];
  const writes: Piece[] = [];
  regions.forEach(([s, e], i) => writes.push(...pieces(s, e, i === 2 ? 300 : opts.maxLen, opts.seed * 10 + i)));
  for (const w of writes) w.data.copy(model, w.off);

  driver = await openImage(img, { readOnly: false, l2CacheBytes: opts.l2CacheBytes });
  const d = driver;
  const reads: Promise<void>[] = [];
  const r = rng(opts.seed + 99);
  const racingRead = async (s: number, len: number): Promise<void> => {
    const got = Buffer.alloc(len);
    await d.read(got, 0, len, s);
    for (let i = 0; i < len; i++) {
      if (got[i] !== old[s + i] && got[i] !== model[s + i]) {
        throw new Error(`racing read saw byte ${got[i]} at ${s + i}: neither old (${old[s + i]}) nor new (${model[s + i]})`);
      }
    }
  };
  const ops = writes.map((w, i) => {
    if (i % 8 === 0) {
      const [s, e] = regions[i % regions.length];
      const off = s + Math.floor(r() * (e - s - 1));
      reads.push(racingRead(off, Math.min(e - off, 3 * cs)));
    }
    return d.write(w.data, 0, w.data.length, w.off);
  });
  await Promise.all([...ops, ...reads]);

  const all = Buffer.alloc(size);
  await d.read(all, 0, size, 0);
  expect(all.equals(model)).toBe(true);
  await d.close();
  driver = null;

  const modelPath = path.join(dir, 'model.raw');
  fs.writeFileSync(modelPath, model);
  const check = qemuCheck(img, 'qed');
  expect(check.code, check.output).toBe(0);
  expect(qemuCompare(img, modelPath, 'qed', 'raw').same).toBe(true);
  const ours = await checkQed(img, { repair: 'none', log: logger('test') });
  expect(ours).toMatchObject({ corruptions: 0, leaks: 0 });
}

describe('QED concurrent requests', () => {
  it.each([1, 2, 3])('disjoint writes to the same and neighbouring unallocated clusters (seed %i)', async (seed) => {
    await runRound({ seed, maxLen: 3 * cs });
  });

  it('with large cluster-crossing writes and a tiny L2 cache (evictions, write-back under pressure)', async () => {
    await runRound({ seed: 4, maxLen: 40 * cs, l2CacheBytes: 1 });
  });
});
