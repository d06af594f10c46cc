/**
 * Logging: one pino root logger, a child per component. Hot paths log only
 * at debug level with object arguments (no string building); pino skips the
 * call cheaply when the level is off.
 *
 * Two formats: JSON lines (pino's own; for files, pipes, journald, and with
 * --log-format json) and, when stderr is a terminal, one readable line per
 * record: `12:04:05.123 WARN  image: message key=value ...`. The readable
 * form is made from the JSON line by HumanStream below (no extra package);
 * values read from an image are escaped as in every other message.
 */
import fs from 'node:fs';
import pino from 'pino';
import { printable } from './errors.js';

export type Logger = pino.Logger;
export type LogFormat = 'json' | 'human';
export const LOG_FORMATS: readonly LogFormat[] = ['json', 'human'];

let root: pino.Logger = pino({ level: process.env.QMOUNT_LOG_LEVEL ?? 'warn', base: undefined }, pino.destination({ dest: 2, sync: true }));

export interface LogOptions {
  level?: string;
  file?: string;
  /** Default: human on a terminal (no --log-file, stderr is a TTY), else JSON. */
  format?: LogFormat;
}

/** The format configureLogging would choose for these options. */
export function logFormatFor(opts: LogOptions): LogFormat {
  return opts.format ?? (!opts.file && process.stderr.isTTY ? 'human' : 'json');
}

/** Reconfigure the root logger (CLI start-up). Children made later follow it. */
export function configureLogging(opts: LogOptions): void {
  const dest =
    logFormatFor(opts) === 'human'
      ? new HumanStream(opts.file ? fs.openSync(opts.file, 'a') : 2)
      : pino.destination({ dest: opts.file ?? 2, mkdir: !!opts.file, sync: true });
  root = pino({ level: opts.level ?? 'warn', base: undefined }, dest);
}

export function logger(component: string): pino.Logger {
  return root.child({ c: component });
}

const LEVELS: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };

function pad2(n: number, w = 2): string {
  return String(n).padStart(w, '0');
}

/** One pino JSON record as one readable line. */
export function humanLine(record: Record<string, unknown>): string {
  const { level, time, msg, c, ...rest } = record;
  const d = new Date(typeof time === 'number' ? time : Date.now());
  const stamp = `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}.${pad2(d.getMilliseconds(), 3)}`;
  const lvl = (LEVELS[level as number] ?? String(level)).padEnd(5);
  const fields = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === 'string' ? (/[\s"=]/.test(v) || v === '' ? JSON.stringify(v) : v) : JSON.stringify(v)}`);
  const text = (v: unknown): string => (typeof v === 'string' ? v : v === undefined ? '' : JSON.stringify(v));
  return printable(`${stamp} ${lvl} ${c ? `${text(c)}: ` : ''}${text(msg)}${fields.length ? ` ${fields.join(' ')}` : ''}`);
}

/** A pino destination writing each record as humanLine, synchronously (records are rare off hot paths). */
class HumanStream {
  constructor(private readonly fd: number) {}
  write(line: string): void {
    let text: string;
    try {
      text = humanLine(JSON.parse(line) as Record<string, unknown>);
    } catch {
      text = printable(line.trimEnd());
    }
    try {
      fs.writeSync(this.fd, `${text}\n`);
    } catch {
      // stderr closed (a daemon): nothing to tell
    }
  }
}
