/**
 * The record each serving qmount keeps of its mount, for `qmount list` and
 * `qmount umount` (which may run in another shell, or be mount(8)'s caller):
 * one JSON file per mount, `<pid>.<n>.json` (n counts a process's mounts), in /run/qmount for root, else in
 * $XDG_RUNTIME_DIR/qmount (or /tmp/qmount-UID). Replaced atomically (write a
 * temporary file, rename) at every state change:
 *   serving   mounted and answering requests
 *   stopping  asked to stop while DIR is in use: still serving (see `users`)
 *   detached  the mount point was unmounted lazily; still serving its users
 *   closing   the kernel ended the connection: flushing and closing the image
 *   closed    the image is closed and its locks released; `exitCode` is set
 * The `closed` record is left behind on purpose (umount reads the exit code
 * from it, then removes it); records of processes that are gone are removed
 * by the next list or mount (closed ones after a minute). `start` (the process start time from /proc/PID/stat)
 * tells a live record from a reused pid.
 */
import fs from 'node:fs';
import path from 'node:path';

export type MountState = 'serving' | 'stopping' | 'detached' | 'closing' | 'closed';

export interface MountRecord {
  pid: number;
  start: string;
  image: string;
  format: string;
  mountPoint: string;
  mode: 'ro' | 'rw';
  backend: string;
  mountId?: number;
  device?: string;
  since: string;
  state: MountState;
  /** who kept it busy, when stopping or detached */
  users?: string;
  exitCode?: number;
}

/**
 * Our own directory, and every directory `list` reads: /run/qmount and our
 * own; root also reads other users' ($XDG_RUNTIME_DIR is /run/user/UID on
 * systemd machines), trusting a record only when its file and its process
 * belong to the same user (see liveRecords).
 */
export function registryDirs(): { own: string; all: string[] } {
  const uid = process.getuid?.() ?? 0;
  const own = uid === 0 ? '/run/qmount' : path.join(process.env.XDG_RUNTIME_DIR || `/tmp/qmount-${uid}`, 'qmount');
  const all = new Set(['/run/qmount', own]);
  if (uid === 0) {
    for (const base of ['/run/user', '/tmp']) {
      try {
        for (const n of fs.readdirSync(base)) {
          if (base === '/run/user' ? /^\d+$/.test(n) : /^qmount-\d+$/.test(n)) all.add(path.join(base, n, 'qmount'));
        }
      } catch {
        // no such base
      }
    }
  }
  return { own, all: [...all] };
}

/** The real uid of a process, or undefined. */
function processUid(pid: number): number | undefined {
  try {
    const m = /^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Field 22 of /proc/PID/stat (start time in clock ticks since boot), or undefined when the process is gone. */
export function processStart(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (fields[0] === 'Z') return undefined; // exited, waiting to be reaped
    return fields[19];
  } catch {
    return undefined;
  }
}

export function recordAlive(r: MountRecord): boolean {
  return processStart(r.pid) === r.start;
}

let mountsHere = 0;

/** The live process's record is ours to update; written with mode 0644 so other users can list it. */
export class Registration {
  private constructor(
    private readonly file: string,
    private record: MountRecord,
  ) {}

  static create(fields: Omit<MountRecord, 'pid' | 'start' | 'since' | 'state'>): Registration {
    const dir = registryDirs().own;
    fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
    // A directory someone else made (e.g. /tmp/qmount-UID made in advance) is not ours to trust.
    if (fs.statSync(dir).uid !== (process.getuid?.() ?? 0)) throw new Error(`${dir} belongs to another user`);
    pruneDead(dir);
    const rec: MountRecord = { pid: process.pid, start: processStart(process.pid) ?? '', since: new Date().toISOString(), state: 'serving', ...fields };
    const reg = new Registration(path.join(dir, `${process.pid}.${++mountsHere}.json`), rec);
    reg.write();
    return reg;
  }

  get state(): MountState {
    return this.record.state;
  }

  update(change: Partial<Pick<MountRecord, 'state' | 'users' | 'exitCode'>>): void {
    this.record = { ...this.record, ...change };
    if (change.state && change.state !== 'stopping' && change.state !== 'detached') delete this.record.users;
    this.write();
  }

  private write(): void {
    const tmp = `${this.file}.tmp`;
    fs.writeFileSync(tmp, `${JSON.stringify(this.record)}\n`, { mode: 0o644 });
    fs.renameSync(tmp, this.file);
  }
}

export function readRecord(file: string): MountRecord | undefined {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as MountRecord;
  } catch {
    return undefined;
  }
}

function recordFiles(dir: string): string[] {
  try {
    return fs.readdirSync(dir).filter((n) => /^\d+\.\d+\.json$/.test(n)).map((n) => path.join(dir, n));
  } catch {
    return [];
  }
}

/** A closed record stays this long for a `qmount umount` still waiting to read its exit code. */
const CLOSED_KEEP_MS = 60_000;

/** Remove the records of processes that are gone (those we may remove). */
function pruneDead(dir: string): void {
  for (const f of recordFiles(dir)) {
    const r = readRecord(f);
    if (r && recordAlive(r)) continue;
    try {
      if (r?.state === 'closed' && Date.now() - fs.statSync(f).mtimeMs < CLOSED_KEEP_MS) continue;
      fs.rmSync(f, { force: true });
    } catch {
      // removed meanwhile, or not ours
    }
  }
}

/** Every live mount's record (not yet closed), from all registry directories we can read. */
export function liveRecords(): Array<MountRecord & { file: string }> {
  const out: Array<MountRecord & { file: string }> = [];
  const { own, all } = registryDirs();
  pruneDead(own);
  for (const dir of all) {
    for (const f of recordFiles(dir)) {
      const r = readRecord(f);
      if (!r || r.state === 'closed' || !recordAlive(r)) continue;
      let owner: number | undefined;
      try {
        owner = fs.statSync(f).uid;
      } catch {
        continue;
      }
      if (owner !== processUid(r.pid)) continue; // a record about someone else's process: not believed
      out.push({ ...r, file: f });
    }
  }
  return out;
}
