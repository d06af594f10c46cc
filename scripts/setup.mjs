#!/usr/bin/env node
/**
 * Brings a checkout to a runnable state; `npm start`, `npm test` and
 * `npm run bench` call it first. Plain Node, no npm dependencies: it runs
 * before `npm ci`. Idempotent: when everything is in place it only stats a
 * few files and asks dpkg once, and prints nothing.
 *
 *   node scripts/setup.mjs           what `npm start` needs (FUSE, qemu-img, demo-image tools)
 *   node scripts/setup.mjs --test    also what the test suite and benchmarks need
 *
 * Steps: Node version, Debian packages (installed with apt-get when root),
 * node_modules (npm ci), dist/ (tsc), the native addons (node-gyp),
 * /dev/fuse. Each failure is one line
 * saying what to do, and a non-zero exit.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const forTest = process.argv.includes('--test');

/** One short status line, prefixed so it stands out from tool output. */
function say(msg) {
  process.stdout.write(`setup: ${msg}\n`);
}

function fail(msg) {
  process.stderr.write(`setup: ${msg}\n`);
  process.exit(1);
}

/** Run a command with inherited output; fail with one line if it does not succeed. */
function runOrFail(cmd, args, what, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: ROOT, stdio: opts.quiet ? 'pipe' : 'inherit', env: opts.env ?? process.env });
  if (r.error) fail(`${what} failed: ${r.error.code === 'ENOENT' ? `${cmd} not found` : r.error.message}`);
  if (r.status !== 0) {
    if (opts.quiet) {
      const out = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim().split('\n').slice(-15).join('\n');
      if (out) process.stderr.write(`${out}\n`);
    }
    fail(`${what} failed (exit ${r.status ?? r.signal})`);
  }
}

// ---- 1. Node -------------------------------------------------------------
const nodeMajor = Number(process.versions.node.split('.')[0]);
if (nodeMajor < 20) fail(`Node ${process.versions.node} is too old: qmount needs Node 20 or newer`);

// ---- 2. Debian packages --------------------------------------------------
/**
 * Package -> why it is needed. `fuse3` gives fusermount3 (libfuse 3 mounts
 * as non-root) and a `fusermount` symlink (fuse-native, qmount's unmount);
 * it conflicts with the older `fuse`, which is accepted instead when
 * installed (we never ask apt to swap them; then only root can mount with
 * the fuse3 backend). `libfuse2` is fuse-native's library, `libfuse3-dev`
 * (with libfuse3-3) and `pkg-config` build native/fuse3.
 */
const BASE_PACKAGES = {
  fuse3: 'fusermount3, fusermount',
  libfuse2: 'libfuse.so.2 for fuse-native',
  'libfuse3-dev': 'libfuse 3 for native/fuse3',
  'pkg-config': 'to build native/fuse3',
  'qemu-utils': 'qemu-img',
  e2fsprogs: 'mkfs.ext4 for the demo image',
  fdisk: 'sfdisk for the demo image',
};
const TEST_PACKAGES = {
  'qemu-system-common': 'qemu-storage-daemon',
  fio: 'benchmarks and stress tests',
  mount: 'losetup, mount',
  'util-linux': 'blockdev, mountpoint',
};
const ALTERNATIVES = { fuse3: ['fuse'] };

function installedPackages(names) {
  // eslint-disable-next-line no-template-curly-in-string -- dpkg-query's own ${field} syntax
  const r = spawnSync('dpkg-query', ['-W', '-f=${Package}|${Status}\\n', ...names], { encoding: 'utf8' });
  if (r.error) return null; // not a dpkg system
  const have = new Set();
  for (const line of r.stdout.split('\n')) {
    const [pkg, status] = line.split('|');
    // dpkg may print "pkg:amd64" for multi-arch packages.
    if (status && status.trim() === 'install ok installed') have.add(pkg.split(':')[0]);
  }
  return have;
}

function checkPackages() {
  const wanted = { ...BASE_PACKAGES, ...(forTest ? TEST_PACKAGES : {}) };
  const names = Object.keys(wanted);
  const alts = names.flatMap((n) => ALTERNATIVES[n] ?? []);
  const have = installedPackages([...names, ...alts]);
  if (have === null) {
    say('dpkg-query not found (not Debian?): skipping the system package check; qmount needs libfuse 2, fusermount and qemu-img');
    return;
  }
  const missing = names.filter((n) => !have.has(n) && !(ALTERNATIVES[n] ?? []).some((a) => have.has(a)));
  if (missing.length === 0) return;
  const cmd = `apt-get update && apt-get install -y --no-install-recommends ${missing.join(' ')}`;
  if (process.getuid?.() !== 0) {
    fail(`missing system packages: ${missing.join(', ')}. Install them as root: sudo sh -c '${cmd}'`);
  }
  say(`installing ${missing.map((n) => `${n} (${wanted[n]})`).join(', ')} with apt-get`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  runOrFail('apt-get', ['-qq', 'update'], 'apt-get update', { quiet: true, env });
  runOrFail('apt-get', ['-qq', 'install', '-y', '--no-install-recommends', ...missing], 'apt-get install', { quiet: true, env });
  const after = installedPackages(missing);
  const still = missing.filter((n) => !after?.has(n));
  if (still.length) fail(`apt-get did not install: ${still.join(', ')}`);
}

// ---- 3. node_modules -----------------------------------------------------
function mtimeMs(p) {
  try {
    return fs.statSync(p).mtimeMs;
  } catch {
    return -1;
  }
}

/** npm as run by `npm test` (npm_execpath), else the one on PATH. */
function npmCommand() {
  const execPath = process.env.npm_execpath;
  if (execPath && /npm-cli\.js$/.test(execPath)) return [process.execPath, [execPath]];
  return ['npm', []];
}

/** Run npm; returns its combined output when it fails (null on success). */
function npm(args, quiet) {
  const [cmd, pre] = npmCommand();
  const r = spawnSync(cmd, [...pre, ...args], { cwd: ROOT, stdio: quiet ? 'pipe' : 'inherit', encoding: 'utf8' });
  if (r.error) fail(`npm ${args[0]} failed: ${r.error.code === 'ENOENT' ? 'npm not found' : r.error.message}`);
  return r.status === 0 ? null : `${r.stdout ?? ''}${r.stderr ?? ''}` || `exit ${r.status}`;
}

/** Commands the npm scripts run from node_modules/.bin. */
const REQUIRED_BINS = ['vitest', 'tsc', 'eslint'];

function checkNodeModules() {
  const lock = path.join(ROOT, 'package-lock.json');
  const installedLock = path.join(ROOT, 'node_modules', '.package-lock.json');
  const flags = ['--no-audit', '--no-fund', '--loglevel=error'];
  if (mtimeMs(lock) < 0) {
    say('package-lock.json missing: running npm install (commit the lock file it writes)');
    if (npm(['install', ...flags], false) !== null) fail('npm install failed');
    return;
  }
  // npm rewrites node_modules/.package-lock.json on every install, so afterwards it is newer than the lock.
  const installed = mtimeMs(installedLock);
  const binsMissing = REQUIRED_BINS.filter((b) => mtimeMs(path.join(ROOT, 'node_modules', '.bin', b)) < 0);
  if (installed >= 0 && installed >= mtimeMs(lock) && binsMissing.length === 0) return;
  say(
    installed < 0
      ? 'node_modules missing: running npm ci'
      : binsMissing.length
        ? `node_modules/.bin/${binsMissing.join(', ')} missing: running npm ci`
        : 'package-lock.json changed: running npm ci',
  );
  const out = npm(['ci', ...flags], true);
  if (out === null) return;
  // No fallback to npm install: it would rewrite the tracked lock file. npm ci
  // checks the lock before it touches node_modules, so a rejected lock is
  // left as it was.
  if (/package\.json and package-lock\.json .*in sync/s.test(out)) {
    fail('npm ci refused package-lock.json: it does not match package.json. Run npm install, check the change to package-lock.json and commit it');
  }
  process.stderr.write(`${out.trim().split('\n').slice(-15).join('\n')}\n`);
  fail('npm ci failed');
}

// ---- 4. build ------------------------------------------------------------
const SOURCE_DIRS = ['src', 'mount', 'cache'];
/**
 * Written after a successful tsc run. tsc emits even when it reports type
 * errors, so the newest file in dist/ does not prove a good build; the stamp
 * does, and it is removed before each build so a failed one is retried.
 */
const STAMP = path.join(ROOT, 'dist', '.build-ok');

function newestSource() {
  let newest = Math.max(mtimeMs(path.join(ROOT, 'tsconfig.json')), mtimeMs(path.join(ROOT, 'package-lock.json')));
  const walk = (dir) => {
    let entries;
    try {
      entries = fs.readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ts')) newest = Math.max(newest, mtimeMs(p));
    }
    // A deleted or renamed file shows as a newer directory.
    newest = Math.max(newest, mtimeMs(dir));
  };
  for (const d of SOURCE_DIRS) walk(path.join(ROOT, d));
  return newest;
}

function checkBuild() {
  const stamp = mtimeMs(STAMP);
  // Equal times count as stale: file times have clock-tick granularity.
  if (stamp >= 0 && stamp > newestSource()) return;
  say(stamp < 0 ? 'building dist/ (tsc)' : 'sources changed: rebuilding dist/ (tsc)');
  fs.rmSync(STAMP, { force: true });
  const tsc = path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
  if (mtimeMs(tsc) < 0) fail('node_modules/typescript is missing: run npm ci');
  runOrFail(process.execPath, [tsc, '-p', 'tsconfig.json'], 'TypeScript build');
  fs.mkdirSync(path.dirname(STAMP), { recursive: true });
  fs.writeFileSync(STAMP, `${new Date().toISOString()}\n`);
}

// ---- 5. native addons ----------------------------------------------------
/**
 * native/ofd-lock: the fcntl(F_OFD_SETLK) calls image locking needs (see
 * src/io/lock.ts); native/fuse3: the libfuse 3 low-level binding (see
 * mount/backend-fuse3.ts); native/fileops: fallocate and SEEK_DATA/SEEK_HOLE
 * for sparse images (see src/io/fileops.ts). Built with the node-gyp that ships inside npm, against the
 * headers of the Node that runs this script (nodedir), so nothing is
 * downloaded. Rebuilt when their sources are newer than the built addon.
 * ofd-lock and fileops are required; without fuse3 qmount falls back to fuse-native, so a
 * failed fuse3 build is a warning, except with --test (the tests need both).
 */
const ADDONS = [
  { name: 'ofd-lock', what: 'image locking', file: 'ofd_lock.node', required: true },
  { name: 'fileops', what: 'hole punching and SEEK_DATA/SEEK_HOLE', file: 'fileops.node', required: true },
  { name: 'fuse3', what: 'libfuse 3 binding', file: 'qmount_fuse3.node', required: forTest },
];

function findNodeGyp() {
  const candidates = [];
  if (process.env.npm_config_node_gyp) candidates.push(process.env.npm_config_node_gyp);
  const execPath = process.env.npm_execpath;
  if (execPath && /npm-cli\.js$/.test(execPath)) candidates.push(path.join(path.dirname(execPath), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    try {
      const npmCli = fs.realpathSync(path.join(dir, 'npm'));
      candidates.push(path.join(path.dirname(npmCli), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
    } catch {
      // no npm here
    }
  }
  candidates.push(path.join(ROOT, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  return candidates.find((c) => mtimeMs(c) >= 0);
}

/** Node's headers: npm's nodedir setting, else the prefix of the running node (/usr/bin/node -> /usr). */
function nodeDir() {
  const configured = process.env.npm_config_nodedir;
  if (configured && mtimeMs(path.join(configured, 'include', 'node', 'node_api.h')) >= 0) return configured;
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  if (mtimeMs(path.join(prefix, 'include', 'node', 'node_api.h')) >= 0) return prefix;
  return undefined;
}

function checkAddon({ name, what, file, required }) {
  const addonDir = path.join(ROOT, 'native', name);
  const addon = path.join(addonDir, 'build', 'Release', file);
  if (mtimeMs(path.join(addonDir, 'binding.gyp')) < 0) return; // a checkout without the addon
  const built = mtimeMs(addon);
  let newest = 0;
  for (const f of fs.readdirSync(addonDir)) if (/\.(c|h|gyp)$/.test(f)) newest = Math.max(newest, mtimeMs(path.join(addonDir, f)));
  if (built >= 0 && built > newest) return;
  const problem = (msg) => (required ? fail(msg) : say(`warning: ${msg}; qmount will use fuse-native`));
  say(`building native/${name} (${what}) with node-gyp`);
  const gyp = findNodeGyp();
  const needs = `it needs python3, make, a C compiler and Node's headers${name === 'fuse3' ? ', libfuse3-dev and pkg-config' : ''}`;
  if (!gyp) return problem(`cannot build native/${name}: node-gyp not found (it ships with npm; or: npm install -g node-gyp); ${needs}`);
  const dir = nodeDir();
  const args = [gyp, 'rebuild', ...(dir ? [`--nodedir=${dir}`] : [])];
  const r = spawnSync(process.execPath, args, { cwd: addonDir, stdio: 'pipe', encoding: 'utf8' });
  if (r.status !== 0 || mtimeMs(addon) < 0) {
    const out = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim().split('\n').slice(-15).join('\n');
    if (out && required) process.stderr.write(`${out}\n`);
    return problem(`building native/${name} failed (exit ${r.status ?? r.signal}); ${needs}${dir ? '' : ' (no Node headers found next to node: set npm_config_nodedir)'}`);
  }
}

// ---- 6. devices ----------------------------------------------------------
function checkDevices() {
  if (mtimeMs('/dev/fuse') < 0) {
    fail('/dev/fuse does not exist: load the module (modprobe fuse), or in a container run with --device /dev/fuse --cap-add SYS_ADMIN');
  }
  if (forTest && mtimeMs('/dev/loop-control') < 0) {
    fail('/dev/loop-control does not exist: the tests need loop devices (modprobe loop, or a privileged container)');
  }
  if (forTest && process.getuid?.() !== 0) {
    say('warning: not root; the tests mount FUSE filesystems and set up loop devices, which needs root');
  }
}

checkPackages();
checkNodeModules();
checkBuild();
for (const a of ADDONS) checkAddon(a);
checkDevices();
