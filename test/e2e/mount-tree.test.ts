/**
 * The multi-file mount tree (mount/tree.ts) on both backends, mounted in this
 * process through MountSession with a hand-built file list (the I/O runs in
 * child processes: this event loop serves the mount): nested directories,
 * a fixed-content file, a read-only source in a writable mount, a large
 * directory (readdir over several requests), per-file sizes and modes,
 * ENOENT/EISDIR/ENOTDIR/EROFS, every file's own bytes, and the entries'
 * close() hooks run at unmount.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import type { TreeEntry } from '../../mount/tree.js';
import { BACKENDS, detach, isMounted, makeMountDir } from '../helpers/mount.js';
import { patternBytes } from '../helpers/qemu.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;

/** A FileSource over memory (the BlockDriver range rules are the service's and the engine's business). */
function memSource(bytes: Buffer, readOnly: boolean) {
  return {
    virtualSize: bytes.length,
    readOnly,
    read: (buf: Buffer, off: number, len: number, pos: number) => Promise.resolve(void bytes.copy(buf, off, pos, pos + len)),
    write: (buf: Buffer, off: number, len: number, pos: number) => Promise.resolve(void buf.copy(bytes, pos, off, off + len)),
    flush: () => Promise.resolve(),
    blockStatus: () => Promise.resolve([]),
    writeZeroes: () => Promise.resolve(),
    resize: () => Promise.reject(Object.assign(new Error('fixed size'), { code: 'EPERM' })),
    allocatedBytes: () => bytes.length,
  };
}

/** Run a shell snippet in a child; stdout, stderr and the exit code (never throws). */
async function sh(script: string): Promise<{ code: number; out: string; err: string }> {
  try {
    const r = await execFileP('sh', ['-c', script], { maxBuffer: 64 * MiB, encoding: 'latin1' });
    return { code: 0, out: r.stdout, err: r.stderr };
  } catch (e) {
    const err = e as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof err.code === 'number' ? err.code : -1, out: err.stdout ?? '', err: err.stderr ?? '' };
  }
}

describe.each(BACKENDS)('%s backend', (backend) => {
  it('serves a tree of several files and directories, each by its own rules', async () => {
    const { MountSession } = await import('../../mount/session.js');
    const { configureLogging, logger } = await import('../../src/log.js');
    const { parseMountOptions } = await import('../../mount/options.js');
    configureLogging({ level: 'silent' });
    const disk = patternBytes(4 * MiB, 1);
    const snapA = patternBytes(3 * MiB + 777, 2);
    const snapB = patternBytes(65536, 3);
    const json = Buffer.from('{"damaged":[]}\n');
    let closes: string[] = [];
    const driver = { ...memSource(disk, false), format: 'raw', filename: 'mem', close: () => Promise.resolve(void closes.push('driver')), info: () => ({}) };
    const many = Array.from({ length: 300 }, (_, i) => `file-with-a-longish-name-${String(i).padStart(3, '0')}.raw`);
    const files: TreeEntry[] = [
      { path: 'disk.raw', source: driver },
      { path: 'snapshots/first.raw', source: memSource(snapA, true), close: () => Promise.resolve(void closes.push('first')) },
      { path: 'snapshots/second.raw', source: memSource(snapB, true), close: () => Promise.resolve(void closes.push('second')) },
      { path: 'damage.json', content: json },
      { path: 'deep/er/still.raw', content: Buffer.from('x') },
      ...many.map((n, i) => ({ path: `many/${n}`, content: Buffer.from(String(i)) })),
    ];
    const dir = fs.realpathSync(makeMountDir());
    const session = await MountSession.mount(driver as never, dir, { readOnly: false, mount: parseMountOptions([]), log: logger('mount'), backend, files });
    try {
      expect((await sh(`ls -a ${dir}`)).out.split('\n').filter(Boolean)).toEqual(['.', '..', 'damage.json', 'deep', 'disk.raw', 'many', 'snapshots']);
      expect((await sh(`ls ${dir}/snapshots`)).out.split('\n').filter(Boolean)).toEqual(['first.raw', 'second.raw']);
      const listed = (await sh(`ls -f ${dir}/many`)).out.split('\n').filter((n) => n && n !== '.' && n !== '..');
      expect(listed.sort()).toEqual([...many].sort()); // every entry once, over several readdir requests

      // sizes, modes (the read-only ones without write bits), link counts (the root: 2 + 3 subdirectories)
      const st = await sh(`cd ${dir} && stat -c '%n %s %a %h %F' . disk.raw damage.json snapshots snapshots/first.raw deep/er deep/er/still.raw`);
      expect(st.out.trim().split('\n')).toEqual([
        '. 4096 700 5 directory',
        `disk.raw ${disk.length} 600 1 regular file`,
        `damage.json ${json.length} 400 1 regular file`,
        'snapshots 4096 700 2 directory',
        `snapshots/first.raw ${snapA.length} 400 1 regular file`,
        'deep/er 4096 700 2 directory',
        'deep/er/still.raw 1 400 1 regular file',
      ]);
      const inodes = (await sh(`stat -c %i ${dir}/disk.raw ${dir}/snapshots/first.raw ${dir}/many/${many[299]}`)).out.trim().split('\n');
      expect(new Set(inodes).size).toBe(3);

      // each file's own bytes
      expect((await sh(`cat ${dir}/damage.json`)).out).toBe(json.toString());
      expect((await sh(`cat ${dir}/many/${many[123]}`)).out).toBe('123');
      expect(Buffer.from((await sh(`cat ${dir}/snapshots/first.raw`)).out, 'latin1').equals(snapA)).toBe(true);
      expect(Buffer.from((await sh(`dd if=${dir}/snapshots/second.raw bs=4096 skip=3 count=2 status=none`)).out, 'latin1').equals(snapB.subarray(12288, 20480))).toBe(true);

      // errors: a missing name, a directory read as a file, a file used as a directory, writing a read-only file
      expect((await sh(`cat ${dir}/nope`)).err).toMatch(/No such file/);
      expect((await sh(`cat ${dir}/snapshots/nope.raw`)).err).toMatch(/No such file/);
      expect((await sh(`cat ${dir}/snapshots`)).err).toMatch(/Is a directory/);
      expect((await sh(`ls ${dir}/disk.raw/x`)).err).toMatch(/Not a directory/);
      for (const f of ['damage.json', 'snapshots/first.raw', 'deep/er/still.raw']) {
        expect((await sh(`printf y | dd of=${dir}/${f} conv=notrunc status=none`)).err, f).toMatch(/Read-only file system/);
      }
      // disk.raw stays writable, and only it changes
      expect((await sh(`printf 'ZZZZ' | dd of=${dir}/disk.raw bs=1 seek=1000 conv=notrunc,fsync status=none`)).code).toBe(0);
      expect(disk.toString('latin1', 1000, 1004)).toBe('ZZZZ');
      expect(snapA.equals(patternBytes(3 * MiB + 777, 2))).toBe(true);
      // a size change of a read-only file is refused; disk.raw's goes to its source (whose resize refuses here)
      expect((await sh(`truncate -s 1M ${dir}/snapshots/first.raw`)).err).toMatch(/Read-only file system/);
      expect((await sh(`truncate -s 1M ${dir}/disk.raw`)).err).toMatch(/Operation not permitted/);

      closes = [];
      expect(await session.close('test done')).toBe(0);
      expect(closes).toEqual(['second', 'first', 'driver']);
      expect(isMounted(dir)).toBe(false);
    } finally {
      await session.close('cleanup');
      if (isMounted(dir)) detach(dir);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
