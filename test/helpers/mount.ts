/**
 * Mount an image with the built CLI (dist/src/cli.js) for a test.
 *
 *   const m = await mountImage(image, { readOnly: true });
 *   try { ... fs.readFileSync(m.rawPath) ... } finally { await m.unmount(); }
 *
 * Foreground mode (the default) runs `qmount -f` as a child of the test and
 * learns readiness through the CLI's readiness pipe (QMOUNT_READY_FD, see
 * src/daemon.ts), so the exit code and stderr are observable. With
 * `foreground: false` the CLI daemonizes; the helper reads the daemon's pid
 * from --pid-file and can only see when it is gone, not its exit code.
 *
 * Safety net: every mount made here and not unmounted by its test is
 * detached (fusermount -uz) and its process killed in afterAll, and once
 * more synchronously when the test process exits.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';
import { findMount, readMountsSync } from '../../mount/mountinfo.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI = path.join(ROOT, 'dist', 'src', 'cli.js');

export interface MountImageOptions {
  readOnly?: boolean;
  format?: 'qcow2' | 'qed' | 'raw';
  /** More CLI arguments, placed before IMAGE DIR (e.g. ['-o', 'allow_other']). */
  extraArgs?: string[];
  /** Default true (see above). */
  foreground?: boolean;
  /** Extra environment for the qmount process (e.g. QMOUNT_FAULTS). */
  env?: Record<string, string>;
  /** Mount here instead of a fresh directory (must exist and be empty; not removed). */
  dir?: string;
  /** --fuse-backend; default: the one set by useBackend(), else qmount's own default (auto). */
  backend?: Backend;
}

/** The FUSE backends; FUSE-level tests run against each (describe.each(BACKENDS)). */
export const BACKENDS = ['fuse3', 'fuse-native'] as const;
export type Backend = (typeof BACKENDS)[number];
let defaultBackend: Backend | undefined;

/** Make later mountImage calls in this file use `backend` (call it in a describe.each block's beforeAll). */
export function useBackend(backend: Backend | undefined): void {
  defaultBackend = backend;
}

export interface ExitStatus {
  /** null when unknown (daemon mode) or killed by a signal */
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface MountedImage {
  dir: string;
  /** dir/disk.raw */
  rawPath: string;
  pid: number;
  /** Unmount with fusermount -u (retrying while busy), wait for the process to end, remove dir. */
  unmount(): Promise<void>;
  kill(signal?: NodeJS.Signals): void;
  /** Settles when the qmount process has ended. */
  exited: Promise<ExitStatus>;
  /** What the process wrote to stderr so far (foreground mode). */
  stderr(): string;
}

const live = new Set<{ dir: string; pid: number; ownDir: boolean }>();

export function isMounted(dir: string): boolean {
  const real = fs.existsSync(dir) ? safeRealpath(dir) : dir;
  return findMount(readMountsSync(), real) !== undefined;
}

function safeRealpath(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return p; // a stale FUSE mount point cannot be resolved
  }
}

/** Running (a zombie waiting for a slow reaper counts as ended). */
export function processRunning(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function requireCli(): void {
  if (!fs.existsSync(CLI)) {
    throw new Error(`${CLI} is missing: build first (npx tsc -p . or node scripts/setup.mjs)`);
  }
}

/** A fresh empty directory to mount on. */
export function makeMountDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `qmount-mnt-${process.pid}-`));
}

export async function mountImage(image: string, opts: MountImageOptions = {}): Promise<MountedImage> {
  requireCli();
  const foreground = opts.foreground ?? true;
  const ownDir = opts.dir === undefined;
  const dir = opts.dir ?? makeMountDir();
  const args: string[] = [];
  if (opts.readOnly) args.push('-r');
  if (opts.format) args.push('--format', opts.format);
  const backend = opts.backend ?? defaultBackend;
  if (backend) args.push('--fuse-backend', backend);
  args.push(...(opts.extraArgs ?? []));
  const entry = { dir, pid: 0, ownDir };
  try {
    const started = foreground ? await startForeground(image, dir, args, opts.env) : await startDaemon(image, dir, args, opts.env);
    entry.pid = started.pid;
    live.add(entry);
    let unmounted: Promise<void> | undefined;
    return {
      dir,
      rawPath: path.join(dir, 'disk.raw'),
      pid: started.pid,
      exited: started.exited,
      stderr: started.stderr,
      kill: (signal: NodeJS.Signals = 'SIGTERM') => process.kill(started.pid, signal),
      unmount: () => (unmounted ??= unmountAndWait(entry, started.exited)),
    };
  } catch (err) {
    if (ownDir) fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

interface Started {
  pid: number;
  exited: Promise<ExitStatus>;
  stderr: () => string;
}

function startForeground(image: string, dir: string, args: string[], env?: Record<string, string>): Promise<Started> {
  const child = spawn(process.execPath, [CLI, '-f', ...args, image, dir], {
    stdio: ['ignore', 'pipe', 'pipe', 'pipe'],
    env: { ...process.env, ...env, QMOUNT_READY_FD: '3' },
  });
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  child.stdout!.resume();
  const exited = new Promise<ExitStatus>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    let line = '';
    const pipe = child.stdio[3] as NodeJS.ReadableStream;
    pipe.setEncoding('utf8');
    pipe.on('data', (d: string) => (line += d));
    pipe.on('end', () => {
      let msg: { ok?: boolean; message?: string } = {};
      try {
        msg = JSON.parse(line.trim() || '{}') as typeof msg;
      } catch {
        // reported below
      }
      if (msg.ok) {
        resolve({ pid: child.pid!, exited, stderr: () => err });
        return;
      }
      void exited.then((st) =>
        reject(new Error(`qmount did not mount ${image} (exit ${st.code ?? st.signal}): ${msg.message ?? ''} ${err.trim()}`)),
      );
    });
  });
}

async function startDaemon(image: string, dir: string, args: string[], env?: Record<string, string>): Promise<Started> {
  const pidFile = path.join(os.tmpdir(), `qmount-pid-${process.pid}-${path.basename(dir)}`);
  const r = spawnSync(process.execPath, [CLI, '--pid-file', pidFile, ...args, image, dir], {
    env: { ...process.env, ...env },
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`qmount did not mount ${image} (exit ${r.status}): ${r.stderr.trim()}`);
  const pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
  const exited = (async (): Promise<ExitStatus> => {
    while (processRunning(pid)) await sleep(50);
    fs.rmSync(pidFile, { force: true });
    return { code: null, signal: null };
  })();
  return { pid, exited, stderr: () => r.stderr };
}

async function unmountAndWait(entry: { dir: string; pid: number; ownDir: boolean }, exited: Promise<ExitStatus>): Promise<void> {
  // The kernel may still hold the file a moment after the test closed it: retry while busy.
  for (let i = 0; i < 50 && isMounted(entry.dir); i++) {
    const r = spawnSync('fusermount', ['-u', entry.dir], { encoding: 'utf8' });
    if (r.status === 0) break;
    await sleep(100);
  }
  const timeout = sleep(30_000).then(() => 'timeout' as const);
  if ((await Promise.race([exited, timeout])) === 'timeout') {
    throw new Error(`qmount (pid ${entry.pid}) did not exit within 30 s after unmounting ${entry.dir}`);
  }
  live.delete(entry);
  if (entry.ownDir) fs.rmSync(entry.dir, { recursive: true, force: true });
}

/** Detach and kill whatever a test left mounted. Synchronous so it can also run at process exit. */
export function cleanupLeftoverMounts(): void {
  for (const e of live) {
    spawnSync('fusermount', ['-uz', e.dir], { stdio: 'ignore' });
    if (e.pid && processRunning(e.pid)) {
      try {
        process.kill(e.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    if (e.ownDir) {
      try {
        fs.rmSync(e.dir, { recursive: true, force: true });
      } catch {
        // stale mount point: fusermount -uz above normally frees it
      }
    }
    live.delete(e);
  }
}

afterAll(() => cleanupLeftoverMounts());
process.on('exit', () => {
  if (live.size > 0) {
    try {
      cleanupLeftoverMounts();
    } catch {
      // exiting anyway
    }
  }
});

/** fusermount -uz a directory (for tests that make stale mounts on purpose). */
/**
 * Run the CLI in daemon mode with `args` on IMAGE and a fresh mount point
 * (failures come back as exit code + stderr). A mount it makes is unmounted
 * afterwards and its daemon waited for, so its locks are gone when this
 * returns.
 */
export async function qmountDaemon(args: string[], image: string): Promise<{ code: number; stderr: string }> {
  const dir = makeMountDir();
  const pidFile = `${dir}.pid`;
  try {
    const r = spawnSync(process.execPath, [CLI, '--pid-file', pidFile, ...args, image, dir], { encoding: 'utf8', timeout: 60_000 });
    return { code: r.status ?? -1, stderr: r.stderr };
  } finally {
    const pid = fs.existsSync(pidFile) ? Number(fs.readFileSync(pidFile, 'utf8')) : 0;
    for (let i = 0; i < 50 && isMounted(dir); i++) {
      if (spawnSync('fusermount', ['-u', dir]).status === 0) break;
      await sleep(100);
    }
    if (pid) for (let i = 0; i < 200 && processRunning(pid); i++) await sleep(50);
    fs.rmSync(pidFile, { force: true });
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export function detach(dir: string): void {
  try {
    execFileSync('fusermount', ['-uz', dir], { stdio: 'ignore' });
  } catch {
    // not mounted
  }
}

/** Parsed JSON lines of a pino log file. */
export function logLines(file: string): Array<Record<string, unknown>> {
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}
