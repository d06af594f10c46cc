/**
 * SliceDriver (src/formats/slice.ts): the BlockDriver range rules against
 * the slice's own bounds, offsets relative to its start, nothing reaching
 * the parent outside [start, start + length), close leaving the parent open.
 */
import fs from 'node:fs';
import path from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmountError } from '../../src/errors.js';
import type { BlockDriver } from '../../src/formats/driver.js';
import { openImage } from '../../src/formats/open.js';
import { SliceDriver } from '../../src/formats/slice.js';
import { patternBytes, scratchDir } from '../helpers/qemu.js';

const SIZE = 1024 * 1024;
const START = 64 * 1024;
const LEN = 128 * 1024;
const log = pino({ level: 'silent' });
let scratch: { dir: string; cleanup: () => void };
let image: string;
beforeAll(() => {
  scratch = scratchDir('slice');
  image = path.join(scratch.dir, 'disk.raw');
  fs.writeFileSync(image, patternBytes(SIZE, 3));
});
afterAll(() => scratch.cleanup());

async function errno(p: Promise<unknown>): Promise<string | null> {
  try {
    await p;
    return null;
  } catch (err) {
    return err instanceof QmountError ? err.errno : String(err);
  }
}

describe('SliceDriver', () => {
  let parent: BlockDriver;
  beforeAll(async () => {
    parent = await openImage(image, { readOnly: false, format: 'raw', log });
  });
  afterAll(async () => parent.close());

  it('refuses bounds outside the parent', () => {
    expect(() => new SliceDriver(parent, SIZE - 512, 1024, 'p1')).toThrow(/does not lie inside/);
    expect(() => new SliceDriver(parent, -1, 512, 'p1')).toThrow(/does not lie inside/);
  });

  it('reads and writes at offsets relative to its start; the range rules use its own size', async () => {
    const s = new SliceDriver(parent, START, LEN, 'p1');
    expect(s.virtualSize).toBe(LEN);
    const orig = fs.readFileSync(image);
    const got = Buffer.alloc(4096);
    await s.read(got, 0, 4096, 1000);
    expect(got.equals(orig.subarray(START + 1000, START + 5096))).toBe(true);

    const data = Buffer.alloc(512, 0xab);
    await s.write(data, 0, 512, LEN - 512); // the last sector of the slice
    expect(await errno(s.write(data, 0, 512, LEN - 256)), 'write crossing the end').toBe('ENOSPC');
    expect(await errno(s.write(data, 0, 512, LEN)), 'write at the end').toBe('ENOSPC');
    expect(await errno(s.read(got, 0, 512, LEN - 256)), 'read crossing the end').toBe('EINVAL');
    expect(await errno(s.read(got, 0, 512, -512)), 'negative offset').toBe('EINVAL');
    expect(await errno(s.resize(2 * LEN))).toBe('EPERM');
    await s.flush();
    const after = fs.readFileSync(image);
    expect(after.subarray(START + LEN - 512, START + LEN).every((b) => b === 0xab)).toBe(true);
    // only that sector changed: nothing of the refused writes reached the parent
    expect(after.subarray(0, START + LEN - 512).equals(orig.subarray(0, START + LEN - 512))).toBe(true);
    expect(after.subarray(START + LEN).equals(orig.subarray(START + LEN))).toBe(true);
  });

  it('is read-only when its parent is; close makes it EBADF and leaves the parent open', async () => {
    const ro = await openImage(image, { readOnly: true, format: 'raw', forceShare: true, log });
    try {
      const s = new SliceDriver(ro, START, LEN, 'p2');
      expect(s.readOnly).toBe(true);
      expect(await errno(s.write(Buffer.alloc(512), 0, 512, 0))).toBe('EROFS');
      await s.close();
      expect(await errno(s.read(Buffer.alloc(512), 0, 512, 0))).toBe('EBADF');
      expect(await errno(ro.read(Buffer.alloc(512), 0, 512, 0))).toBeNull();
    } finally {
      await ro.close();
    }
  });
});
