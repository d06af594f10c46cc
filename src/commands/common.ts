/**
 * What every qmount command shares: the error that carries an exit code,
 * one-line messages on stderr, and the IMAGE argument check.
 */
import fs from 'node:fs';
import { oneLine } from '../errors.js';
import { printable } from '../errors.js';

export const EXIT_OK = 0;
export const EXIT_USAGE = 1;
export const EXIT_FAIL = 2;

/** An error with the exit code it ends the program with. */
export class CliError extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
  ) {
    super(message);
  }
}

// Messages may quote names read from an image (untrusted): printable() keeps them one line, free of terminal escapes.
export function printError(msg: string): void {
  process.stderr.write(`qmount: ${printable(msg)}\n`);
}

export function printWarning(msg: string): void {
  process.stderr.write(`qmount: warning: ${printable(msg)}\n`);
}

/** Turn a thrown value into a CliError with `code` unless it already carries one. */
export function withCode(err: unknown, code: number): CliError {
  return err instanceof CliError ? err : new CliError(code, oneLine(err));
}

/** IMAGE must exist and be a regular file or block device (exit 1 otherwise). */
export async function checkImagePath(image: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(image);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new CliError(EXIT_USAGE, code === 'ENOENT' ? `${image}: no such image file` : `${image}: cannot access: ${code ?? oneLine(err)}`);
  }
  if (!st.isFile() && !st.isBlockDevice()) throw new CliError(EXIT_USAGE, `${image}: not a regular file`);
}

/** Run a command body: a CliError (or any error, as `code`) is printed as one line and becomes the exit code. */
export async function runCommand(body: () => Promise<number>, code = EXIT_FAIL): Promise<number> {
  try {
    return await body();
  } catch (err) {
    const e = withCode(err, code);
    printError(e.message);
    return e.exitCode;
  }
}
