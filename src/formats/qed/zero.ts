/**
 * QED write-zeroes and discard (docs/interop/qed_spec.rst "Zero data
 * clusters"). Rules, per guest cluster wholly inside the request:
 *
 *  - The new entry is what a never-written cluster with zeros needs: 0
 *    (unallocated) when no backing data lies under it, else 1 (the zero
 *    cluster value, which stops reads from going to the backing file).
 *    Backing data may never show through a zeroed range.
 *  - A data cluster with `unmap`: its entry takes that value and its host
 *    cluster is punched out of the image file. QED keeps no record of free
 *    space and this engine's allocator is append-only, so the host cluster is
 *    leaked: never referenced again and never handed out again while
 *    mounted, so a lock-free read or write that mapped it before the change
 *    reaches only those (punched) bytes, never another cluster's data.
 *    `qemu-img check` reports such clusters as leaks (exit 3), which the
 *    format allows; the next `qemu-img convert` or a `check -r` drops them.
 *  - A data cluster without `unmap`: zeros are written in place (fallocate
 *    ZERO_RANGE, else zeros); the mapping stays.
 *  - Unallocated and zero clusters: only the entry rule above (nothing is
 *    written when the entry already says it; nothing is ever allocated).
 * Partial clusters: zeros are written in place into data clusters, through
 * the ordinary (allocating) write where backing data would show, and not at
 * all where the cluster reads zeros already.
 *
 * Ordering: entries change under the metadata lock, after the need-check
 * bit is durable (the driver's rule 4), through the L2 cache like link();
 * a cluster whose allocating write is in flight is waited for first. The
 * punch is issued after the entry changed in memory and may reach the disk
 * before or after the L2 table: the host cluster belongs to this one entry,
 * so either order leaves that guest cluster reading its old data or zeros.
 */
import type { Mutex } from '../../../cache/mutex.js';
import type { ImageFile } from '../../io/file.js';
import type { BlockDriver } from '../driver.js';
import type { InflightClusters } from '../inflight.js';
import type { DataClusterCount } from './alloc.js';
import { QED_ZERO_CLUSTER, type QedGeometry } from './header.js';
import type { QedTables } from './table.js';

export interface ZeroContext {
  file: ImageFile;
  geo: QedGeometry;
  tables: QedTables;
  backing: BlockDriver | null;
  metaLock: Mutex;
  /** guest clusters of allocating writes in flight (../inflight.ts) */
  inflight: InflightClusters;
  count: DataClusterCount;
  markNeedCheckLocked(): Promise<void>;
  /** the metadata changed: arm the need-check idle timer */
  changedMetadata(): void;
  /** the driver's write (allocates, fills from the backing file) */
  write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void>;
  /** a write ending at host offset `end` completed */
  wrote(end: number): void;
}

/**
 * Make guest [guestOffset, +length) read zeros (range already checked).
 * `diskEnd` is the virtual size: a last cluster reaching past it counts as
 * whole when the range runs to the end of the disk.
 */
export async function zeroRange(c: ZeroContext, guestOffset: number, length: number, unmap: boolean, diskEnd: number): Promise<void> {
  const cs = c.geo.clusterSize;
  const end = guestOffset + length;
  const wholeEnd = end === diskEnd ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
  const wholeStart = Math.ceil(guestOffset / cs) * cs;
  if (wholeStart >= wholeEnd) {
    await zeroPartial(c, guestOffset, length);
    return;
  }
  if (guestOffset < wholeStart) await zeroPartial(c, guestOffset, wholeStart - guestOffset);
  await zeroClusters(c, wholeStart / cs, (wholeEnd - wholeStart) / cs, unmap);
  if (wholeEnd < end) await zeroPartial(c, wholeEnd, end - wholeEnd);
}

async function zeroPartial(c: ZeroContext, guestOffset: number, length: number): Promise<void> {
  let done = 0;
  while (done < length) {
    const at = guestOffset + done;
    const ext = await c.tables.map(at, length - done);
    if (ext.kind === 'data') {
      await c.file.writeZeroes('zero_write', ext.host, ext.bytes);
      c.wrote(ext.host + ext.bytes);
    } else if (ext.kind === 'unalloc' && c.backing && at < c.backing.virtualSize) {
      await c.write(Buffer.alloc(ext.bytes), 0, ext.bytes, at);
    }
    done += ext.bytes;
  }
}

/** Host ranges [offset, +length) from cluster offsets, contiguous ones merged. */
function runsOf(hosts: number[], cs: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const h of hosts) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === h) last[1] += cs;
    else out.push([h, cs]);
  }
  return out;
}

/**
 * Does a cluster with this entry read zeros already, so that zeroing it
 * changes nothing? Yes for the zero cluster value and for an unallocated
 * entry over no backing data; no for a data cluster (punched or zeroed in
 * place) and for an unallocated entry with backing data under it (it gets
 * the zero cluster value).
 */
function zeroAlready(entry: number, underBacking: boolean): boolean {
  return entry === QED_ZERO_CLUSTER || (entry === 0 && !underBacking);
}

async function zeroClusters(c: ZeroContext, firstCluster: number, count: number, unmap: boolean): Promise<void> {
  const g = c.geo;
  const cs = g.clusterSize;
  const backingEnd = c.backing ? c.backing.virtualSize : 0;
  const readsZero = (e: number, cluster: number): boolean => zeroAlready(e, cluster * cs < backingEnd);
  let cl = firstCluster;
  const endCluster = firstCluster + count;
  while (cl < endCluster) {
    const n = Math.min(endCluster - cl, g.tableEntries - (cl % g.tableEntries));
    const first = cl;
    // Lock-free, from memory: a span that reads zeros already needs nothing (nothing changes, so no order to keep
    // with requests in flight; an entry linked by an answered write is in memory).
    if (c.tables.everyCachedEntry(first, n, readsZero) === true) {
      cl += n;
      continue;
    }
    const plan = await c.metaLock.run(async (): Promise<{ wait: Promise<void> } | { punch: number[]; inPlace: number[] }> => {
      const busy = c.inflight.waitFor(first, first + n - 1);
      if (busy) return { wait: busy };
      const cur = await c.tables.entries(first, n);
      const next: number[] = [];
      const punch: number[] = [];
      const inPlace: number[] = [];
      let changed = false;
      for (let i = 0; i < n; i++) {
        const e = cur[i];
        const underBacking = (first + i) * cs < backingEnd;
        const zeroEntry = underBacking ? QED_ZERO_CLUSTER : 0;
        if (zeroAlready(e, underBacking)) {
          next.push(e);
        } else if (e === 0) {
          next.push(QED_ZERO_CLUSTER); // backing data lies under it: the zero cluster value hides it
          changed = true;
        } else if (unmap) {
          next.push(zeroEntry);
          punch.push(e);
          changed = true;
        } else {
          next.push(e);
          inPlace.push(e);
        }
      }
      if (changed) {
        await c.markNeedCheckLocked();
        await c.tables.setEntries(first, n, (i) => next[i]);
        if (punch.length > 0) c.count.changed(first, -punch.length);
      }
      return { punch, inPlace };
    });
    if ('wait' in plan) {
      await plan.wait;
      continue; // the cluster is linked now: look again
    }
    c.changedMetadata();
    for (const [host, len] of runsOf(plan.punch, cs)) await c.file.punchHole('punch_hole', host, len);
    for (const [host, len] of runsOf(plan.inPlace, cs)) {
      if (!(await c.file.zeroRange('zero_write', host, len))) await c.file.writeZeroes('zero_write', host, len);
      c.wrote(host + len);
    }
    cl += n;
  }
}
