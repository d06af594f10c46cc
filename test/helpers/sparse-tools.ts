/**
 * Sparse-file probes run as child processes (asynchronously: a test that
 * mounts in its own process must keep its event loop serving FUSE).
 *
 *   seekWalk(file)   the [start, end) data extents SEEK_DATA/SEEK_HOLE find
 *   statBlocks(file) st_size and st_blocks as stat(1) prints them
 *   qemuMapData(img) the data extents of `qemu-img map --output=json`, merged
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { run } from './qemu.js';

const execFileP = promisify(execFile);

const WALK_PY = `
import os, sys, json, errno
fd = os.open(sys.argv[1], os.O_RDONLY)
end = os.fstat(fd).st_size
out, pos = [], 0
while pos < end:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO: raise
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    out.append([d, h])
    pos = h
print(json.dumps(out))
`;

/** Data extents by SEEK_DATA/SEEK_HOLE, as [start, end) pairs. */
export async function seekWalk(file: string): Promise<Array<[number, number]>> {
  const { stdout } = await execFileP('python3', ['-c', WALK_PY, file]);
  return JSON.parse(stdout) as Array<[number, number]>;
}

/** One lseek from a child: the offset, or the errno name (e.g. 'ENXIO'). */
export async function lseekOnce(file: string, pos: number, whence: 'SEEK_DATA' | 'SEEK_HOLE'): Promise<number | string> {
  const py = `import os, sys, errno\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n    print(os.lseek(fd, ${pos}, os.${whence}))\nexcept OSError as e:\n    print(errno.errorcode[e.errno])`;
  const { stdout } = await execFileP('python3', ['-c', py, file]);
  const t = stdout.trim();
  return /^\d+$/.test(t) ? Number(t) : t;
}

export async function statBlocks(file: string): Promise<{ size: number; blocks: number }> {
  const { stdout } = await execFileP('stat', ['-c', '%s %b %B', file]);
  const [size, blocks, unit] = stdout.trim().split(' ').map(Number);
  if (unit !== 512) throw new Error(`stat block unit ${unit}`);
  return { size: size!, blocks: blocks! };
}

/**
 * st_blocks once the engine's count settled: a qcow2 or QED mount counts its
 * data clusters in the background after open and shows an estimate until
 * then (published within a second of the count's end). Polls until `ok`
 * holds or 30 s passed, then returns the last value (the caller asserts).
 */
export async function settledBlocks(file: string, ok: (bytes: number) => boolean): Promise<{ size: number; blocks: number }> {
  const until = Date.now() + 30_000;
  for (;;) {
    const st = await statBlocks(file);
    if (ok(st.blocks * 512) || Date.now() > until) return st;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Run a command as a child without blocking the event loop; resolves with its exit code and output. */
export async function tool(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  try {
    const r = await execFileP(cmd, args, { maxBuffer: 64 * 1024 * 1024 });
    return { code: 0, out: `${r.stdout}${r.stderr}` };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, out: `${e.stdout ?? ''}${e.stderr ?? ''}` };
  }
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
}

/** qemu-img map's extents that hold data (data and not zero), adjacent ones merged. */
export function qemuMapData(image: string, format?: string, extra: string[] = []): Array<[number, number]> {
  const args = ['map', '--output=json', ...extra];
  if (format) args.push('-f', format);
  args.push(image);
  const map = JSON.parse(run('qemu-img', args).stdout) as MapEntry[];
  const out: Array<[number, number]> = [];
  for (const e of map) {
    if (!e.data || e.zero) continue;
    const last = out[out.length - 1];
    if (last && last[1] === e.start) last[1] = e.start + e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

/** Bytes of data in a list of extents. */
export function extentBytes(extents: Array<[number, number]>): number {
  return extents.reduce((n, [a, b]) => n + (b - a), 0);
}
