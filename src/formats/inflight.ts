/**
 * Guest clusters in flight: the registry qcow2 and QED both keep of
 * allocating writes (qcow2: any write that changes a cluster's mapping -
 * allocation, copy-on-write, materialising zero or unallocated
 * subclusters; QED: allocating writes).
 *
 * The invariant, kept by every caller:
 *  - A guest cluster is registered in the same critical section (under the
 *    driver's metadata lock) that decided to change its mapping, and settled
 *    in the one that links the new mapping - or undoes the attempt. Between
 *    the two its mapping is this request's alone: the data I/O in between
 *    (copy-on-write reads, the data write) runs without the lock.
 *  - Any request that would decide about a registered cluster's mapping
 *    (another allocating write, a write-zeroes or discard) first waits for
 *    it to settle, then decides again from scratch, under the lock: the
 *    mapping it waited for may have changed. A lock-free path (qcow2's
 *    direct write) never acts on a registered cluster: it takes the locked
 *    path instead.
 * So no guest cluster is allocated twice, and no write lands in a cluster
 * whose mapping is being replaced.
 *
 * Indexes are guest cluster indexes (guest offset / cluster size).
 */

interface Pending {
  promise: Promise<void>;
  resolve: () => void;
}

export class InflightClusters {
  private readonly clusters = new Map<number, Pending>();

  /** Is guest cluster `clusterIndex` in flight? */
  has(clusterIndex: number): boolean {
    return this.clusters.has(clusterIndex);
  }

  /** A promise that settles when the first in-flight cluster of [firstClusterIndex, lastClusterIndex] settles; null when none is in flight. */
  waitFor(firstClusterIndex: number, lastClusterIndex: number): Promise<void> | null {
    for (let ci = firstClusterIndex; ci <= lastClusterIndex; ci++) {
      const p = this.clusters.get(ci);
      if (p) return p.promise;
    }
    return null;
  }

  /** Register guest clusters [firstClusterIndex, +count), settled together (under the lock, with the decision). */
  register(firstClusterIndex: number, count = 1): void {
    let resolve!: () => void;
    const promise = new Promise<void>((r) => (resolve = r));
    const p: Pending = { promise, resolve };
    for (let i = 0; i < count; i++) this.clusters.set(firstClusterIndex + i, p);
  }

  /** The mapping of [firstClusterIndex, +count) is linked (or the attempt undone): wake their waiters. Clusters not in flight are ignored. */
  settle(firstClusterIndex: number, count = 1): void {
    for (let i = 0; i < count; i++) {
      const ci = firstClusterIndex + i;
      const p = this.clusters.get(ci);
      if (p) {
        this.clusters.delete(ci);
        p.resolve();
      }
    }
  }
}
