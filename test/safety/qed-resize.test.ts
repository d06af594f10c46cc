/**
 * QED resize under crashes and faults (resize is not an op of the shared
 * crash workloads, whose guest model has a fixed size, so it is judged here).
 *
 * Grow over a larger backing file: the new part must read zeros, never the
 * backing file's data, so zero entries are written and synced before the
 * header's image_size. Every recorded write of the resize is a crash point
 * (all, none and random subsets of the unflushed writes landed): qemu-img
 * check exits 0 or 3 (2 only behind the need-check bit), the size is the old
 * or the new one, the old part reads as before, and when the new size is
 * there the new part reads zeros; a read-write open + close then leaves the
 * image clean. Shrinking after a discard of the tail: old or new size, the
 * kept part intact. EIO/ENOSPC at every write point a resize reaches: the
 * resize fails with that errno, the driver keeps the old size, the image
 * stays consistent with the old content.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { errnoOf } from '../../src/errors.js';
import { openImage } from '../../src/formats/open.js';
import { instrumentation } from '../../src/io/instrument.js';
import type { IoPoint } from '../../src/io/points.js';
import {
  crashStates, fastScratch, flaggedUnclean, IoTracker, materialize, quietLog,
  type Recording,
} from '../helpers/crash.js';
import { convertToRaw, patternBytes, qemuCheck, qemuImg, qemuIo } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const OLD = 4 * MiB;
const GROWN = 12 * MiB + 512;
const cleanups: Array<() => void> = [];
afterAll(() => cleanups.forEach((c) => c()));
afterEach(() => instrumentation.clearFaults());

function build(dir: string): { image: string; base: string; initial: Buffer } {
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, patternBytes(8 * MiB, 5));
  const image = path.join(dir, 'img.qed');
  qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', image, String(OLD));
  qemuIo(image, 'qed', [`write -P 0x71 ${MiB} ${256 * KiB}`]);
  const initial = fs.readFileSync(convertToRaw(image, path.join(dir, 'initial.raw')));
  return { image, base, initial };
}

function virtualSize(image: string): number {
  return (JSON.parse(qemuImg('info', '--output=json', '-U', image)) as { 'virtual-size': number })['virtual-size'];
}

/** Record a read-write open, `work`, close of `image`. */
async function record(image: string, work: (d: Awaited<ReturnType<typeof openImage>>) => Promise<void>): Promise<Recording> {
  const pristine = new Map([[image, fs.readFileSync(image)]]);
  const tracker = new IoTracker(new Set([image]));
  tracker.start();
  try {
    const d = await openImage(image, { readOnly: false, format: 'qed', log: quietLog });
    try {
      await work(d);
    } finally {
      await d.close();
    }
  } finally {
    tracker.stop();
  }
  return { pristine, ios: tracker.ios } as unknown as Recording;
}

/** Problems of the state now in `image`: sizes allowed, content per size. */
async function judge(image: string, dir: string, sizes: number[], content: (size: number, raw: Buffer) => string | null): Promise<string[]> {
  const problems: string[] = [];
  const flagged = flaggedUnclean(image, 'qed');
  const c = qemuCheck(image, 'qed');
  if (![0, 3, ...(flagged ? [2] : [])].includes(c.code)) problems.push(`qemu-img check exit ${c.code}: ${c.output.split('\n').slice(0, 3).join(' | ')}`);
  const size = virtualSize(image);
  if (!sizes.includes(size)) problems.push(`size ${size}, expected one of ${sizes.join(', ')}`);
  const raw = fs.readFileSync(convertToRaw(image, path.join(dir, 'state.raw'), ['-U']));
  const bad = content(size, raw);
  if (bad) problems.push(bad);
  const d = await openImage(image, { readOnly: false, format: 'qed', log: quietLog });
  await d.close();
  const c2 = qemuCheck(image, 'qed');
  if (c2.code !== 0 && c2.code !== 3) problems.push(`after a read-write open: qemu-img check exit ${c2.code}`);
  if (flaggedUnclean(image, 'qed')) problems.push('need-check bit left set');
  return problems;
}

const grownContent = (initial: Buffer) => (size: number, raw: Buffer): string | null => {
  if (!raw.subarray(0, OLD).equals(initial)) return 'the old part changed';
  if (size === GROWN && !raw.subarray(OLD).every((b) => b === 0)) return `the grown part shows non-zero bytes (backing data?) at ${OLD + raw.subarray(OLD).findIndex((b) => b !== 0)}`;
  return null;
};

describe('QED resize: every write a crash point', () => {
  it('grow over a larger backing file', async () => {
    const { dir, cleanup } = fastScratch('qed-resize-grow');
    cleanups.push(cleanup);
    const { image, initial } = build(dir);
    const rec = await record(image, (d) => d.resize(GROWN));
    const points = new Set(rec.ios.map((r) => r.point));
    expect([...points]).toEqual(expect.arrayContaining(['header_update', 'qed_l2_update', 'header_resize', 'flush']));
    expect(virtualSize(image)).toBe(GROWN);
    const failures: string[] = [];
    const states = crashStates(rec, { full: true, sample: 0, subsets: 3, seed: 7 });
    for (const st of states) {
      materialize(rec, st);
      const problems = await judge(image, dir, [OLD, GROWN], grownContent(initial));
      if (problems.length) failures.push(`${st.label}: ${problems.join('; ')}`);
    }
    console.log(`qed grow: ${rec.ios.length} I/Os recorded, ${states.length} crash states checked`);
    expect(failures.slice(0, 5), `${failures.length} of ${states.length} states failed`).toEqual([]);
  });

  it('shrink after discarding the tail', async () => {
    const { dir, cleanup } = fastScratch('qed-resize-shrink');
    cleanups.push(cleanup);
    const { image, initial } = build(dir);
    const d0 = await openImage(image, { readOnly: false, format: 'qed', log: quietLog });
    await d0.writeZeroes(MiB, OLD - MiB, { unmap: true });
    await d0.close();
    const rec = await record(image, (d) => d.resize(MiB));
    const failures: string[] = [];
    const states = crashStates(rec, { full: true, sample: 0, subsets: 3, seed: 9 });
    for (const st of states) {
      materialize(rec, st);
      const problems = await judge(image, dir, [MiB, OLD], (size, raw) => {
        if (!raw.subarray(0, MiB).equals(initial.subarray(0, MiB))) return 'the kept part changed';
        if (size === OLD && !raw.subarray(MiB).every((b) => b === 0)) return 'the discarded tail is not zeros';
        return null;
      });
      if (problems.length) failures.push(`${st.label}: ${problems.join('; ')}`);
    }
    expect(states.length).toBeGreaterThan(1);
    expect(failures.slice(0, 5), `${failures.length} of ${states.length} states failed`).toEqual([]);
  });
});

describe('QED resize: EIO and ENOSPC at every write point it reaches', () => {
  it('grow over a larger backing file', async () => {
    const { dir, cleanup } = fastScratch('qed-resize-faults');
    cleanups.push(cleanup);
    const { image, initial } = build(dir);
    const pristine = fs.readFileSync(image);
    const seen: IoPoint[] = [];
    const rec = await record(image, async (d) => {
      instrumentation.record((ev) => seen.push(ev.point));
      await d.resize(GROWN);
      instrumentation.record(null);
    });
    void rec;
    const failures: string[] = [];
    let runs = 0;
    for (const point of [...new Set(seen)]) {
      for (const errno of ['EIO', 'ENOSPC'] as const) {
        fs.writeFileSync(image, pristine);
        const d = await openImage(image, { readOnly: false, format: 'qed', log: quietLog });
        instrumentation.setFaults([{ point, errno, times: 1 }]);
        const got = await d.resize(GROWN).then(() => null, (e: unknown) => errnoOf(e));
        instrumentation.clearFaults();
        runs++;
        const problems: string[] = [];
        if (got !== errno) problems.push(`resize answered ${got ?? 'success'}`);
        if (d.virtualSize !== OLD) problems.push(`the driver's size is ${d.virtualSize} after the failure`);
        const back = Buffer.alloc(OLD);
        await d.read(back, 0, OLD, 0);
        if (!back.equals(initial)) problems.push('reads changed after the failure');
        await d.close();
        problems.push(...(await judge(image, dir, [OLD], grownContent(initial))));
        if (problems.length) failures.push(`${errno} at ${point}: ${problems.join('; ')}`);
      }
    }
    console.log(`qed grow faults: ${runs} runs over ${[...new Set(seen)].join(', ')}`);
    expect(failures).toEqual([]);
  });
});
