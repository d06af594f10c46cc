/**
 * mount/mountinfo.ts: the one parser of /proc/self/mountinfo (used by the
 * mount session, the scripts through dist/, and the test helpers).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { findMount, parseMountInfo, readMounts, readMountsSync } from '../../mount/mountinfo.js';

// Lines as the kernel writes them (show_mountinfo): space, tab, newline and
// backslash in paths become \040, \011, \012 and \134.
const SAMPLE = [
  '22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw',
  '25 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4k',
  '101 22 0:50 / /tmp/with\\040space rw,nosuid,nodev,relatime shared:40 master:3 - fuse.qmount qmount rw,user_id=0,group_id=0',
  '102 22 0:51 / /tmp/tab\\011and\\012newline rw,relatime - fuse.qmount qmount rw',
  '103 22 0:52 / /tmp/back\\134slash rw,relatime - tmpfs my\\040src rw',
  // A literal "\040" in a name: the backslash is escaped, the digits are not an escape.
  '104 22 0:53 / /tmp/lit\\134040eral rw,relatime - tmpfs none rw',
  // No optional fields at all.
  '105 22 0:54 /sub /tmp/bind rw - ext4 /dev/sda1 rw',
  // A directory called "-" (the separator is the first "-" after the options).
  '106 22 0:55 / /tmp/- rw shared:7 - tmpfs - rw',
  '',
].join('\n');

describe('parseMountInfo', () => {
  const entries = parseMountInfo(SAMPLE);

  it('reads the mount point, file system type and source of every line', () => {
    expect(entries.map((e) => e.mountPoint)).toEqual([
      '/',
      '/dev',
      '/tmp/with space',
      '/tmp/tab\tand\nnewline',
      '/tmp/back\\slash',
      '/tmp/lit\\040eral',
      '/tmp/bind',
      '/tmp/-',
    ]);
    expect(entries[0]).toMatchObject({ mountPoint: '/', fsType: 'ext4', source: '/dev/sda1' });
    expect(entries[0]!.device).toMatch(/^\d+:\d+$/);
    expect(entries[2]).toMatchObject({ mountPoint: '/tmp/with space', fsType: 'fuse.qmount', source: 'qmount' });
    expect(entries[4]!.source).toBe('my src');
    expect(entries[6]).toMatchObject({ mountPoint: '/tmp/bind', fsType: 'ext4', source: '/dev/sda1' });
    expect(entries[7]).toMatchObject({ mountPoint: '/tmp/-', fsType: 'tmpfs', source: '-' });
  });

  it('reads the mount id (which /proc/PID/fdinfo names) and the per-mount options', () => {
    expect(entries.map((e) => e.id)).toEqual([22, 25, 101, 102, 103, 104, 105, 106]);
    expect(entries[2]!.options).toBe('rw,nosuid,nodev,relatime');
    expect(entries[6]!.options).toBe('rw');
  });

  it('skips blank and malformed lines', () => {
    expect(parseMountInfo('')).toEqual([]);
    expect(parseMountInfo('\n\n')).toEqual([]);
    expect(parseMountInfo('1 2 3\nnot a mountinfo line at all\n')).toEqual([]);
  });

  it('findMount matches the unescaped path exactly, the topmost of stacked mounts', () => {
    expect(findMount(entries, '/tmp/with space')?.fsType).toBe('fuse.qmount');
    expect(findMount(entries, '/tmp/with\\040space')).toBeUndefined();
    expect(findMount(entries, '/tmp/with')).toBeUndefined();
    const stacked = parseMountInfo(`${SAMPLE}200 101 0:60 / /tmp/with\\040space rw - tmpfs top rw\n`);
    expect(findMount(stacked, '/tmp/with space')).toMatchObject({ mountPoint: '/tmp/with space', fsType: 'tmpfs', source: 'top' });
  });
});

describe('reading /proc/self/mountinfo', () => {
  it('sees the root and /proc, the same synchronously and not', async () => {
    const sync = readMountsSync();
    expect(findMount(sync, '/')).toBeDefined();
    expect(findMount(sync, '/proc')?.fsType).toBe('proc');
    expect(await readMounts()).toEqual(readMountsSync());
  });

  it.runIf(process.getuid?.() === 0)('sees a real mount on a path with a space, a tab and a backslash', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-mountinfo-'));
    const target = path.join(dir, 'a b\tc\\d');
    fs.mkdirSync(target);
    const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'mountinfo test', target], { encoding: 'utf8' });
    try {
      expect(r.status, r.stderr).toBe(0);
      expect(findMount(readMountsSync(), target)).toMatchObject({ mountPoint: target, fsType: 'tmpfs', source: 'mountinfo test' });
    } finally {
      if (r.status === 0) spawnSync('umount', [target]);
      fs.rmSync(dir, { recursive: true, force: true });
    }
    expect(findMount(readMountsSync(), target)).toBeUndefined();
  });
});
