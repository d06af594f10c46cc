/**
 * Where file I/O runs: inline on the event loop (a page-cache hit is a
 * plain copy, cheaper than two thread crossings) or on libuv's thread pool
 * (large writes; and everything while inline calls are seen to block).
 * ImageFile asks this module; it knows nothing of formats.
 */
import { performance } from 'node:perf_hooks';

/**
 * Large writes go to the thread pool. Copying a large write into new
 * page-cache pages takes long enough (1 MiB into a fresh part of the image:
 * ~600 µs here, page allocation and the file system's block reservation
 * included) that the two thread crossings are cheap beside it, and inline
 * the copies of the requests in flight run one after another on the event
 * loop's core while it answers nothing else; on the pool they run beside
 * the loop. Measured (alternating, 1 MiB sequential writes at qd4 into
 * unallocated space, 2 cores, 8 pairs): the pool 0.90x-1.51x of inline,
 * median 1.27x, ahead in 7 of 8, for ~90 µs more CPU per request
 * (README, Benchmarks). Reads stay inline at every size:
 * a page-cache hit is a plain copy (1 MiB reads on the pool cost 330-460 µs
 * of CPU per request against 260-300 inline, and were not faster); and 4 KiB
 * writes on the pool cost 80-110 µs of CPU per request against 50-56 inline.
 */
const LARGE_WRITE_BYTES = 256 * 1024;

function envBytes(v: string | undefined, dflt: number): number {
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : dflt;
}

/**
 * Inline I/O (every read, and writes below ioTuning.poolWritesFrom). A FUSE
 * request reaches the event loop (fuse3 reads /dev/fuse there; fuse-native
 * crosses from its FUSE thread and back); a pread/pwrite on libuv's thread
 * pool adds two more crossings (event loop -> worker -> event loop), which on a small
 * machine is most of a request's latency. A call the page cache satisfies
 * takes microseconds, so reads and writes run synchronously on the event
 * loop instead. What that risks is a call that waits for the disk: it stalls
 * the loop, and every other request with it, and calls that wait for the
 * disk one at a time lose the parallelism a disk needs. So each inline call
 * is timed against what a page-cache copy could take (SLOW_BASE_MS plus the
 * bytes at COPY_BYTES_PER_MS). SLOW_STRIKES slow calls in a row (one alone is
 * usually the event loop losing its CPU for a moment, not the disk) send this
 * file's calls to the thread pool for a back-off period. Then a probe: the
 * next PROBE_CALLS calls run inline; if more than half of them are slow the
 * period doubles (so the disk stalls the loop for at most a few calls per
 * period), else calls stay inline. A probe is several calls, not one,
 * because the first inline call after a stretch on the thread pool is often
 * slow by itself (cold caches, a CPU waking up): judged alone it kept a busy
 * mount on the thread pool for good. fdatasync, fstat, ftruncate (except
 * extend()) always use the thread pool.
 */
export const ioTuning = {
  /** QMOUNT_INLINE_IO=0 turns inline calls off (every call on the thread pool). */
  inline: process.env.QMOUNT_INLINE_IO !== '0',
  /**
   * Writes of at least this many bytes always use the thread pool (see
   * LARGE_WRITE_BYTES); QMOUNT_POOL_WRITES_FROM overrides it (0: every
   * write, a huge number: none).
   */
  poolWritesFrom: envBytes(process.env.QMOUNT_POOL_WRITES_FROM, LARGE_WRITE_BYTES),
};
/** Faster than any disk read or write that is not a page-cache hit (NVMe: ~80 µs). */
const SLOW_BASE_MS = 0.05;
/** 1 GB/s: a page-cache copy is several times faster. */
const COPY_BYTES_PER_MS = 1e6;
const SLOW_STRIKES = 2;
const PROBE_CALLS = 8;
const BACKOFF_MIN_MS = 20;
const BACKOFF_MAX_MS = 2000;

/**
 * Totals over every ImageFile of the process (logged when a mount closes):
 * calls inline, on the pool, slow inline ones; fdatasyncs issued and
 * skipped (nothing changed since the last one, file.ts).
 */
export const ioCounters = { inline: 0, pooled: 0, slow: 0, syncs: 0, syncsSkipped: 0 };

export class InlinePolicy {
  /** 0: inline. Else calls go to the pool until this time, then a probe runs. */
  private asyncUntil = 0;
  private backoffMs = 0;
  /** Slow inline calls in a row (outside a probe). */
  private slowRun = 0;
  /** The probe after a back-off: calls left in it, and how many were slow. */
  private probeLeft = 0;
  private probeSlow = 0;
  /** Counters for tests and benchmarks. */
  readonly stats = { inline: 0, pooled: 0, slow: 0 };

  /** `now`: milliseconds, monotonic (tests pass a fake clock). */
  constructor(readonly now: () => number = () => performance.now()) {}

  /** May the next call run inline? */
  allowed(): boolean {
    if (!ioTuning.inline) return false;
    return this.asyncUntil === 0 || this.now() >= this.asyncUntil;
  }

  /** An inline call of `bytes` that started at `start` (this.now()) is over. */
  done(start: number, bytes: number): void {
    this.stats.inline++;
    ioCounters.inline++;
    const end = this.now();
    const slow = end - start > SLOW_BASE_MS + bytes / COPY_BYTES_PER_MS;
    if (slow) {
      this.stats.slow++;
      ioCounters.slow++;
    }
    if (this.asyncUntil !== 0) {
      // A probe call (allowed() let it through after the back-off period).
      if (slow) this.probeSlow++;
      this.probeLeft--;
      if (this.probeSlow > PROBE_CALLS / 2) this.backOff(end);
      else if (this.probeLeft <= 0) this.reset();
      return;
    }
    if (!slow) {
      this.slowRun = 0;
      return;
    }
    if (++this.slowRun >= SLOW_STRIKES) this.backOff(end);
  }

  private backOff(now: number): void {
    this.backoffMs = Math.min(BACKOFF_MAX_MS, this.backoffMs === 0 ? BACKOFF_MIN_MS : this.backoffMs * 2);
    this.asyncUntil = now + this.backoffMs;
    this.slowRun = 0;
    this.probeLeft = PROBE_CALLS;
    this.probeSlow = 0;
  }

  private reset(): void {
    this.asyncUntil = 0;
    this.backoffMs = 0;
    this.slowRun = 0;
    this.probeLeft = 0;
    this.probeSlow = 0;
  }
}
