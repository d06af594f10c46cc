/**
 * `qmount create` against qemu-img: for every variant, qemu-img check is
 * clean, qemu-img info reports what qemu-img create would have made (every
 * field but the file name and its allocated size), the image reads as zeros
 * (or as its backing file), and a qmount mount can write to it and leave it
 * clean.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, mountImage } from '../helpers/mount.js';
import { convertToRaw, patternBytes, qemuCheck, qemuCompare, qemuImg, qemuIo, scratchDir, sha256File } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
let scratch: { dir: string; cleanup: () => void };
let base: string;

function qmount(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function infoJson(image: string): Record<string, unknown> {
  const info = JSON.parse(qemuImg('info', '--output=json', image)) as Record<string, unknown>;
  delete info.filename;
  delete info['actual-size'];
  return info;
}

beforeAll(() => {
  scratch = scratchDir('create');
  base = path.join(scratch.dir, 'base.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, String(24 * MiB));
  qemuIo(base, 'qcow2', ['write -P 0x5a 0 1M', 'write -P 0x33 5M 64k', 'write -P 0x77 23M 1M']);
});
afterAll(() => scratch.cleanup());

interface Variant {
  name: string;
  format: 'qcow2' | 'qed';
  args: string[];
  /** undefined: taken from the backing file */
  size?: string;
}

const VARIANTS: Variant[] = [
  { name: 'qcow2 v3 defaults', format: 'qcow2', args: [], size: '64M' },
  { name: 'qcow2 v2 (compat=0.10), 4 KiB clusters', format: 'qcow2', args: ['-o', 'compat=0.10,cluster_size=4096'], size: '40M' },
  { name: 'qcow2 extended L2, 128 KiB clusters, lazy refcounts, refcount_bits=1', format: 'qcow2', args: ['-o', 'extended_l2=on,cluster_size=128k,lazy_refcounts=on,refcount_bits=1'], size: '3G' },
  { name: 'qcow2 preallocation=metadata, refcount_bits=64, 512-byte clusters', format: 'qcow2', args: ['-o', 'preallocation=metadata,refcount_bits=64,cluster_size=512'], size: '6M' },
  { name: 'qcow2 with a backing file, size from the backing', format: 'qcow2', args: ['-b', 'base.qcow2', '-F', 'qcow2'] },
  { name: 'qcow2 extended L2 over a backing file, larger than it', format: 'qcow2', args: ['-b', 'base.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on'], size: '40M' },
  { name: 'QED 4 KiB clusters, table_size 2', format: 'qed', args: ['-o', 'cluster_size=4096,table_size=2'], size: '100M' },
  { name: 'QED with a backing file', format: 'qed', args: ['-b', 'base.qcow2', '-F', 'qcow2'] },
];

describe.each(VARIANTS)('qmount create: $name', (v) => {
  let mine: string;
  let theirs: string;
  beforeAll(() => {
    const tag = v.name.replace(/[^a-z0-9]+/gi, '-');
    mine = path.join(scratch.dir, `mine-${tag}.${v.format}`);
    theirs = path.join(scratch.dir, `qemu-${tag}.${v.format}`);
    const size = v.size === undefined ? [] : [v.size];
    const r = qmount(['create', '-f', v.format, ...v.args, mine, ...size]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Formatting '.*', fmt=/);
    qemuImg('create', '-q', '-f', v.format, ...v.args, theirs, ...size);
  });

  it('is clean for qemu-img check and qemu-img info agrees with qemu-img create', () => {
    const check = qemuCheck(mine, v.format);
    expect(check.output).toMatch(/No errors were found/);
    expect(check.code).toBe(0);
    expect(infoJson(mine)).toEqual(infoJson(theirs));
  });

  it('reads like the image qemu-img made, and qmount info agrees', () => {
    expect(qemuCompare(mine, theirs, v.format, v.format).same).toBe(true);
    const info = JSON.parse(qmount(['info', '--output', 'json', mine]).stdout) as Record<string, unknown>;
    const q = infoJson(theirs);
    // (QED records no backing format; qmount info names the one it probed, qemu-img info none: cli-parity's concern.)
    const keys = ['format', 'virtual-size', 'cluster-size', 'backing-filename', ...(v.format === 'qcow2' ? ['backing-filename-format'] : [])];
    for (const k of keys) expect(info[k]).toEqual(q[k]);
  });

  it('takes writes through a qmount mount and stays clean', async () => {
    const work = path.join(scratch.dir, `w-${path.basename(mine)}`);
    const ref = `${work}.ref.raw`;
    fs.copyFileSync(mine, work);
    convertToRaw(mine, ref);
    const data = patternBytes(300 * 1024, 9);
    const at = 512 * 1024 + 4096; // over the backing file's data where there is one
    const rfd = fs.openSync(ref, 'r+');
    fs.writeSync(rfd, data, 0, data.length, at);
    fs.closeSync(rfd);
    const m = await mountImage(work, { format: v.format });
    try {
      const fd = fs.openSync(m.rawPath, 'r+');
      fs.writeSync(fd, data, 0, data.length, at);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
    } finally {
      await m.unmount();
    }
    expect(qemuCheck(work, v.format).code).toBe(0);
    expect(qemuCompare(work, ref, v.format, 'raw').output).toMatch(/Images are identical/);
  });
});

describe('qmount create refuses what qemu-img refuses, and never overwrites', () => {
  const CASES: Array<{ name: string; args: string[]; code: number; msg: RegExp }> = [
    { name: '-b without -F', args: ['-f', 'qcow2', '-b', 'base.qcow2', 'x1.qcow2'], code: 1, msg: /needs its format: -F/ },
    { name: 'lazy_refcounts with compat=0.10', args: ['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'x2.qcow2', '1M'], code: 1, msg: /compatibility level 1\.1/ },
    { name: 'extended_l2 with 4 KiB clusters', args: ['-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k', 'x3.qcow2', '1M'], code: 1, msg: /at least 16384/ },
    { name: 'bad cluster size', args: ['-f', 'qcow2', '-o', 'cluster_size=3000', 'x4.qcow2', '1M'], code: 1, msg: /power of two/ },
    { name: 'unknown option', args: ['-f', 'qcow2', '-o', 'frobnicate=1', 'x5.qcow2', '1M'], code: 1, msg: /does not support option "frobnicate"/ },
    { name: 'no size and no backing', args: ['-f', 'qcow2', 'x6.qcow2'], code: 1, msg: /SIZE is needed/ },
    { name: 'missing backing file', args: ['-f', 'qcow2', '-b', 'nope.qcow2', '-F', 'qcow2', 'x7.qcow2'], code: 2, msg: /nope\.qcow2/ },
  ];
  for (const c of CASES) {
    it(c.name, () => {
      const r = qmount(['create', ...c.args.map((a) => (/^x\d\./.test(a) ? path.join(scratch.dir, a) : a))]);
      expect(r.stderr).toMatch(/^qmount: [^\n]+\n$/);
      expect(r.stderr).toMatch(c.msg);
      expect(r.code).toBe(c.code);
      const target = c.args.find((a) => /^x\d\./.test(a))!;
      expect(fs.existsSync(path.join(scratch.dir, target))).toBe(false);
    });
  }

  it('a 0-byte qcow2 (empty L1 table) is clean and as qemu-img makes it', () => {
    const mine = path.join(scratch.dir, 'zero-mine.qcow2');
    const theirs = path.join(scratch.dir, 'zero-qemu.qcow2');
    expect(qmount(['create', '-q', '-f', 'qcow2', mine, '0']).code).toBe(0);
    qemuImg('create', '-q', '-f', 'qcow2', theirs, '0');
    expect(qemuCheck(mine, 'qcow2').code).toBe(0);
    expect(infoJson(mine)).toEqual(infoJson(theirs));
    expect(qmount(['info', mine]).code).toBe(0);
  });

  it('progress: -p draws one updating line while a preallocated image is written; nothing without it off a terminal', () => {
    const shown = path.join(scratch.dir, 'progress-p.qcow2');
    const r = qmount(['create', '-q', '-p', '-f', 'qcow2', '-o', 'preallocation=metadata', shown, '64G']);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/\r\x1b\[Kcreating +\d+\.\d%/);
    expect(r.stderr).not.toMatch(/\n/);
    expect(qemuCheck(shown, 'qcow2').code).toBe(0);
    const quiet = path.join(scratch.dir, 'progress-none.qcow2');
    expect(qmount(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', quiet, '64G']).stderr).toBe('');
  });

  it('an existing file is left alone (EEXIST)', () => {
    const before = sha256File(base);
    const r = qmount(['create', '-f', 'qcow2', base, '1M']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already exists/);
    expect(sha256File(base)).toBe(before);
  });
});
