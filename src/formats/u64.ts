/**
 * 64-bit on-disk fields, decoded at the edge. Every format decodes its
 * 64-bit offsets, sizes, table entries and refcounts through this file and
 * nowhere else.
 *
 * Why: a JavaScript number is exact only below 2^53, and past that Node's
 * fs takes an unsafe position as "the current file position": a pwrite meant
 * for host offset 2^55 (a hostile L2 entry) lands at offset 0, on the header.
 * So one bound applies to every value an image gives us:
 *
 *   MAX_DISK_BYTES = 2^52 (4 PiB). An offset or size at or above it is not
 *   used. Below it, an offset plus any length qmount computes with (a
 *   cluster, a table, a request) stays exact. No file system in use holds
 *   a file that large (ext4 stops at 16 TiB), so no real image is refused;
 *   guest disks are limited to the same 4 PiB.
 *
 * Two ways to decode, by what a bad value means:
 *  - header fields (`headerU64BE`/`headerU64LE`): the image cannot be opened;
 *    a one-line FormatError naming the field.
 *  - table entries (`u64BE`, `u64LE`, `u64Of`): the value decodes as
 *    INVALID_OFFSET (Infinity), which fails every alignment, bounds and
 *    "inside the file" check the formats make (Infinity % n is NaN, and
 *    Infinity plus anything stays Infinity), and ImageFile refuses it before
 *    any syscall. So only the request that needs the entry fails (EIO), and a
 *    write that needs it marks the image corrupt (the drivers' write paths).
 */
import { FormatError } from '../errors.js';

/** Exclusive upper bound of every offset, size or count read from an image. */
export const MAX_DISK_BYTES = 2 ** 52;
/** What an entry at or above MAX_DISK_BYTES decodes to. */
export const INVALID_OFFSET = Infinity;

const TWO32 = 0x1_0000_0000;
/** MAX_DISK_BYTES / 2^32: the high 32-bit half of a valid value is below this. */
const MAX_HI = MAX_DISK_BYTES / TWO32;

/** hi * 2^32 + lo for two unsigned 32-bit halves, or INVALID_OFFSET at or above MAX_DISK_BYTES. */
export function u64Of(hi: number, lo: number): number {
  return hi >= MAX_HI ? INVALID_OFFSET : hi * TWO32 + lo;
}

export function u64BE(buf: Buffer, at: number): number {
  return u64Of(buf.readUInt32BE(at), buf.readUInt32BE(at + 4));
}

export function u64LE(buf: Buffer, at: number): number {
  return u64Of(buf.readUInt32LE(at + 4), buf.readUInt32LE(at));
}

/** True for a decoded value that is usable (not INVALID_OFFSET). */
export function representable(v: number): boolean {
  return v < MAX_DISK_BYTES;
}

function headerValue(v: number, raw: () => bigint, what: string): number {
  if (v === INVALID_OFFSET) {
    throw new FormatError(`${what} 0x${raw().toString(16)} is too large (qmount's limit is 2^52 bytes)`);
  }
  return v;
}

/** A big-endian 64-bit header field; throws FormatError naming `what` when out of range. */
export function headerU64BE(buf: Buffer, at: number, what: string): number {
  return headerValue(u64BE(buf, at), () => buf.readBigUInt64BE(at), what);
}

/** A little-endian 64-bit header field; throws FormatError naming `what` when out of range. */
export function headerU64LE(buf: Buffer, at: number, what: string): number {
  return headerValue(u64LE(buf, at), () => buf.readBigUInt64LE(at), what);
}

/** A decoded offset for messages: hex, or what INVALID_OFFSET stands for. */
export function hexOffset(v: number): string {
  return v === INVALID_OFFSET ? '(at or above 2^52)' : `0x${v.toString(16)}`;
}
