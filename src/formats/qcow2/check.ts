/**
 * `qmount check` for qcow2: refcounts against references (snapshots,
 * compressed clusters, bitmaps included), L1/L2 alignment and bounds, COPIED
 * flags - see refscan.ts and repair.ts. `--repair leaks` fixes refcounts that
 * are too high; `--repair all` also those too low and the flags, then clears
 * the dirty and corrupt bits once nothing is left to fix.
 */
import { ImageFile } from '../../io/file.js';
import type { Logger } from '../../log.js';
import type { WorkHooks } from '../../progress.js';
import { DEFAULT_L2_CACHE_BYTES, DEFAULT_REFCOUNT_CACHE_BYTES, type CheckReport, type RepairMode } from '../driver.js';
import { lockForUse } from '../image-lock.js';
import { loadQcow2 } from './driver.js';
import { Refcounts } from './refcount.js';
import { reconcile } from './repair.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, incompatibleField } from './spec.js';

export async function checkQcow2(path: string, opts: { repair: RepairMode; log: Logger; hooks?: WorkHooks; forceShare?: boolean }): Promise<CheckReport> {
  const readOnly = opts.repair === 'none';
  const file = await ImageFile.open(path, { readOnly });
  try {
    lockForUse(file, path, path, { readOnly, forceShare: opts.forceShare }); // like qemu-img check (../image-lock.ts)
    const s = await loadQcow2(
      file,
      { readOnly, l2CacheBytes: DEFAULT_L2_CACHE_BYTES, refcountCacheBytes: DEFAULT_REFCOUNT_CACHE_BYTES, log: opts.log },
      true,
    );
    const table = Buffer.alloc(s.header.refcountTableClusters * s.g.clusterSize);
    await file.read(table, 0, table.length, s.header.refcountTableOffset);
    const rc = new Refcounts(s, table, DEFAULT_REFCOUNT_CACHE_BYTES);
    const r = await reconcile(s, rc, { leaks: opts.repair !== 'none', corruptions: opts.repair === 'all' }, opts.hooks, readOnly ? 'checking' : 'repairing');
    const corruptions = r.corruptions - r.fixedCorruptions;
    const leaks = r.leaks - r.fixedLeaks;
    if (!readOnly) {
      await rc.cache.flush();
      await s.l2Cache.flush();
      await rc.cache.flush();
      const bits = BigInt(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
      if (opts.repair === 'all' && corruptions === 0 && (s.header.incompatible & bits) !== 0n) {
        const [at, field] = incompatibleField(s.header.incompatible & ~bits);
        await file.write('header_update', field, 0, field.length, at);
        await file.flush();
      }
    }
    await s.dataFile?.close().catch(() => {});
    return {
      format: 'qcow2',
      corruptions,
      leaks,
      fixedCorruptions: r.fixedCorruptions,
      fixedLeaks: r.fixedLeaks,
      messages: r.messages,
      // qemu-img: the end of the highest cluster with a refcount or a reference.
      imageEndOffset: (r.highestCluster + 1) * s.g.clusterSize,
      frag: r.frag,
    };
  } finally {
    await file.close();
  }
}
