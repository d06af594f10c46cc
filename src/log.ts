/**
 * Logging: one pino root logger, a child per component. Hot paths log only
 * at debug level with object arguments (no string building); pino skips the
 * call cheaply when the level is off.
 */
import pino from 'pino';

export type Logger = pino.Logger;

let root: pino.Logger = pino({ level: process.env.QMOUNT_LOG_LEVEL ?? 'warn', base: undefined }, pino.destination(2));

export interface LogOptions {
  level?: string;
  file?: string;
}

/** Reconfigure the root logger (CLI start-up). Children made later follow it. */
export function configureLogging(opts: LogOptions): void {
  const dest = opts.file ? pino.destination({ dest: opts.file, mkdir: true, sync: true }) : pino.destination(2);
  root = pino({ level: opts.level ?? 'warn', base: undefined }, dest);
}

export function logger(component: string): pino.Logger {
  return root.child({ c: component });
}
