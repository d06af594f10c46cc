/**
 * SIGKILL during QED discard / write-zeroes workloads, three rounds on the
 * same image. disk.raw has no fallocate on this branch's mount, so the
 * workload runs the engine in a child process (dist/, the code `qmount`
 * runs): two lanes on disjoint halves of the disk issue writes, writeZeroes
 * with and without unmap (some cluster-aligned), and flushes, and log every
 * request as issued and as completed on stdout. The child is SIGKILLed at a
 * random moment after its first completed flush. Then, as in sigkill.test.ts:
 *  - qemu-img check exits 0 or 3 (2 only behind the need-check bit);
 *  - a read-only open reads every byte flushed before the kill, later bytes
 *    old or new;
 *  - a read-write open + close leaves the image clean (0 or 3, need-check
 *    cleared) with the content the read-only open saw;
 *  - the backing file is unchanged.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/formats/open.js';
import { expectation, flaggedUnclean, guestMismatch, quietLog, readAll, type GuestFlush, type GuestWrite } from '../helpers/crash.js';
import { convertToRaw, patternBytes, qemuCheck, qemuImg, qemuIo, scratchDir, sha256File } from '../helpers/qemu.js';
import { rng } from '../helpers/workload.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const ROUNDS = 3;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const cleanups: Array<() => void> = [];
afterAll(() => cleanups.forEach((c) => c()));

/** The child: lanes of requests, each logged as "I id kind offset length seed unmap" / "D id" / "E id errno". */
const CHILD = `
import fs from 'node:fs';
const { openImage } = await import(process.env.OPEN_JS);
const pino = (await import('pino')).default;
const [image, seedStr, sizeStr] = process.argv.slice(1);
const seed = Number(seedStr), size = Number(sizeStr);
const d = await openImage(image, { readOnly: false, format: 'qed', log: pino({ level: 'silent' }) });
let id = 0;
const out = (s) => fs.writeSync(1, s + '\\n');
function rng(s) { let a = s >>> 0; return () => { a = (a + 0x6d2b79f5) >>> 0; let t = a; t = Math.imul(t ^ (t >>> 15), t | 1); t ^= t + Math.imul(t ^ (t >>> 7), t | 61); return ((t ^ (t >>> 14)) >>> 0) / 4294967296; }; }
function pattern(len, s) { const b = Buffer.alloc(len); let x = s >>> 0; for (let i = 0; i < len; i++) { x = (Math.imul(x, 1103515245) + 12345) >>> 0; b[i] = (x >>> 24) | 1; } return b; }
async function lane(l) {
  const r = rng(seed * 31 + l);
  const half = size / 2;
  for (let i = 0; ; i++) {
    const my = id++;
    if (i % 6 === 5) { out('I ' + my + ' flush'); await d.flush(); out('D ' + my); continue; }
    let len = 1 + Math.floor(r() ** 2 * 256 * 1024);
    let off = l * half + Math.floor(r() * (half - len));
    const k = r();
    if (k < 0.5) {
      const s = seed * 1000003 + l * 100000 + i;
      out('I ' + my + ' write ' + off + ' ' + len + ' ' + s);
      await d.write(pattern(len, s), 0, len, off);
    } else {
      const unmap = r() < 0.6;
      if (r() < 0.5) { off -= off % 4096; len = Math.max(4096, len - (len % 4096)); if (off + len > (l + 1) * half) len = (l + 1) * half - off; }
      out('I ' + my + ' zero ' + off + ' ' + len + ' 0 ' + (unmap ? 1 : 0));
      await d.writeZeroes(off, len, { unmap });
    }
    out('D ' + my);
  }
}
await Promise.all([lane(0), lane(1)]);
`;

/** Must equal the child's pattern(). */
function childPattern(len: number, s: number): Buffer {
  const b = Buffer.alloc(len);
  let x = s >>> 0;
  for (let i = 0; i < len; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    b[i] = (x >>> 24) | 1; // never 0: a write is never mistaken for zeros
  }
  return b;
}

/** Run the child until SIGKILL (sent `delayMs` after its first completed flush); parse its log. */
async function runUntilKilled(image: string, seed: number, delayMs: number): Promise<{ writes: GuestWrite[]; flushes: GuestFlush[]; signal: string | null }> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', CHILD, image, String(seed), String(SIZE)], {
    cwd: ROOT,
    env: { ...process.env, OPEN_JS: path.join(ROOT, 'dist', 'src', 'formats', 'open.js') },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let text = '';
  let stderr = '';
  let armed = false;
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  child.stdout.on('data', (b: Buffer) => {
    text += b.toString();
    if (!armed && /^D \d+$/m.test(text) && flushDone(text)) {
      armed = true;
      setTimeout(() => child.kill('SIGKILL'), delayMs);
    }
  });
  const signal = await new Promise<string | null>((resolve) => child.on('exit', (_code, sig) => resolve(sig)));
  if (!armed) throw new Error(`the child ended before a flush completed: ${stderr.slice(-500)}`);
  const writes: GuestWrite[] = [];
  const flushes: GuestFlush[] = [];
  const byId = new Map<number, { done: number }>();
  text.split('\n').forEach((line, tick) => {
    const f = line.split(' ');
    if (f[0] === 'I') {
      const rid = Number(f[1]);
      if (f[2] === 'flush') {
        const fl: GuestFlush = { issued: tick + 1, done: Infinity };
        flushes.push(fl);
        byId.set(rid, fl);
      } else {
        const len = Number(f[4]);
        const data = f[2] === 'write' ? childPattern(len, Number(f[5])) : Buffer.alloc(len);
        const w: GuestWrite = { offset: Number(f[3]), data, issued: tick + 1, done: Infinity };
        writes.push(w);
        byId.set(rid, w);
      }
    } else if (f[0] === 'D') {
      const rec = byId.get(Number(f[1]));
      if (rec) rec.done = tick + 1;
    }
  });
  return { writes, flushes, signal };
}

function flushDone(text: string): boolean {
  const flushIds = new Set([...text.matchAll(/^I (\d+) flush$/gm)].map((m) => m[1]));
  return [...text.matchAll(/^D (\d+)$/gm)].some((m) => flushIds.has(m[1]));
}

describe('SIGKILL during QED discard and write-zeroes (engine in a child process), three times in a row', () => {
  it.each([
    ['QED over a raw backing file, 4 KiB clusters', true],
    ['QED, 64 KiB clusters', false],
  ] as const)('%s', async (_name, withBacking) => {
    const { dir, cleanup } = scratchDir('sigkill-sparse');
    cleanups.push(cleanup);
    const image = path.join(dir, 'disk.qed');
    const frozen: string[] = [];
    if (withBacking) {
      const base = path.join(dir, 'base.raw');
      fs.writeFileSync(base, patternBytes(20 * MiB, 17));
      frozen.push(base);
      qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', image, String(SIZE));
    } else {
      qemuImg('create', '-q', '-f', 'qed', image, String(SIZE));
    }
    qemuIo(image, 'qed', [`write -P 0x51 0 ${6 * MiB}`, `write -P 0x52 ${16 * MiB} ${6 * MiB}`]);
    const frozenHashes = frozen.map(sha256File);
    let content = fs.readFileSync(convertToRaw(image, path.join(dir, 'start.raw')));
    for (let round = 0; round < ROUNDS; round++) {
      const r = rng((round + 1) * 7919 + (withBacking ? 1 : 0));
      const run = await runUntilKilled(image, round * 101 + 3, Math.floor(r() * 400));
      expect(run.signal).toBe('SIGKILL');
      const unclean = flaggedUnclean(image, 'qed');
      const c = qemuCheck(image, 'qed');
      expect(unclean ? [0, 2, 3] : [0, 3], c.output).toContain(c.code);
      const want = expectation(content, run.writes, run.flushes, Infinity);
      const ro = await openImage(image, { readOnly: true, format: 'qed', log: quietLog });
      const seen = await readAll(ro);
      await ro.close();
      expect(guestMismatch(seen, want.base, want.later), `round ${round}: ${run.writes.length} requests`).toBeNull();
      const rw = await openImage(image, { readOnly: false, format: 'qed', log: quietLog });
      await rw.close();
      const c2 = qemuCheck(image, 'qed');
      expect([0, 3], c2.output).toContain(c2.code);
      expect(flaggedUnclean(image, 'qed')).toBe(false);
      const after = fs.readFileSync(convertToRaw(image, path.join(dir, 'after.raw')));
      expect(after.equals(seen), 'the repairing open changed guest data').toBe(true);
      console.log(`round ${round}: ${run.writes.length} writes/zeroes, ${run.flushes.length} flushes, check ${c.code}${unclean ? ' (need-check set)' : ''}`);
      content = after;
    }
    expect(frozen.map(sha256File)).toEqual(frozenHashes);
  });
});
