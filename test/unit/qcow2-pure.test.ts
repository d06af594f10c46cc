/**
 * The pure qcow2 code on in-memory data: the spec module's codecs and
 * cluster-type classifier, compressed extents, write planning (plan.ts) and
 * the overlap index (overlap.ts). The end-to-end suites reach all of it too;
 * these pin the rules down one by one.
 */
import { describe, expect, it } from 'vitest';
import type { L2Entry } from '../../src/formats/qcow2/map.js';
import { OverlapIndex } from '../../src/formats/qcow2/overlap.js';
import { badOldMapping, directHost, planCluster } from '../../src/formats/qcow2/plan.js';
import {
  badClusterOffset,
  clusterType,
  ClusterType,
  compressedClusters,
  compressedExtent,
  decodeCompressed,
  entryOffset,
  geometryOf,
  HDR,
  incompatibleField,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  L2E_COMPRESSED,
  L2E_COPIED,
  L2E_ZERO,
  refcountTableFields,
  writeEntry,
} from '../../src/formats/qcow2/spec.js';
import { zeroEntry } from '../../src/formats/qcow2/zero.js';
import { INVALID_OFFSET } from '../../src/formats/u64.js';

const KiB = 1024;
const std = geometryOf({ clusterBits: 16, incompatible: 0n, refcountOrder: 4, version: 3 });
const v2 = geometryOf({ clusterBits: 16, incompatible: 0n, refcountOrder: 4, version: 2 });
const ext = geometryOf({ clusterBits: 16, incompatible: BigInt(INCOMPAT_EXTL2), refcountOrder: 4, version: 3 });
const dataFile = geometryOf({ clusterBits: 16, incompatible: BigInt(INCOMPAT_DATA_FILE), refcountOrder: 4, version: 3 });

function entry(hiFlags: number, host: number, loFlags = 0, alloc = 0, zero = 0): L2Entry {
  const b = Buffer.alloc(8);
  writeEntry(b, 0, hiFlags, host, loFlags);
  return { hi: b.readUInt32BE(0), lo: b.readUInt32BE(4), alloc, zero };
}

describe('qcow2 spec: entries', () => {
  it('geometry follows the header', () => {
    expect(std).toMatchObject({ clusterSize: 65536, l2EntryBytes: 8, l2Entries: 8192, l2Span: 512 * 1024 * KiB, subclusterSize: 65536, csizeShift: 54 });
    expect(ext).toMatchObject({ l2EntryBytes: 16, l2Entries: 4096, subclusterSize: 2048, extL2: true });
    expect(geometryOf({ clusterBits: 9, incompatible: 0n, refcountOrder: 6, version: 3 })).toMatchObject({ refblockEntries: 64, csizeShift: 61 });
  });

  it('offsets round-trip through writeEntry/entryOffset below 2^52 and decode as INVALID_OFFSET above', () => {
    for (const off of [0, 512, 65536, 2 ** 32 + 65536, 2 ** 52 - 65536]) {
      const e = entry(L2E_COPIED, off);
      expect(entryOffset(e.hi, e.lo)).toBe(off);
      expect((e.hi & L2E_COPIED) >>> 0).toBe(L2E_COPIED);
    }
    expect(entryOffset(0x00100000, 0)).toBe(INVALID_OFFSET); // 2^52
    expect(entryOffset(0x80800000, 0)).toBe(INVALID_OFFSET); // COPIED | 2^55 (issue 10)
    expect(entryOffset(0xff000000, 0x1ff)).toBe(0); // flags and reserved bits are not offset bits
    expect(badClusterOffset(std, INVALID_OFFSET)).toMatch(/2\^52/);
    expect(badClusterOffset(std, 65536 + 512)).toMatch(/not aligned/);
    expect(badClusterOffset(std, 3 * 65536)).toBeNull();
  });

  it('classifies every cluster type as QEMU does, including offset 0 in a data file', () => {
    const t = (g: typeof std, e: L2Entry): ClusterType => clusterType(g, e.hi, e.lo);
    expect(t(std, entry(0, 0))).toBe(ClusterType.Unallocated);
    expect(t(std, entry(L2E_COPIED, 65536))).toBe(ClusterType.Normal);
    expect(t(std, entry(0, 65536))).toBe(ClusterType.Normal); // shared with a snapshot
    expect(t(std, entry(0, 0, L2E_ZERO))).toBe(ClusterType.ZeroPlain);
    expect(t(std, entry(L2E_COPIED, 65536, L2E_ZERO))).toBe(ClusterType.ZeroAlloc);
    expect(t(v2, entry(0, 0, L2E_ZERO))).toBe(ClusterType.Unallocated); // no zero flag in version 2
    expect(t(ext, entry(0, 0, L2E_ZERO))).toBe(ClusterType.Unallocated); // extended L2: bitmaps say zero
    expect(t(std, entry(L2E_COMPRESSED, 70000))).toBe(ClusterType.Compressed);
    expect(t(dataFile, entry(L2E_COPIED, 0))).toBe(ClusterType.Normal); // guest cluster 0 at data-file offset 0
    expect(t(dataFile, entry(0, 0))).toBe(ClusterType.Unallocated);
  });

  it('decodes compressed descriptors into the sectors they reference', () => {
    // offset 0x12345, 3 additional sectors (4 in all) with 64 KiB clusters
    const hi = L2E_COMPRESSED | (3 << (54 - 32));
    const d = decodeCompressed(std, hi, 0x12345);
    expect(d).toEqual({ hostOffset: 0x12345, length: 4 * 512 - (0x12345 % 512) });
    expect(compressedExtent(d)).toEqual({ start: 0x12345 - (0x12345 % 512), bytes: 4 * 512 });
    expect(compressedClusters(std, d)).toEqual([65536, 65536]);
    const across = decodeCompressed(std, L2E_COMPRESSED | (1 << (54 - 32)), 2 * 65536 - 200);
    expect(compressedClusters(std, across)).toEqual([65536, 2 * 65536]);
    expect(decodeCompressed(std, L2E_COMPRESSED | 0x00200000, 0).hostOffset).toBe(INVALID_OFFSET); // bit 53
  });

  it('encodes the header writes an open image makes', () => {
    const [at, b] = incompatibleField(3n);
    expect(at).toBe(HDR.incompatible);
    expect(b.readBigUInt64BE(0)).toBe(3n);
    const [rt, f] = refcountTableFields(0x30000, 2);
    expect(rt).toBe(HDR.refcountTableOffset);
    expect(rt + 8).toBe(HDR.refcountTableClusters);
    expect(f.readBigUInt64BE(0)).toBe(0x30000n);
    expect(f.readUInt32BE(8)).toBe(2);
  });
});

describe('qcow2 write planning', () => {
  const cs = 65536;
  it('writes in place only into an owned, normal cluster (with extended L2: every touched subcluster allocated)', () => {
    expect(directHost(std, 0, 0, 4096, entry(L2E_COPIED, 5 * cs))).toBe(5 * cs);
    expect(directHost(std, 0, 0, 4096, entry(0, 5 * cs))).toBe(-1); // shared
    expect(directHost(std, 0, 0, 4096, entry(L2E_COPIED, 5 * cs, L2E_ZERO))).toBe(-1); // zero flag
    expect(directHost(std, 0, 0, 4096, entry(L2E_COMPRESSED, 5 * cs))).toBe(-1);
    expect(directHost(std, 0, 0, 4096, entry(L2E_COPIED | 0x00800000, 0))).toBe(-1); // 2^55: never used
    expect(directHost(std, 0, 0, 4096, entry(L2E_COPIED, 5 * cs + 512))).toBe(-1); // unaligned
    expect(directHost(ext, 0, 0, 4096, entry(L2E_COPIED, 5 * cs, 0, 0b11))).toBe(5 * cs); // subclusters 0, 1
    expect(directHost(ext, 0, 0, 4096 + 1, entry(L2E_COPIED, 5 * cs, 0, 0b11))).toBe(-1); // touches subcluster 2
    expect(directHost(dataFile, 7, 0, 4096, entry(L2E_COPIED, 0))).toBe(7 * cs); // data file: host = guest
  });

  it('rewrites: a new cluster for unallocated, shared and compressed ones; in place for owned zero clusters', () => {
    const fresh = planCluster(std, 3, 1000, 5000, 0, entry(0, 0));
    expect(fresh).toMatchObject({ rewrite: true, fresh: true, segments: [[0, cs]] });
    expect(planCluster(std, 3, 0, 10, 0, entry(0, 9 * cs))).toMatchObject({ rewrite: true, fresh: true }); // shared
    expect(planCluster(std, 3, 0, 10, 0, entry(L2E_COMPRESSED, 70000))).toMatchObject({ rewrite: true, fresh: true });
    expect(planCluster(std, 3, 0, 10, 0, entry(L2E_COPIED, 9 * cs, L2E_ZERO))).toMatchObject({ rewrite: true, fresh: false, hostOffset: 9 * cs });
    expect(planCluster(std, 3, 0, 10, 0, entry(L2E_COPIED, 9 * cs))).toMatchObject({ rewrite: false, hostOffset: 9 * cs });
  });

  it('extended L2: writes only the touched subclusters of a new cluster and keeps the bitmaps right', () => {
    const sc = ext.subclusterSize;
    const op = planCluster(ext, 0, sc + 10, 3 * sc - 10, 0, entry(0, 0, 0, 0, 1 << 2));
    expect(op.segments).toEqual([[sc, 3 * sc]]);
    expect(op.newAlloc).toBe(0b110);
    expect(op.newZero).toBe(0); // the zero bit of subcluster 2 is cleared: it now holds data
    const kept = planCluster(ext, 0, 10, sc + 10, 0, entry(L2E_COPIED, 4 * cs, 0, 0b01));
    // subcluster 0 allocated: only the guest bytes; subcluster 1 not: written whole
    expect(kept).toMatchObject({ fresh: false, hostOffset: 4 * cs, segments: [[10, 2 * sc]], newAlloc: 0b11 });
  });

  it('refuses mappings no write may act on', () => {
    const fileSize = 10 * cs;
    expect(badOldMapping(std, fileSize, entry(0, 0), 0)).toBeNull();
    expect(badOldMapping(std, fileSize, entry(L2E_COPIED, 20 * cs), 0)).toBeNull(); // owned past the end: the write grows the file
    expect(badOldMapping(std, fileSize, entry(0, 20 * cs), 0)).toMatch(/shared data cluster .* past the end/);
    expect(badOldMapping(std, fileSize, entry(L2E_COPIED | 0x00800000, 0), 0)).toMatch(/2\^52/);
    expect(badOldMapping(std, fileSize, entry(L2E_COPIED, 3 * cs + 512), 0)).toMatch(/not aligned/);
    expect(badOldMapping(std, fileSize, entry(L2E_COMPRESSED, 20 * cs), 0)).toMatch(/compressed cluster: .*past the end/);
    expect(badOldMapping(std, fileSize, entry(L2E_COMPRESSED, 100), 0)).toMatch(/header cluster/);
    expect(badOldMapping(ext, fileSize, entry(L2E_COPIED, 3 * cs, 0, 1, 1), 0)).toMatch(/both allocated and zero/);
    expect(badOldMapping(ext, fileSize, entry(0, 0, 0, 1), 0)).toMatch(/unallocated cluster/);
    expect(badOldMapping(ext, fileSize, entry(L2E_COMPRESSED, 3 * cs, 0, 0, 1), 0)).toMatch(/subcluster bitmap/);
    expect(badOldMapping(dataFile, fileSize, entry(L2E_COPIED, 5 * cs), 5 * cs)).toBeNull();
    expect(badOldMapping(dataFile, fileSize, entry(L2E_COPIED, 5 * cs), 7 * cs)).toMatch(/does not match/);
  });
});

describe('qcow2 overlap index', () => {
  const cs = 65536;
  const build = (): OverlapIndex => {
    const x = new OverlapIndex();
    x.build({
      clusterSize: cs,
      l1TableOffset: 3 * cs,
      l1Bytes: 8,
      refcountTableOffset: cs,
      refcountTableBytes: cs,
      snapshotTableOffset: 0,
      snapshotTableBytes: 0,
      snapshots: [{ name: 's1', l1TableOffset: 9 * cs, l1Size: 1 }],
      l2Tables: [4 * cs, 0],
      refBlocks: [2 * cs],
    });
    return x;
  };

  it('finds every kind of metadata and nothing else', () => {
    const x = build();
    expect(x.find(100, 10)).toMatch(/header/);
    expect(x.find(cs + 5, 1)).toMatch(/refcount table/);
    expect(x.find(2 * cs, cs)).toMatch(/refcount block/);
    expect(x.find(3 * cs, 8)).toMatch(/active L1/);
    expect(x.find(4 * cs + 100, 10)).toMatch(/L2 table/);
    expect(x.find(9 * cs, 1)).toMatch(/snapshot s1/);
    expect(x.find(5 * cs, 4 * cs)).toBeNull();
  });

  it('follows metadata that moves: a grown refcount table, a copied L2 table, a new block', () => {
    const x = build();
    x.refcountTableMoved(6 * cs, 2 * cs);
    expect(x.find(cs, cs)).toBeNull(); // the old table's cluster may be reused
    expect(x.find(7 * cs, 1)).toMatch(/refcount table/);
    x.l2Dropped(4 * cs);
    x.l2Allocated(8 * cs);
    expect(x.find(4 * cs, cs)).toBeNull();
    expect(x.find(8 * cs, 1)).toMatch(/L2 table/);
    x.refblockAdded(5 * cs);
    expect(x.find(5 * cs, 1)).toMatch(/refcount block/);
  });
});

describe('qcow2 write-zeroes decisions (zero.ts zeroEntry)', () => {
  const ALL = 0xffffffff;
  const own = (g = std) => entry(L2E_COPIED, 5 * 64 * KiB, 0, g.extL2 ? ALL : 0);

  it('v3: zero flag; unmap drops the reference, without unmap an own cluster stays behind the flag', () => {
    const keep = zeroEntry(std, own(), ALL, false, false);
    expect(keep).toMatchObject({ skip: false, drop: false });
    expect(clusterType(std, keep.hi, keep.lo)).toBe(ClusterType.ZeroAlloc);
    const unmap = zeroEntry(std, own(), ALL, true, false);
    expect(unmap).toMatchObject({ skip: false, drop: true, hi: 0, lo: L2E_ZERO });
    // Already zero, or unallocated without a backing file: nothing to do.
    expect(zeroEntry(std, entry(0, 0, L2E_ZERO), ALL, true, true).skip).toBe(true);
    expect(zeroEntry(std, entry(0, 0), ALL, true, false).skip).toBe(true);
    // Unallocated over a backing file: the zero flag hides the backing data.
    expect(zeroEntry(std, entry(0, 0), ALL, false, true)).toMatchObject({ skip: false, drop: false, lo: L2E_ZERO });
  });

  it('compressed clusters always lose their reference; a shared cluster keeps only the snapshot reference', () => {
    const compressed = entry(L2E_COMPRESSED, 3 * 64 * KiB + 1000);
    expect(zeroEntry(std, compressed, ALL, false, false)).toMatchObject({ drop: true, hi: 0, lo: L2E_ZERO });
    const shared = entry(0, 5 * 64 * KiB);
    expect(zeroEntry(std, shared, ALL, true, false)).toMatchObject({ drop: true, hi: 0 });
    expect(zeroEntry(std, shared, ALL, false, false)).toMatchObject({ drop: false });
  });

  it('v2 without backing: unallocate; an own cluster without unmap gets zeros in place', () => {
    expect(zeroEntry(v2, own(v2), ALL, true, false)).toMatchObject({ drop: true, hi: 0, lo: 0 });
    expect(zeroEntry(v2, own(v2), ALL, false, false)).toMatchObject({ skip: true, inPlace: true });
    expect(zeroEntry(v2, entry(0, 0), ALL, true, false).skip).toBe(true);
  });

  it('extended L2: zero bits for whole subclusters; the host cluster goes once nothing is allocated (unmap)', () => {
    const part = zeroEntry(ext, own(ext), 0x0000000f, true, true);
    expect(part).toMatchObject({ drop: false, alloc: 0xfffffff0, zero: 0x0000000f });
    const rest = zeroEntry(ext, entry(L2E_COPIED, 5 * 64 * KiB, 0, 0x0000000f), 0x0000000f, true, false);
    expect(rest).toMatchObject({ drop: true, hi: 0, lo: 0, alloc: 0, zero: 0x0000000f });
    // A part of a compressed cluster is written as zeros instead.
    expect(zeroEntry(ext, entry(L2E_COMPRESSED, 3 * 64 * KiB + 1000), 0x1, true, false).viaWrite).toBe(true);
    // Unallocated subclusters without a backing file already read as zeros.
    expect(zeroEntry(ext, entry(0, 0), 0xff, true, false).skip).toBe(true);
  });
});
