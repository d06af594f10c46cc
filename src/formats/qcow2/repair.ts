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
import os from 'node:os';
import { CorruptionError } from '../../errors.js';
import { INVALID_OFFSET } from '../u64.js';
import type { Refcounts } from './refcount.js';
import { checkpoint, type WorkHooks } from '../../progress.js';
import type { FragInfo } from '../driver.js';
import { scanReferences } from './refscan.js';
import type { Qcow2State } from './state.js';
import { clusterType, entryOffset, hasHostCluster, L2E_COPIED, writeEntry } from './spec.js';

export interface RefcountReport {
  corruptions: number;
  leaks: number;
  fixedCorruptions: number;
  fixedLeaks: number;
  messages: string[];
  frag: FragInfo;
  /** Highest cluster index with a refcount or a reference (qemu-img's image end offset is the next one's offset). */
  highestCluster: number;
}

export async function reconcile(
  s: Qcow2State,
  rc: Refcounts,
  fix: { leaks: boolean; corruptions: boolean },
  hooks?: WorkHooks,
  label = 'checking',
): Promise<RefcountReport> {
  const r0 = { corruptions: 0, leaks: 0, fixedCorruptions: 0, fixedLeaks: 0, messages: [] as string[] };
  const note = (m: string): void => {
    if (r0.messages.length < 200) r0.messages.push(m);
  };
  const cs = s.g.clusterSize;
  const blocks: number[] = [];
  /** refcount blocks that cannot be used: their clusters' refcounts are unknown */
  const badBlocks = new Set<number>();
  for (let i = 0; i < rc.tableEntries; i++) {
    const why = rc.blockProblem(i);
    if (why) {
      r0.corruptions++;
      note(`ERROR refcount table entry ${i}: refcount block ${why}`);
      badBlocks.add(i);
      continue;
    }
    const b = rc.blockOffset(i);
    if (b !== 0) blocks.push(b);
  }
  // Progress in bytes of metadata: every L2 table the scan reads, then every refcount block compared.
  const perBlock = s.g.refblockEntries;
  let scanTables = 0;
  const report = hooks?.progress;
  const onTable = report
    ? (read: number, total: number): void => {
        scanTables = total;
        report(label, read * cs, (total + Math.ceil(Math.ceil(s.fileSize / cs) / perBlock)) * cs);
      }
    : undefined;
  const scan = await scanReferences(s, { offset: rc.tableOffset, clusters: rc.tableClusters, blocks }, hooks, onTable);
  for (const p of scan.problems) {
    r0.corruptions++;
    note(`ERROR ${p.message}`);
  }
  const r: RefcountReport = { ...r0, frag: scan.frag, highestCluster: 0 };
  // Like qemu-img, only clusters inside the file are compared: a refcount
  // past the end describes space that does not exist yet, which costs nothing.
  const total = scan.clusters;
  if (fix.corruptions || fix.leaks) rc.freeHintIndex = Math.max(rc.freeHintIndex, total);
  const counts = scan.counts;
  const copied = scan.copied;
  /** An active L2 entry's COPIED flag disagrees with its cluster's refcount (after repair): re-read the tables below. */
  let copiedTrouble = false;
  const blockCount = Math.ceil(total / perBlock);
  const order = s.g.refcountOrder;
  // The block is compared from a copy taken when it is loaded: a repair
  // changes only the entry it repairs (new refcount blocks go past the
  // compared range, see freeHintIndex above), whose new value `final` is known.
  // With 16-bit refcounts (the default) the copy is byte-swapped to native
  // order and read as a Uint16Array.
  const copy = Buffer.alloc(cs);
  const u16 = new Uint16Array(copy.buffer, copy.byteOffset, cs >>> 1);
  const swap = order === 4 && os.endianness() === 'LE';
  // One refcount block at a time, its entries compared in a synchronous
  // loop: one await per block, not per cluster (a 1 TiB image has 16M clusters).
  for (let blk = 0; blk < blockCount; blk++) {
    await checkpoint(hooks, label);
    report?.(label, (scanTables + blk + 1) * cs, (scanTables + blockCount) * cs);
    if (badBlocks.has(blk)) continue; // reported above; nothing in it can be compared
    const first = blk * perBlock;
    const last = Math.min(total, first + perBlock);
    const block = await rc.block(blk); // null: no block, every refcount 0
    if (block) {
      block.copy(copy);
      if (swap) copy.swap16();
    }
    for (let c = first; c < last; c++) {
      let actual: number;
      if (block === null) {
        c = counts.nextNonZero(c, last);
        if (c >= last) break;
        actual = 0;
      } else if (swap) {
        actual = u16[c - first]!;
      } else {
        actual = rc.readEntry(copy, c - first);
      }
      const expected = counts.get(c);
      if (actual === 0 && expected === 0) continue;
      r.highestCluster = c;
      let final = actual;
      if (actual !== expected && (await mismatch(c, actual, expected))) final = expected;
      if (copied && expected !== 0 && (final === 1 ? copied.clear.has(c) : copied.set.has(c))) copiedTrouble = true;
    }
  }

  /** Count (and with `fix`, repair) one refcount that differs from the references; true if repaired. */
  async function mismatch(c: number, actual: number, expected: number): Promise<boolean> {
    const leak = actual > expected;
    if (leak) r.leaks++;
    else r.corruptions++;
    const doFix = leak ? fix.leaks : fix.corruptions;
    note(`${doFix ? 'Repairing' : leak ? 'Leaked' : 'ERROR'} cluster ${c} refcount=${actual === INVALID_OFFSET ? '(2^52 or more)' : actual} reference=${expected}`);
    if (!doFix) return false;
    await rc.set(c, expected);
    if (leak) r.fixedLeaks++;
    else r.fixedCorruptions++;
    return true;
  }

  // COPIED flags in the active L1 and L2 tables. The data clusters' flags
  // were compared with the refcounts above from the scan's bits; the L2
  // tables are read again only to find (and fix) entries that disagree.
  const rereadL2 = copiedTrouble || copied === undefined;
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
    if (!rereadL2) continue;
    // A copy to read across the awaits below; the fixes go into the cached table through one modify().
    const copy = await s.l2With(l2, (table) => Buffer.from(table));
    const fixes: Array<[at: number, hi: number]> = [];
    for (let j = 0; j < s.g.l2Entries; j++) {
      const at = j * s.g.l2EntryBytes;
      const hi = copy.readUInt32BE(at);
      const lo = copy.readUInt32BE(at + 4);
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
        fixes.push([at, (wantCopied ? hi | L2E_COPIED : hi & ~L2E_COPIED) >>> 0]);
        r.fixedCorruptions++;
      }
    }
    if (fixes.length > 0) {
      await s.l2Modify(l2, (table) => {
        for (const [at, hi] of fixes) table.writeUInt32BE(hi, at);
      });
    }
  }
  return r;
}

/**
 * Repair a dirty image before a read-write mount; refuses what it cannot
 * fix, with one error and no log line before it (a refused open is one
 * line of output); a successful rebuild is logged once, as a warning.
 * Interrupted (hooks.signal), it stops between two tables or blocks with an
 * InterruptedError: nothing is flushed and the dirty bit stays set, so the
 * next open rebuilds again (fixes already evicted from the cache are
 * refcounts made right, harmless while the image is dirty).
 */
export async function repairRefcounts(s: Qcow2State, rc: Refcounts, hooks?: WorkHooks): Promise<void> {
  s.log.info({}, 'image was not closed cleanly (dirty bit set): rebuilding refcounts');
  const r = await reconcile(s, rc, { leaks: true, corruptions: true }, hooks, 'rebuilding refcounts');
  if (r.corruptions > r.fixedCorruptions) {
    const first = r.messages.find((m) => m.startsWith('ERROR')) ?? r.messages[0] ?? 'unknown problem';
    throw new CorruptionError(
      `image was not closed cleanly and its refcounts cannot be rebuilt: ${first.replace(/^ERROR /, '')}; mount it read-only (-r) to recover data`,
    );
  }
  s.log.warn({ fixedLeaks: r.fixedLeaks, fixedCorruptions: r.fixedCorruptions }, 'image was not closed cleanly (dirty bit set): refcounts rebuilt');
}
