/** mount/tree.ts path rules and inode numbering; the service's alias ranges (mount/service.ts changed()). */
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { DiskService } from '../../mount/service.js';
import { MAX_NODES, MountTree, type FileSource } from '../../mount/tree.js';

const src = (size: number, readOnly = false): FileSource => ({
  virtualSize: size, readOnly,
  read: () => Promise.resolve(), write: () => Promise.resolve(), flush: () => Promise.resolve(),
  blockStatus: () => Promise.resolve([]), writeZeroes: () => Promise.resolve(), resize: () => Promise.resolve(),
  allocatedBytes: () => size,
});

describe('MountTree', () => {
  it('numbers the root 1, then nodes in order of first mention (parents before children)', () => {
    const t = MountTree.build([{ path: 'disk.raw', source: src(10) }, { path: 'a/b/c.raw', source: src(1) }, { path: 'a/d.raw', content: Buffer.from('x') }], { readOnly: false });
    expect(t.nodes.map((n) => [n.ino, n.path, n.kind, n.parent])).toEqual([
      [1, '/', 'dir', 1], [2, '/disk.raw', 'file', 1], [3, '/a', 'dir', 1], [4, '/a/b', 'dir', 3], [5, '/a/b/c.raw', 'file', 4], [6, '/a/d.raw', 'file', 3],
    ]);
    expect(t.byPath('/a/b/c.raw')?.ino).toBe(5);
    expect(t.byIno(6)?.path).toBe('/a/d.raw');
    expect(t.byIno(7)).toBeUndefined();
  });

  it('read-only: the mount, the source, or fixed content', () => {
    const t = MountTree.build([{ path: 'w', source: src(1) }, { path: 'r', source: src(1, true) }, { path: 'c', content: Buffer.alloc(1) }], { readOnly: false });
    expect(t.files().map((f) => f.readOnly)).toEqual([false, true, true]);
    expect(MountTree.build([{ path: 'w', source: src(1) }], { readOnly: true }).files()[0]!.readOnly).toBe(true);
  });

  it.each([
    ['/abs.raw', /empty, "." or ".."/],
    ['a//b', /empty/],
    ['a/../b', /"\.\."/],
    ['./x', /"\."/],
    ['a\0b', /NUL/],
    [`${'n'.repeat(256)}`, /longer than 255/],
  ])('refuses the path %j', (p, why) => {
    expect(() => MountTree.build([{ path: p, source: src(1) }], { readOnly: false })).toThrow(why);
  });

  it('refuses duplicates, a name that is both file and directory, and more than MAX_NODES nodes', () => {
    expect(() => MountTree.build([{ path: 'x', source: src(1) }, { path: 'x', source: src(1) }], { readOnly: false })).toThrow(/twice/);
    expect(() => MountTree.build([{ path: 'x', source: src(1) }, { path: 'x/y', source: src(1) }], { readOnly: false })).toThrow(/is a file/);
    expect(() => MountTree.build([{ path: 'x/y', source: src(1) }, { path: 'x', source: src(1) }], { readOnly: false })).toThrow(/twice/);
    const many = Array.from({ length: MAX_NODES }, (_, i) => ({ path: `f${i}`, content: Buffer.alloc(0) }));
    expect(() => MountTree.build(many, { readOnly: false })).toThrow(/more than 4096/);
  });
});

describe('DiskService aliases', () => {
  it('a change of one file reports the overlapping ranges of the files showing the same bytes', () => {
    const disk = src(1000);
    const other = src(50);
    const t = MountTree.build([
      { path: 'disk.raw', source: disk },
      { path: 'p1.raw', source: src(100), viewOf: { base: disk, offset: 100 } },
      { path: 'p2.raw', source: src(300), viewOf: { base: disk, offset: 500 } },
      { path: 'other.raw', source: other },
    ], { readOnly: false });
    const s = new DiskService(t, { readOnly: false, allowOther: false, log: pino({ level: 'silent' }) });
    void s.drain();
    const seen: Array<[string, number, number]> = [];
    s.invalidate = (f, off, len) => seen.push([f.path, off, len]);
    const [d, p1, p2, o] = t.files();
    expect([d, p1, p2].map((f) => s.hasAliases(f!))).toEqual([true, true, true]);
    expect(s.hasAliases(o!)).toBe(false);
    s.changed(d!, 150, 400); // disk [150, 550): p1 [50, 100), p2 [0, 50)
    expect(seen).toEqual([['/p1.raw', 50, 50], ['/p2.raw', 0, 50]]);
    seen.length = 0;
    s.changed(p2!, 10, 20); // disk [510, 530)
    expect(seen).toEqual([['/disk.raw', 510, 20]]);
    seen.length = 0;
    s.changed(o!, 0, 50);
    s.changed(p1!, 0, 0);
    expect(seen).toEqual([]);
  });
});
