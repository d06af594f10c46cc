import { describe, expect, it } from 'vitest';
import { Mutex } from '../../cache/mutex.js';

const tick = () => new Promise<void>((r) => setImmediate(r));

describe('Mutex', () => {
  it('serves waiters in arrival order (FIFO)', async () => {
    const m = new Mutex();
    const order: number[] = [];
    // Later callers finish their critical section faster: only FIFO keeps order.
    const runs = [0, 1, 2, 3, 4, 5].map((i) =>
      m.run(async () => {
        for (let k = 0; k < 6 - i; k++) await tick();
        order.push(i);
      }),
    );
    await Promise.all(runs);
    expect(order).toEqual([0, 1, 2, 3, 4, 5]);
  });

  it('excludes across awaits: no two critical sections interleave', async () => {
    const m = new Mutex();
    let inside = 0;
    let maxInside = 0;
    const events: string[] = [];
    const job = (i: number) =>
      m.run(async () => {
        inside++;
        maxInside = Math.max(maxInside, inside);
        events.push(`start${i}`);
        await tick();
        await new Promise((r) => setTimeout(r, 1));
        await tick();
        events.push(`end${i}`);
        inside--;
        return i * 10;
      });
    const results = await Promise.all([job(1), job(2), job(3)]);
    expect(results).toEqual([10, 20, 30]);
    expect(maxInside).toBe(1);
    expect(events).toEqual(['start1', 'end1', 'start2', 'end2', 'start3', 'end3']);
  });

  it('reports locked while held or awaited, and unlocked after', async () => {
    const m = new Mutex();
    expect(m.locked).toBe(false);
    let release!: () => void;
    const held = m.run(() => new Promise<void>((r) => (release = r)));
    await tick();
    expect(m.locked).toBe(true);
    release();
    await held;
    expect(m.locked).toBe(false);
  });

  it('releases the lock when the critical section throws (sync and async)', async () => {
    const m = new Mutex();
    await expect(
      m.run(() => {
        throw new Error('sync boom');
      }),
    ).rejects.toThrow('sync boom');
    await expect(
      m.run(async () => {
        await tick();
        throw new Error('async boom');
      }),
    ).rejects.toThrow('async boom');
    expect(m.locked).toBe(false);
    // The next caller still gets the lock, and queued callers behind a thrower run too.
    const order: string[] = [];
    const a = m.run(async () => {
      await tick();
      order.push('a');
      throw new Error('a failed');
    });
    const b = m.run(async () => {
      order.push('b');
      return 'b-result';
    });
    await expect(a).rejects.toThrow('a failed');
    await expect(b).resolves.toBe('b-result');
    expect(order).toEqual(['a', 'b']);
    expect(m.locked).toBe(false);
  });

  it('a sync function result is returned', async () => {
    const m = new Mutex();
    await expect(m.run(() => 42)).resolves.toBe(42);
  });
});
