/**
 * A write-back cache of fixed-size metadata tables (L2 tables, refcount
 * blocks), keyed by the table's byte offset in its file. It knows nothing of
 * formats: a TableStore supplied by the driver reads, writes and syncs.
 *
 * The mechanism of write ordering (callers declare, the cache enforces;
 * which orders a format needs is the format's to say - qcow2: commit.ts):
 *
 *  - `dependOn(other)`: before any dirty table of this cache is written,
 *    every dirty table of `other` is written AND synced. A cache depends on
 *    at most one other cache; declaring a new dependency first flushes
 *    whatever would otherwise form a chain or cycle, so the dependency graph
 *    never has a cycle and a flush always terminates.
 *    A flush that also makes the store's own pointers to the tables durable
 *    (TableStore.synced) does so before it returns, so it is part of the
 *    "written AND synced" a dependent cache waits for.
 *  - `dependOnSync()`: before any dirty table of this cache is written, the
 *    store is synced (data written by the caller, e.g. a copy-on-write, is
 *    durable before the table entry pointing at it).
 *  - A table is never evicted while dirty: dirty tables are pinned outside the
 *    LRU until written. Clean tables are evicted in LRU order within maxBytes.
 *  - A write snapshots the table first, so a caller that modifies a table
 *    while its write-back is in flight never tears the on-disk copy; the
 *    modification re-marks it dirty.
 *
 * Borrowing. A table is changed only inside `modify(key, change)`, and read
 * by the engine's locked paths inside `with(key, use)`: the synchronous
 * callback gets the cache's own copy (modify marks it dirty after), and the
 * callbacks' type refuses an async function, so no caller can read or change
 * a table across an await - after one, the buffer may have been evicted,
 * re-read or replaced by a newer copy. `get()` and `peek()` hand out the
 * buffer itself, for the hot read paths: read it synchronously right after
 * the call, never change it. `scan(key, use)` borrows like with() for a
 * one-off pass over many tables: a table not cached is read beside the cache
 * and not installed, so the pass never evicts the working set.
 */
import { LRUCache } from 'lru-cache';
import { Mutex } from './mutex.js';

export interface TableStore {
  read(key: number, into: Buffer): Promise<void>;
  write(key: number, data: Buffer): Promise<void>;
  /** Make all earlier writes to the underlying file(s) durable. */
  sync(): Promise<void>;
  /**
   * Called by flush() after its sync, under the flush lock: every table
   * written so far is durable now, so the owner may write (and sync) what
   * points at them on disk (qcow2: refcount table entries of new blocks).
   */
  synced?(): Promise<void>;
}

/** A borrowing callback's result: anything but a promise (the table is lent only while the callback runs). */
export type Sync<T> = T & (T extends PromiseLike<unknown> ? never : unknown);

export interface TableCacheOptions {
  name: string;
  tableBytes: number;
  maxBytes: number;
  store: TableStore;
}

export class TableCache {
  readonly name: string;
  readonly tableBytes: number;
  private readonly store: TableStore;
  private readonly lru: LRUCache<number, Buffer>;
  private readonly dirty = new Map<number, Buffer>();
  /** Tables being written back: still served from memory, never re-read mid-write. */
  private readonly writing = new Map<number, Buffer>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  private readonly flushLock = new Mutex();
  private dependency: TableCache | null = null;
  private needsSync = false;
  private readonly maxDirty: number;
  /** Statistics for tests and benchmarks. */
  readonly stats = { hits: 0, misses: 0, writes: 0, flushes: 0 };

  constructor(opts: TableCacheOptions) {
    this.name = opts.name;
    this.tableBytes = opts.tableBytes;
    this.store = opts.store;
    const entries = Math.max(4, Math.floor(opts.maxBytes / opts.tableBytes));
    this.lru = new LRUCache<number, Buffer>({ max: entries });
    this.maxDirty = Math.max(2, entries >> 1);
  }

  get capacity(): number {
    return this.lru.max;
  }

  get dirtyCount(): number {
    return this.dirty.size;
  }

  get cachedCount(): number {
    return this.lru.size;
  }

  /** The table if cached (no I/O). */
  peek(key: number): Buffer | undefined {
    return this.dirty.get(key) ?? this.writing.get(key) ?? this.lru.get(key);
  }

  /** The table, loaded through the store on a miss. Concurrent misses share one read. */
  async get(key: number): Promise<Buffer> {
    const hit = this.dirty.get(key) ?? this.writing.get(key) ?? this.lru.get(key);
    if (hit) {
      this.stats.hits++;
      return hit;
    }
    let p = this.loading.get(key);
    if (!p) {
      this.stats.misses++;
      p = this.load(key);
      this.loading.set(key, p);
    }
    return p;
  }

  private async load(key: number): Promise<Buffer> {
    try {
      const buf = Buffer.allocUnsafe(this.tableBytes);
      await this.store.read(key, buf);
      // Another caller may have installed a newer version meanwhile.
      const now = this.dirty.get(key) ?? this.writing.get(key) ?? this.lru.peek(key);
      if (now) return now;
      this.lru.set(key, buf);
      return buf;
    } finally {
      this.loading.delete(key);
    }
  }

  /** Borrow the table at `key` (loaded on a miss) for reading, inside the synchronous `use`. */
  async with<T>(key: number, use: (table: Buffer) => Sync<T>): Promise<T> {
    const loaded = await this.get(key);
    return use(this.peek(key) ?? loaded);
  }

  /**
   * Change the table at `key` (loaded on a miss) in place, inside the
   * synchronous `change`; it is marked dirty after (not when `change`
   * throws: check before changing anything).
   */
  async modify<T>(key: number, change: (table: Buffer) => Sync<T>): Promise<T> {
    const loaded = await this.get(key);
    const table = this.peek(key) ?? loaded;
    const r = change(table);
    this.markDirty(key, table);
    return r;
  }

  /**
   * Borrow the table at `key` for reading, inside the synchronous `use`,
   * without making it recent: the cached copy (dirty, being written, or
   * clean) when there is one, else a copy read through the store and not
   * installed. For a pass over many tables that must not evict the others.
   */
  async scan<T>(key: number, use: (table: Buffer) => Sync<T>): Promise<T> {
    const cached = this.dirty.get(key) ?? this.writing.get(key) ?? this.lru.peek(key);
    if (cached) return use(cached);
    const loading = this.loading.get(key);
    let table: Buffer;
    if (loading) {
      table = await loading;
    } else {
      table = Buffer.allocUnsafe(this.tableBytes);
      await this.store.read(key, table);
    }
    // Cached meanwhile (a newer copy, if it was changed): that one.
    return use(this.dirty.get(key) ?? this.writing.get(key) ?? this.lru.peek(key) ?? table);
  }

  /** Put a table the caller built (a new, copied or repaired table). */
  install(key: number, buf: Buffer, dirty: boolean): void {
    if (buf.length !== this.tableBytes) throw new RangeError(`${this.name}: table size mismatch`);
    this.lru.set(key, buf);
    if (dirty) this.dirty.set(key, buf);
    else this.dirty.delete(key);
  }

  /** `buf` (the table at key) was changed in place (by modify()). */
  private markDirty(key: number, buf: Buffer): void {
    this.dirty.set(key, buf);
    this.lru.set(key, buf);
  }

  /** Forget a table (its cluster was freed). Dirty content is dropped. */
  discard(key: number): void {
    this.dirty.delete(key);
    this.writing.delete(key);
    this.lru.delete(key);
  }

  /** Drop every table (after an error that leaves memory untrustworthy). */
  clear(): void {
    this.dirty.clear();
    this.lru.clear();
  }

  /** True when enough tables are dirty that the caller should write back. */
  get underPressure(): boolean {
    return this.dirty.size >= this.maxDirty;
  }

  /** See the ordering invariants above. */
  async dependOn(other: TableCache): Promise<void> {
    if (this.dependency === other) return;
    if (other.dependency) await other.flush();
    if (this.dependency) await this.flush();
    this.dependency = other;
  }

  dependOnSync(): void {
    this.needsSync = true;
  }

  /** Write every dirty table (honouring dependencies) without a final sync. */
  writeBack(): Promise<void> {
    return this.flushLock.run(() => this.writeBackLocked());
  }

  /** Write every dirty table (honouring dependencies), then sync. */
  flush(): Promise<void> {
    return this.flushLock.run(async () => {
      await this.writeBackLocked();
      await this.store.sync();
      if (this.store.synced) await this.store.synced();
      this.stats.flushes++;
    });
  }

  private async writeBackLocked(): Promise<void> {
    // Tables dirtied after this point wait for the next write-back, so a
    // steady stream of modifications cannot keep a flush from finishing.
    const pending = new Set(this.dirty.keys());
    for (;;) {
      for (const k of pending) if (!this.dirty.has(k)) pending.delete(k);
      if (pending.size === 0) {
        if (this.dirty.size > 0) return;
        // Nothing is dirty, so nothing is owed to the dependency: dropping it
        // here is what keeps a clean cache from closing a cycle.
        this.dependency = null;
        this.needsSync = false;
        return;
      }
      // Checked before every table, so a dependency declared while an
      // earlier table was being written still holds for the next one.
      const dep = this.dependency;
      if (dep) {
        await dep.flush();
        if (this.dependency === dep) this.dependency = null;
        continue;
      }
      if (this.needsSync) {
        this.needsSync = false;
        try {
          await this.store.sync();
        } catch (err) {
          this.needsSync = true;
          throw err;
        }
        continue;
      }
      const key = Math.min(...pending);
      pending.delete(key);
      const buf = this.dirty.get(key)!;
      this.dirty.delete(key);
      this.writing.set(key, buf);
      const snapshot = Buffer.from(buf);
      try {
        await this.store.write(key, snapshot);
        this.stats.writes++;
      } catch (err) {
        // Still dirty unless discarded meanwhile: a later flush retries.
        if (this.writing.get(key) === buf && !this.dirty.has(key)) this.dirty.set(key, buf);
        throw err;
      } finally {
        if (this.writing.get(key) === buf) {
          this.writing.delete(key);
          if (!this.dirty.has(key)) this.lru.set(key, buf);
        }
      }
    }
  }
}
