/**
 * Internal qcow2 snapshots: `-l NAME|ID` (ID first, then name; read-only)
 * and DIR/snapshots/*.raw, each equal to `qemu-img convert -l
 * snapshot.id=ID -O raw` (so at the snapshot's own recorded size); names:
 * NAME.raw for unique printable names, id-ID.raw for duplicates and names
 * with '/' or control characters. A missing snapshot is a one-line error
 * listing those that exist.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, makeMountDir, mountImage } from '../helpers/mount.js';
import { convertToRaw, qemuImg, qemuIo, scratchDir, sha256File } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
let scratch: { dir: string; cleanup: () => void };
let image: string;
/** snapshot ID -> the raw content qemu-img gives for it */
const refs = new Map<string, string>();

beforeAll(() => {
  scratch = scratchDir('snapshots');
  image = path.join(scratch.dir, 'snaps.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', image, String(8 * MiB));
  qemuIo(image, 'qcow2', ['write -P 1 0 1M', 'write -P 0x11 7M 512k']);
  qemuImg('snapshot', '-c', 'small', image); // 1, 8 MiB
  qemuImg('resize', '-q', image, String(12 * MiB));
  qemuIo(image, 'qcow2', ['write -P 2 9M 1M']);
  qemuImg('snapshot', '-c', 'dup', image); // 2
  qemuIo(image, 'qcow2', ['write -P 3 0 64k']);
  qemuImg('snapshot', '-c', 'dup', image); // 3
  qemuImg('snapshot', '-c', 'tab\there', image); // 4
  qemuIo(image, 'qcow2', ['write -P 4 64k 64k']);
  qemuImg('snapshot', '-c', 'a/b', image); // 5
  qemuImg('snapshot', '-c', '1', image); // 6: a name that is another snapshot's ID
  qemuIo(image, 'qcow2', ['write -P 5 2M 1M']); // the active image differs from every snapshot
  for (const id of ['1', '2', '3', '4', '5', '6']) {
    refs.set(id, convertToRaw(image, path.join(scratch.dir, `ref-${id}.raw`), ['-l', `snapshot.id=${id}`]));
  }
});
afterAll(() => scratch.cleanup());

/** Each snapshot's recorded size (disk_size): snapshot 1 was taken before the resize to 12 MiB. */
const SIZES: Record<string, number> = { '1': 8 * MiB, '2': 12 * MiB, '3': 12 * MiB, '4': 12 * MiB, '5': 12 * MiB, '6': 12 * MiB };

/**
 * `got` is snapshot `id` at its recorded size. qemu-img convert -l gives
 * the snapshot at the image's current size (the part past the snapshot's
 * own size as zeros): equal up to that size, and zeros after it.
 */
function expectSnapshot(got: Buffer, id: string, what: string): void {
  const ref = fs.readFileSync(refs.get(id)!);
  expect(got.length, what).toBe(SIZES[id]);
  expect(got.equals(ref.subarray(0, got.length)), what).toBe(true);
  expect(ref.subarray(got.length).every((b) => b === 0), what).toBe(true);
}

function qmount(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('-l / --load-snapshot', () => {
  const CASES = [
    { arg: 'small', id: '1', why: 'by name, at its recorded 8 MiB' },
    { arg: '3', id: '3', why: 'by ID' },
    { arg: '1', id: '1', why: 'an ID wins over a name (snapshot 6 is named "1")' },
    { arg: 'a/b', id: '5', why: 'a name with a slash' },
  ];
  for (const c of CASES) {
    it(`-l ${c.arg}: ${c.why}`, async () => {
      const before = sha256File(image);
      const m = await mountImage(image, { extraArgs: ['-l', c.arg] });
      try {
        expect(fs.statSync(m.rawPath).size).toBe(SIZES[c.id]);
        expectSnapshot(fs.readFileSync(m.rawPath), c.id, m.rawPath);
        expect(() => fs.openSync(m.rawPath, 'r+')).toThrow(/EROFS|EACCES/);
      } finally {
        await m.unmount();
      }
      expect(sha256File(image)).toBe(before);
    });
  }

  it('a snapshot that does not exist: one line naming the snapshots, exit 2', () => {
    const dir = makeMountDir();
    try {
      const r = qmount(['-f', '-l', 'nope', image, dir]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/^qmount: [^\n]*no snapshot with ID or name "nope"; its snapshots \(ID name\): 1 small, 2 dup, 3 dup, 4 tab\\x09here, 5 a\/b, 6 1\n$/);
    } finally {
      fs.rmdirSync(dir);
    }
  });

  it('-l on an image without snapshots says so', () => {
    const plain = path.join(scratch.dir, 'plain.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', plain, String(MiB));
    const dir = makeMountDir();
    try {
      const r = qmount(['-f', '-l', 'x', plain, dir]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/it has no internal snapshots\n$/);
    } finally {
      fs.rmdirSync(dir);
    }
  });
});

describe('DIR/snapshots/*.raw', () => {
  const FILES: Record<string, string> = { 'small.raw': '1', 'id-2.raw': '2', 'id-3.raw': '3', 'id-4.raw': '4', 'id-5.raw': '5', '1.raw': '6' };

  for (const readOnly of [true, false]) {
    it(`every snapshot as a file equal to qemu-img convert -l (${readOnly ? 'read-only' : 'writable'} mount)`, async () => {
      const work = path.join(scratch.dir, `work-${readOnly}.qcow2`);
      fs.copyFileSync(image, work);
      const m = await mountImage(work, { readOnly });
      try {
        expect(fs.readdirSync(m.dir).sort()).toEqual(['disk.raw', 'snapshots']);
        expect(fs.readdirSync(path.join(m.dir, 'snapshots')).sort()).toEqual(Object.keys(FILES).sort());
        if (!readOnly) {
          // Writing the active disk leaves every snapshot as it was.
          const fd = fs.openSync(m.rawPath, 'r+');
          fs.writeSync(fd, Buffer.alloc(2 * MiB, 0xee), 0, 2 * MiB, 0);
          fs.fsyncSync(fd);
          fs.closeSync(fd);
        }
        for (const [file, id] of Object.entries(FILES)) {
          const p = path.join(m.dir, 'snapshots', file);
          expect(fs.statSync(p).size).toBe(SIZES[id]);
          expectSnapshot(fs.readFileSync(p), id, file);
          expect(() => fs.openSync(p, 'r+')).toThrow(/EROFS|EACCES/);
        }
      } finally {
        await m.unmount();
      }
      if (!readOnly) expect(spawnSync('qemu-img', ['check', work]).status).toBe(0);
    });
  }

  it('an image without internal snapshots has no snapshots/ directory', async () => {
    const plain = path.join(scratch.dir, 'plain2.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', plain, String(MiB));
    const m = await mountImage(plain, { readOnly: true });
    try {
      expect(fs.readdirSync(m.dir)).toEqual(['disk.raw']);
    } finally {
      await m.unmount();
    }
  });
});
