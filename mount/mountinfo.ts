/**
 * Which directories are mount points, from /proc/self/mountinfo: the mount
 * point checks, which mount is ours (by mount id, which a lazy unmount does
 * not change and /proc/PID/fdinfo names), `qmount list`. The project's only
 * mountinfo parser: the test helpers import it, the scripts (which run after
 * the build) import dist/mount/mountinfo.js.
 */
import fs from 'node:fs';

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

export interface MountEntry {
  /** the mount id (first field; also `mnt_id` in /proc/PID/fdinfo/FD) */
  id: number;
  mountPoint: string;
  fsType: string;
  source: string;
  /** per-mount options (ro/rw, nosuid, ...) */
  options: string;
  /** the device number, "major:minor" (the name of its /sys/class/bdi entry) */
  device: string;
}

export function parseMountInfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const fields = line.split(' ');
    // id parent major:minor root mountpoint options [optional...] - fstype source superopts
    const sep = fields.indexOf('-', 6);
    if (fields.length < 5 || sep < 0) continue;
    out.push({
      id: Number(fields[0]),
      mountPoint: unescapeField(fields[4]!),
      fsType: fields[sep + 1] ?? '',
      source: unescapeField(fields[sep + 2] ?? ''),
      options: fields[5] ?? '',
      device: fields[2]!,
    });
  }
  return out;
}

export async function readMounts(): Promise<MountEntry[]> {
  return parseMountInfo(await fs.promises.readFile('/proc/self/mountinfo', 'utf8'));
}

export function readMountsSync(): MountEntry[] {
  return parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8'));
}

/** The mount on exactly this (real, absolute) path, the topmost one if stacked. */
export function findMount(entries: MountEntry[], mountPoint: string): MountEntry | undefined {
  let found: MountEntry | undefined;
  for (const e of entries) if (e.mountPoint === mountPoint) found = e;
  return found;
}
