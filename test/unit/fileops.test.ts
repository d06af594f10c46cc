/**
 * native/fileops through ImageFile: punchHole, zeroRange, seekData/seekHole
 * on a real file (the test directory's file system: ext4 or tmpfs, both
 * punch holes and track them), and their instrumentation (fault injection,
 * the crash recorder's 'punch' events).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ImageFile } from '../../src/io/file.js';
import { fallocateSync, fileOpsAvailable, seek } from '../../src/io/fileops.js';
import { instrumentation, type IoEvent } from '../../src/io/instrument.js';

const MiB = 1024 * 1024;
let dir: string;
let file: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-fileops-'));
  file = path.join(dir, 'f');
  fs.writeFileSync(file, Buffer.alloc(4 * MiB, 0xab));
});
afterEach(() => {
  instrumentation.clearFaults();
  instrumentation.record(null);
  fs.rmSync(dir, { recursive: true, force: true });
});

const blocks = (): number => fs.statSync(file).blocks * 512;

describe('native/fileops', () => {
  it('is built (setup builds it; without it qmount only cannot punch)', () => {
    expect(fileOpsAvailable()).toBe(true);
  });

  it('punchHole deallocates, reads zeros, keeps the size; seekData/seekHole find the hole', async () => {
    const f = await ImageFile.open(file, { readOnly: false });
    try {
      const before = blocks();
      expect(await f.punchHole('punch_hole', MiB, 2 * MiB)).toBe(true);
      expect(fs.statSync(file).size).toBe(4 * MiB);
      expect(before - blocks()).toBeGreaterThanOrEqual(2 * MiB);
      expect(await f.allocatedBytes()).toBe(blocks());
      const back = Buffer.alloc(4 * MiB);
      await f.read(back, 0, back.length, 0);
      expect(back.subarray(0, MiB).every((b) => b === 0xab)).toBe(true);
      expect(back.subarray(MiB, 3 * MiB).every((b) => b === 0)).toBe(true);
      expect(back.subarray(3 * MiB).every((b) => b === 0xab)).toBe(true);
      expect(await f.seekHole(0)).toBe(MiB);
      expect(await f.seekData(MiB)).toBe(3 * MiB);
      expect(await f.seekData(0)).toBe(0);
      expect(await f.seekHole(3 * MiB)).toBe(4 * MiB); // the end of the file is a hole
      expect(await f.seekData(4 * MiB)).toBeNull(); // ENXIO at the end
      expect(await f.seekHole(4 * MiB)).toBeNull();
      // Past the end: punches nothing, the size stays.
      expect(await f.punchHole('punch_hole', 4 * MiB, MiB)).toBe(true);
      expect(fs.statSync(file).size).toBe(4 * MiB);
      expect(await f.punchHole('punch_hole', 0, 0)).toBe(true);
    } finally {
      await f.close();
    }
  });

  it('zeroRange reads zeros and keeps the size', async () => {
    const f = await ImageFile.open(file, { readOnly: false });
    try {
      expect(await f.zeroRange('data_write', 4096, MiB)).toBe(true);
      const back = Buffer.alloc(MiB + 8192);
      await f.read(back, 0, back.length, 0);
      expect(back.subarray(0, 4096).every((b) => b === 0xab)).toBe(true);
      expect(back.subarray(4096, 4096 + MiB).every((b) => b === 0)).toBe(true);
      expect(back.subarray(4096 + MiB).every((b) => b === 0xab)).toBe(true);
      expect(fs.statSync(file).size).toBe(4 * MiB);
    } finally {
      await f.close();
    }
  });

  it('refuses on a read-only file (EROFS), a bad range (EINVAL) and after close (EBADF)', async () => {
    const ro = await ImageFile.open(file, { readOnly: true });
    await expect(ro.punchHole('punch_hole', 0, 4096)).rejects.toMatchObject({ errno: 'EROFS' });
    await expect(ro.zeroRange('data_write', 0, 4096)).rejects.toMatchObject({ errno: 'EROFS' });
    expect(await ro.seekData(0)).toBe(0); // seeking is reading
    await ro.close();
    const f = await ImageFile.open(file, { readOnly: false });
    await expect(f.punchHole('punch_hole', -1, 4096)).rejects.toMatchObject({ errno: 'EINVAL' });
    await expect(f.seekData(-1)).rejects.toMatchObject({ errno: 'EINVAL' });
    await f.close();
    await expect(f.punchHole('punch_hole', 0, 4096)).rejects.toMatchObject({ errno: 'EBADF' });
    await expect(f.seekHole(0)).rejects.toMatchObject({ errno: 'EBADF' });
    expect(blocks()).toBeGreaterThanOrEqual(4 * MiB);
  });

  it('is instrumented: faults are injected at its point, the recorder sees kind punch', async () => {
    const f = await ImageFile.open(file, { readOnly: false });
    try {
      instrumentation.setFaults([{ point: 'punch_hole', errno: 'EIO', times: 1 }]);
      await expect(f.punchHole('punch_hole', 0, MiB)).rejects.toMatchObject({ errno: 'EIO' });
      expect(instrumentation.injected.map((x) => x.kind)).toEqual(['punch']);
      expect(blocks()).toBeGreaterThanOrEqual(4 * MiB); // nothing punched
      instrumentation.clearFaults();
      const events: IoEvent[] = [];
      instrumentation.record((ev) => events.push(ev));
      await f.punchHole('punch_hole', 0, MiB);
      await f.zeroRange('data_write', MiB, 4096);
      instrumentation.record(null);
      expect(events.map((e) => [e.kind, e.point, e.offset, e.length])).toEqual([
        ['punch', 'punch_hole', 0, MiB],
        ['write', 'data_write', MiB, 4096],
      ]);
    } finally {
      await f.close();
    }
  });

  it('names errors by errno (EBADF on a closed descriptor)', () => {
    const fd = fs.openSync(file, 'r+');
    fs.closeSync(fd);
    expect(() => fallocateSync(fd, 'punch', 0, 4096)).toThrow(expect.objectContaining({ code: 'EBADF' }) as Error);
    expect(() => seek(fd, 0, 'data')).toThrow(expect.objectContaining({ code: 'EBADF' }) as Error);
  });
});
