/**
 * Resize of a qcow2 image (BlockDriver.resize).
 *
 * Growing, in this order (a crash between any two steps leaves a valid
 * image of the old size, at worst with a leaked old L1 table):
 *  1. flush, then, when the L1 table cannot map the new size, move it to a
 *     larger copy (commit.ts, step 6: new table durable, one header write
 *     switches l1_table_offset + l1_size, old table released after);
 *  2. make the new range read as zeros where it would not by itself: the
 *     rest of the old last cluster (or subcluster), and whatever a backing
 *     file would show there (zero.ts: zero flags on v3, zeros on v2);
 *  3. flush, then write the header's size field (last) and sync.
 * Shrinking: refused (EPERM) when this image stores anything but zeros at
 * or past the new end (data clusters holding zeros are allowed: written
 * zeros, the cut last cluster); otherwise only the size field changes. Entries past the end stay (zero or unallocated);
 * a later grow zeroes what they would show, as above.
 * With internal snapshots: growing a v3 image is allowed (each snapshot
 * records its own size), shrinking is refused, and so is any resize of a v2
 * image (its snapshots take the image's size) - as QEMU does.
 */
import { Mutex } from '../../../cache/mutex.js';
import { CorruptionError, QmountError } from '../../errors.js';
import { readGuest } from './read.js';
import { L1E_BYTES, MAX_L1_BYTES, sizeField } from './spec.js';
import { blockStatus } from './status.js';
import type { Qcow2Writer } from './write.js';
import { writeZeroes } from './zero.js';

const MiB = 1024 * 1024;

/** One resize at a time per image. */
const resizing = new WeakMap<Qcow2Writer, Mutex>();

export async function resize(w: Qcow2Writer, newSize: number): Promise<void> {
  const s = w.s;
  const g = s.g;
  if (!Number.isSafeInteger(newSize) || newSize < 0 || newSize % 512 !== 0) {
    throw new QmountError('EINVAL', `${s.file.path}: a disk size must be a non-negative multiple of 512 bytes, not ${String(newSize)}`);
  }
  const entries = Math.ceil(newSize / g.l2Span);
  if (entries * L1E_BYTES > MAX_L1_BYTES) {
    throw new QmountError('EINVAL', `${s.file.path}: ${newSize} bytes is more than a qcow2 L1 table of ${MAX_L1_BYTES} bytes can map with ${g.clusterSize}-byte clusters`);
  }
  let lock = resizing.get(w);
  if (!lock) resizing.set(w, (lock = new Mutex()));
  await lock.run(async () => {
    if (s.corrupt) throw new CorruptionError('image is marked corrupt; writes are refused');
    const oldSize = s.virtualSize;
    if (newSize === oldSize) return;
    if (s.snapshots.length > 0 && (newSize < oldSize || s.header.version === 2)) {
      throw new QmountError('EPERM', `${s.file.path}: ${newSize < oldSize ? 'shrinking an image with internal snapshots' : 'resizing a version 2 image with internal snapshots'} is refused (QEMU refuses it too)`);
    }
    if (newSize < oldSize) await shrink(w, oldSize, newSize);
    else await grow(w, oldSize, newSize, entries);
    s.log.info({ oldSize, newSize }, 'disk resized');
  });
}

async function grow(w: Qcow2Writer, oldSize: number, newSize: number, entries: number): Promise<void> {
  const s = w.s;
  await s.meta.run(async () => {
    await w.prepareFirstWrite();
    await w.flushLocked();
    if (entries > s.l1Entries) await w.commit.moveL1(entries);
  });
  const unit = s.g.subclusterSize;
  const tailEnd = Math.min(newSize, Math.ceil(oldSize / unit) * unit);
  const backingEnd = s.header.backingFile === undefined ? 0 : Math.min(newSize, s.backing ? s.backing.virtualSize : newSize);
  const zeroEnd = Math.max(tailEnd, backingEnd);
  // The new range is addressable from here on (the zeroing writes into it); the disk's size changes last.
  s.header.size = newSize;
  try {
    if (zeroEnd > oldSize) await writeZeroes(w, oldSize, zeroEnd - oldSize, true);
    await s.meta.run(async () => {
      await w.flushLocked();
      await writeSize(w, newSize);
    });
  } catch (err) {
    s.header.size = oldSize;
    throw err;
  }
}

async function shrink(w: Qcow2Writer, oldSize: number, newSize: number): Promise<void> {
  const s = w.s;
  const cs = s.g.clusterSize;
  await s.meta.run(async () => {
    await w.prepareFirstWrite();
    // Data clusters past the new end are allowed when they hold zeros (zeros written, a cut cluster).
    const buf = Buffer.alloc(Math.min(MiB, cs * 16));
    for (const e of await blockStatus(s, newSize, oldSize - newSize)) {
      if (e.depth !== 0 || !e.data) continue;
      for (let at = e.guestOffset; at < e.guestOffset + e.length; at += buf.length) {
        const n = Math.min(buf.length, e.guestOffset + e.length - at);
        await readGuest(s, buf, 0, n, at);
        if (buf.subarray(0, n).some((b) => b !== 0)) refuse(w, newSize, at);
      }
    }
    await w.flushLocked();
    await writeSize(w, newSize);
    s.header.size = newSize;
  });
}

function refuse(w: Qcow2Writer, newSize: number, at: number): never {
  throw new QmountError('EPERM', `${w.s.file.path}: cannot shrink to ${newSize} bytes: guest offset ${at} at or past the new end holds data (discard it first)`);
}

/** The header's size field, then a sync (under the metadata lock). */
async function writeSize(w: Qcow2Writer, bytes: number): Promise<void> {
  const [at, field] = sizeField(bytes);
  await w.s.file.write('header_resize', field, 0, field.length, at);
  await w.s.syncAll();
}
