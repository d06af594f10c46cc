/**
 * QED space allocation: append only. QED has no refcounts, so a cluster is in
 * use exactly when a table entry points at it, and new clusters are taken
 * from the end of the file.
 *
 * Invariants:
 *  - `allocEnd` starts as the file size rounded up to a cluster (bytes after
 *    the last whole cluster are never overwritten) and only grows; a range
 *    handed out is never handed out again, even if the write into it fails
 *    (it is leaked, which the format allows).
 *  - `fileEnd` is the file's physical size as far as this process knows: it
 *    grows when a write past it completes. A data pointer at or past it is
 *    corrupt; one whose cluster straddles it reads zeros for the missing tail.
 */
export class AppendAllocator {
  allocEnd: number;
  fileEnd: number;

  constructor(
    fileSize: number,
    private readonly clusterSize: number,
  ) {
    this.fileEnd = fileSize;
    this.allocEnd = Math.ceil(fileSize / clusterSize) * clusterSize;
  }

  /** Reserve `clusters` contiguous clusters at the end of the file; returns the host offset. */
  alloc(clusters: number): number {
    const off = this.allocEnd;
    this.allocEnd += clusters * this.clusterSize;
    return off;
  }

  /** A write ending at `end` completed. */
  wrote(end: number): void {
    if (end > this.fileEnd) this.fileEnd = end;
  }
}

/**
 * How many data clusters the L2 tables map (for allocatedBytes), counted by
 * a background scan of the tables after open and then kept current.
 *
 * Invariant: `clusters` is exact for the L2 tables of L1 indexes below
 * `nextL1`. The scan counts one table at a time under the driver's metadata
 * lock, and every change of an entry (link, discard) also happens under it
 * and calls changed(): a change in a table already counted adjusts the
 * count, one in a table not yet counted is seen by the scan. So when `done`
 * the count is exact, with no lock held over the whole scan.
 */
export class DataClusterCount {
  clusters = 0;
  done = false;
  private nextL1 = 0;
  private scan: Promise<void> | null = null;
  private stopped = false;

  constructor(
    /** L2 entries per table */
    private readonly tableEntries: number,
    /** L1 entries */
    private readonly l1Entries: number,
    /** data clusters of one L2 table; runs under `locked` */
    private readonly countTable: (l1Index: number) => Promise<number>,
    private readonly locked: <T>(fn: () => Promise<T>) => Promise<T>,
  ) {}

  /** `delta` data clusters appeared (+) or went (-) at guest cluster `cluster`; caller holds the metadata lock. */
  changed(cluster: number, delta: number): void {
    if (Math.floor(cluster / this.tableEntries) < this.nextL1) this.clusters += delta;
  }

  /** Start the scan (once); resolves when it is over. A corrupt table stops it with the count incomplete. */
  ready(): Promise<void> {
    this.scan ??= (async () => {
      while (this.nextL1 < this.l1Entries && !this.stopped) {
        await this.locked(async () => {
          this.clusters += await this.countTable(this.nextL1);
          this.nextL1++;
        });
      }
      this.done = this.nextL1 >= this.l1Entries;
    })();
    return this.scan;
  }

  /** Stop scanning (close). */
  stop(): Promise<void> {
    this.stopped = true;
    return (this.scan ?? Promise.resolve()).catch(() => {});
  }
}
