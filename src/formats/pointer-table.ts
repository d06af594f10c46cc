/**
 * Pending pointer entries of an in-memory table of 8-byte entries (the qcow2
 * L1 and refcount tables, the QED L1 table) whose disk copy is updated only
 * at a flush, and the new tables they point at.
 *
 * The rule kept here: an entry reaches the disk only once what it points at
 * is durable. The table in memory is changed at once (reads and writes find
 * the new table or block); the entry is noted here with its target (a table
 * not written yet) and the value the disk still has. The owner's store
 * reports each target's write (written()). At the end of a flush, after a
 * sync that followed every write reported so far, the owner calls
 * writeReady(): the entries whose target was written are written - in one
 * write covering their span, where an entry between them whose target was
 * not gets the disk's old value, so the disk never names a target that is
 * not durable - and synced. Entries not ready wait for the next flush: their
 * targets were created while this flush ran, and nothing the flush owes its
 * caller depends on them.
 */

interface Pending {
  target: number;
  /** the entry's 8 bytes on disk, as they were when it first changed */
  before: Buffer;
}

export class PendingPointers {
  private readonly pending = new Map<number, Pending>();
  /** Targets noted and not written yet. */
  private readonly unwritten = new Set<number>();

  get size(): number {
    return this.pending.size;
  }

  /** Entry `index` of `table` is about to be set to point at the new table `target`: call before changing it in memory. */
  note(table: Buffer, index: number, target: number): void {
    this.unwritten.add(target);
    const known = this.pending.get(index);
    if (known) known.target = target;
    else this.pending.set(index, { target, before: Buffer.from(table.subarray(index * 8, index * 8 + 8)) });
  }

  /** True while the noted table `target` has not been written: its first write is the allocating one. */
  isNew(target: number): boolean {
    return this.unwritten.has(target);
  }

  /** The table `target` was written (its store's write completed). */
  written(target: number): void {
    this.unwritten.delete(target);
  }

  /**
   * Write the entries of `table` whose target was written, at
   * `write(span, firstIndex)`, then `sync()`. Returns how many were written.
   */
  async writeReady(table: Buffer, write: (span: Buffer, firstIndex: number) => Promise<void>, sync: () => Promise<void>): Promise<number> {
    const durable = (target: number): boolean => !this.unwritten.has(target);
    let first = Infinity;
    let last = -1;
    const ready: number[] = [];
    for (const [i, p] of this.pending) {
      if (!durable(p.target)) continue;
      ready.push(i);
      if (i < first) first = i;
      if (i > last) last = i;
    }
    if (ready.length === 0) return 0;
    const span = Buffer.from(table.subarray(first * 8, (last + 1) * 8));
    for (const [i, p] of this.pending) {
      if (i > first && i < last && !durable(p.target)) p.before.copy(span, (i - first) * 8);
    }
    await write(span, first);
    await sync();
    for (const i of ready) this.pending.delete(i);
    return ready.length;
  }
}
