/**
 * Internal snapshots as read-only disks: `-l NAME|ID` and the mount's
 * snapshots/NAME.raw files.
 *
 * A snapshot is read through its own L1 table, at its own recorded size
 * (disk_size in the entry's extra data; the image's size for v2 entries
 * that do not record one), over the same image file, external data file
 * and backing file as the active image: the read path (read.ts) is the same,
 * only the L1 table differs. Clusters a snapshot shares with the active
 * image cannot change under it while the mount is read-only; with a
 * writable mount, copy-on-write (write.ts) never rewrites a cluster whose
 * refcount is above 1, which every cluster a snapshot references has.
 *
 * An L1 table shorter than the snapshot's size needs (QEMU tolerates it) is
 * padded with unallocated entries.
 */
import { QmountError } from '../../errors.js';
import { checkRequest, type BlockDriver, type BlockExtent, type ImageInfo } from '../driver.js';
import { readGuest } from './read.js';
import { blockStatus } from './status.js';
import type { Qcow2Snapshot } from './snapshot.js';
import { Qcow2State } from './state.js';
import { L1E_BYTES } from './spec.js';

/** L2 cache per snapshot disk: snapshots are read by copying files out, mostly sequentially. */
const SNAPSHOT_L2_CACHE_BYTES = 4 * 1024 * 1024;

/** The qcow2 state behind an opened qcow2 driver (undefined for other formats and wrappers). */
export function qcow2StateOf(d: BlockDriver): Qcow2State | undefined {
  const s = (d as { s?: unknown }).s;
  return s instanceof Qcow2State ? s : undefined;
}

/** `ref` as a snapshot ID first, then as a name (QEMU's order for -l). */
export function findSnapshot(snapshots: readonly Qcow2Snapshot[], ref: string): Qcow2Snapshot | undefined {
  return snapshots.find((s) => s.id === ref) ?? snapshots.find((s) => s.name === ref);
}

/** The one-line error for a snapshot that does not exist, naming those that do. */
export function noSuchSnapshot(image: string, ref: string, snapshots: readonly Qcow2Snapshot[]): QmountError {
  const list = snapshots.length === 0 ? 'it has no internal snapshots' : `its snapshots (ID name): ${snapshots.map((s) => `${s.id} ${s.name}`).join(', ')}`;
  return new QmountError('ENOENT', `${image}: no snapshot with ID or name "${ref}"; ${list}`);
}

/**
 * A read-only disk showing snapshot `snap` of the image behind `base`.
 * `ownsBase`: closing it closes `base` (for -l); snapshot files of a mount
 * share the mount's driver and leave it open.
 */
export async function openSnapshotDisk(base: BlockDriver, snap: Qcow2Snapshot, ownsBase: boolean): Promise<BlockDriver> {
  const s = qcow2StateOf(base);
  if (!s) throw new QmountError('ENOTSUP', `${base.filename}: internal snapshots exist only in qcow2 images`);
  const size = snap.guestSize ?? s.virtualSize;
  const needed = Math.ceil(size / s.g.l2Span);
  const l1 = Buffer.alloc(Math.max(needed, snap.l1Size) * L1E_BYTES);
  if (snap.l1Size > 0) {
    const n = await s.file.read(l1, 0, snap.l1Size * L1E_BYTES, snap.l1TableOffset);
    if (n < snap.l1Size * L1E_BYTES) throw new QmountError('EIO', `snapshot "${snap.name}": L1 table lies past the end of the file`);
  }
  const header = { ...s.header, size, l1Size: l1.length / L1E_BYTES, l1TableOffset: snap.l1TableOffset };
  const state = new Qcow2State(s.file, s.dataFile, header, s.g, l1, s.snapshots, s.backing, s.fileSize, SNAPSHOT_L2_CACHE_BYTES, s.log.child({ snapshot: snap.id }));
  state.dataFileSize = s.dataFileSize;
  return new SnapshotDisk(base, state, snap, ownsBase);
}

class SnapshotDisk implements BlockDriver {
  readonly format = 'qcow2' as const;
  readonly readOnly = true;
  private closed = false;

  constructor(
    private readonly base: BlockDriver,
    readonly s: Qcow2State,
    readonly snapshot: Qcow2Snapshot,
    private readonly ownsBase: boolean,
  ) {}

  get filename(): string {
    return this.base.filename;
  }

  get virtualSize(): number {
    return this.s.virtualSize;
  }

  read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    try {
      checkRequest(this, 'read', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err);
    }
    return readGuest(this.s, buf, bufOffset, length, guestOffset);
  }

  write(): Promise<void> {
    return Promise.reject(new QmountError('EROFS', `snapshot "${this.snapshot.name}" is read-only`));
  }

  async flush(): Promise<void> {
    if (this.closed) throw new QmountError('EBADF', `${this.filename}: flush after close`);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.ownsBase) await this.base.close();
  }

  info(): ImageInfo {
    return { ...this.base.info(), virtualSize: this.virtualSize };
  }

  blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    try {
      checkRequest(this, 'read', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err);
    }
    return blockStatus(this.s, guestOffset, length);
  }

  writeZeroes(): Promise<void> {
    return this.write();
  }

  resize(): Promise<void> {
    return this.write();
  }

  /** An upper bound (st_blocks of a snapshot file): the snapshot's own data is not counted. */
  allocatedBytes(): number {
    return this.virtualSize;
  }
}

/** Longest file name most file systems (and FUSE's lookup) take, in bytes. */
const MAX_NAME_BYTES = 255;

function usableName(name: string): boolean {
  return (
    name !== '' &&
    name !== '.' &&
    name !== '..' &&
    !name.includes('/') &&
    !/[\u0000-\u001f\u007f-\u009f]/.test(name) &&
    Buffer.byteLength(`${name}.raw`, 'utf8') <= MAX_NAME_BYTES
  );
}

/**
 * File names for the snapshots/ directory, one per snapshot in table order:
 * - a name that is usable (not empty, not . or .., no '/', no control
 *   characters, short enough) and held by no other snapshot: NAME.raw;
 * - otherwise (duplicate or unusable): id-ID.raw when the ID is usable,
 *   unique and that name is not taken;
 * - failing that: index-N.raw (N: the entry's position in the table, from 0).
 * Stable for a given snapshot table.
 */
export function snapshotFileNames(snapshots: readonly Qcow2Snapshot[]): string[] {
  const count = (key: (s: Qcow2Snapshot) => string, v: string): number => snapshots.filter((s) => key(s) === v).length;
  const names = snapshots.map((s) => (usableName(s.name) && count((x) => x.name, s.name) === 1 ? `${s.name}.raw` : undefined));
  const taken = new Set(names.filter((n): n is string => n !== undefined));
  return snapshots.map((s, i) => {
    const n = names[i];
    if (n !== undefined) return n;
    const byId = `id-${s.id}.raw`;
    if (usableName(`id-${s.id}`) && count((x) => x.id, s.id) === 1 && !taken.has(byId)) {
      taken.add(byId);
      return byId;
    }
    let byIndex = `index-${i}.raw`;
    while (taken.has(byIndex)) byIndex = `_${byIndex}`;
    taken.add(byIndex);
    return byIndex;
  });
}
