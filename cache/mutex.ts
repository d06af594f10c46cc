/**
 * A FIFO async mutex. `run(fn)` holds the lock for the whole of fn,
 * including its awaits; waiters are served in arrival order.
 */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  private holders = 0;

  get locked(): boolean {
    return this.holders > 0;
  }

  async run<T>(fn: () => Promise<T> | T): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    this.holders++;
    try {
      await prev;
      return await fn();
    } finally {
      this.holders--;
      release();
    }
  }
}
