/**
 * `qmount umount [--force] DIR`: unmount a qmount mount (any, also one
 * started by another shell or by mount(8)) and wait until its process has
 * closed the image and exited, so its locks are gone when this returns:
 * `qmount umount DIR && qemu-img check IMG` works.
 *
 * Exit codes:
 *   0  unmounted, and the image was closed cleanly
 *   1  DIR is not a qmount mount, or it is busy (the users are named;
 *      nothing changed: the mount goes on serving)
 *   2  closing the image failed, or the process ended without closing it
 * --force asks the serving process to close now (SIGUSR2, see
 * mount/session.ts forceClose): users still there get I/O errors and lose
 * what they write after it.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { findMount, readMounts } from '../../mount/mountinfo.js';
import { liveRecords, processStart, readRecord, type MountRecord } from '../../mount/registry.js';
import { describeUsers, findUsers } from '../../mount/users.js';

/** How often the wait looks at the serving process (besides watching its record). */
const WAIT_POLL_MS = 10;

function say(msg: string): void {
  process.stderr.write(`qmount: ${msg}\n`);
}

function run(cmd: string, args: string[]): Promise<string | undefined> {
  return new Promise((resolve) => {
    execFile(cmd, args, (err, _stdout, stderr) => resolve(err ? stderr.trim() || err.message : undefined));
  });
}

async function resolveDir(dir: string): Promise<{ real: string; stale: boolean } | undefined> {
  try {
    return { real: await fs.promises.realpath(dir), stale: false };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') return { real: path.resolve(dir), stale: true };
    say(`${dir}: ${code === 'ENOENT' ? 'no such directory' : `cannot use: ${code ?? String(err)}`}`);
    return undefined;
  }
}

/** Wait until the record says closed and the process is gone. Resolves to the exit code to return. */
function waitForClose(rec: MountRecord & { file: string }): Promise<number> {
  return new Promise((resolve) => {
    let closedCode: number | undefined;
    let watcher: fs.FSWatcher | undefined;
    const closedIn = (r: MountRecord | undefined): void => {
      if (r?.state === 'closed') closedCode = r.exitCode ?? 0;
    };
    const check = (): void => {
      closedIn(readRecord(rec.file));
      if (processStart(rec.pid) === rec.start) return; // still running
      // Gone: it may have written 'closed' and exited after the read above, so read once more.
      if (closedCode === undefined) closedIn(readRecord(rec.file));
      clearInterval(timer);
      watcher?.close();
      fs.rmSync(rec.file, { force: true });
      if (closedCode === undefined) {
        say(`the qmount process (pid ${rec.pid}) ended without closing ${rec.image} cleanly`);
        resolve(2);
      } else {
        if (closedCode !== 0) say(`closing ${rec.image} failed (see the mount's log)`);
        resolve(closedCode === 0 ? 0 : 2);
      }
    };
    const timer = setInterval(check, WAIT_POLL_MS);
    try {
      watcher = fs.watch(path.dirname(rec.file), check);
    } catch {
      // the interval alone
    }
    check();
  });
}

export async function umountCommand(dir: string, flags: { force?: boolean }): Promise<number> {
  const where = await resolveDir(dir);
  if (!where) return 1;
  const { real, stale } = where;
  const rec = liveRecords().find((r) => r.mountPoint === real);
  const entry = findMount(await readMounts(), real);
  if (!rec && entry?.fsType !== 'fuse.qmount') {
    say(`${dir}: not a qmount mount${entry ? ` (${entry.fsType} is mounted there)` : ''}`);
    return 1;
  }
  if (!rec) {
    // A qmount mount without a live process record: stale, or from a qmount that keeps none.
    const err = await run('fusermount', ['-u', real]);
    if (err) {
      say(`${dir}: cannot unmount: ${err}`);
      return 1;
    }
    if (!stale) say(`${dir}: unmounted, but its qmount process is unknown: not waiting for it to close the image`);
    return 0;
  }
  if (flags.force) {
    say(`--force: ${rec.image} is closed now; whoever still uses ${real} gets I/O errors and loses what it writes`);
    process.kill(rec.pid, 'SIGUSR2');
    return waitForClose(rec);
  }
  if (rec.state === 'detached' || !entry || entry.id !== rec.mountId) {
    const users = describeUsers(await findUsers({ mountPoint: real, mountId: rec.mountId, device: rec.device }));
    say(`${dir} was unmounted lazily and is still in use${users ? ` by ${users}` : ''}; qmount (pid ${rec.pid}) closes ${rec.image} once the last user is gone`);
    return 1;
  }
  const err = await run('fusermount', ['-u', real]);
  if (err) {
    const users = describeUsers(await findUsers({ mountPoint: real, mountId: rec.mountId, device: rec.device }));
    say(`${dir} is busy${users ? `: in use by ${users}` : ` (${err})`}; nothing changed. Stop those users first (or qmount umount --force, which loses what they write)`);
    return 1;
  }
  return waitForClose(rec);
}

export function registerUmount(program: Command, setResult: (p: Promise<number>) => void): void {
  program
    .command('umount')
    .description('unmount a qmount mount and wait until its image is closed and unlocked; exit 0 closed cleanly, 1 not mounted or busy, 2 closing failed')
    .argument('<DIR>')
    .option('--force', 'close the image now even if DIR is in use: its users get I/O errors and lose what they write')
    .action((dir: string, flags: { force?: boolean }) => setResult(umountCommand(dir, flags)));
}
