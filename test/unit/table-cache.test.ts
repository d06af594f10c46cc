import { describe, expect, it } from 'vitest';
import { TableCache, type TableStore } from '../../cache/table-cache.js';

const TB = 16; // table bytes: small so contents are easy to compare

interface Ev {
  store: string;
  op: 'read' | 'write' | 'sync';
  key?: number;
  data?: Buffer;
}

/** A deferred promise: tests hold a store operation open and release it later. */
function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

const tick = () => new Promise<void>((r) => setImmediate(r));

/**
 * An in-memory TableStore recording every read, write and sync, in order,
 * into a log that several stores may share (to check cross-cache ordering).
 */
class MemStore implements TableStore {
  readonly disk = new Map<number, Buffer>();
  reads = 0;
  /** Keys whose next write fails (each entry is consumed once). */
  failNext: number[] = [];
  /** When set, every read/write waits for this before completing. */
  readGate: Promise<void> | null = null;
  writeGate: Promise<void> | null = null;
  /** Called when a write starts (before the gate). */
  onWriteStart: ((key: number) => void) | null = null;

  constructor(
    readonly name: string,
    readonly log: Ev[] = [],
  ) {}

  /** The stored content of a table, filled with `fill` when never written. */
  content(key: number): Buffer {
    return this.disk.get(key) ?? Buffer.alloc(TB, key & 0xff);
  }

  async read(key: number, into: Buffer): Promise<void> {
    this.reads++;
    if (this.readGate) await this.readGate;
    this.content(key).copy(into);
    this.log.push({ store: this.name, op: 'read', key });
  }

  async write(key: number, data: Buffer): Promise<void> {
    this.onWriteStart?.(key);
    if (this.writeGate) await this.writeGate;
    await tick();
    const i = this.failNext.indexOf(key);
    if (i >= 0) {
      this.failNext.splice(i, 1);
      throw Object.assign(new Error(`injected write failure at ${key}`), { code: 'EIO' });
    }
    this.disk.set(key, Buffer.from(data));
    this.log.push({ store: this.name, op: 'write', key, data: Buffer.from(data) });
  }

  async sync(): Promise<void> {
    await tick();
    this.log.push({ store: this.name, op: 'sync' });
  }
}

function makeCache(name: string, tables: number, log?: Ev[]): { cache: TableCache; store: MemStore } {
  const store = new MemStore(name, log);
  const cache = new TableCache({ name, tableBytes: TB, maxBytes: tables * TB, store });
  return { cache, store };
}

/** Modify a table in place the way drivers do (modify: a synchronous change, then marked dirty). */
async function modify(cache: TableCache, key: number, byte: number): Promise<void> {
  await cache.modify(key, (t) => {
    t.fill(byte);
  });
}

/** Reject instead of hanging forever, so a deadlock is a test failure, not a timeout of the whole file. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([
    p,
    new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms (deadlock?)`)), ms)),
  ]);
}

const idx = (log: Ev[], pred: (e: Ev) => boolean) => log.findIndex(pred);
const lastIdx = (log: Ev[], pred: (e: Ev) => boolean) => {
  for (let i = log.length - 1; i >= 0; i--) if (pred(log[i])) return i;
  return -1;
};

describe('TableCache: lookups', () => {
  it('counts misses and hits and serves the stored content', async () => {
    const { cache, store } = makeCache('t', 8);
    store.disk.set(64, Buffer.alloc(TB, 0x5a));
    const a = await cache.get(64);
    expect(a.equals(Buffer.alloc(TB, 0x5a))).toBe(true);
    expect(cache.stats).toMatchObject({ hits: 0, misses: 1 });
    const b = await cache.get(64);
    expect(b).toBe(a);
    expect(cache.stats).toMatchObject({ hits: 1, misses: 1 });
    expect(store.reads).toBe(1);
    expect(cache.peek(64)).toBe(a);
    expect(cache.peek(128)).toBeUndefined();
    expect(store.reads).toBe(1);
  });

  it('concurrent get() of one key reads the store once and returns one buffer', async () => {
    const { cache, store } = makeCache('t', 8);
    const gate = deferred();
    store.readGate = gate.promise;
    const gets = [cache.get(7), cache.get(7), cache.get(7), cache.get(7)];
    await tick();
    gate.resolve();
    const bufs = await Promise.all(gets);
    expect(store.reads).toBe(1);
    for (const b of bufs) expect(b).toBe(bufs[0]);
    expect(cache.stats.misses).toBe(1);
  });

  it('a failed read is not cached: the next get() retries', async () => {
    const { cache, store } = makeCache('t', 8);
    let fail = true;
    const orig = store.read.bind(store);
    store.read = async (key, into) => {
      if (fail) {
        fail = false;
        throw new Error('read failed');
      }
      return orig(key, into);
    };
    await expect(cache.get(3)).rejects.toThrow('read failed');
    const t = await cache.get(3);
    expect(t.equals(Buffer.alloc(TB, 3))).toBe(true);
  });
});

describe('TableCache: eviction', () => {
  it('keeps at most maxBytes of clean tables, evicting least recently used first', async () => {
    const { cache, store } = makeCache('t', 4);
    expect(cache.capacity * TB).toBeLessThanOrEqual(4 * TB);
    for (const k of [0, 1, 2, 3]) await cache.get(k);
    expect(cache.cachedCount).toBe(4);
    await cache.get(0); // 0 is now most recently used; 1 is the LRU
    await cache.get(4); // evicts 1
    expect(cache.cachedCount * TB).toBeLessThanOrEqual(4 * TB);
    expect(cache.peek(1)).toBeUndefined();
    expect(cache.peek(0)).toBeDefined();
    const reads = store.reads;
    await cache.get(0);
    expect(store.reads).toBe(reads); // hit
    await cache.get(1);
    expect(store.reads).toBe(reads + 1); // miss: was evicted
    for (let k = 10; k < 50; k++) await cache.get(k);
    expect(cache.cachedCount * TB).toBeLessThanOrEqual(4 * TB);
  });

  it('never evicts a dirty table: it stays readable with its modified content and is written on flush', async () => {
    const { cache, store } = makeCache('t', 4);
    await modify(cache, 100, 0xd1);
    await modify(cache, 200, 0xd2);
    for (let k = 0; k < 40; k++) await cache.get(k); // far more than capacity
    expect(cache.dirtyCount).toBe(2);
    const reads = store.reads;
    expect((await cache.get(100)).equals(Buffer.alloc(TB, 0xd1))).toBe(true);
    expect(cache.peek(200)?.equals(Buffer.alloc(TB, 0xd2))).toBe(true);
    expect(store.reads).toBe(reads); // served from memory, not re-read (which would lose the change)
    await cache.flush();
    expect(store.disk.get(100)?.equals(Buffer.alloc(TB, 0xd1))).toBe(true);
    expect(store.disk.get(200)?.equals(Buffer.alloc(TB, 0xd2))).toBe(true);
    expect(cache.dirtyCount).toBe(0);
  });

  it('reports pressure once many tables are dirty', async () => {
    const { cache } = makeCache('t', 8);
    expect(cache.underPressure).toBe(false);
    for (let k = 0; k < 8; k++) await modify(cache, k, 1);
    expect(cache.underPressure).toBe(true);
    await cache.flush();
    expect(cache.underPressure).toBe(false);
  });
});

describe('TableCache: write-back', () => {
  it('flush writes every dirty table once, in key order, then syncs', async () => {
    const { cache, store } = makeCache('t', 8);
    await modify(cache, 48, 1);
    await modify(cache, 16, 2);
    await modify(cache, 32, 3);
    await cache.flush();
    const ops = store.log.filter((e) => e.op !== 'read').map((e) => `${e.op}${e.key ?? ''}`);
    expect(ops).toEqual(['write16', 'write32', 'write48', 'sync']);
    expect(cache.stats.writes).toBe(3);
    await cache.flush(); // nothing dirty: no writes
    expect(store.log.filter((e) => e.op === 'write')).toHaveLength(3);
  });

  it('a store write failure keeps the table dirty and a later flush retries it', async () => {
    const { cache, store } = makeCache('t', 8);
    await modify(cache, 1, 0xa1);
    await modify(cache, 2, 0xa2);
    await modify(cache, 3, 0xa3);
    store.failNext = [2];
    await expect(cache.flush()).rejects.toThrow('injected write failure');
    expect(store.disk.has(2)).toBe(false);
    expect(cache.dirtyCount).toBeGreaterThanOrEqual(1);
    // The content is still in memory, unchanged.
    expect(cache.peek(2)?.equals(Buffer.alloc(TB, 0xa2))).toBe(true);
    await cache.flush();
    expect(cache.dirtyCount).toBe(0);
    for (const k of [1, 2, 3]) expect(store.disk.get(k)?.equals(Buffer.alloc(TB, 0xa0 + k))).toBe(true);
  });

  it('a table modified during its write-back stays dirty; the write is an untorn snapshot', async () => {
    const { cache, store } = makeCache('t', 8);
    await modify(cache, 5, 0x11);
    const gate = deferred();
    store.writeGate = gate.promise;
    const started = deferred();
    store.onWriteStart = () => started.resolve();
    const flushing = cache.flush();
    await started.promise;
    // The write is in flight: change the table in memory.
    await cache.modify(5, (t) => {
      expect(t.equals(Buffer.alloc(TB, 0x11))).toBe(true);
      t.fill(0x22, 0, TB / 2);
    });
    store.writeGate = null;
    gate.resolve();
    await flushing;
    // What reached the store is the content when the write began, not a mix.
    expect(store.disk.get(5)?.equals(Buffer.alloc(TB, 0x11))).toBe(true);
    expect(cache.dirtyCount).toBe(1);
    expect((await cache.get(5)).subarray(0, TB / 2).equals(Buffer.alloc(TB / 2, 0x22))).toBe(true);
    await cache.flush();
    expect(cache.dirtyCount).toBe(0);
    expect(store.disk.get(5)?.subarray(0, TB / 2).equals(Buffer.alloc(TB / 2, 0x22))).toBe(true);
    expect(store.disk.get(5)?.subarray(TB / 2).equals(Buffer.alloc(TB / 2, 0x11))).toBe(true);
  });

  it('discard drops a dirty table: it is never written', async () => {
    const { cache, store } = makeCache('t', 8);
    await modify(cache, 9, 0x99);
    cache.discard(9);
    await cache.flush();
    expect(store.disk.has(9)).toBe(false);
    expect(cache.peek(9)).toBeUndefined();
  });

  // Regression (fixed in 7fbbf91). A table freed (discard)
  // while its write-back is in flight must not come back if that write fails;
  // it would later be written over a cluster that may belong to someone else.
  it('discard during an in-flight write that then fails does not resurrect the table', async () => {
    const { cache, store } = makeCache('t', 8);
    await modify(cache, 9, 0x99);
    const gate = deferred();
    store.writeGate = gate.promise;
    const started = deferred();
    store.onWriteStart = () => started.resolve();
    store.failNext = [9];
    const flushing = cache.flush();
    await started.promise;
    cache.discard(9);
    store.writeGate = null;
    gate.resolve();
    await expect(flushing).rejects.toThrow('injected write failure');
    expect(cache.dirtyCount).toBe(0);
    await cache.flush();
    expect(store.disk.has(9)).toBe(false);
  });

  it('clear() forgets everything: the next get() reads the store again', async () => {
    const { cache, store } = makeCache('t', 8);
    await cache.get(1);
    await modify(cache, 2, 0x77);
    cache.clear();
    expect(cache.dirtyCount).toBe(0);
    const reads = store.reads;
    expect((await cache.get(2)).equals(Buffer.alloc(TB, 2))).toBe(true);
    expect(store.reads).toBe(reads + 1);
  });

  it('install() of a dirty table is written on flush; a clean install is not', async () => {
    const { cache, store } = makeCache('t', 8);
    cache.install(30, Buffer.alloc(TB, 0x30), true);
    cache.install(31, Buffer.alloc(TB, 0x31), false);
    expect(() => cache.install(32, Buffer.alloc(TB + 1), true)).toThrow(RangeError);
    expect(store.reads).toBe(0);
    expect((await cache.get(31)).equals(Buffer.alloc(TB, 0x31))).toBe(true);
    await cache.flush();
    expect(store.disk.get(30)?.equals(Buffer.alloc(TB, 0x30))).toBe(true);
    expect(store.disk.has(31)).toBe(false);
  });
});

describe('TableCache: ordering between caches', () => {
  it("dependOn: the other cache's writes and a sync happen before any of this cache's writes", async () => {
    const log: Ev[] = [];
    const { cache: l2 } = makeCache('l2', 8, log);
    const { cache: rc } = makeCache('rc', 8, log);
    await modify(rc, 1, 1);
    await modify(rc, 2, 2);
    await l2.dependOn(rc);
    await modify(l2, 10, 3);
    await modify(l2, 11, 4);
    await l2.flush();
    const firstL2Write = idx(log, (e) => e.store === 'l2' && e.op === 'write');
    const lastRcWrite = lastIdx(log, (e) => e.store === 'rc' && e.op === 'write');
    const rcSync = idx(log, (e) => e.store === 'rc' && e.op === 'sync');
    expect(lastRcWrite).toBeGreaterThanOrEqual(0);
    expect(firstL2Write).toBeGreaterThan(lastRcWrite);
    expect(rcSync).toBeGreaterThan(lastRcWrite);
    expect(rcSync).toBeLessThan(firstL2Write);
    expect(rc.dirtyCount).toBe(0);
    expect(l2.dirtyCount).toBe(0);
  });

  it("synced(): runs after the flush's sync, and a dependent cache writes only after it returns", async () => {
    const log: Ev[] = [];
    const l2 = makeCache('l2', 8, log).cache;
    const rcStore = new MemStore('rc', log);
    // The owner's pointers to its tables (qcow2: refcount table entries), written once they are durable.
    Object.assign(rcStore, {
      synced: async () => {
        await tick();
        log.push({ store: 'rc', op: 'write', key: -1 });
      },
    });
    const rc = new TableCache({ name: 'rc', tableBytes: TB, maxBytes: 8 * TB, store: rcStore });
    await modify(rc, 1, 1);
    await l2.dependOn(rc);
    await modify(l2, 10, 3);
    await l2.flush();
    const rcSync = idx(log, (e) => e.store === 'rc' && e.op === 'sync');
    const pointers = idx(log, (e) => e.store === 'rc' && e.key === -1);
    const firstL2Write = idx(log, (e) => e.store === 'l2' && e.op === 'write');
    expect(rcSync).toBeGreaterThan(idx(log, (e) => e.store === 'rc' && e.key === 1));
    expect(pointers).toBeGreaterThan(rcSync);
    expect(firstL2Write).toBeGreaterThan(pointers);
    // writeBack() alone makes nothing durable: no synced() call.
    await modify(rc, 2, 2);
    await rc.writeBack();
    expect(log.filter((e) => e.key === -1)).toHaveLength(1);
  });

  it('dependOn is honoured by writeBack() too (not only flush)', async () => {
    const log: Ev[] = [];
    const { cache: a } = makeCache('a', 8, log);
    const { cache: b } = makeCache('b', 8, log);
    await modify(b, 1, 1);
    await a.dependOn(b);
    await modify(a, 2, 2);
    await a.writeBack();
    const ops = log.filter((e) => e.op !== 'read').map((e) => `${e.store}.${e.op}`);
    expect(ops).toEqual(['b.write', 'b.sync', 'a.write']);
  });

  // Regression (fixed in 7fbbf91). QEMU checks the dependency
  // before each table it writes; a dependency declared while a write-back is
  // in flight must still hold for the tables written after it.
  it('a dependency declared while a write-back is in flight holds for tables written after it', async () => {
    const log: Ev[] = [];
    const { cache: l2, store: l2Store } = makeCache('l2', 8, log);
    const { cache: rc } = makeCache('rc', 8, log);
    await modify(l2, 10, 0x10);
    await modify(l2, 20, 0x20);
    const gate = deferred();
    const started = deferred();
    l2Store.writeGate = gate.promise;
    l2Store.onWriteStart = () => started.resolve();
    const flushing = l2.flush();
    await started.promise; // table 10 is being written; 20 is still queued
    // A new allocation: refcount raised first, then the L2 entry (in table 20) points at it.
    await modify(rc, 1, 0x01);
    await l2.dependOn(rc);
    await modify(l2, 20, 0x21);
    l2Store.writeGate = null;
    gate.resolve();
    await within(flushing, 2000, 'l2.flush');
    await within(l2.flush(), 2000, 'second l2.flush');
    const write21 = idx(log, (e) => e.store === 'l2' && e.op === 'write' && e.key === 20 && e.data![0] === 0x21);
    const rcWrite = idx(log, (e) => e.store === 'rc' && e.op === 'write');
    const rcSync = idx(log, (e) => e.store === 'rc' && e.op === 'sync');
    expect(write21).toBeGreaterThanOrEqual(0);
    expect(rcWrite).toBeGreaterThanOrEqual(0);
    expect(rcSync).toBeGreaterThan(rcWrite);
    expect(write21).toBeGreaterThan(rcSync);
  });

  it('dependOnSync: the store is synced before the first table write, once', async () => {
    const { cache, store } = makeCache('t', 8);
    await modify(cache, 1, 1);
    cache.dependOnSync();
    await modify(cache, 2, 2);
    await cache.writeBack();
    let ops = store.log.filter((e) => e.op !== 'read').map((e) => `${e.op}${e.key ?? ''}`);
    expect(ops).toEqual(['sync', 'write1', 'write2']);
    await modify(cache, 3, 3);
    await cache.writeBack();
    ops = store.log.filter((e) => e.op !== 'read').map((e) => `${e.op}${e.key ?? ''}`);
    expect(ops).toEqual(['sync', 'write1', 'write2', 'write3']);
  });

  it('a chain is flushed when declared: a.dependOn(b) while b depends on c', async () => {
    const log: Ev[] = [];
    const { cache: a } = makeCache('a', 8, log);
    const { cache: b } = makeCache('b', 8, log);
    const { cache: c } = makeCache('c', 8, log);
    await modify(c, 1, 1);
    await b.dependOn(c);
    await modify(b, 2, 2);
    await within(a.dependOn(b), 2000, 'a.dependOn(b)');
    await modify(a, 3, 3);
    await within(a.flush(), 2000, 'a.flush');
    const ops = log.filter((e) => e.op !== 'read').map((e) => `${e.store}.${e.op}`);
    expect(ops.indexOf('c.sync')).toBeLessThan(ops.indexOf('b.write'));
    expect(ops.indexOf('b.sync')).toBeLessThan(ops.indexOf('a.write'));
  });

  it('dependOn both ways with dirty tables: no deadlock, the latest declaration orders the writes', async () => {
    const log: Ev[] = [];
    const { cache: l2 } = makeCache('l2', 8, log);
    const { cache: rc } = makeCache('rc', 8, log);
    // allocate: refcount up, then L2 entry
    await modify(rc, 1, 0x01);
    await l2.dependOn(rc);
    await modify(l2, 10, 0x10);
    // free: L2 entry cleared, then refcount down
    await within(rc.dependOn(l2), 2000, 'rc.dependOn(l2)');
    await modify(l2, 11, 0x11);
    await modify(rc, 2, 0x02);
    await within(Promise.all([rc.flush(), l2.flush()]), 2000, 'flush both');
    const at = (store: string, key: number) => idx(log, (e) => e.store === store && e.op === 'write' && e.key === key);
    const syncAfter = (store: string, i: number) => log.findIndex((e, j) => j > i && e.store === store && e.op === 'sync');
    // rc1 durable before l2.10 written
    expect(syncAfter('rc', at('rc', 1))).toBeLessThan(at('l2', 10));
    // l2.11 durable before rc2 written
    expect(syncAfter('l2', at('l2', 11))).toBeLessThan(at('rc', 2));
    expect(rc.dirtyCount + l2.dirtyCount).toBe(0);
  });

  // Regression (fixed in 7fbbf91). dependOn(other) flushes
  // `other` to break a would-be cycle, but a flush of a clean cache returns
  // before clearing its dependency, so a <-> b is left declared and the next
  // flush deadlocks on the two flush locks.
  it('dependOn both ways while the first cache is clean: no deadlock', async () => {
    const log: Ev[] = [];
    const { cache: a } = makeCache('a', 8, log);
    const { cache: b } = makeCache('b', 8, log);
    await a.dependOn(b); // a clean
    await within(b.dependOn(a), 2000, 'b.dependOn(a)');
    await modify(a, 1, 1);
    await modify(b, 2, 2);
    await within(Promise.all([a.flush(), b.flush()]), 2000, 'flush both');
    const ops = log.filter((e) => e.op !== 'read').map((e) => `${e.store}.${e.op}`);
    // b depends on a (the latest declaration): a written and synced before b written.
    expect(ops.indexOf('a.sync')).toBeLessThan(ops.indexOf('b.write'));
    expect(a.dirtyCount + b.dirtyCount).toBe(0);
  });
});

describe('TableCache: borrowing', () => {
  it('modify() changes the cached copy and marks it dirty; a throwing change marks nothing', async () => {
    const { cache, store } = makeCache('t', 8);
    expect(await cache.modify(3, (t) => (t[0] = 0x77))).toBe(0x77);
    expect(cache.dirtyCount).toBe(1);
    expect(await cache.with(3, (t) => t[0])).toBe(0x77);
    await cache.flush();
    expect(store.disk.get(3)?.[0]).toBe(0x77);
    await expect(
      cache.modify(4, () => {
        throw new Error('refused');
      }),
    ).rejects.toThrow('refused');
    expect(cache.dirtyCount).toBe(0);
  });

  it('with() lends the current copy even when the loaded buffer was evicted before the callback ran', async () => {
    const { cache } = makeCache('t', 4);
    const lent = cache.with(1, (t) => t);
    cache.install(1, Buffer.alloc(TB, 0x55), false); // a newer copy arrives while the load settles
    expect((await lent).equals(Buffer.alloc(TB, 0x55))).toBe(true);
  });

  it('scan() reads beside the cache: a miss is not installed and evicts nothing; a cached (dirty) copy is used', async () => {
    const { cache, store } = makeCache('t', 4);
    for (const k of [0, 1, 2, 3]) await cache.get(k);
    await modify(cache, 2, 0x42);
    const reads = store.reads;
    for (let k = 10; k < 20; k++) expect(await cache.scan(k, (t) => t[0])).toBe(k & 0xff);
    expect(store.reads).toBe(reads + 10);
    expect(cache.cachedCount).toBe(4);
    expect(await cache.scan(2, (t) => t[0])).toBe(0x42);
    for (const k of [0, 1, 3]) await cache.get(k);
    expect(store.reads).toBe(reads + 10); // the working set is still cached
  });
});
