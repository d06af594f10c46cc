/**
 * The requests a mount's service has passed to a driver and not answered
 * yet: counted for draining (close waits for them), recorded for the
 * unanswered-request log (a request still pending after UNANSWERED_MS is a
 * bug worth one log line with its op and offset; it stays pending, this is
 * not a timeout). Records are reused: no allocation per request.
 */
import type { Logger } from '../src/log.js';

/** A request not answered after this long is a bug worth a log line (not a timeout: it stays pending). */
export const UNANSWERED_MS = 120_000;
const SWEEP_MS = 30_000;

interface Pending {
  op: string;
  pos: number;
  length: number;
  start: number;
  logged: boolean;
  busy: boolean;
}

export class RequestTracker {
  private inflight = 0;
  /** Request records; the id enter() hands out is index + 1 (0: refused). */
  private readonly pending: Pending[] = [];
  /** Indexes of records not in use. */
  private readonly free: number[] = [];
  private readonly sweep: NodeJS.Timeout;
  private drainWaiters: Array<() => void> = [];
  /** Once set, enter() refuses (the driver is about to be closed). */
  private closing = false;

  /** `onUnanswered`: once per request seen pending after UNANSWERED_MS (a counter). */
  constructor(
    private readonly log: Logger,
    private readonly onUnanswered: () => void,
  ) {
    this.sweep = setInterval(() => this.logUnanswered(), SWEEP_MS);
    this.sweep.unref();
  }

  /** A request reaches the driver: its id for leave(), or 0 once draining began (answer EIO). */
  enter(op: string, pos: number, length: number): number {
    if (this.closing) return 0;
    this.inflight++;
    let i = this.free.pop();
    if (i === undefined) {
      i = this.pending.length;
      this.pending.push({ op, pos, length, start: 0, logged: false, busy: false });
    }
    const p = this.pending[i]!;
    p.op = op;
    p.pos = pos;
    p.length = length;
    p.start = Date.now();
    p.logged = false;
    p.busy = true;
    return i + 1;
  }

  /** The request `id` was answered. */
  leave(id: number): void {
    this.pending[id - 1]!.busy = false;
    this.free.push(id - 1);
    if (--this.inflight === 0 && this.drainWaiters.length > 0) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  /** Refuse new requests; resolves once those already entered are answered. */
  drain(): Promise<void> {
    this.closing = true;
    clearInterval(this.sweep);
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  private logUnanswered(): void {
    const now = Date.now();
    for (const p of this.pending) {
      if (!p.busy || p.logged || now - p.start < UNANSWERED_MS) continue;
      p.logged = true;
      this.onUnanswered();
      this.log.error({ op: p.op, guestOffset: p.pos, length: p.length, waitingMs: now - p.start }, 'request not answered (a bug: it stays pending)');
    }
  }
}
