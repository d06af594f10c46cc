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
