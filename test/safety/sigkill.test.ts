/**
 * Real processes: qmount is SIGKILLed in the middle of a write workload,
 * three times in a row on the same image, for each image kind below.
 *
 * Each round: mount read-write; two writer lanes write random data through
 * disk.raw (async, so several requests are in flight) with fsyncs in between;
 * SIGKILL arrives at a random moment after the first fsync completed. Then:
 *  - the process really died of the SIGKILL; the dead FUSE mount is detached;
 *  - qemu-img check finds no corruption (exit 0 or 3); exit 2 only with the
 *    qcow2 dirty bit (lazy_refcounts) or the QED need-check bit set;
 *  - a read-only mount of the crashed image changes no byte of it (sha256
 *    before and after; backing files too) and reads: every byte fsync'd
 *    before the kill (and not written again after that fsync was issued) is
 *    there; bytes written later are old or new;
 *  - a read-write mount then unmount leaves the image clean (check 0 or 3, no
 *    dirty/need-check bit) with the same guest content the read-only mount
 *    saw (a repair must not change data);
 *  - internal snapshots keep their content.
 * The next round starts from that content.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { expectation, flaggedUnclean, guestMismatch, type GuestFlush, type GuestWrite } from '../helpers/crash.js';
import { detach, mountImage, type MountedImage } from '../helpers/mount.js';
import { convertToRaw, patternBytes, qemuCheck, qemuImg, qemuIo, scratchDir, sha256File } from '../helpers/qemu.js';
import { rng } from '../helpers/workload.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const ROUNDS = 3;
const cleanups: Array<() => void> = [];
afterAll(() => cleanups.forEach((c) => c()));

interface Kind {
  name: string;
  format: 'qcow2' | 'qed';
  size: number;
  /** build in dir; returns the image and files that must never change */
  build(dir: string): { image: string; frozen: string[] };
  snapshot?: boolean;
}

function create(dir: string, opts: string, size: number, backing?: string): string {
  const image = path.join(dir, 'disk.qcow2');
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts) args.push('-o', opts);
  if (backing) args.push('-b', backing, '-F', 'qcow2');
  qemuImg(...args, image, String(size));
  return image;
}

const KINDS: Kind[] = [
  { name: 'qcow2 512-byte clusters', format: 'qcow2', size: 24 * MiB, build: (d) => ({ image: create(d, 'cluster_size=512', 24 * MiB), frozen: [] }) },
  { name: 'qcow2 64k clusters', format: 'qcow2', size: 64 * MiB, build: (d) => ({ image: create(d, '', 64 * MiB), frozen: [] }) },
  {
    name: 'qcow2 with an internal snapshot',
    format: 'qcow2',
    size: 32 * MiB,
    snapshot: true,
    build(d) {
      const image = create(d, '', 32 * MiB);
      qemuIo(image, 'qcow2', [`write -P 0x5a 0 ${12 * MiB}`, `write -P 0x5b ${20 * MiB} ${MiB}`]);
      qemuImg('snapshot', '-c', 's1', image);
      convertToRaw(image, path.join(d, 's1.raw'));
      return { image, frozen: [path.join(d, 's1.raw')] };
    },
  },
  {
    name: 'qcow2 over a backing file',
    format: 'qcow2',
    size: 32 * MiB,
    build(d) {
      const base = path.join(d, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, String(32 * MiB));
      qemuIo(base, 'qcow2', [`write -P 0x6a 0 ${16 * MiB}`]);
      return { image: create(d, '', 32 * MiB, 'base.qcow2'), frozen: [base] };
    },
  },
  { name: 'qcow2 lazy_refcounts', format: 'qcow2', size: 32 * MiB, build: (d) => ({ image: create(d, 'lazy_refcounts=on,cluster_size=4096', 32 * MiB), frozen: [] }) },
  {
    name: 'QED',
    format: 'qed',
    size: 32 * MiB,
    build(d) {
      const image = path.join(d, 'disk.qed');
      qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', image, String(32 * MiB));
      return { image, frozen: [] };
    },
  },
];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Write through disk.raw until the mount dies. Two lanes of async writes; an
 * fsync every few writes per lane. Every request is stamped on one clock.
 */
async function writeUntilKilled(m: MountedImage, size: number, seed: number, kill: (firstSync: Promise<void>) => void): Promise<{ writes: GuestWrite[]; flushes: GuestFlush[] }> {
  let clock = 0;
  const tick = () => ++clock;
  const writes: GuestWrite[] = [];
  const flushes: GuestFlush[] = [];
  const fh = await fs.promises.open(m.rawPath, 'r+');
  let synced!: () => void;
  kill(new Promise<void>((r) => (synced = r)));
  let dead = false;
  const lane = async (id: number): Promise<void> => {
    const r = rng(seed * 31 + id);
    for (let i = 0; !dead; i++) {
      if (i % 5 === 4) {
        const f: GuestFlush = { issued: tick(), done: Infinity };
        flushes.push(f);
        try {
          await fh.sync();
          f.done = tick();
          synced();
        } catch {
          dead = true;
        }
        continue;
      }
      const len = 1 + Math.floor(r() ** 2 * 200 * KiB);
      // Each lane has its own half of the disk, so concurrent writes never overlap.
      const half = size / 2;
      const offset = id * half + Math.floor(r() * (half - len));
      const data = r() < 0.1 ? Buffer.alloc(len) : patternBytes(len, seed * 1_000_003 + id * 100_000 + i);
      const w: GuestWrite = { offset, data, issued: tick(), done: Infinity };
      writes.push(w);
      try {
        await fh.write(data, 0, len, offset);
        w.done = tick();
      } catch {
        dead = true;
      }
    }
  };
  await Promise.all([lane(0), lane(1)]);
  await fh.close().catch(() => {});
  return { writes, flushes };
}

function hashes(files: string[]): string[] {
  return files.map(sha256File);
}

describe('SIGKILL of qmount during writes, three times in a row', () => {
  it.each(KINDS.map((k) => [k.name, k] as const))('%s', async (_name, kind) => {
    const { dir, cleanup } = scratchDir('sigkill');
    cleanups.push(cleanup);
    const { image, frozen } = kind.build(dir);
    const frozenHashes = hashes(frozen);
    let content = fs.readFileSync(convertToRaw(image, path.join(dir, 'start.raw')));
    const log: string[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      const r = rng(((round + 1) * 0x9e3779b9) ^ (KINDS.indexOf(kind) * 0x85ebca6b));
      for (let i = 0; i < 4; i++) r(); // xorshift starts small from small seeds
      const delay = Math.floor(r() * 600);
      const m = await mountImage(image, { format: kind.format });
      let run: { writes: GuestWrite[]; flushes: GuestFlush[] };
      try {
        run = await writeUntilKilled(m, kind.size, round + 1, (firstSync) => {
          void firstSync.then(() => sleep(delay)).then(() => m.kill('SIGKILL'));
        });
        const st = await m.exited;
        expect(st.signal, 'qmount must die of the SIGKILL, mid-workload').toBe('SIGKILL');
      } finally {
        detach(m.dir);
        await m.unmount();
      }
      const synced = run.flushes.filter((f) => f.done < Infinity).length;
      const landed = run.writes.filter((w) => w.done < Infinity).length;
      const unclean = flaggedUnclean(image, kind.format);
      const c = qemuCheck(image, kind.format);
      log.push(`round ${round + 1}: kill ${delay} ms after the first fsync, ${landed}/${run.writes.length} writes answered, ${synced} fsyncs; after the kill: check ${c.code}${unclean ? ' (unclean bit set)' : ''}`);
      expect(unclean ? [0, 2, 3] : [0, 3], c.output).toContain(c.code);

      // Read-only mount: changes nothing, serves the fsync'd data.
      const want = expectation(content, run.writes, run.flushes, Infinity);
      const before = hashes([image, ...frozen]);
      const ro = await mountImage(image, { readOnly: true, format: kind.format });
      let seen: Buffer;
      try {
        seen = await fs.promises.readFile(ro.rawPath);
      } finally {
        await ro.unmount();
      }
      expect(hashes([image, ...frozen]), 'a read-only mount must not change the crashed image').toEqual(before);
      expect(seen.length).toBe(kind.size);
      expect(guestMismatch(seen, want.base, want.later)).toBeNull();

      // Read-write mount and unmount: clean, same content.
      const rw = await mountImage(image, { format: kind.format });
      await rw.unmount();
      expect((await rw.exited).code).toBe(0);
      const c2 = qemuCheck(image, kind.format);
      expect([0, 3], c2.output).toContain(c2.code);
      expect(flaggedUnclean(image, kind.format)).toBe(false);
      const now = fs.readFileSync(convertToRaw(image, path.join(dir, 'now.raw')));
      expect(now.equals(seen), 'the repairing mount changed guest content').toBe(true);
      if (kind.snapshot) {
        qemuImg('convert', '-l', 'snapshot.name=s1', '-O', 'raw', image, path.join(dir, 's1-now.raw'));
        expect(fs.readFileSync(path.join(dir, 's1-now.raw')).equals(fs.readFileSync(path.join(dir, 's1.raw')))).toBe(true);
      }
      content = now;
    }
    expect(hashes(frozen)).toEqual(frozenHashes);
    console.log(`${kind.name}: ${log.join('; ')}`);
  }, 120_000);
});
