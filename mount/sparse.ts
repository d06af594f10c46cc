/**
 * The sparse-file operations of one mounted file, over the BlockDriver
 * calls of the file being addressed (blockStatus, writeZeroes, resize,
 * allocatedBytes): lseek SEEK_DATA/SEEK_HOLE, fallocate and st_blocks.
 * Binding-neutral and free of FUSE codes: failures are QmountErrors with
 * errno names (the service translates), "no such offset" (ENXIO) is null.
 *
 * Semantics (the one place they are written; README "Sparse images"):
 * - data vs hole: an extent is data when blockStatus says `data` and not
 *   `zero` (stored bytes, in this image or below); zero clusters,
 *   unallocated ranges without backing data and everything the chain does
 *   not define are holes. Past the end of the disk is a hole (EOF).
 * - SEEK_DATA / SEEK_HOLE at or past the end: ENXIO (as Linux file systems
 *   answer both). SEEK_HOLE finds the end of the disk when no hole is
 *   before it; SEEK_DATA finds nothing (ENXIO) when only holes follow.
 * - A source that cannot tell holes (blockStatus answers ENOTSUP) is one
 *   data extent: SEEK_DATA returns the offset itself, SEEK_HOLE the end.
 * - fallocate modes (Linux's; anything else ENOTSUP = EOPNOTSUPP):
 *     PUNCH_HOLE|KEEP_SIZE   zeros; clusters freed unless discard=ignore
 *                            (PUNCH_HOLE without KEEP_SIZE: EINVAL, as Linux)
 *     ZERO_RANGE[|KEEP_SIZE] zeros, never freeing (what the loop driver
 *                            sends for REQ_NOUNMAP write-zeroes)
 *     0 / KEEP_SIZE          within the disk nothing to do: succeed (the
 *                            engine cannot reserve space; a later write may
 *                            still get ENOSPC from the host)
 *   With KEEP_SIZE the range is cut at the end of the disk. Without it a
 *   range reaching past the end grows the disk first (to the end rounded up
 *   to 512 bytes: virtual sizes are sector multiples), as truncate would.
 * - truncate: driver.resize (growing reads as zeros; shrinking is EPERM
 *   unless nothing is allocated at or past the new end; a size that is not a
 *   multiple of 512 is EINVAL: the driver contract).
 * - st_blocks = ceil(allocatedBytes / 512): guest data stored in the chain
 *   (each layer's data summed: an overlay's cluster over backing data counts
 *   twice), not the image file's size and not zero clusters.
 */
import { QmountError } from '../src/errors.js';
import type { BlockDriver, BlockExtent } from '../src/formats/driver.js';

/** What a file of the mount needs for these ops (the mount tree's FileSource has it). */
export type SparseSource = Pick<BlockDriver, 'virtualSize' | 'readOnly' | 'blockStatus' | 'writeZeroes' | 'resize' | 'allocatedBytes'>;

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
const KNOWN_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;

/**
 * blockStatus is asked for this much first, then twice as much per round up
 * to MAX (bounds one call's work). What a call returns beyond the offset
 * found is kept (StatusCache), so large windows cost nothing twice: a
 * SEEK_DATA/SEEK_HOLE walk asks the driver about each byte about once.
 */
const FIRST_WINDOW = 256 * 1024 * 1024;
const MAX_WINDOW = 8 * 1024 * 1024 * 1024;
/** writeZeroes is called for at most this many bytes at a time (a 10 GiB discard is many calls). */
export const ZERO_CHUNK = 1024 * 1024 * 1024;

export type DiscardMode = 'unmap' | 'ignore';

export function isData(e: BlockExtent): boolean {
  return e.data && !e.zero;
}

/** st_blocks of a source (512-byte units). */
export function blocksOf(src: SparseSource): number {
  return Math.ceil(src.allocatedBytes() / 512);
}

/**
 * The last blockStatus answer of a mount, for the lseek that follows (cp
 * alternates SEEK_DATA and SEEK_HOLE over the same extents). Valid while
 * nothing changed: every write, discard and resize anywhere in the mount
 * calls invalidate() when it starts and when it completes (files may share
 * bytes: a partition and disk.raw), and an answer is kept only if no
 * invalidate() happened while it was computed. A write still in flight
 * when an answer is kept invalidates it on completion: lseek never sees a
 * state older than the last completed change.
 */
export class StatusCache {
  private generation = 0;
  private entry: { src: SparseSource; start: number; end: number; extents: BlockExtent[] } | undefined;

  invalidate(): void {
    this.generation++;
    this.entry = undefined;
  }

  /** Extents covering [pos, end) for some end > pos (at most pos + window), from the cache or the driver. */
  async status(src: SparseSource, pos: number, window: number): Promise<{ extents: BlockExtent[]; end: number }> {
    const c = this.entry;
    if (c && c.src === src && c.start <= pos && pos < c.end) return { extents: c.extents, end: c.end };
    const end = Math.min(pos + window, src.virtualSize);
    const gen = this.generation;
    const extents = await src.blockStatus(pos, end - pos);
    if (gen === this.generation) this.entry = { src, start: pos, end, extents };
    return { extents, end };
  }
}

/**
 * lseek SEEK_DATA / SEEK_HOLE from `pos`: the offset found, or null for
 * ENXIO. Other `whence` values are EINVAL (the kernel answers them itself).
 */
export async function seek(src: SparseSource, pos: number, whence: number, cache = new StatusCache()): Promise<number | null> {
  if (whence !== SEEK_DATA && whence !== SEEK_HOLE) throw new QmountError('EINVAL', `lseek whence ${whence} is not SEEK_DATA or SEEK_HOLE`);
  const wantData = whence === SEEK_DATA;
  const size = src.virtualSize;
  if (!(pos >= 0) || pos >= size) return null;
  let window = FIRST_WINDOW;
  while (pos < size) {
    let r: { extents: BlockExtent[]; end: number };
    try {
      r = await cache.status(src, pos, window);
    } catch (err) {
      if (err instanceof QmountError && err.errno === 'ENOTSUP') return wantData ? pos : size;
      throw err;
    }
    for (const e of r.extents) {
      if (e.length > 0 && e.guestOffset + e.length > pos && isData(e) === wantData) return Math.max(e.guestOffset, pos);
    }
    // Extents cover exactly the range asked by contract; advancing to its end never loops on a short answer.
    pos = r.end;
    window = Math.min(window * 2, MAX_WINDOW);
  }
  return wantData ? null : size;
}

/** The smallest virtual size (a multiple of 512) holding `end` bytes. */
export function sectorRoundUp(end: number): number {
  return Math.ceil(end / 512) * 512;
}

/** fallocate(2) on a source; see the modes above. Resolves once done; rejects with a QmountError. */
export async function fallocate(src: SparseSource, mode: number, pos: number, length: number, discard: DiscardMode): Promise<void> {
  if (src.readOnly) throw new QmountError('EROFS', 'fallocate on a read-only file');
  if (mode & ~KNOWN_MODES) throw new QmountError('ENOTSUP', `fallocate mode 0x${mode.toString(16)} is not supported`);
  const punch = (mode & FALLOC_FL_PUNCH_HOLE) !== 0;
  const zero = (mode & FALLOC_FL_ZERO_RANGE) !== 0;
  const keepSize = (mode & FALLOC_FL_KEEP_SIZE) !== 0;
  if ((punch && zero) || (punch && !keepSize)) throw new QmountError('EINVAL', `fallocate mode 0x${mode.toString(16)}: PUNCH_HOLE needs KEEP_SIZE alone`);
  if (!(Number.isSafeInteger(pos) && Number.isSafeInteger(length) && pos >= 0 && length > 0 && Number.isSafeInteger(pos + length))) {
    throw new QmountError('EINVAL', `fallocate of ${length} bytes at ${pos}`);
  }
  const oldSize = src.virtualSize;
  let end = pos + length;
  if (keepSize) end = Math.min(end, oldSize);
  else if (end > oldSize) await src.resize(sectorRoundUp(end)); // grown bytes read as zeros already
  if (!punch && !zero) return;
  // Zero what existed before any growth.
  const zeroEnd = Math.min(end, oldSize);
  const unmap = punch && discard === 'unmap';
  for (let at = pos; at < zeroEnd; at += ZERO_CHUNK) {
    await src.writeZeroes(at, Math.min(ZERO_CHUNK, zeroEnd - at), { unmap });
  }
}

/** truncate/ftruncate to `size` (see the rules above). */
export async function truncate(src: SparseSource, size: number): Promise<void> {
  if (src.readOnly) throw new QmountError('EROFS', 'truncate of a read-only file');
  if (size === src.virtualSize) return;
  await src.resize(size);
}
