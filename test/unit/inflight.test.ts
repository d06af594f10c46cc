import { describe, expect, it } from 'vitest';
import { InflightClusters } from '../../src/formats/inflight.js';

describe('InflightClusters', () => {
  it('waits for the first registered cluster of a range; null when none', async () => {
    const r = new InflightClusters();
    expect(r.waitFor(0, 10)).toBeNull();
    r.register(4, 3); // 4, 5, 6 as one unit
    r.register(8);
    expect(r.has(5)).toBe(true);
    expect(r.has(7)).toBe(false);
    expect(r.waitFor(0, 3)).toBeNull();
    expect(r.waitFor(7, 7)).toBeNull();
    let woke = 0;
    const unit = r.waitFor(6, 9)!;
    void unit.then(() => woke++);
    const single = r.waitFor(8, 8)!;
    void single.then(() => (woke += 10));
    r.settle(4, 3);
    await unit;
    expect(woke).toBe(1);
    expect(r.waitFor(0, 7)).toBeNull();
    expect(r.has(8)).toBe(true);
    r.settle(8);
    r.settle(8); // twice, and clusters never registered: ignored
    r.settle(100, 2);
    await single;
    expect(woke).toBe(11);
    expect(r.waitFor(0, 100)).toBeNull();
  });
});
