/** QED header parsing and validation: every rule gives a one-line FormatError. */
import { describe, expect, it } from 'vitest';
import { FormatError } from '../../src/errors.js';
import { INVALID_OFFSET } from '../../src/formats/u64.js';
import {
  QED_F_BACKING_FILE,
  QED_F_NEED_CHECK,
  decodeBackingName,
  featureNames,
  geometryOf,
  maxImageSize,
  parseHeader,
  readEntry,
  serializeHeader,
  writeEntry,
  type QedHeader,
} from '../../src/formats/qed/header.js';

function good(): QedHeader {
  return {
    clusterSize: 65536,
    tableSize: 4,
    headerSize: 1,
    features: 0n,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: 65536,
    imageSize: 1 << 30,
    backingFilenameOffset: 0,
    backingFilenameSize: 0,
  };
}
const FILE = 65536 * 5;

function rejects(mutate: (h: QedHeader, b: Buffer) => void, re: RegExp, fileSize = FILE, errno = 'EINVAL'): void {
  const h = good();
  const b = serializeHeader(h);
  mutate(h, b);
  let err: unknown;
  try {
    parseHeader(b, fileSize);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(FormatError);
  const msg = (err as Error).message;
  expect(msg).toMatch(re);
  expect(msg).not.toContain('\n');
  expect((err as FormatError).errno).toBe(errno);
}

describe('QED header', () => {
  it('round-trips through serialize/parse', () => {
    const h = { ...good(), features: QED_F_BACKING_FILE | QED_F_NEED_CHECK, backingFilenameOffset: 64, backingFilenameSize: 9 };
    expect(parseHeader(serializeHeader(h), FILE)).toEqual(h);
    const g = geometryOf(h);
    expect(g.tableEntries).toBe(32768);
    expect(g.l2Span).toBe(32768 * 65536);
    expect(g.headerEnd).toBe(65536);
    expect(featureNames(h.features)).toEqual(['backing_file', 'need_check']);
  });

  it('refuses a truncated header', () => {
    expect(() => parseHeader(serializeHeader(good()).subarray(0, 40), 40)).toThrow(/truncated/);
    rejects(() => {}, /truncated: file has 63 bytes/, 63);
  });

  it('refuses a bad magic', () => rejects((_h, b) => b.writeUInt32LE(0x514649fb, 0), /not a QED image: bad magic/));

  it.each([0, 2048, 4095, 65535, 3 * 4096, 128 * 1024 * 1024])('refuses cluster size %i', (cs) =>
    rejects((_h, b) => b.writeUInt32LE(cs, 4), /cluster size \d+ is invalid/),
  );

  it.each([0, 3, 32, 17])('refuses table size %i', (ts) => rejects((_h, b) => b.writeUInt32LE(ts, 8), /table size \d+ is invalid/));

  it('refuses header sizes of 0 or past 4 GiB', () => {
    rejects((_h, b) => b.writeUInt32LE(0, 12), /header size 0 clusters is invalid/);
    rejects((_h, b) => b.writeUInt32LE(65536, 12), /header size 65536 clusters is invalid/);
  });

  it('refuses an L1 offset that is unaligned, inside the header or past the file', () => {
    rejects((_h, b) => b.writeBigUInt64LE(65536n + 512n, 40), /L1 table offset 0x10200 is invalid/);
    rejects((_h, b) => b.writeBigUInt64LE(0n, 40), /L1 table offset 0x0 is invalid/);
    rejects((_h, b) => b.writeBigUInt64LE(BigInt(FILE), 40), /past the end of the file/);
    // The table's last cluster must be inside the file too.
    rejects((_h, b) => b.writeBigUInt64LE(BigInt(FILE - 65536 * 2), 40), /past the end of the file/);
    rejects((_h, b) => b.writeBigUInt64LE(1n << 62n, 40), /L1 table offset 0x4000000000000000 is too large/);
    rejects((_h, b) => b.writeBigUInt64LE(1n << 52n, 40), /too large/);
  });

  it('refuses image sizes that are unaligned or too large for the tables', () => {
    rejects((_h, b) => b.writeBigUInt64LE(1000n, 48), /not a multiple of 512/);
    const max = maxImageSize(65536, 4);
    rejects((_h, b) => b.writeBigUInt64LE(BigInt(max) + 512n, 48), /too large for the tables/);
    // 4 KiB clusters, 1-cluster tables: 512 * 512 * 4096 = 1 GiB at most.
    const h = { ...good(), clusterSize: 4096, tableSize: 1, l1TableOffset: 4096, imageSize: 1 << 30 };
    expect(parseHeader(serializeHeader(h), 8192).imageSize).toBe(1 << 30);
    expect(() => parseHeader(serializeHeader({ ...h, imageSize: (1 << 30) + 512 }), 8192)).toThrow(/too large/);
  });

  it('refuses unknown incompatible features with ENOTSUP, accepts unknown compat/autoclear bits', () => {
    rejects((_h, b) => b.writeBigUInt64LE(0x10n, 16), /unsupported incompatible features 0x10/, FILE, 'ENOTSUP');
    rejects((_h, b) => b.writeBigUInt64LE(1n << 63n, 16), /unsupported incompatible features 0x8000000000000000/, FILE, 'ENOTSUP');
    const h = { ...good(), compatFeatures: 0xffn, autoclearFeatures: 1n << 40n };
    expect(parseHeader(serializeHeader(h), FILE)).toEqual(h);
  });

  it('refuses a backing file name outside the header', () => {
    rejects(
      (_h, b) => {
        b.writeBigUInt64LE(QED_F_BACKING_FILE, 16);
        b.writeUInt32LE(65530, 56);
        b.writeUInt32LE(10, 60);
      },
      /backing file name .* lies outside the header/,
    );
  });

  it('decodes backing names, refusing invalid UTF-8', () => {
    expect(decodeBackingName(Buffer.from('base.img'))).toBe('base.img');
    expect(decodeBackingName(Buffer.from('a\0junk'))).toBe('a');
    expect(() => decodeBackingName(Buffer.from([0x61, 0xff, 0x62]))).toThrow(FormatError);
  });

  it('reads and writes 64-bit entries exactly below 2^52, and decodes larger ones as INVALID_OFFSET', () => {
    const t = Buffer.alloc(32);
    for (const v of [0, 1, 65536, 2 ** 32, 2 ** 40 + 65536, 2 ** 52 - 4096]) {
      writeEntry(t, 2, v);
      expect(readEntry(t, 2)).toBe(v);
      expect(t.readBigUInt64LE(16)).toBe(BigInt(v));
    }
    for (const big of [1n << 52n, (1n << 53n) + 4096n, 1n << 63n, 0xffffffffffffffffn]) {
      t.writeBigUInt64LE(big, 8);
      expect(readEntry(t, 1)).toBe(INVALID_OFFSET);
    }
  });
});
