#!/usr/bin/env node
/**
 * `npm start` (after scripts/setup.mjs).
 *
 *   npm start                        build (or reuse) the demo image under .tmp/demo/ and
 *                                    mount it in the foreground at .tmp/demo/mnt
 *   npm start -- IMAGE DIR [opts]    run qmount itself with these arguments
 *
 * The CLI runs as a child with the terminal's stdio. Ctrl-C reaches it
 * directly (same process group); this script only waits and passes its exit
 * status on.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';
import { makeDemoImage } from './make-demo.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'dist', 'src', 'cli.js');
const DEMO_DIR = path.join(ROOT, '.tmp', 'demo');
const DEMO_IMAGE = path.join(DEMO_DIR, 'demo.qcow2');
const DEMO_MNT = path.join(DEMO_DIR, 'mnt');
/** Where the hints mount the guest's ext4 (not /mnt, which may be in use). */
const DEMO_GUEST = path.join(DEMO_DIR, 'guest');
/** Foreground, read-write: the hints read through a read-only loop device, and say how to write. */
const DEMO_FLAGS = ['-f'];

function fail(msg) {
  process.stderr.write(`start: ${msg}\n`);
  process.exit(1);
}

/** Run the CLI in the foreground and leave with its exit status. */
function requireCli() {
  if (!fs.existsSync(CLI)) fail(`${path.relative(ROOT, CLI)} is missing: the CLI has not been built (node scripts/setup.mjs)`);
}

function runCli(args) {
  requireCli();
  const child = spawn(process.execPath, [CLI, ...args], { stdio: 'inherit' });
  // Ctrl-C goes to the whole foreground process group, so the CLI gets it
  // itself; we must not die first. SIGTERM/SIGHUP sent to us alone are passed on.
  process.on('SIGINT', () => {});
  for (const sig of ['SIGTERM', 'SIGHUP']) process.on(sig, () => child.kill(sig));
  child.on('error', (err) => fail(`cannot run ${CLI}: ${err.message}`));
  child.on('exit', (code, signal) => {
    if (signal) process.exit(128 + (signalNumber(signal) ?? 1));
    process.exit(code ?? 1);
  });
}

function signalNumber(name) {
  return { SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 }[name];
}

/**
 * The one mountinfo parser, mount/mountinfo.ts, as built into dist/ (the demo
 * needs the built CLI anyway; setup.mjs builds both before this script runs).
 */
async function loadMountinfo() {
  try {
    return await import(path.join(ROOT, 'dist', 'mount', 'mountinfo.js'));
  } catch (err) {
    return fail(`cannot load dist/mount/mountinfo.js: the CLI has not been built (node scripts/setup.mjs): ${err.message}`);
  }
}

/** Whether `dir` is a mount point, per /proc/self/mountinfo (false when it cannot be read). */
function isMountPoint(mountinfo, dir) {
  try {
    return mountinfo.findMount(mountinfo.readMountsSync(), dir) !== undefined;
  } catch {
    return false;
  }
}

/** An empty, unmounted directory; a dead FUSE mount left by a killed run is detached. */
function prepareMountPoint(mountinfo, dir) {
  if (isMountPoint(mountinfo, dir)) {
    let alive = true;
    try {
      fs.readdirSync(dir);
    } catch (err) {
      if (err.code === 'ENOTCONN' || err.code === 'ECONNABORTED') alive = false;
      else throw err;
    }
    if (alive) fail(`${dir} is already mounted (another npm start?); stop that one first, or: fusermount -u ${dir}`);
    spawnSync('fusermount', ['-uz', dir], { stdio: 'ignore' });
    if (isMountPoint(mountinfo, dir)) fail(`${dir} holds a dead mount that could not be detached; try: umount -l ${dir}`);
  }
  fs.mkdirSync(dir, { recursive: true });
}

/**
 * The hints the demo prints, as commands (run in `cwd`, as root) and notes.
 * LOOP stands for the loop device losetup prints. Each works as printed
 * while the demo is mounted: test/e2e/cli-parity.test.ts runs them in order.
 */
export function demoHints({ image, mnt, guest, cli, cwd }) {
  const rel = (p) => path.relative(cwd, p) || '.';
  const raw = path.join(mnt, 'disk.raw');
  return [
    { cmd: `ls -l ${rel(mnt)}`, note: 'one file, disk.raw: the whole guest disk' },
    { cmd: `dd if=${rel(raw)} bs=512 skip=1 count=1 status=none | hexdump -C | head -3`, note: 'sector 1 holds the GPT header: "EFI PART"' },
    // -U: the demo mount holds the image's write lock, as QEMU would; info reads it anyway (qemu-img info -U).
    { cmd: `node ${rel(cli)} info -U ${rel(image)}` },
    { cmd: `losetup -P -r --show -f ${rel(raw)}`, note: 'prints the loop device, say /dev/loop0' },
    { cmd: 'partx -a /dev/loop0', note: 'only if /dev/loop0p1 did not appear', optional: true },
    { cmd: `mkdir -p ${rel(guest)} && mount -o ro /dev/loop0p1 ${rel(guest)}` },
    { cmd: `(cd ${rel(guest)} && ls -l && sha256sum -c SHA256SUMS)` },
    { cmd: `umount ${rel(guest)} && losetup -d /dev/loop0`, note: 'to change the guest disk: losetup without -r, mount without -o ro' },
  ];
}

/** The demo's banner with its hints. */
function demoText(where) {
  const rel = (p) => path.relative(where.cwd, p) || '.';
  const lines = ['', `qmount demo: mounting ${rel(where.image)} (256 MiB qcow2 disk, GPT, one ext4 partition) at ${rel(where.mnt)}`, '', `Try, in another terminal (as root, in ${where.cwd}):`];
  for (const h of demoHints(where)) {
    if (h.note && h.cmd.length > 36) lines.push(`  ${h.cmd}`, `  ${''.padEnd(36)} # ${h.note}`);
    else lines.push(h.note ? `  ${h.cmd.padEnd(36)} # ${h.note}` : `  ${h.cmd}`);
  }
  lines.push('', 'Stop: Ctrl-C here (after the umount and losetup -d above).', '');
  return lines.join('\n');
}

async function demo() {
  requireCli();
  fs.mkdirSync(DEMO_DIR, { recursive: true });
  if (fs.existsSync(DEMO_IMAGE)) {
    process.stdout.write(`start: reusing ${path.relative(ROOT, DEMO_IMAGE)} (delete it to rebuild)\n`);
  } else {
    process.stdout.write(`start: building the demo image ${path.relative(ROOT, DEMO_IMAGE)}\n`);
    try {
      makeDemoImage(DEMO_IMAGE, { sizeMiB: 256, label: 'gpt' });
    } catch (err) {
      fail(`cannot build the demo image: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  prepareMountPoint(await loadMountinfo(), DEMO_MNT);
  process.stdout.write(`${demoText({ image: DEMO_IMAGE, mnt: DEMO_MNT, guest: DEMO_GUEST, cli: CLI, cwd: process.cwd() })}\n`);
  runCli([...DEMO_FLAGS, DEMO_IMAGE, DEMO_MNT]);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  if (args.length === 0) await demo();
  else runCli(args);
}
