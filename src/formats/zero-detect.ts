/**
 * --detect-zeroes off|on|unmap, with qemu-nbd's meaning, as a BlockDriver
 * wrapper (withDetectZeroes):
 *
 *  - off: writes go through unchanged.
 *  - on: a write whose buffer is all zeros becomes writeZeroes({unmap:
 *    false}) for the clusters it covers whole, so zeros written over
 *    unallocated or zero clusters allocate nothing (and over data clusters
 *    are zeroed in place, the space kept).
 *  - unmap: the same with writeZeroes({unmap: true}): zeros written over data
 *    clusters free them (a discard).
 * The partial clusters at either end of such a write stay ordinary writes
 * (of the zeros). A write that is not all zeros, on a read-only driver, or
 * with a range the driver must refuse, goes to the driver unchanged (which
 * answers it with the contract's errno). The last cluster of a disk whose
 * size is not a multiple of the cluster counts as whole when the write runs
 * to the end of the disk.
 *
 * Cost: after a look at the first and last byte (so a write of ordinary
 * data is judged at its first non-zero byte, almost always the first), the
 * zero test of ranges of NATIVE_FROM bytes and more is native/fileops's
 * one-pass test (AVX2 where the CPU has it: ~10 us for a 1 MiB write fresh
 * from the kernel, against ~21 us for the compiler-vectorised loop and
 * ~30 us for memcmp, measured); smaller ones, and all of them without the addon, are memcmp
 * (Buffer.compare against a static zero buffer, in 1 MiB steps).
 */
import { nativeZeroTest } from '../io/fileops.js';
import type { BlockDriver, BlockExtent, FdSink, ImageInfo } from './driver.js';

export type DetectZeroes = 'off' | 'on' | 'unmap';

export const DETECT_ZEROES_MODES: readonly DetectZeroes[] = ['off', 'on', 'unmap'];

/** Granularity for drivers without clusters (raw): a file system block. */
const DEFAULT_GRANULE = 4096;

const ZERO = Buffer.alloc(1024 * 1024);

/** Below this many bytes the call into the addon costs more than its faster scan saves. */
const NATIVE_FROM = 64 * 1024;
const nativeIsZero = nativeZeroTest();

/** Are buf[offset, +length) all zero bytes? Stops at the first non-zero block. */
export function isAllZero(buf: Buffer, offset: number, length: number): boolean {
  if (length === 0) return true;
  if (buf[offset] !== 0 || buf[offset + length - 1] !== 0) return false;
  if (nativeIsZero !== null && length >= NATIVE_FROM) return nativeIsZero(buf, offset, length);
  for (let done = 0; done < length; done += ZERO.length) {
    const n = Math.min(ZERO.length, length - done);
    if (ZERO.compare(buf, offset + done, offset + done + n, 0, n) !== 0) return false;
  }
  return true;
}

/** Counters (for logs and benchmarks). */
export interface DetectZeroesStats {
  /** writes turned (partly) into writeZeroes */
  detected: number;
  /** bytes that went to writeZeroes instead of write */
  zeroBytes: number;
}

class DetectZeroesDriver implements BlockDriver {
  readonly stats: DetectZeroesStats = { detected: 0, zeroBytes: 0 };
  private readonly granule: number;
  private readonly unmap: boolean;

  constructor(
    private readonly inner: BlockDriver,
    mode: 'on' | 'unmap',
  ) {
    this.unmap = mode === 'unmap';
    const cs = inner.info().clusterSize;
    this.granule = cs !== undefined && cs > 0 ? cs : DEFAULT_GRANULE;
  }

  get format(): BlockDriver['format'] {
    return this.inner.format;
  }
  get filename(): string {
    return this.inner.filename;
  }
  get virtualSize(): number {
    return this.inner.virtualSize;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    return this.inner.read(buf, bufOffset, length, guestOffset);
  }

  readNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    return this.inner.readNow?.(buf, bufOffset, length, guestOffset) ?? false;
  }

  sendNow(length: number, guestOffset: number, sink: FdSink): boolean {
    return this.inner.sendNow?.(length, guestOffset, sink) ?? false;
  }

  /** Only writes too short to hold a whole granule go at once: every other one is looked at by write(). */
  writeNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    return length < this.granule && (this.inner.writeNow?.(buf, bufOffset, length, guestOffset) ?? false);
  }

  async write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    const d = this.inner;
    const g = this.granule;
    const end = guestOffset + length;
    const plain =
      d.readOnly ||
      length < g ||
      !Number.isSafeInteger(guestOffset) ||
      !Number.isSafeInteger(length) ||
      guestOffset < 0 ||
      end > d.virtualSize;
    if (plain) return d.write(buf, bufOffset, length, guestOffset);
    const wholeStart = Math.ceil(guestOffset / g) * g;
    const wholeEnd = end === d.virtualSize ? end : Math.floor(end / g) * g;
    if (wholeEnd <= wholeStart || !isAllZero(buf, bufOffset, length)) return d.write(buf, bufOffset, length, guestOffset);
    this.stats.detected++;
    this.stats.zeroBytes += wholeEnd - wholeStart;
    // Head and tail edges as writes, the whole clusters as write-zeroes; disjoint, so in any order.
    if (wholeStart > guestOffset) await d.write(buf, bufOffset, wholeStart - guestOffset, guestOffset);
    await d.writeZeroes(wholeStart, wholeEnd - wholeStart, { unmap: this.unmap });
    if (end > wholeEnd) await d.write(buf, bufOffset + (wholeEnd - guestOffset), end - wholeEnd, wholeEnd);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  info(): ImageInfo {
    return this.inner.info();
  }
  blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    return this.inner.blockStatus(guestOffset, length);
  }
  writeZeroes(guestOffset: number, length: number, opts: { unmap: boolean }): Promise<void> {
    return this.inner.writeZeroes(guestOffset, length, opts);
  }
  resize(newSize: number): Promise<void> {
    return this.inner.resize(newSize);
  }
  allocatedBytes(): number {
    return this.inner.allocatedBytes();
  }
}

/**
 * `d` with --detect-zeroes `mode` applied to its writes; `off` returns `d`
 * itself. The wrapper owns nothing: closing it closes `d`.
 */
export function withDetectZeroes(d: BlockDriver, mode: DetectZeroes): BlockDriver & { stats?: DetectZeroesStats } {
  return mode === 'off' ? d : new DetectZeroesDriver(d, mode);
}
