/**
 * Test hooks on the I/O layer: fault injection and write recording.
 *
 * Production cost is one boolean test per write/flush (`instrumentation.active`).
 * Faults come from tests directly or, for a real qmount process, from the
 * QMOUNT_FAULTS environment variable (JSON array of FaultRule).
 */
import type { IoPoint } from './points.js';

export interface FaultRule {
  /** The point to fail, or '*' for any write/flush. */
  point: IoPoint | '*';
  errno: 'EIO' | 'ENOSPC';
  /** Only files whose path ends with this. */
  pathSuffix?: string;
  /** Let this many matching operations pass first. */
  skip?: number;
  /** Fail this many matching operations, then pass again (default: forever). */
  times?: number;
}

export interface IoEvent {
  /** punch: [offset, +length) deallocated (fallocate PUNCH_HOLE|KEEP_SIZE): reads zeros, file size kept */
  kind: 'write' | 'flush' | 'truncate' | 'punch';
  point: IoPoint;
  path: string;
  offset: number;
  length: number;
  /** A copy of the bytes written (kind 'write' only). */
  data?: Buffer;
}

/** A fault that was injected: the operation it failed (no data) and the errno. */
export interface InjectedFault {
  kind: IoEvent['kind'];
  point: IoPoint;
  path: string;
  offset: number;
  length: number;
  errno: FaultRule['errno'];
}

interface ActiveRule extends FaultRule {
  seen: number;
  failed: number;
}

class Instrumentation {
  active = false;
  private rules: ActiveRule[] = [];
  private recorder: ((ev: IoEvent) => void) | null = null;
  private onInject: ((f: InjectedFault) => void) | null = null;
  /** Faults injected since the last setFaults(), in order. */
  injected: InjectedFault[] = [];

  /** Replace the rules; `onInject` is told of each fault as it is thrown. */
  setFaults(rules: FaultRule[], onInject?: (f: InjectedFault) => void): void {
    this.rules = rules.map((r) => ({ ...r, seen: 0, failed: 0 }));
    this.injected = [];
    this.onInject = onInject ?? null;
    this.update();
  }

  /** Drop the rules (what was injected stays readable until the next setFaults). */
  clearFaults(): void {
    this.rules = [];
    this.onInject = null;
    this.update();
  }

  record(fn: ((ev: IoEvent) => void) | null): void {
    this.recorder = fn;
    this.update();
  }

  private update(): void {
    this.active = this.rules.length > 0 || this.recorder !== null;
  }

  /** Throws the injected error if a rule matches; records the event otherwise. */
  check(kind: IoEvent['kind'], point: IoPoint, path: string, offset: number, length: number, data?: Buffer): void {
    for (const r of this.rules) {
      if (r.point !== '*' && r.point !== point) continue;
      if (r.pathSuffix !== undefined && !path.endsWith(r.pathSuffix)) continue;
      r.seen++;
      if (r.seen <= (r.skip ?? 0)) continue;
      if (r.times !== undefined && r.failed >= r.times) continue;
      r.failed++;
      const fault: InjectedFault = { kind, point, path, offset, length, errno: r.errno };
      this.injected.push(fault);
      this.onInject?.(fault);
      const err = new Error(`injected ${r.errno} at ${point}`) as Error & { code: string };
      err.code = r.errno;
      throw err;
    }
    if (this.recorder) {
      this.recorder({ kind, point, path, offset, length, data: data ? Buffer.from(data) : undefined });
    }
  }
}

export const instrumentation = new Instrumentation();

const fromEnv = process.env.QMOUNT_FAULTS;
if (fromEnv) {
  try {
    instrumentation.setFaults(JSON.parse(fromEnv) as FaultRule[]);
  } catch {
    // A malformed test variable must not break a real mount; ignore it.
  }
}
