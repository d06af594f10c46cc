/**
 * Feedback on long work (a check, a repair, the refcount rebuild of a dirty
 * image at open, image creation): how far it got, and a way to stop it.
 *
 * The engine reports through WorkHooks and never prints; the CLI decides
 * whether a ProgressLine draws (on a terminal, or with -p) and turns
 * signals into an aborted AbortSignal.
 */
import { InterruptedError } from './errors.js';

export interface WorkHooks {
  /** Once aborted, the work stops at its next step with an InterruptedError. */
  signal?: AbortSignal;
  /** Units done of a total (bytes of metadata, of image...), for the task `label`. */
  progress?: (label: string, done: number, total: number) => void;
}

/** Throw an InterruptedError naming `what` if the work was asked to stop. */
export function stopIfAborted(hooks: WorkHooks | undefined, what: string): void {
  if (hooks?.signal?.aborted) throw new InterruptedError(`${what} interrupted`);
}

/** When the last checkpoint let the event loop run, per hooks object. */
const lastYield = new WeakMap<WorkHooks, number>();
/** The longest stretch of work between two turns of the event loop, in ms. */
const YIELD_EVERY_MS = 50;

/**
 * A point where long work may stop: at most every 50 ms it lets the event
 * loop run (file reads from the page cache complete inline, so without
 * this a signal handler would wait for the end of the work), then throws
 * an InterruptedError if the work was asked to stop.
 */
export async function checkpoint(hooks: WorkHooks | undefined, what: string): Promise<void> {
  if (!hooks?.signal) return;
  const now = Date.now();
  const last = lastYield.get(hooks);
  if (last === undefined) lastYield.set(hooks, now);
  else if (now - last >= YIELD_EVERY_MS) {
    await new Promise<void>((resolve) => setImmediate(resolve));
    lastYield.set(hooks, Date.now());
  }
  stopIfAborted(hooks, what);
}

function rate(bytesPerSecond: number): string {
  const units = ['B/s', 'KiB/s', 'MiB/s', 'GiB/s', 'TiB/s'];
  let v = bytesPerSecond;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 100 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

/**
 * One updating line on a terminal: `label  42.0%  310 MiB/s`, redrawn at
 * most every 100 ms with \r, cleared by done(). Draws nothing when not enabled.
 */
export class ProgressLine {
  private started = 0;
  private lastDraw = 0;
  private drawn = false;
  private label = '';

  constructor(
    private readonly out: NodeJS.WriteStream | { write(s: string): boolean },
    readonly enabled: boolean,
  ) {}

  /** `-p` given: on; `--no-progress`: off; else on when `stream` is a terminal. */
  static forStream(stream: NodeJS.WriteStream, choice: boolean | undefined): ProgressLine {
    return new ProgressLine(stream, choice ?? stream.isTTY === true);
  }

  /** The WorkHooks.progress callback. */
  readonly update = (label: string, done: number, total: number): void => {
    if (!this.enabled) return;
    const now = Date.now();
    if (label !== this.label) {
      this.label = label;
      this.started = now;
      this.lastDraw = 0;
    }
    if (now - this.lastDraw < 100 && done < total) return;
    this.lastDraw = now;
    const pct = total > 0 ? Math.min(100, (100 * done) / total) : 100;
    const secs = (now - this.started) / 1000;
    const speed = secs > 0.05 ? `  ${rate(done / secs)}` : '';
    this.out.write(`\r\x1b[K${label} ${pct.toFixed(1).padStart(5)}%${speed}`);
    this.drawn = true;
  };

  /** Clear the line (before the result or an error is printed). */
  done(): void {
    if (this.drawn) this.out.write('\r\x1b[K');
    this.drawn = false;
    this.label = '';
  }
}
