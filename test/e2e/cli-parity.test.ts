/**
 * CLI parity with qemu-img and input that must be refused (issue 14):
 * `info` and `check` output against qemu-img's on the same images (made by
 * qemu-img here), -U/--format/extra arguments, foreign formats refused by
 * name, the probed-raw guard, truncated images, the demo's hints, log
 * formats, progress, and Ctrl-C during a long open.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, isMounted, makeMountDir, mountImage, qmountDaemon, type MountedImage } from '../helpers/mount.js';
import { patternBytes, qemuImg, qemuIo, readAt, run, scratchDir, writeAt } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
let scratch: { dir: string; cleanup: () => void };
const at = (name: string) => path.join(scratch.dir, name);

function qmount(args: string[], opts: { cwd?: string } = {}): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000, cwd: opts.cwd });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Run `cmd` in a pseudo-terminal (script(1)): stdout and stderr both come back in stdout. */
function inTerminal(cmd: string): { code: number | null; out: string } {
  const r = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, out: r.stdout };
}

/** Wait (up to a minute, not a timed assertion) until `probe` is true: stderr may trail the ready message. */
async function until(probe: () => boolean): Promise<void> {
  for (let i = 0; i < 600 && !probe(); i++) await new Promise((r) => setTimeout(r, 100));
}

async function withMounted(m: MountedImage, body: (m: MountedImage) => void | Promise<void>): Promise<void> {
  try {
    await body(m);
  } finally {
    await m.unmount();
  }
}

beforeAll(() => {
  scratch = scratchDir('cli-parity');
});
afterAll(() => scratch?.cleanup());

describe('qmount info agrees with qemu-img info field by field', () => {
  const images: Record<string, () => string> = {
    'v3 with a snapshot (date-nsec, icount)': () => {
      const p = at('snap.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', p, '64M');
      qemuIo(p, 'qcow2', ['write -P 0x11 0 1M']);
      qemuImg('snapshot', '-c', 'first', p);
      qemuIo(p, 'qcow2', ['write -P 0x22 512k 1M']);
      qemuImg('snapshot', '-c', 'second one', p);
      return p;
    },
    'compat 0.10': () => {
      const p = at('v2.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', p, '16M');
      return p;
    },
    'external raw data file (data-file-raw)': () => {
      const p = at('df.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${at('df.data')},data_file_raw=on`, p, '8M');
      return p;
    },
    'extended L2, zstd, lazy refcounts, 16k clusters': () => {
      const p = at('ext.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,compression_type=zstd,lazy_refcounts=on,cluster_size=16384', p, '8M');
      return p;
    },
    qed: () => {
      const p = at('plain.qed');
      qemuImg('create', '-q', '-f', 'qed', p, '8M');
      return p;
    },
    raw: () => {
      const p = at('plain.raw');
      fs.writeFileSync(p, patternBytes(MiB, 3));
      return p;
    },
  };
  for (const [name, make] of Object.entries(images)) {
    it(`${name}: JSON equal, human text equal`, () => {
      const p = make();
      const want = JSON.parse(qemuImg('info', '--output=json', p)) as unknown;
      const r = qmount(['info', '--output', 'json', p]);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual(want);
      expect(qmount(['info', p]).stdout).toBe(qemuImg('info', p));
    });
  }

  it('--backing-chain: a list, equal to qemu-img info --backing-chain; plain info shows the top image only', () => {
    const base = at('chain-base.qcow2');
    const top = at('chain-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    const want = JSON.parse(qemuImg('info', '--output=json', '--backing-chain', top)) as unknown[];
    const r = qmount(['info', '--output', 'json', '--backing-chain', top]);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual(want);
    expect(want).toHaveLength(2);
    expect(JSON.parse(qmount(['info', '--output', 'json', top]).stdout)).toEqual(JSON.parse(qemuImg('info', '--output=json', top)));
    expect(qmount(['info', '--backing-chain', top]).stdout).toBe(qemuImg('info', '--backing-chain', top));
  });

  it('a missing backing file: the image is shown (as qemu-img shows it), one warning, exit 0', () => {
    const base = at('gone-base.qcow2');
    const top = at('orphan.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    fs.rmSync(base);
    const r = qmount(['info', '--output', 'json', top]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/^qmount: warning: the backing chain cannot be followed: .*gone-base\.qcow2.*ENOENT\n$/);
    expect(JSON.parse(r.stdout)).toEqual(JSON.parse(qemuImg('info', '--output=json', top)));
    const human = qmount(['info', top]);
    expect(human.code).toBe(0);
    expect(human.stdout).toBe(qemuImg('info', top));
  });
});

describe('qmount check agrees with qemu-img check', () => {
  /** qemu-img check --output=json, and its human lines. */
  function qemuCheckBoth(p: string): { code: number; json: Record<string, unknown>; human: string } {
    const j = run('qemu-img', ['check', '--output=json', p], { allowFail: true });
    const h = run('qemu-img', ['check', p], { allowFail: true });
    return { code: j.code, json: JSON.parse(j.stdout) as Record<string, unknown>, human: h.stdout };
  }
  const images: Record<string, () => string> = {
    'sequentially written': () => {
      const p = at('seq.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', p, '64M');
      qemuIo(p, 'qcow2', ['write -P 0x31 0 8M']);
      return p;
    },
    'fragmented (clusters written backwards)': () => {
      const p = at('frag.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', p, '64M');
      qemuIo(p, 'qcow2', Array.from({ length: 32 }, (_, i) => `write -P ${i + 1} ${(31 - i) * 65536 * 3} 64k`));
      return p;
    },
    'compressed': () => {
      const src = at('comp-src.raw');
      fs.writeFileSync(src, Buffer.concat([Buffer.alloc(4 * MiB, 0x41), patternBytes(MiB, 9)]));
      const p = at('comp.qcow2');
      qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, p);
      return p;
    },
    'with snapshots': () => {
      const p = at('snaps.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', p, '32M');
      qemuIo(p, 'qcow2', ['write -P 0x11 0 2M']);
      qemuImg('snapshot', '-c', 's1', p);
      qemuIo(p, 'qcow2', ['write -P 0x12 1M 2M']);
      return p;
    },
    'preallocation=metadata': () => {
      const p = at('prealloc.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', p, '256M');
      return p;
    },
    'qed, two runs of clusters': () => {
      const p = at('frag.qed');
      qemuImg('create', '-q', '-f', 'qed', p, '64M');
      qemuIo(p, 'qed', ['write -P 0x71 10M 64k', 'write -P 0x72 0 3M']);
      return p;
    },
    'truncated (clusters past the end)': () => {
      const p = at('cut.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', p, '64M');
      qemuIo(p, 'qcow2', ['write -P 0x51 0 4M']);
      fs.truncateSync(p, 2 * MiB);
      return p;
    },
  };
  for (const [name, make] of Object.entries(images)) {
    it(`${name}: same JSON counts, same summary lines, same exit code`, () => {
      const p = make();
      const want = qemuCheckBoth(p);
      const r = qmount(['check', '--output', 'json', p]);
      expect(r.code).toBe(want.code);
      const got = JSON.parse(r.stdout) as Record<string, unknown>;
      delete got.messages;
      expect(got).toEqual(want.json);
      const human = qmount(['check', p]);
      expect(human.code).toBe(want.code);
      const summary = (text: string) => text.split('\n').filter((l) => /% allocated|^Image end offset|errors were found|leaked clusters were found|^No errors/.test(l));
      expect(summary(human.stdout)).toEqual(summary(want.human));
      expect(summary(human.stdout).some((l) => /^\d+\/\d+ = [\d.]+% allocated, [\d.]+% fragmented, [\d.]+% compressed clusters$/.test(l))).toBe(true);
    });
  }

  it('-U checks an image a writer holds (without it the lock refuses); -U with --repair is a usage error', async () => {
    const p = at('held.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', p, '16M');
    await withMounted(await mountImage(p), () => {
      const locked = qmount(['check', p]);
      expect(locked.code).toBe(1);
      expect(locked.stderr).toMatch(/^qmount: .*(lock|in use|being written)/);
      const shared = qmount(['check', '-U', p]);
      expect(shared.stderr).toBe('');
      expect(shared.code).toBe(0);
      expect(shared.stdout).toMatch(/^No errors were found on the image\.$/m);
      const both = qmount(['check', '-U', '--repair', 'all', p]);
      expect(both.code).toBe(1);
      expect(both.stderr).toMatch(/--force-share .* cannot be used with --repair/);
    });
  });

  it('--format: raw has nothing to check (63), a raw file checked as qcow2 cannot complete (1)', () => {
    const q = at('fmt.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', q, '1M');
    const raw = at('fmt.raw');
    fs.writeFileSync(raw, Buffer.alloc(MiB));
    expect(qmount(['check', '--format', 'raw', q]).code).toBe(63);
    expect(run('qemu-img', ['check', '-f', 'raw', q], { allowFail: true }).code).toBe(63);
    const asQcow2 = qmount(['check', '--format', 'qcow2', raw]);
    expect(asQcow2.code).toBe(1);
    expect(run('qemu-img', ['check', '-f', 'qcow2', raw], { allowFail: true }).code).toBe(1);
    expect(qmount(['check', '-f', 'qcow2', q]).code).toBe(0);
  });
});

describe('extra positional arguments are an error', () => {
  it('info, check and mount refuse them (exit 1, one line)', () => {
    const p = at('extra.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', p, '1M');
    const dir = makeMountDir();
    try {
      for (const args of [['info', p, p], ['check', p, 'more'], [p, dir, 'surplus'], ['-f', p, dir, 'surplus']]) {
        const r = qmount(args);
        expect(r.code, args.join(' ')).toBe(1);
        expect(r.stderr).toMatch(/^qmount: too many arguments[^\n]*\n$/);
        expect(isMounted(dir)).toBe(false);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('known formats qmount does not implement are refused by name', () => {
  const FOREIGN: Array<{ fmt: string; name: RegExp; opts?: string[] }> = [
    { fmt: 'vmdk', name: /VMDK/ },
    { fmt: 'vmdk', name: /VMDK/, opts: ['-o', 'subformat=streamOptimized'] },
    { fmt: 'vpc', name: /VHD/ },
    { fmt: 'vhdx', name: /VHDX/ },
    { fmt: 'vdi', name: /VDI/ },
    { fmt: 'parallels', name: /Parallels/ },
    { fmt: 'qcow', name: /QCOW \(version 1\)/ },
  ];
  for (const [i, f] of FOREIGN.entries()) {
    it(`${f.fmt}${f.opts ? ` ${f.opts.join(' ')}` : ''}: info exit 2, check exit 63, mount exit 2, each naming it; --format raw takes the bytes`, async () => {
      const p = at(`foreign-${i}.${f.fmt}`);
      qemuImg('create', '-q', '-f', f.fmt, ...(f.opts ?? []), p, '8M');
      const before = fs.readFileSync(p);
      const info = qmount(['info', p]);
      expect(info.code).toBe(2);
      expect(info.stderr).toMatch(/^qmount: [^\n]*\n$/);
      expect(info.stderr).toMatch(f.name);
      const check = qmount(['check', p]);
      expect(check.code).toBe(63);
      expect(check.stderr).toMatch(f.name);
      const mounted = await qmountDaemon([], p);
      expect(mounted.code).toBe(2);
      expect(mounted.stderr).toMatch(f.name);
      expect(fs.readFileSync(p).equals(before)).toBe(true);
      const asRaw = qmount(['info', '--format', 'raw', p]);
      expect(asRaw.code).toBe(0);
      expect(asRaw.stdout).toMatch(/^file format: raw$/m);
    });
  }
});

describe('a probed raw image refuses writes that make sector 0 look like another format', () => {
  const qcow2Head = (): Buffer => {
    const h = Buffer.alloc(512);
    h.writeUInt32BE(0x514649fb, 0);
    h.writeUInt32BE(3, 4);
    return h;
  };
  it('qcow2, QED and VMDK magics (whole or pieced together) fail with EPERM and change nothing; other writes to sector 0 work', async () => {
    const p = at('guest.raw');
    fs.writeFileSync(p, patternBytes(4 * MiB, 21));
    await withMounted(await mountImage(p), (m) => {
      const fd = fs.openSync(m.rawPath, 'r+');
      try {
        const refused = (buf: Buffer, pos: number) => {
          expect(() => fs.writeSync(fd, buf, 0, buf.length, pos)).toThrow(expect.objectContaining({ code: 'EPERM' }) as Error);
        };
        refused(qcow2Head(), 0);
        refused(Buffer.from('QED\0'), 0);
        refused(Buffer.from('KDMV'), 0);
        // Piece by piece: the last byte first is fine (no magic yet), the rest would complete it.
        fs.writeSync(fd, Buffer.from([0xfb]), 0, 1, 3);
        refused(Buffer.from('QFI'), 0);
        fs.writeSync(fd, Buffer.alloc(4096, 0x77), 0, 4096, 0); // ordinary data: fine
        fs.writeSync(fd, qcow2Head(), 0, 512, 4096); // the magic elsewhere: fine
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    });
    expect(readAt(p, 0, 4096).equals(Buffer.alloc(4096, 0x77))).toBe(true);
    expect(qmount(['info', p]).stdout).toMatch(/^file format: raw$/m);
  });

  it('with --format raw the same write is the user’s choice', async () => {
    const p = at('chosen.raw');
    fs.writeFileSync(p, Buffer.alloc(MiB));
    await withMounted(await mountImage(p, { format: 'raw' }), (m) => {
      const fd = fs.openSync(m.rawPath, 'r+');
      try {
        fs.writeSync(fd, qcow2Head(), 0, 512, 0);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    });
    expect(readAt(p, 0, 4).readUInt32BE(0)).toBe(0x514649fb);
  });
});

describe('a truncated qcow2 mounted read-write', () => {
  const corruptions = (p: string): number => {
    const r = run('qemu-img', ['check', '--output=json', p], { allowFail: true });
    return (JSON.parse(r.stdout) as { corruptions?: number }).corruptions ?? 0;
  };
  // Layout of a fresh 64 MiB image with 4 MiB written: header, refcount table, refcount block, L1, L2 (at 256 KiB), data from 320 KiB.
  for (const cut of [200 * 1024, 300 * 1024, 1 * MiB, 2 * MiB, 4 * MiB - 65536]) {
    it(`cut at ${cut} bytes: a warning at mount, and writes never add corruptions`, async () => {
      const p = at(`trunc-${cut}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', p, '64M');
      qemuIo(p, 'qcow2', ['write -P 0x61 0 4M']);
      fs.truncateSync(p, cut);
      const before = corruptions(p);
      expect(before).toBeGreaterThan(0);
      await withMounted(await mountImage(p), (m) => {
        expect(m.stderr()).toMatch(/qmount: warning: .*looks truncated/);
        const fd = fs.openSync(m.rawPath, 'r+');
        try {
          for (const off of [0, MiB, 3 * MiB, 3 * MiB + 131172, 10 * MiB, 40 * MiB]) {
            try {
              fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, off);
            } catch (err) {
              expect((err as NodeJS.ErrnoException).code).toBe('EIO'); // refused, image marked corrupt
            }
          }
          try {
            fs.fsyncSync(fd);
          } catch (err) {
            expect((err as NodeJS.ErrnoException).code).toBe('EIO');
          }
        } finally {
          fs.closeSync(fd);
        }
      });
      expect(corruptions(p)).toBeLessThanOrEqual(before);
    });
  }
});

describe("the demo's printed hints work as printed", () => {
  it('each hint, run in order in a shell while the demo image is mounted read-write, exits 0', async () => {
    const { makeDemoImage } = (await import('../../scripts/make-demo.mjs')) as { makeDemoImage: (t: string, o: object) => unknown };
    const { demoHints } = (await import('../../scripts/start.mjs')) as {
      demoHints: (w: object) => Array<{ cmd: string; optional?: boolean }>;
    };
    const image = at('demo/demo.qcow2');
    fs.mkdirSync(path.dirname(image), { recursive: true });
    makeDemoImage(image, { sizeMiB: 32, label: 'gpt' });
    const mnt = at('demo/mnt');
    fs.mkdirSync(mnt);
    const guest = at('demo/guest');
    const hints = demoHints({ image, mnt, guest, cli: CLI, cwd: scratch.dir });
    let loop = '';
    await withMounted(await mountImage(image, { dir: mnt }), () => {
      try {
        for (const h of hints) {
          if (h.optional && fs.existsSync(`${loop}p1`)) continue;
          const cmd = loop ? h.cmd.replaceAll('/dev/loop0', loop) : h.cmd;
          const r = spawnSync('bash', ['-c', cmd], { cwd: scratch.dir, encoding: 'utf8', timeout: 60_000 });
          expect(r.status, `${cmd}: ${r.stderr}`).toBe(0);
          if (h.cmd.startsWith('losetup') && h.cmd.includes('--show')) loop = r.stdout.trim();
          if (h.cmd.includes('sha256sum')) expect(r.stdout).toMatch(/hello\.txt: OK/);
          if (h.cmd.includes(' info ')) expect(r.stdout).toMatch(/^file format: qcow2$/m);
          if (h.cmd.startsWith('dd ')) expect(r.stdout).toMatch(/EFI PART/);
        }
      } finally {
        if (isMounted(guest)) spawnSync('umount', [guest]);
        if (loop) spawnSync('losetup', ['-d', loop]);
      }
    });
    expect(loop).toMatch(/^\/dev\/loop\d+$/);
  });
});

describe('logs: readable on a terminal, JSON lines otherwise', () => {
  it('--log-format human gives one readable line per record; the default off a terminal is JSON; a foreground mount says it is ready', async () => {
    const p = at('logs.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', p, '4M');
    await withMounted(await mountImage(p, { extraArgs: ['--log-level', 'info', '--log-format', 'human'] }), async (m) => {
      await until(() => /qmount: ready/.test(m.stderr()));
      expect(m.stderr()).toMatch(/^\d\d:\d\d:\d\d\.\d{3} INFO {2}cli: ready image=\S+ mountPoint=\S+ pid=\d+$/m);
      expect(m.stderr()).toMatch(/^qmount: ready: .*logs\.qcow2 is mounted at .*disk\.raw \(read-write\)/m);
      expect(m.stderr()).not.toMatch(/^\{/m);
    });
    await withMounted(await mountImage(p, { extraArgs: ['--log-level', 'info'] }), async (m) => {
      await until(() => /qmount: ready/.test(m.stderr()));
      const json = m.stderr().split('\n').filter((l) => l.startsWith('{'));
      expect(json.map((l) => (JSON.parse(l) as { msg: string }).msg)).toContain('ready');
    });
  });

  it('on a terminal the default is human; --log-format json keeps JSON there', () => {
    // An overlay whose backing file is gone, mounted read-write: the open logs "opening backing file" at info, then fails (exit 2).
    const base = at('tty-base.qcow2');
    const top = at('tty-top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '4M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    fs.rmSync(base);
    const dir = makeMountDir();
    try {
      // (read-write: a read-only mount would serve the image and mark the missing backing ranges EIO)
      const human = inTerminal(`${process.execPath} ${CLI} -f --log-level info ${top} ${dir}`);
      expect(human.code).toBe(2);
      expect(human.out).toMatch(/^\d\d:\d\d:\d\d\.\d{3} INFO {2}image: opening backing file image=\S+ backing=\S+tty-base\.qcow2 format=qcow2\r?$/m);
      expect(human.out).not.toMatch(/^\{/m);
      const json = inTerminal(`${process.execPath} ${CLI} -f --log-level info --log-format json ${top} ${dir}`);
      expect(json.code).toBe(2);
      expect(json.out).toMatch(/^\{"level":30,.*"msg":"opening backing file"\}\r?$/m);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('progress of long work', () => {
  it('check: one updating line with percentage and rate on a terminal or with -p; nothing otherwise', () => {
    const p = at('progress.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', p, '64G');
    const forced = qmount(['check', '-p', p]);
    expect(forced.code).toBe(0);
    expect(forced.stderr).toMatch(/\r\x1b\[Kchecking +100\.0%/);
    expect(forced.stderr).not.toMatch(/\n/); // one line, redrawn, then cleared
    expect(forced.stderr.endsWith('\r\x1b[K')).toBe(true);
    const plain = qmount(['check', p]);
    expect(plain.stderr).toBe('');
    const tty = inTerminal(`${process.execPath} ${CLI} check ${p}`);
    expect(tty.code).toBe(0);
    expect(tty.out).toMatch(/checking +\d+\.\d%( +[\d.]+ [KMGT]?i?B\/s)?/);
    expect(inTerminal(`${process.execPath} ${CLI} check --no-progress ${p}`).out).not.toMatch(/checking/);
  });
});

describe('Ctrl-C during a long open', () => {
  it('the refcount rebuild of a dirty lazy-refcounts image stops at SIGINT; the image stays consistent (qemu-img check)', async () => {
    const p = at('dirty-big.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,preallocation=metadata', p, '1T');
    // Set the dirty bit (incompatible feature bit 0, header byte 79) as a killed QEMU would leave it.
    const b = readAt(p, 72, 8);
    b[7]! |= 1;
    writeAt(p, 72, b);
    expect((JSON.parse(qemuImg('info', '--output=json', p)) as { 'dirty-flag': boolean })['dirty-flag']).toBe(true);
    const dir = makeMountDir();
    try {
      const child = spawn(process.execPath, [CLI, '-f', '--log-level', 'info', '--log-format', 'json', p, dir], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      const started = new Promise<void>((resolve) => {
        child.stderr.setEncoding('utf8').on('data', (d: string) => {
          err += d;
          if (err.includes('rebuilding refcounts')) resolve();
        });
      });
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      await started;
      child.kill('SIGINT');
      const code = await exited;
      expect(err).not.toMatch(/"msg":"ready"/);
      expect(err).toMatch(/qmount: interrupted by SIGINT before the mount was ready/);
      expect(code).toBe(2);
      expect(isMounted(dir)).toBe(false);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    const check = run('qemu-img', ['check', p], { allowFail: true });
    expect(check.code, check.stdout + check.stderr).toBe(0);
    // The rebuild never finished, so the image is still marked dirty: the next open rebuilds again.
    expect((JSON.parse(qemuImg('info', '--output=json', p)) as { 'dirty-flag': boolean })['dirty-flag']).toBe(true);
  });
});
