/**
 * `qmount list [--output human|json]`: every qmount mount on the machine,
 * from the records the serving processes keep (mount/registry.ts), plus any
 * fuse.qmount mount in our mount table without a record (pid unknown).
 */
import type { Command } from 'commander';
import { Option } from 'commander';
import { readMounts } from '../../mount/mountinfo.js';
import { liveRecords, type MountState } from '../../mount/registry.js';

export interface ListedMount {
  image: string;
  mountPoint: string;
  /** null: a fuse.qmount mount without a record (its process is unknown) */
  pid: number | null;
  mode: 'ro' | 'rw';
  format: string | null;
  backend: string | null;
  state: MountState | 'unknown';
  since: string | null;
  /** who keeps it busy while stopping or detached */
  users?: string;
}

export async function listMounts(): Promise<ListedMount[]> {
  const records = liveRecords();
  const out: ListedMount[] = records.map((r) => ({
    image: r.image,
    mountPoint: r.mountPoint,
    pid: r.pid,
    mode: r.mode,
    format: r.format,
    backend: r.backend,
    state: r.state,
    since: r.since,
    ...(r.users ? { users: r.users } : {}),
  }));
  for (const e of await readMounts()) {
    if (e.fsType !== 'fuse.qmount') continue;
    if (records.some((r) => r.mountId === e.id || (r.mountId === undefined && r.mountPoint === e.mountPoint))) continue;
    const ro = e.options.split(',').includes('ro');
    out.push({ image: e.source, mountPoint: e.mountPoint, pid: null, mode: ro ? 'ro' : 'rw', format: null, backend: null, state: 'unknown', since: null });
  }
  return out.sort((a, b) => (a.mountPoint < b.mountPoint ? -1 : a.mountPoint > b.mountPoint ? 1 : 0));
}

function table(rows: ListedMount[]): string {
  const cells = [['IMAGE', 'DIR', 'PID', 'MODE', 'STATE'], ...rows.map((m) => [m.image, m.mountPoint, m.pid === null ? '-' : String(m.pid), m.mode, m.users ? `${m.state} (in use by ${m.users})` : m.state])];
  const widths = cells[0]!.map((_, i) => Math.max(...cells.map((r) => r[i]!.length)));
  return cells.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n');
}

export async function listCommand(flags: { output: string }): Promise<number> {
  const mounts = await listMounts();
  if (flags.output === 'json') process.stdout.write(`${JSON.stringify(mounts, null, 2)}\n`);
  else if (mounts.length > 0) process.stdout.write(`${table(mounts)}\n`);
  return 0;
}

export function registerList(program: Command, setResult: (p: Promise<number>) => void): void {
  program
    .command('list')
    .description('list qmount mounts: image, mount point, pid, mode, state')
    .addOption(new Option('--output <format>', 'output format').choices(['human', 'json']).default('human'))
    .action((flags: { output: string }) => setResult(listCommand(flags)));
}
