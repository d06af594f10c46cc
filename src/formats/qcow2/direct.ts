/**
 * Direct writes in flight, by host cluster.
 *
 * The fast path's invariant: a direct write - one that goes in place into a
 * host cluster the L2 entry says is this image's own (COPIED), without
 * holding the metadata lock or registering the guest cluster in flight
 * (Qcow2Writer.directWrite, the non-rewrite ops of a planned request, and
 * the zeros writeZeroes writes in place) - may still be in flight when the
 * mapping it acted on changes: writeZeroes with unmap, or a copy-on-write,
 * can drop that cluster's reference while the bytes are on their way. The
 * write may then land in a cluster that is no longer mapped (harmless:
 * nobody reads it), but never in one that was handed out again or punched.
 * So every direct write is counted here, by host cluster, from before it is
 * issued until it settled, and the quarantine (refcount.ts, invariant 3;
 * released by commit.ts, step 5) keeps every busy cluster out of the
 * allocator and unpunched until a flush finds it idle. The one exception
 * is a direct write done synchronously (Qcow2Writer.writeNow): it is
 * decided, issued and settled before the event loop runs anything else, so
 * no mapping change can come while it is in flight.
 *
 * With an external data file nothing is counted: data clusters there are
 * never refcounted nor freed.
 */
import type { ImageFile } from '../../io/file.js';
import type { IoPoint } from '../../io/points.js';
import type { Qcow2State } from './state.js';

export class DirectWrites {
  private readonly count = new Map<number, number>();

  constructor(private readonly s: Qcow2State) {}

  /** Is a direct write in flight on host cluster `clusterIndex`? (bound: passed around as a callback) */
  readonly busy = (clusterIndex: number): boolean => this.count.has(clusterIndex);

  begin(clusterIndex: number): void {
    this.count.set(clusterIndex, (this.count.get(clusterIndex) ?? 0) + 1);
  }

  end(clusterIndex: number): void {
    const n = this.count.get(clusterIndex)! - 1;
    if (n === 0) this.count.delete(clusterIndex);
    else this.count.set(clusterIndex, n);
  }

  /** The host cluster a direct write to `hostOffset` of `file` is counted on (-1: not counted, a data file). */
  clusterOf(file: ImageFile, hostOffset: number): number {
    return file === this.s.file ? Math.floor(hostOffset / this.s.g.clusterSize) : -1;
  }

  /**
   * Issue one direct write inside one host cluster (`buf` null: zeros),
   * counted until it settles. `begun`: the caller counted it already, in
   * the critical section that decided it (so no flush can come between the
   * decision and the count).
   */
  issue(file: ImageFile, point: IoPoint, buf: Buffer | null, bufOffset: number, length: number, hostOffset: number, begun = false): Promise<void> {
    const s = this.s;
    const c = this.clusterOf(file, hostOffset);
    if (c >= 0 && !begun) this.begin(c);
    const io = buf ? file.write(point, buf, bufOffset, length, hostOffset) : file.writeZeroes(point, hostOffset, length);
    return io.then(
      () => {
        if (c >= 0) this.end(c);
        s.noteDataEnd(file, hostOffset + length);
      },
      (err: unknown) => {
        if (c >= 0) this.end(c);
        throw err;
      },
    );
  }
}
