/**
 * Disk full: the image lives on a small tmpfs (24 MiB) and its virtual disk
 * is larger (64 MiB). Writes through a real mount fill the tmpfs until the
 * engine's allocations fail. Proven:
 *  - the failing request gets ENOSPC (not EIO, not a dead mount);
 *  - while full, the mount stays usable: reads work, fsync'd data reads back,
 *    writes into already-allocated clusters succeed, fsync succeeds;
 *  - after a spare file on the tmpfs is deleted, allocating writes work again
 *    through the same mount: a failed allocation gives its clusters back and
 *    leaves no latched error, so no remount is needed (tested on purpose: a
 *    remount would hide a driver that stays broken after ENOSPC);
 *  - after unmount: qemu-img check exits 0 or 3 (a failed allocation may
 *    leak), and QEMU reads every byte a successful write put there (bytes of
 *    the failed writes read old or new).
 * Both qcow2 (64 KiB clusters) and QED (64 KiB clusters).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { guestMismatch, type GuestWriteOp } from '../helpers/crash.js';
import { mountImage } from '../helpers/mount.js';
import { convertToRaw, patternBytes, qemuCheck, qemuImg, scratchDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const cleanups: Array<() => void> = [];
afterAll(() => cleanups.forEach((c) => c()));

/** A 24 MiB tmpfs at dir/fs; the returned cleanup unmounts it. */
function smallTmpfs(dir: string): { root: string; cleanup: () => void } {
  const root = path.join(dir, 'fs');
  fs.mkdirSync(root);
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', root], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mount -t tmpfs failed: ${r.stderr.trim()}`);
  return {
    root,
    cleanup: () => {
      if (spawnSync('umount', [root]).status !== 0) spawnSync('umount', ['-l', root]);
    },
  };
}

/** One write syscall sequence; returns the bytes the kernel confirmed and the error that stopped it. */
function writeAll(fd: number, data: Buffer, offset: number): { written: number; code?: string } {
  let written = 0;
  try {
    while (written < data.length) {
      written += fs.writeSync(fd, data, written, data.length - written, offset + written);
    }
    return { written };
  } catch (err) {
    return { written, code: (err as NodeJS.ErrnoException).code };
  }
}

describe('disk full under a mount', () => {
  it.each([['qcow2'], ['qed']] as const)('%s: ENOSPC, nothing corrupted, data intact, writing works again after space is freed', async (format) => {
    const { dir, cleanup } = scratchDir('disk-full');
    cleanups.push(cleanup);
    const tmpfs = smallTmpfs(dir);
    try {
      const image = path.join(tmpfs.root, `disk.${format}`);
      const size = 64 * MiB;
      const opts = format === 'qed' ? ['-o', 'cluster_size=65536'] : [];
      qemuImg('create', '-q', '-f', format, ...opts, image, String(size));
      const spare = path.join(tmpfs.root, 'spare.bin');
      fs.writeFileSync(spare, patternBytes(4 * MiB, 1));

      const model = Buffer.alloc(size);
      const failed: GuestWriteOp[] = [];
      const m = await mountImage(image, { format });
      let unmounted = false;
      try {
        const fd = fs.openSync(m.rawPath, 'r+');
        try {
          // Earlier data, fsync'd.
          const early = patternBytes(2 * MiB, 2);
          expect(writeAll(fd, early, 0)).toEqual({ written: early.length });
          early.copy(model, 0);
          fs.fsyncSync(fd);

          // Fill: 1 MiB chunks into unallocated space until a write fails.
          let off = 4 * MiB;
          let stop: string | undefined;
          for (let i = 0; off + MiB <= size && !stop; i++, off += MiB) {
            const chunk = patternBytes(MiB, 100 + i);
            const r = writeAll(fd, chunk, off);
            chunk.copy(model, off, 0, r.written);
            if (r.code) {
              stop = r.code;
              failed.push({ offset: off + r.written, data: chunk.subarray(r.written) });
            } else if (i % 4 === 3) {
              fs.fsyncSync(fd);
            }
          }
          expect(stop, 'the tmpfs never filled').toBe('ENOSPC');
          const fullAt = off;

          // Full, and still usable.
          const got = Buffer.alloc(2 * MiB);
          fs.readSync(fd, got, 0, got.length, 0);
          expect(got.equals(early)).toBe(true);
          const inPlace = patternBytes(100 * KiB, 3);
          expect(writeAll(fd, inPlace, 300 * KiB)).toEqual({ written: inPlace.length });
          inPlace.copy(model, 300 * KiB);
          fs.fsyncSync(fd);

          // Free space: allocating writes work again, same mount.
          fs.rmSync(spare);
          const again = patternBytes(2 * MiB, 4);
          const at = Math.min(fullAt + MiB, size - again.length);
          expect(writeAll(fd, again, at)).toEqual({ written: again.length });
          again.copy(model, at);
          fs.fsyncSync(fd);
          // Guest content through the mount: every confirmed write, failed bytes old or new.
          const all = Buffer.alloc(size);
          fs.readSync(fd, all, 0, size, 0);
          expect(guestMismatch(all, model, failed)).toBeNull();
        } finally {
          fs.closeSync(fd);
        }
        await m.unmount();
        unmounted = true;
        expect((await m.exited).code).toBe(0);
      } finally {
        if (!unmounted) await m.unmount();
      }
      const c = qemuCheck(image, format);
      console.log(`${format}: ENOSPC after ${(failed[0].offset / MiB).toFixed(2)} MiB of guest data; qemu-img check exit ${c.code}`);
      expect([0, 3], c.output).toContain(c.code);
      const raw = convertToRaw(image, path.join(dir, 'after.raw'));
      expect(guestMismatch(fs.readFileSync(raw), model, failed)).toBeNull();
    } finally {
      tmpfs.cleanup();
    }
  });
});
