/**
 * Reconciling refcounts with references (see refscan.ts for how references
 * are counted). `qemu-img check` semantics: a refcount above the reference
 * count is a leak; below it is a corruption; a COPIED flag that disagrees
 * with "refcount is exactly 1" in the active tables is a corruption.
 *
 * Repair writes through the same caches as the write path. It is run with
 * the dirty bit set (lazy refcounts) or on a checked image, so ordering
 * between refcount blocks and tables is not needed until the final flush.
 * New refcount blocks are placed after every referenced cluster.
 */
import { CorruptionError } from '../../errors.js';
import { INVALID_OFFSET } from '../u64.js';
import type { Refcounts } from './refcount.js';
import { scanReferences } from './refscan.js';
import type { Qcow2State } from './state.js';
import { clusterType, entryOffset, hasHostCluster, L2E_COPIED, writeEntry } from './spec.js';

export interface RefcountReport {
  corruptions: number;
  leaks: number;
  fixedCorruptions: number;
  fixedLeaks: number;
  messages: string[];
}

export async function reconcile(
  s: Qcow2State,
  rc: Refcounts,
  fix: { leaks: boolean; corruptions: boolean },
): Promise<RefcountReport> {
  const r: RefcountReport = { corruptions: 0, leaks: 0, fixedCorruptions: 0, fixedLeaks: 0, messages: [] };
  const note = (m: string): void => {
    if (r.messages.length < 200) r.messages.push(m);
  };
  const cs = s.g.clusterSize;
  const blocks: number[] = [];
  /** refcount blocks that cannot be used: their clusters' refcounts are unknown */
  const badBlocks = new Set<number>();
  for (let i = 0; i < rc.tableEntries; i++) {
    const why = rc.blockProblem(i);
    if (why) {
      r.corruptions++;
      note(`ERROR refcount table entry ${i}: refcount block ${why}`);
      badBlocks.add(i);
      continue;
    }
    const b = rc.blockOffset(i);
    if (b !== 0) blocks.push(b);
  }
  const scan = await scanReferences(s, { offset: rc.tableOffset, clusters: rc.tableClusters, blocks });
  for (const p of scan.problems) {
    r.corruptions++;
    note(`ERROR ${p.message}`);
  }
  // Like qemu-img, only clusters inside the file are compared: a refcount
  // past the end describes space that does not exist yet, which costs nothing.
  const total = scan.clusters;
  if (fix.corruptions || fix.leaks) rc.freeHint = Math.max(rc.freeHint, total);
  const perBlock = s.g.refblockEntries;
  // One refcount block at a time, its entries read synchronously: one
  // await per block, not per cluster (a 1 TiB image has 16M clusters).
  for (let blk = 0; blk * perBlock < total; blk++) {
    if (badBlocks.has(blk)) continue; // reported above; nothing in it can be compared
    const first = blk * perBlock;
    const last = Math.min(total, first + perBlock);
    let block = await rc.block(blk); // null: no block, every refcount 0
    for (let c = first; c < last; c++) {
      const expected = scan.counts[c]!;
      const actual = block ? rc.readEntry(block, c - first) : 0;
      if (actual === expected) continue;
      await mismatch(c, actual, expected);
      block = await rc.block(blk); // the buffer may have changed or moved during the await
    }
  }

  async function mismatch(c: number, actual: number, expected: number): Promise<void> {
    const leak = actual > expected;
    if (leak) r.leaks++;
    else r.corruptions++;
    const doFix = leak ? fix.leaks : fix.corruptions;
    note(`${doFix ? 'Repairing' : leak ? 'Leaked' : 'ERROR'} cluster ${c} refcount=${actual === INVALID_OFFSET ? '(2^52 or more)' : actual} reference=${expected}`);
    if (doFix) {
      await rc.set(c, expected);
      if (leak) r.fixedLeaks++;
      else r.fixedCorruptions++;
    }
  }

  // COPIED flags in the active L1 and L2 tables.
  for (let i = 0; i < s.l1Entries; i++) {
    const l2 = s.l2OffsetOf(i);
    if (l2 === 0 || l2 % cs !== 0 || l2 >= s.fileSize || badBlocks.has(Math.floor(l2 / cs / perBlock))) continue;
    const want = (await rc.get(l2 / cs)) === 1;
    if (want !== s.l1Copied(i)) {
      r.corruptions++;
      note(`${fix.corruptions ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} refcount flag mismatch`);
      if (fix.corruptions) {
        const e = Buffer.alloc(8);
        writeEntry(e, 0, want ? L2E_COPIED : 0, l2, 0);
        await s.file.write('l1_update', e, 0, 8, s.header.l1TableOffset + i * 8);
        e.copy(s.l1, i * 8);
        r.fixedCorruptions++;
      }
    }
    const table = await s.l2Table(l2);
    let changed = false;
    for (let j = 0; j < s.g.l2Entries; j++) {
      const at = j * s.g.l2EntryBytes;
      const hi = table.readUInt32BE(at);
      const lo = table.readUInt32BE(at + 4);
      const type = clusterType(s.g, hi, lo);
      if (!hasHostCluster(type)) continue; // unallocated, plain zero or compressed: COPIED means nothing
      const host = entryOffset(hi, lo);
      let wantCopied: boolean;
      if (s.g.hasDataFile) wantCopied = true; // data-file clusters are never shared
      else if (host % cs !== 0 || host >= s.fileSize || badBlocks.has(Math.floor(host / cs / perBlock))) continue;
      else wantCopied = (rc.peek(host / cs) ?? (await rc.get(host / cs))) === 1;
      if (wantCopied === ((hi & L2E_COPIED) !== 0)) continue;
      r.corruptions++;
      note(`${fix.corruptions ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry at ${l2 + at}`);
      if (fix.corruptions) {
        table.writeUInt32BE((wantCopied ? hi | L2E_COPIED : hi & ~L2E_COPIED) >>> 0, at);
        changed = true;
        r.fixedCorruptions++;
      }
    }
    if (changed) s.l2Cache.markDirty(l2, table);
  }
  return r;
}

/**
 * Repair a dirty image before a read-write mount; refuses what it cannot
 * fix, with one error and no log line before it (a refused open is one
 * line of output); a successful rebuild is logged once, as a warning.
 */
export async function repairRefcounts(s: Qcow2State, rc: Refcounts): Promise<void> {
  s.log.info({}, 'image was not closed cleanly (dirty bit set): rebuilding refcounts');
  const r = await reconcile(s, rc, { leaks: true, corruptions: true });
  if (r.corruptions > r.fixedCorruptions) {
    const first = r.messages.find((m) => m.startsWith('ERROR')) ?? r.messages[0] ?? 'unknown problem';
    throw new CorruptionError(
      `image was not closed cleanly and its refcounts cannot be rebuilt: ${first.replace(/^ERROR /, '')}; mount it read-only (-r) to recover data`,
    );
  }
  s.log.warn({ fixedLeaks: r.fixedLeaks, fixedCorruptions: r.fixedCorruptions }, 'image was not closed cleanly (dirty bit set): refcounts rebuilt');
}
