/**
 * scripts/setup.mjs in a sandbox: a copy of the script in a scratch "repo"
 * whose node_modules, TypeScript compiler, npm and dpkg-query are fakes that
 * record how they were called. The real machine is never changed (no
 * apt-get: the missing-package case runs as an unprivileged user).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { scratchDir } from '../helpers/qemu.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

let sandbox: { dir: string; cleanup: () => void };
let repo: string;
let calls: string;

function write(rel: string, text: string, mode = 0o644): void {
  const p = path.join(repo, rel);
  fs.mkdirSync(path.dirname(p), { recursive: true });
  fs.writeFileSync(p, text, { mode });
}

/** Set a file's mtime `secondsAgo` in the past. */
function age(rel: string, secondsAgo: number): void {
  const t = new Date(Date.now() - secondsAgo * 1000);
  fs.utimesSync(path.join(repo, rel), t, t);
}

/** A fake command: a Node script appending "name args" to the calls log, then behaving per env. */
function fakeScript(name: string, body = ''): string {
  return `#!${process.execPath}
const fs = require('fs');
fs.appendFileSync(${JSON.stringify(path.join(sandbox.dir, 'calls.log'))}, ${JSON.stringify(name)} + ' ' + process.argv.slice(2).join(' ') + '\\n');
${body}
`;
}

function runSetup(args: string[] = [], env: Record<string, string> = {}, asNobody = false): { code: number; out: string; stderr: string; ms: number } {
  const cmd = asNobody ? 'setpriv' : process.execPath;
  const cmdArgs = asNobody
    ? ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, 'scripts/setup.mjs', ...args]
    : ['scripts/setup.mjs', ...args];
  const t0 = Date.now();
  const r = spawnSync(cmd, cmdArgs, {
    cwd: repo,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    env: {
      PATH: `${path.join(sandbox.dir, 'bin')}:/usr/bin:/bin:/usr/sbin:/sbin`,
      HOME: sandbox.dir,
      CI: 'true',
      npm_execpath: path.join(sandbox.dir, 'npm', 'bin', 'npm-cli.js'),
      ...env,
    },
  });
  return { code: r.status ?? -1, out: `${r.stdout}${r.stderr}`, stderr: r.stderr, ms: Date.now() - t0 };
}

function readCalls(): string[] {
  return fs.readFileSync(calls, 'utf8').trim().split('\n').filter(Boolean);
}

beforeEach(() => {
  sandbox = scratchDir('setup');
  fs.chmodSync(sandbox.dir, 0o755); // the unprivileged case must reach the repo
  repo = path.join(sandbox.dir, 'repo');
  calls = path.join(sandbox.dir, 'calls.log');
  fs.mkdirSync(repo);
  fs.writeFileSync(calls, '', { mode: 0o666 });
  fs.chmodSync(calls, 0o666); // despite the umask
  write('scripts/setup.mjs', fs.readFileSync(path.join(ROOT, 'scripts', 'setup.mjs'), 'utf8'));
  write('package.json', '{"name":"sandbox","type":"module"}\n');
  write('package-lock.json', '{}\n');
  write('tsconfig.json', '{}\n');
  write('src/a.ts', 'export const a = 1;\n');
  write('mount/b.ts', 'export const b = 2;\n');
  write('cache/c.ts', 'export const c = 3;\n');
  write('node_modules/.package-lock.json', '{}\n');
  write('node_modules/.bin/vitest', '#!/bin/sh\n', 0o755);
  write('node_modules/.bin/tsc', '#!/bin/sh\n', 0o755);
  write('node_modules/.bin/eslint', '#!/bin/sh\n', 0o755);
  // fake tsc: writes dist/, fails when FAKE_TSC_FAIL is set
  write(
    'node_modules/typescript/bin/tsc',
    fakeScript(
      'tsc',
      `fs.mkdirSync('dist/src', { recursive: true }); fs.writeFileSync('dist/src/a.js', '');
if (process.env.FAKE_TSC_FAIL) { console.error('a.ts(1,1): error TS2322: fake'); process.exit(2); }`,
    ),
  );
  // fake npm: "ci" fails like a lock that does not match package.json when
  // FAKE_CI_EUSAGE is set, or like a network failure with FAKE_CI_FAIL;
  // "install" rewrites package-lock.json, as the real one does.
  fs.mkdirSync(path.join(sandbox.dir, 'npm', 'bin'), { recursive: true });
  fs.writeFileSync(
    path.join(sandbox.dir, 'npm', 'bin', 'npm-cli.js'),
    fakeScript(
      'npm',
      `if (process.argv[2] === 'ci' && process.env.FAKE_CI_EUSAGE) {
  console.error('npm error code EUSAGE');
  console.error('npm error');
  console.error('npm error \`npm ci\` can only install packages when your package.json and package-lock.json or npm-shrinkwrap.json are in sync. Please update your lock file with \`npm install\` before continuing.');
  console.error('npm error Missing: eslint@9.39.5 from lock file');
  process.exit(1);
}
if (process.argv[2] === 'ci' && process.env.FAKE_CI_FAIL) {
  console.error('npm error code ECONNRESET');
  console.error('npm error network aborted');
  process.exit(1);
}
if (process.argv[2] === 'install') fs.writeFileSync('package-lock.json', '{"rewritten":true}\\n');
fs.mkdirSync('node_modules', { recursive: true });
fs.writeFileSync('node_modules/.package-lock.json', '{}');`,
    ),
  );
  // fake dpkg-query: every package installed except those in FAKE_MISSING
  fs.mkdirSync(path.join(sandbox.dir, 'bin'));
  fs.writeFileSync(
    path.join(sandbox.dir, 'bin', 'dpkg-query'),
    fakeScript(
      'dpkg-query',
      `const missing = (process.env.FAKE_MISSING || '').split(',');
for (const p of process.argv.slice(2).filter((a) => !a.startsWith('-'))) {
  console.log(p + '|' + (missing.includes(p) ? 'unknown ok not-installed' : 'install ok installed'));
}`,
    ),
    { mode: 0o755 },
  );
  // Everything is fresh: node_modules after the lock, the build stamp after the sources.
  for (const f of ['package-lock.json', 'tsconfig.json', 'src/a.ts', 'mount/b.ts', 'cache/c.ts', 'src', 'mount', 'cache']) age(f, 100);
  write('dist/.build-ok', 'ok\n');
  age('dist/.build-ok', 10);
  age('node_modules/.package-lock.json', 50);
});

afterEach(() => sandbox.cleanup());

describe('scripts/setup.mjs', () => {
  it('does nothing, silently and quickly, when everything is in place', () => {
    const r = runSetup(['--test']);
    expect(r.out).toBe('');
    expect(r.code).toBe(0);
    expect(r.ms).toBeLessThan(1000);
    expect(readCalls().map((c) => c.split(' ')[0])).toEqual(['dpkg-query']);
  });

  it('asks dpkg for the base packages, and for the test packages only with --test', () => {
    runSetup();
    runSetup(['--test']);
    const [base, test] = readCalls();
    for (const p of ['fuse', 'fuse3', 'libfuse2', 'libfuse3-dev', 'pkg-config', 'qemu-utils', 'e2fsprogs', 'fdisk']) {
      expect(base.split(' ')).toContain(p);
    }
    expect(base).not.toContain('qemu-system-common');
    for (const p of ['qemu-system-common', 'fio', 'mount', 'util-linux']) expect(test.split(' ')).toContain(p);
  });

  it('rebuilds when a source is newer than the last good build, then is quiet again', () => {
    fs.appendFileSync(path.join(repo, 'mount', 'b.ts'), '// edited\n');
    const r = runSetup();
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain('rebuilding dist/');
    expect(readCalls().filter((c) => c.startsWith('tsc'))).toEqual(['tsc -p tsconfig.json']);
    const again = runSetup();
    expect(again.out).toBe('');
    expect(readCalls().filter((c) => c.startsWith('tsc'))).toHaveLength(1);
  });

  it('builds when dist/ is missing', () => {
    fs.rmSync(path.join(repo, 'dist'), { recursive: true });
    const r = runSetup();
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain('building dist/');
    expect(fs.existsSync(path.join(repo, 'dist', '.build-ok'))).toBe(true);
  });

  it('a failed build exits non-zero and is retried next time, although tsc wrote dist/', () => {
    fs.appendFileSync(path.join(repo, 'src', 'a.ts'), '// edited\n');
    const bad = runSetup([], { FAKE_TSC_FAIL: '1' });
    expect(bad.code).not.toBe(0);
    expect(bad.out).toContain('TypeScript build failed');
    expect(fs.existsSync(path.join(repo, 'dist', 'src', 'a.js'))).toBe(true);
    expect(fs.existsSync(path.join(repo, 'dist', '.build-ok'))).toBe(false);
    const good = runSetup();
    expect(good.code, good.out).toBe(0);
    expect(readCalls().filter((c) => c.startsWith('tsc'))).toHaveLength(2);
  });

  it('runs npm ci when the lock file is newer than node_modules', () => {
    age('node_modules/.package-lock.json', 200);
    const r = runSetup();
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain('package-lock.json changed: running npm ci');
    expect(readCalls().filter((c) => c.startsWith('npm'))).toEqual(['npm ci --no-audit --no-fund --loglevel=error']);
  });

  it('runs npm ci when node_modules/.bin/vitest is missing', () => {
    fs.rmSync(path.join(repo, 'node_modules', '.bin', 'vitest'));
    const r = runSetup();
    expect(r.out).toContain('node_modules/.bin/vitest missing');
    expect(readCalls().some((c) => c.startsWith('npm ci'))).toBe(true);
  });

  it('npm ci refusing the lock file: one line saying what to do, exit 1, no npm install, lock file untouched', () => {
    fs.rmSync(path.join(repo, 'node_modules'), { recursive: true });
    const lock = path.join(repo, 'package-lock.json');
    const before = { text: fs.readFileSync(lock, 'utf8'), mtimeMs: fs.statSync(lock).mtimeMs };
    const r = runSetup([], { FAKE_CI_EUSAGE: '1' });
    expect(r.code).toBe(1);
    expect(r.out).toContain('node_modules missing: running npm ci');
    expect(r.stderr).toBe(
      'setup: npm ci refused package-lock.json: it does not match package.json. Run npm install, check the change to package-lock.json and commit it\n',
    );
    expect(readCalls().filter((c) => c.startsWith('npm')).map((c) => c.split(' ')[1])).toEqual(['ci']);
    expect(fs.readFileSync(lock, 'utf8')).toBe(before.text);
    expect(fs.statSync(lock).mtimeMs).toBe(before.mtimeMs);
    expect(fs.existsSync(path.join(repo, 'dist', 'src', 'a.js'))).toBe(false); // stopped before the build
  });

  it('npm ci failing otherwise: its last lines, then one setup line, exit 1', () => {
    age('node_modules/.package-lock.json', 200);
    const r = runSetup([], { FAKE_CI_FAIL: '1' });
    expect(r.code).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines.at(-1)).toBe('setup: npm ci failed');
    expect(lines.filter((l) => l.startsWith('setup:'))).toHaveLength(1);
    expect(r.stderr).toContain('npm error network aborted');
    expect(readCalls().filter((c) => c.startsWith('npm')).map((c) => c.split(' ')[1])).toEqual(['ci']);
  });

  it('not root and a package missing: names it and the apt-get command, exits 1, installs nothing', () => {
    const r = runSetup(['--test'], { FAKE_MISSING: 'fdisk,fio' }, true);
    expect(r.code).toBe(1);
    expect(r.out.trim().split('\n')).toHaveLength(1);
    expect(r.out).toContain('missing system packages: fdisk, fio');
    expect(r.out).toContain('apt-get install -y --no-install-recommends fdisk fio');
    expect(readCalls().map((c) => c.split(' ')[0])).toEqual(['dpkg-query']);
  });

  it('an installed fuse stands in for fuse3 (they conflict; fuse3, which also provides fusermount, is what a fresh system gets)', () => {
    const r = runSetup([], { FAKE_MISSING: 'fuse3' }, true);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toBe('');
    const both = runSetup([], { FAKE_MISSING: 'fuse,fuse3' }, true);
    expect(both.code).toBe(1);
    expect(both.out).toContain('missing system packages: fuse3.');
  });
});
