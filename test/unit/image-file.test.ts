import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ReadOnlyError } from '../../src/errors.js';
import { checkRange, ImageFile, InlinePolicy, ioCounters, IoRangeError, ioTuning } from '../../src/io/file.js';
import { instrumentation } from '../../src/io/instrument.js';

/** A clock the test moves by hand; `step` is added on every reading. */
function fakeClock(step = 0): { now: () => number; t: number; step: number } {
  const c = {
    t: 1000,
    step,
    now: () => {
      const v = c.t;
      c.t += c.step;
      return v;
    },
  };
  return c;
}

describe('InlinePolicy', () => {
  it('stays inline while calls are fast', () => {
    const clock = fakeClock(0.01);
    const p = new InlinePolicy(clock.now);
    for (let i = 0; i < 100; i++) {
      expect(p.allowed()).toBe(true);
      p.done(clock.now(), 4096);
    }
    expect(p.stats).toEqual({ inline: 100, pooled: 0, slow: 0 });
  });

  it('two slow calls in a row send calls to the pool for a back-off; a probe of 8 calls, mostly slow, doubles it; mostly fast, ends it', () => {
    const clock = fakeClock();
    const p = new InlinePolicy(clock.now);
    const call = (ms: number): void => {
      const start = clock.now();
      clock.t += ms;
      p.done(start, 4096);
    };
    call(5); // one slow call: a hiccup, still inline
    expect(p.allowed()).toBe(true);
    call(0.01);
    call(5); // the fast call between broke the run
    expect(p.allowed()).toBe(true);
    call(5); // two in a row: 20 ms back-off
    expect(p.allowed()).toBe(false);
    clock.t += 19;
    expect(p.allowed()).toBe(false);
    clock.t += 1;
    // The probe: 5 slow calls of 8 fail it at the fifth; the back-off doubles to 40 ms.
    for (let i = 0; i < 5; i++) {
      expect(p.allowed()).toBe(true);
      call(i === 2 ? 0.01 : 5);
      if (i < 4) expect(p.allowed()).toBe(true);
    }
    call(5);
    expect(p.allowed()).toBe(false);
    clock.t += 39;
    expect(p.allowed()).toBe(false);
    clock.t += 1;
    // A probe whose first call is slow (as the first call after the pool often is) but
    // most are fast: inline again, back-off forgotten.
    call(5);
    for (let i = 0; i < 7; i++) {
      expect(p.allowed()).toBe(true);
      call(i % 3 === 0 ? 5 : 0.01);
    }
    expect(p.allowed()).toBe(true);
    call(5);
    expect(p.allowed()).toBe(true); // a single slow call again
    call(5);
    expect(p.allowed()).toBe(false);
    clock.t += 20;
    expect(p.allowed()).toBe(true); // 20 ms again, not 80
    expect(p.stats.slow).toBe(14);
  });

  it('what counts as slow grows with the size of the call (a page-cache copy of 128 KiB takes longer than one of 4 KiB)', () => {
    const clock = fakeClock();
    const p = new InlinePolicy(clock.now);
    const call = (ms: number, bytes: number): void => {
      const start = clock.now();
      clock.t += ms;
      p.done(start, bytes);
    };
    call(0.15, 128 * 1024);
    call(0.15, 128 * 1024);
    expect(p.allowed()).toBe(true);
    call(0.15, 4096); // a disk read, not a copy
    call(0.15, 4096);
    expect(p.allowed()).toBe(false);
  });

  it('the back-off is capped', () => {
    const clock = fakeClock();
    const p = new InlinePolicy(clock.now);
    for (let i = 0; i < 20; i++) {
      while (!p.allowed()) clock.t += 1;
      const start = clock.now();
      clock.t += 10;
      p.done(start, 4096);
    }
    clock.t += 2000;
    expect(p.allowed()).toBe(true);
  });

  it('QMOUNT_INLINE_IO=0 (ioTuning.inline false) never allows inline calls', () => {
    const p = new InlinePolicy(fakeClock().now);
    ioTuning.inline = false;
    try {
      expect(p.allowed()).toBe(false);
    } finally {
      ioTuning.inline = true;
    }
  });
});

describe('ImageFile', () => {
  let dir: string;
  let file: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-imagefile-'));
    file = path.join(dir, 'f.bin');
    fs.writeFileSync(file, Buffer.from('0123456789abcdef'));
  });
  afterEach(() => {
    instrumentation.clearFaults();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Both ways of doing I/O must behave the same. */
  for (const mode of ['inline', 'pooled'] as const) {
    describe(mode, () => {
      async function open(readOnly = false): Promise<ImageFile> {
        const f = await ImageFile.open(file, { readOnly });
        // Deterministic: inline calls always look fast (a stopped clock), or never run inline.
        f.policy = mode === 'pooled' ? Object.assign(new InlinePolicy(), { allowed: () => false }) : new InlinePolicy(() => 0);
        return f;
      }

      it('reads and writes at positions; short read at end of file; zero fill past it', async () => {
        const f = await open();
        try {
          await f.write('data_write', Buffer.from('XYZ'), 0, 3, 4);
          await f.write('data_write', Buffer.from('--tail'), 2, 4, 14); // extends the file to 18
          const buf = Buffer.alloc(24, 0xee);
          expect(await f.read(buf, 1, 20, 0)).toBe(18);
          expect(buf.subarray(1, 19).toString()).toBe('0123XYZ789abcdtail');
          expect(buf[0]).toBe(0xee);
          const z = Buffer.alloc(8, 0xee);
          expect(await f.readZeroFill(z, 0, 8, 14)).toBe(4);
          expect(z).toEqual(Buffer.from([...Buffer.from('tail'), 0, 0, 0, 0]));
          expect(await f.read(Buffer.alloc(4), 0, 4, 100)).toBe(0);
          expect(mode === 'pooled' ? f.ioStats.inline : f.ioStats.pooled).toBe(0);
          expect(mode === 'pooled' ? f.ioStats.pooled : f.ioStats.inline).toBe(5);
        } finally {
          await f.close();
        }
        expect(fs.readFileSync(file).toString()).toBe('0123XYZ789abcdtail');
      });

      it('errors arrive as rejected promises, never as synchronous throws', async () => {
        const ro = await open(true);
        try {
          let p: Promise<void> | undefined;
          expect(() => (p = ro.write('data_write', Buffer.from('x'), 0, 1, 0))).not.toThrow();
          await expect(p).rejects.toBeInstanceOf(ReadOnlyError);
        } finally {
          await ro.close();
        }
        const rw = await open();
        try {
          instrumentation.setFaults([{ point: 'data_write', errno: 'EIO' }]);
          let p: Promise<void> | undefined;
          expect(() => (p = rw.write('data_write', Buffer.from('x'), 0, 1, 0))).not.toThrow();
          await expect(p).rejects.toMatchObject({ code: 'EIO' });
        } finally {
          await rw.close();
        }
        // the kernel's errors too: reading a directory is EISDIR
        const d = await ImageFile.open(dir, { readOnly: true });
        if (mode === 'pooled') d.policy = Object.assign(new InlinePolicy(), { allowed: () => false });
        try {
          let r: Promise<number> | undefined;
          expect(() => (r = d.read(Buffer.alloc(1), 0, 1, 0))).not.toThrow();
          await expect(r).rejects.toMatchObject({ code: 'EISDIR' });
        } finally {
          await d.close();
        }
        expect(fs.readFileSync(file).toString()).toBe('0123456789abcdef');
      });

      it('sendNow hands the descriptor to the sink only for bytes the file surely has (never a short read), inline only', async () => {
        const f = await open();
        const seen: Array<[number, number]> = [];
        const sink = {
          send: (fd: number, position: number, length: number) => {
            const b = Buffer.alloc(length);
            expect(fs.readSync(fd, b, 0, length, position)).toBe(length);
            seen.push([position, length]);
            return true;
          },
        };
        try {
          const inline = mode === 'inline';
          expect(f.sendNow(0, 16, sink)).toBe(inline); // the whole file as it was at open
          expect(f.sendNow(8, 9, sink)).toBe(false); // one byte past its end
          await f.write('data_write', Buffer.from('+tail'), 0, 5, 16); // completed: the file reaches 21
          expect(f.sendNow(8, 13, sink)).toBe(inline);
          await f.truncate(10); // shrinks: nothing past 10 any more
          expect(f.sendNow(8, 3, sink)).toBe(false);
          expect(f.sendNow(0, 10, sink)).toBe(inline);
          expect(seen).toEqual(inline ? [[0, 16], [8, 13], [0, 10]] : []);
        } finally {
          await f.close();
        }
        expect(f.sendNow(0, 1, sink)).toBe(false); // closed
      });

      it('readZeroFillNow / writeNow: done before returning when inline, declined (nothing done) on the pool; errors thrown', async () => {
        const f = await open();
        try {
          const z = Buffer.alloc(8, 0xee);
          const wrote = f.writeNow('data_write', Buffer.from('NOW'), 0, 3, 12);
          const read = f.readZeroFillNow(z, 0, 8, 12);
          if (mode === 'inline') {
            expect([wrote, read]).toEqual([true, 4]);
            expect(z).toEqual(Buffer.from([...Buffer.from('NOWf'), 0, 0, 0, 0]));
            expect(f.ioStats).toMatchObject({ inline: 2, pooled: 0 });
          } else {
            expect([wrote, read]).toEqual([false, -1]);
            expect(z.every((b) => b === 0xee)).toBe(true);
            expect(f.ioStats).toMatchObject({ inline: 0, pooled: 0 });
          }
          // A bad range throws at once, whatever the mode; an injected fault is thrown where the write runs inline.
          expect(() => f.readZeroFillNow(z, 0, 8, -1)).toThrow(IoRangeError);
          instrumentation.setFaults([{ point: 'data_write', errno: 'EIO' }]);
          if (mode === 'inline') {
            let thrown: unknown;
            try {
              f.writeNow('data_write', Buffer.from('x'), 0, 1, 0);
            } catch (err) {
              thrown = err;
            }
            expect(thrown).toMatchObject({ code: 'EIO' });
          } else {
            expect(f.writeNow('data_write', Buffer.from('x'), 0, 1, 0)).toBe(false);
          }
          instrumentation.clearFaults();
        } finally {
          await f.close();
        }
        expect(fs.readFileSync(file).toString()).toBe(mode === 'inline' ? '0123456789abNOWf' : '0123456789abcdef');
        const ro = await open(true);
        try {
          if (mode === 'inline') expect(() => ro.writeNow('data_write', Buffer.from('x'), 0, 1, 0)).toThrow(ReadOnlyError);
        } finally {
          await ro.close();
        }
      });
    });
  }

  it('writes of ioTuning.poolWritesFrom bytes or more use the thread pool; reads of any size stay inline', async () => {
    const f = await ImageFile.open(file, { readOnly: false });
    f.policy = new InlinePolicy(() => 0); // inline calls always look fast
    const big = ioTuning.poolWritesFrom;
    try {
      const data = Buffer.alloc(big, 0x5c);
      await f.write('data_write', data, 0, big - 1, 0);
      expect(f.ioStats).toMatchObject({ inline: 1, pooled: 0 });
      await f.write('data_write', data, 0, big, 0);
      expect(f.ioStats).toMatchObject({ inline: 1, pooled: 1 });
      const back = Buffer.alloc(big);
      expect(await f.read(back, 0, big, 0)).toBe(big);
      expect(back.equals(data)).toBe(true);
      expect(f.ioStats).toMatchObject({ inline: 2, pooled: 1 });
    } finally {
      await f.close();
    }
  });
});

describe('ImageFile.flush skips a sync with nothing to do', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-sync-'));
  });
  afterEach(() => {
    instrumentation.clearFaults();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('syncs after each kind of change (inline, pooled, in flight, zeroing, truncate) and not again until the next one; a failed sync is retried', async () => {
    const file = path.join(dir, 'f.bin');
    fs.writeFileSync(file, Buffer.alloc(65536, 1));
    const f = await ImageFile.open(file, { readOnly: false });
    const synced = async (): Promise<boolean> => {
      const before = ioCounters.syncs;
      await f.flush();
      return ioCounters.syncs === before + 1;
    };
    try {
      expect(await synced()).toBe(false); // nothing written since open
      f.policy = new InlinePolicy(() => 0);
      await f.write('data_write', Buffer.alloc(512, 2), 0, 512, 0);
      expect(await synced()).toBe(true);
      expect(await synced()).toBe(false);
      f.policy = Object.assign(new InlinePolicy(), { allowed: () => false }); // on the thread pool
      await f.write('data_write', Buffer.alloc(512, 3), 0, 512, 512);
      expect(await synced()).toBe(true);
      // A change still in flight when the flush starts: synced (conservatively), and again once it settled.
      const inFlight = f.write('data_write', Buffer.alloc(512, 4), 0, 512, 1024);
      expect(await synced()).toBe(true);
      await inFlight;
      expect(await synced()).toBe(true);
      expect(await synced()).toBe(false);
      await f.writeZeroes('cow_write', 4096, 8192);
      expect(await synced()).toBe(true);
      await f.truncate(200000);
      expect(await synced()).toBe(true);
      // A failed sync (injected) makes nothing durable: the next flush syncs.
      await f.write('data_write', Buffer.alloc(512, 5), 0, 512, 0);
      instrumentation.setFaults([{ point: 'flush', errno: 'EIO', times: 1 }]);
      await expect(f.flush()).rejects.toMatchObject({ code: 'EIO' });
      instrumentation.clearFaults();
      expect(await synced()).toBe(true);
    } finally {
      await f.close();
    }
  });
});

describe('ImageFile.writeZeroes', () => {
  let dir: string;
  let file: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-zeroes-'));
    file = path.join(dir, 'f.bin');
    fs.writeFileSync(file, Buffer.alloc(8192, 0xaa));
  });
  afterEach(() => {
    instrumentation.clearFaults();
    instrumentation.record(null);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('zeros data below the end of the file and grows it past the end without writing the hole', async () => {
    const f = await ImageFile.open(file, { readOnly: false });
    try {
      await f.writeZeroes('cow_write', 4096, 4096 + 4 * 1024 * 1024);
    } finally {
      await f.close();
    }
    const st = fs.statSync(file);
    expect(st.size).toBe(8192 + 4 * 1024 * 1024);
    const data = fs.readFileSync(file);
    expect(data.subarray(0, 4096).every((b) => b === 0xaa)).toBe(true);
    expect(data.subarray(4096).every((b) => b === 0)).toBe(true);
    // 4 MiB of zeros past the old end cost about one block, not 4 MiB
    expect(st.blocks * 512).toBeLessThan(1024 * 1024);
  });

  it('bytes written since open are not taken for zeros, whatever the file size says', async () => {
    const f = await ImageFile.open(file, { readOnly: false });
    try {
      await f.write('data_write', Buffer.alloc(4096, 0xbb), 0, 4096, 65536); // the file now ends at 69632
      await f.writeZeroes('cow_write', 60000, 20000); // overlaps the written block and goes past it
      await f.writeZeroes('cow_write', 100000, 10); // past everything: only the end byte
      const buf = Buffer.alloc(100010 + 10, 0xee);
      expect(await f.read(buf, 0, buf.length, 0)).toBe(100010);
      expect(buf.subarray(0, 8192).every((b) => b === 0xaa)).toBe(true);
      expect(buf.subarray(8192, 100010).every((b) => b === 0)).toBe(true);
    } finally {
      await f.close();
    }
  });

  it('is a write of zeros to fault injection and the recorder; refused on a read-only file', async () => {
    const events: Array<{ point: string; offset: number; length: number; zero: boolean }> = [];
    instrumentation.record((ev) => events.push({ point: ev.point, offset: ev.offset, length: ev.length, zero: !!ev.data && ev.data.every((b) => b === 0) && ev.data.length === ev.length }));
    const f = await ImageFile.open(file, { readOnly: false });
    try {
      await f.writeZeroes('cow_write', 10000, 5000);
      expect(events).toEqual([{ point: 'cow_write', offset: 10000, length: 5000, zero: true }]);
      instrumentation.setFaults([{ point: 'cow_write', errno: 'ENOSPC' }]);
      await expect(f.writeZeroes('cow_write', 20000, 100)).rejects.toMatchObject({ code: 'ENOSPC' });
    } finally {
      await f.close();
    }
    expect(fs.statSync(file).size).toBe(15000);
    const ro = await ImageFile.open(file, { readOnly: true });
    try {
      await expect(ro.writeZeroes('cow_write', 0, 1)).rejects.toBeInstanceOf(ReadOnlyError);
    } finally {
      await ro.close();
    }
  });
});

describe('ImageFile positions and lengths', () => {
  let dir: string;
  let file: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmount-range-'));
    file = path.join(dir, 'f.bin');
    fs.writeFileSync(file, Buffer.from('0123456789abcdef'));
  });
  afterEach(() => {
    instrumentation.record(null);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  // Node's fs takes an unsafe or missing position as "the current file position" (0 here):
  // each of these would otherwise have written at the start of the file.
  const BAD: Array<[string, number, number, string]> = [
    ['negative position', -512, 4, 'EINVAL'],
    ['fractional position', 0.5, 4, 'EINVAL'],
    ['NaN position', NaN, 4, 'EINVAL'],
    ['null position', null as unknown as number, 4, 'EINVAL'],
    ['undefined position', undefined as unknown as number, 4, 'EINVAL'],
    ['Infinity position', Infinity, 4, 'EINVAL'],
    ['position 2^55', 2 ** 55, 4, 'EFBIG'],
    ['position past MAX_SAFE_INTEGER with the length', Number.MAX_SAFE_INTEGER - 1, 4, 'EFBIG'],
    ['negative length', 0, -1, 'EINVAL'],
    ['fractional length', 0, 1.5, 'EINVAL'],
  ];

  for (const mode of ['inline', 'pooled'] as const) {
    it(`refuses bad positions and lengths with a typed error before any syscall or record (${mode})`, async () => {
      const events: string[] = [];
      instrumentation.record((ev) => events.push(`${ev.kind} ${ev.point}`));
      const f = await ImageFile.open(file, { readOnly: false });
      if (mode === 'pooled') f.policy = Object.assign(new InlinePolicy(), { allowed: () => false });
      try {
        for (const [what, pos, len, errno] of BAD) {
          const buf = Buffer.alloc(8, 0x5a);
          const tries: Array<[string, () => Promise<unknown>]> = [
            ['read', () => f.read(buf, 0, len, pos)],
            ['readZeroFill', () => f.readZeroFill(buf, 0, len, pos)],
            ['write', () => f.write('data_write', buf, 0, len, pos)],
            ['writeZeroes', () => f.writeZeroes('cow_write', pos, len)],
          ];
          for (const [op, call] of tries) {
            let p: Promise<unknown> | undefined;
            expect(() => (p = call()), `${op}, ${what}`).not.toThrow();
            const err = await p!.then(() => null, (e: unknown) => e);
            expect(err, `${op}, ${what}`).toBeInstanceOf(IoRangeError);
            expect((err as IoRangeError).errno, `${op}, ${what}`).toBe(errno);
          }
          if (len === 4 && !(pos + len > Number.MAX_SAFE_INTEGER && pos <= Number.MAX_SAFE_INTEGER)) {
            await expect(f.truncate(pos), `truncate, ${what}`).rejects.toBeInstanceOf(IoRangeError);
          }
        }
      } finally {
        await f.close();
      }
      expect(events).toEqual([]);
      expect(fs.readFileSync(file).toString()).toBe('0123456789abcdef');
    });
  }

  it('accepts the largest safe range and zero-length calls', async () => {
    const f = await ImageFile.open(file, { readOnly: false });
    try {
      expect(await f.read(Buffer.alloc(1), 0, 0, 3)).toBe(0);
      await f.write('data_write', Buffer.alloc(1), 0, 0, 5);
      await f.writeZeroes('cow_write', 7, 0);
      expect(() => checkRange('f', 'read', Number.MAX_SAFE_INTEGER - 4, 4)).not.toThrow();
    } finally {
      await f.close();
    }
    expect(fs.readFileSync(file).toString()).toBe('0123456789abcdef');
  });
});
