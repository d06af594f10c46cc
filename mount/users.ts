/**
 * Who still uses a mount, for the message that says why it cannot be
 * unmounted yet: loop devices whose backing file is on it, and processes
 * with a file open on it or their working directory in it. Best effort: a
 * process in another pid namespace, or one that only mmap()s a file it has
 * closed, is not found; the caller then says "in use" without naming users.
 *
 * Nothing here touches files on the mount itself (a stat would be a FUSE
 * request, and the mount may be the one being asked about): loop devices are
 * matched by the device number losetup reports (from the LOOP_GET_STATUS64
 * ioctl), or by path from /sys when losetup cannot tell (not root); open
 * files by the mount id in /proc/PID/fdinfo/FD, which a lazy unmount keeps.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';

export interface MountIdentity {
  mountPoint: string;
  /** mount id (mountinfo's first field) */
  mountId?: number;
  /** "major:minor" of the FUSE super block */
  device?: string;
}

export interface MountUsers {
  /** /dev/loopN */
  loops: string[];
  processes: Array<{ pid: number; command: string; how: 'open file' | 'working directory' }>;
}

function losetupBacking(): Promise<Array<{ name: string; dev: string }> | undefined> {
  return new Promise((resolve) => {
    execFile('losetup', ['--list', '--json', '--output', 'NAME,BACK-MAJ:MIN'], { timeout: 5000 }, (err, stdout) => {
      if (err) return resolve(undefined);
      try {
        const parsed = JSON.parse(stdout || '{"loopdevices":[]}') as { loopdevices?: Array<{ name?: string; 'back-maj:min'?: string }> };
        resolve((parsed.loopdevices ?? []).map((d) => ({ name: d.name ?? '?', dev: (d['back-maj:min'] ?? '').trim() })));
      } catch {
        resolve(undefined);
      }
    });
  });
}

async function loopUsers(m: MountIdentity): Promise<string[]> {
  const byDevice = m.device ? await losetupBacking() : undefined;
  if (byDevice) return byDevice.filter((d) => d.dev === m.device).map((d) => d.name);
  const out: string[] = [];
  let names: string[] = [];
  try {
    names = (await fs.promises.readdir('/sys/block')).filter((n) => n.startsWith('loop'));
  } catch {
    return out;
  }
  const prefix = `${m.mountPoint}/`;
  for (const n of names) {
    try {
      const backing = (await fs.promises.readFile(`/sys/block/${n}/loop/backing_file`, 'utf8')).trim();
      if (backing.startsWith(prefix)) out.push(`/dev/${n}`);
    } catch {
      // not attached
    }
  }
  return out;
}

async function readText(file: string): Promise<string | undefined> {
  try {
    return await fs.promises.readFile(file, 'utf8');
  } catch {
    return undefined;
  }
}

async function processUsers(m: MountIdentity): Promise<MountUsers['processes']> {
  const out: MountUsers['processes'] = [];
  let pids: string[];
  try {
    pids = (await fs.promises.readdir('/proc')).filter((n) => /^\d+$/.test(n) && Number(n) !== process.pid);
  } catch {
    return out;
  }
  const inside = (p: string): boolean => p === m.mountPoint || p.startsWith(`${m.mountPoint}/`);
  for (const pid of pids) {
    let how: 'open file' | 'working directory' | undefined;
    try {
      if (inside(await fs.promises.readlink(`/proc/${pid}/cwd`))) how = 'working directory';
    } catch {
      // gone, or not ours to look at
    }
    if (!how && m.mountId !== undefined) {
      let fds: string[] = [];
      try {
        fds = await fs.promises.readdir(`/proc/${pid}/fd`);
      } catch {
        // gone, or not ours to look at
      }
      for (const fd of fds) {
        let link: string;
        try {
          link = await fs.promises.readlink(`/proc/${pid}/fd/${fd}`);
        } catch {
          continue;
        }
        if (!link.startsWith('/') || link.startsWith('/dev/') || link.startsWith('/proc/')) continue; // sockets, pipes, devices
        const info = await readText(`/proc/${pid}/fdinfo/${fd}`);
        const id = info && /^mnt_id:\s*(\d+)/m.exec(info);
        if (id && Number(id[1]) === m.mountId) {
          how = 'open file';
          break;
        }
      }
    }
    if (how) out.push({ pid: Number(pid), command: ((await readText(`/proc/${pid}/comm`)) ?? '?').trim(), how });
  }
  return out;
}

export async function findUsers(m: MountIdentity): Promise<MountUsers> {
  const [loops, processes] = await Promise.all([loopUsers(m), processUsers(m)]);
  return { loops, processes };
}

/** "/dev/loop0, pid 812 (fio: open file)", or undefined when none were found. */
export function describeUsers(u: MountUsers): string | undefined {
  const parts = [...u.loops, ...u.processes.map((p) => `pid ${p.pid} (${p.command}: ${p.how})`)];
  return parts.length > 0 ? parts.join(', ') : undefined;
}
