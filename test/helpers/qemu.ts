/**
 * Test helpers around QEMU's tools (the oracle) and scratch directories.
 * Every image a test uses is made here at test time with qemu-img/qemu-io.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export function run(cmd: string, args: string[], opts: { input?: Buffer | string; allowFail?: boolean } = {}): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { input: opts.input, maxBuffer: 256 * 1024 * 1024 });
  const out = { code: r.status ?? -1, stdout: r.stdout?.toString() ?? '', stderr: r.stderr?.toString() ?? '' };
  if (!opts.allowFail && out.code !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${out.code}: ${out.stderr || out.stdout}`);
  }
  return out;
}

export function qemuImg(...args: string[]): string {
  return run('qemu-img', args).stdout;
}

/** qemu-io with -c commands; image opened with the given format. */
export function qemuIo(image: string, format: string, cmds: string[], extra: string[] = []): string {
  const args = ['-f', format, ...extra];
  for (const c of cmds) args.push('-c', c);
  args.push(image);
  return run('qemu-io', args).stdout;
}

export function qemuCheck(image: string, format?: string): { code: number; output: string } {
  const args = ['check'];
  if (format) args.push('-f', format);
  args.push(image);
  const r = run('qemu-img', args, { allowFail: true });
  return { code: r.code, output: r.stdout + r.stderr };
}

/** qemu-img compare; true when identical. `forceShare` (-U) reads an image qmount still holds open. */
export function qemuCompare(a: string, b: string, fmtA?: string, fmtB?: string, forceShare = false): { same: boolean; output: string } {
  const args = ['compare'];
  if (forceShare) args.push('-U');
  if (fmtA) args.push('-f', fmtA);
  if (fmtB) args.push('-F', fmtB);
  args.push(a, b);
  const r = run('qemu-img', args, { allowFail: true });
  return { same: r.code === 0, output: r.stdout + r.stderr };
}

/** The oracle's view of an image's guest content. */
export function convertToRaw(image: string, out: string, extra: string[] = []): string {
  run('qemu-img', ['convert', ...extra, '-O', 'raw', image, out]);
  return out;
}

export function sha256File(p: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex');
}

let counter = 0;
/** A fresh scratch directory under the OS temp dir; removed by the returned cleanup. */
export function scratchDir(tag: string): { dir: string; cleanup: () => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `qmount-${tag}-${process.pid}-${counter++}-`));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** Deterministic pseudo-random bytes (xorshift) so failures reproduce. */
export function patternBytes(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

export function have(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** `len` bytes of file `p` at offset `off` (tests poke at image headers and tables). */
export function readAt(p: string, off: number, len: number): Buffer {
  const fd = fs.openSync(p, 'r');
  try {
    const b = Buffer.alloc(len);
    fs.readSync(fd, b, 0, len, off);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

/** Overwrite bytes of file `p` at offset `off` (to damage images on purpose). */
export function writeAt(p: string, off: number, data: Buffer): void {
  const fd = fs.openSync(p, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, off);
  } finally {
    fs.closeSync(fd);
  }
}
