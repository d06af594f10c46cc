/**
 * The qmount command line: input validation and one-line errors, exit codes,
 * `info` against qemu-img info, `check` dispatch.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, isMounted, makeMountDir, mountImage } from '../helpers/mount.js';
import { patternBytes, qemuImg, qemuIo, scratchDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
let scratch: { dir: string; cleanup: () => void };
let raw: string;

function qmount(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Exactly one line `qmount: ...` on stderr, no stack frames. */
function expectOneLineError(stderr: string, pattern: RegExp): void {
  expect(stderr).toMatch(/^qmount: [^\n]+\n$/);
  expect(stderr).not.toMatch(/^\s+at /m);
  expect(stderr).toMatch(pattern);
}

beforeAll(() => {
  scratch = scratchDir('cli');
  raw = path.join(scratch.dir, 'disk.img');
  fs.writeFileSync(raw, patternBytes(4 * MiB, 5));
});
afterAll(() => scratch.cleanup());

describe('bad input gives one line, a non-zero exit and no mount', () => {
  const file = () => path.join(scratch.dir, 'a-file');
  const garbage = () => {
    // qcow2 magic followed by nonsense: the driver must refuse it.
    const p = path.join(scratch.dir, 'garbage.qcow2');
    const b = Buffer.alloc(4096, 0xff);
    b.writeUInt32BE(0x514649fb, 0);
    fs.writeFileSync(p, b);
    return p;
  };
  const CASES: Array<{ name: string; args: (dir: string) => string[]; code: number; msg: RegExp }> = [
    { name: 'missing image', args: (d) => [path.join(scratch.dir, 'nope.img'), d], code: 1, msg: /nope\.img: no such image file/ },
    { name: 'missing dir', args: (d) => [raw, path.join(d, 'missing')], code: 1, msg: /missing: mount point does not exist/ },
    { name: 'dir is a file', args: () => [raw, file()], code: 1, msg: /a-file: mount point is not a directory/ },
    { name: 'bad --format', args: (d) => ['--format', 'vmdk', raw, d], code: 1, msg: /'vmdk' is invalid.*qcow2, qed, raw/ },
    { name: 'bad -o', args: (d) => ['-o', 'allow_other,bogus', raw, d], code: 1, msg: /unknown mount option "bogus"/ },
    { name: '-o value out of range', args: (d) => ['-o', 'max_write=1', raw, d], code: 1, msg: /max_write=1 is out of range/ },
    { name: 'allow_other with allow_root', args: (d) => ['-o', 'allow_other', '-o', 'allow_root', raw, d], code: 1, msg: /cannot be combined/ },
    { name: 'bad --l2-cache-size', args: (d) => ['--l2-cache-size', '12Q', raw, d], code: 1, msg: /"12Q" is not a size/ },
    { name: 'zero --l2-cache-size', args: (d) => ['--l2-cache-size', '0', raw, d], code: 1, msg: /"0" is not a size/ },
    { name: 'unknown option', args: (d) => ['--frobnicate', raw, d], code: 1, msg: /unknown option '--frobnicate'/ },
    { name: 'missing DIR argument', args: () => [raw], code: 1, msg: /missing required argument 'DIR'/ },
    { name: 'image the driver refuses', args: (d) => ['--format', 'qcow2', garbage(), d], code: 2, msg: /garbage\.qcow2/ },
  ];

  for (const mode of ['daemon', 'foreground'] as const) {
    for (const c of CASES) {
      it(`${c.name} (${mode})`, () => {
        fs.writeFileSync(file(), 'x');
        const dir = makeMountDir();
        try {
          const args = c.args(dir);
          const r = qmount(mode === 'foreground' ? ['-f', ...args] : args);
          expect(r.code).toBe(c.code);
          expectOneLineError(r.stderr, c.msg);
          expect(r.stdout).toBe('');
          expect(isMounted(dir)).toBe(false);
          expect(fs.readdirSync(dir)).toEqual([]);
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
      });
    }
  }
});

describe('options that are accepted', () => {
  it('--version prints the package version', () => {
    const r = qmount(['--version']);
    const pkg = JSON.parse(fs.readFileSync(path.join(path.dirname(CLI), '..', '..', 'package.json'), 'utf8')) as { version: string };
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(pkg.version);
  });

  it('--help names the subcommands and exits 0', () => {
    const r = qmount(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/info/);
    expect(r.stdout).toMatch(/check/);
    expect(r.stdout).toMatch(/--l2-cache-size/);
  });

  for (const size of ['1048576', '32M', '1G', '512k', '64MiB']) {
    it(`--l2-cache-size ${size} mounts`, async () => {
      const m = await mountImage(raw, { readOnly: true, extraArgs: ['--l2-cache-size', size, '--no-backing', '-o', 'ro,default_permissions'] });
      try {
        expect(fs.statSync(m.rawPath).size).toBe(4 * MiB);
      } finally {
        await m.unmount();
      }
      expect(await m.exited).toEqual({ code: 0, signal: null });
    });
  }

  it('-o ro is the same as -r', async () => {
    const img = path.join(scratch.dir, 'ro-opt.img');
    fs.copyFileSync(raw, img);
    const m = await mountImage(img, { extraArgs: ['-o', 'ro'] });
    try {
      expect(() => fs.openSync(m.rawPath, 'r+')).toThrow(/EROFS/);
    } finally {
      await m.unmount();
    }
  });
});

describe('qmount info', () => {
  it('raw, json', () => {
    const r = qmount(['info', '--output', 'json', raw]);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(j.format).toBe('raw');
    expect(j['virtual-size']).toBe(4 * MiB);
    expect(j.filename).toBe(raw);
    expect(j['dirty-flag']).toBe(false);
    expect(typeof j['actual-size']).toBe('number');
  });

  it('raw, human', () => {
    const r = qmount(['info', raw]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^file format: raw$/m);
    expect(r.stdout).toMatch(/^virtual size: 4 MiB \(4194304 bytes\)$/m);
  });

  it('qcow2 with a backing file agrees with qemu-img info', () => {
    const base = path.join(scratch.dir, 'base.raw');
    fs.copyFileSync(raw, base);
    const top = path.join(scratch.dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536,lazy_refcounts=on', '-b', 'base.raw', '-F', 'raw', top, '8M');
    qemuIo(top, 'qcow2', ['write -P 0x42 1M 64k']);
    const want = JSON.parse(qemuImg('info', '--output', 'json', top)) as Record<string, unknown>;
    const r = qmount(['info', '--output', 'json', top]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const got = JSON.parse(r.stdout) as Record<string, unknown>;
    for (const k of ['filename', 'format', 'virtual-size', 'actual-size', 'cluster-size', 'backing-filename', 'backing-filename-format', 'dirty-flag']) {
      expect(got[k], k).toEqual(want[k]);
    }
    expect(got['full-backing-filename']).toBe(fs.realpathSync(base));
    const wantData = (want['format-specific'] as { data: Record<string, unknown> }).data;
    const gotData = (got['format-specific'] as { data: Record<string, unknown> }).data;
    for (const k of ['compat', 'lazy-refcounts', 'refcount-bits', 'corrupt', 'extended-l2', 'compression-type']) {
      expect(gotData[k], k).toEqual(wantData[k]);
    }
    const chain = JSON.parse(qmount(['info', '--output', 'json', '--backing-chain', top]).stdout) as Array<Record<string, unknown>>;
    expect(chain[1]!.format).toBe('raw');
    expect(chain[1]!['virtual-size']).toBe(4 * MiB);

    const human = qmount(['info', top]);
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/^file format: qcow2$/m);
    expect(human.stdout).toMatch(/^cluster_size: 65536$/m);
    expect(human.stdout).toMatch(/^backing file: base\.raw \(actual path: .*base\.raw\)$/m);
    expect(human.stdout).toMatch(/^ {4}lazy refcounts: true$/m);
  });

  it('a missing image: one line, exit 1', () => {
    const r = qmount(['info', path.join(scratch.dir, 'nope')]);
    expect(r.code).toBe(1);
    expectOneLineError(r.stderr, /nope: no such image file/);
  });

  it('an image the driver refuses: one line, exit 2', () => {
    const p = path.join(scratch.dir, 'bad-info.qcow2');
    const b = Buffer.alloc(512);
    b.writeUInt32BE(0x514649fb, 0);
    b.writeUInt32BE(99, 4); // version 99
    fs.writeFileSync(p, b);
    const r = qmount(['info', p]);
    expect(r.code).toBe(2);
    expectOneLineError(r.stderr, /bad-info\.qcow2/);
  });

  it('bad --output is a usage error', () => {
    const r = qmount(['info', '--output', 'xml', raw]);
    expect(r.code).toBe(1);
    expectOneLineError(r.stderr, /'xml' is invalid/);
  });
});

describe('qmount check', () => {
  it('raw images have nothing to check: exit 63 like qemu-img', () => {
    const r = qmount(['check', raw]);
    expect(r.code).toBe(63);
    expectOneLineError(r.stderr, /raw images have no metadata to check/);
  });

  it('a missing image: the check cannot complete, exit 1', () => {
    const r = qmount(['check', '--output', 'json', path.join(scratch.dir, 'nope')]);
    expect(r.code).toBe(1);
    expectOneLineError(r.stderr, /nope/);
  });

  it('bad --repair is a usage error', () => {
    const r = qmount(['check', '--repair', 'everything', raw]);
    expect(r.code).toBe(1);
    expectOneLineError(r.stderr, /'everything' is invalid/);
  });
});
