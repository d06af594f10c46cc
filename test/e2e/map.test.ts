/**
 * `qmount map` against `qemu-img map` for every kind of image qmount reads:
 * the JSON output byte for byte (same extents, same fields), and the human
 * table. The extents come from the drivers' blockStatus.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI } from '../helpers/mount.js';
import { patternBytes, qemuImg, qemuIo, run, scratchDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
let scratch: { dir: string; cleanup: () => void };

function qmount(args: string[], cwd: string): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000, cwd });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

interface Kind {
  name: string;
  format: 'qcow2' | 'qed' | 'raw';
  /** makes the image in the scratch dir; returns its file name */
  make: (dir: string) => string;
}

const q = (dir: string, ...args: string[]) => run('qemu-img', args.map((a) => (a.endsWith('.qcow2') || a.endsWith('.qed') || a.endsWith('.raw') ? path.join(dir, a) : a)));
const io = (dir: string, file: string, format: string, cmds: string[]) => qemuIo(path.join(dir, file), format, cmds);

const KINDS: Kind[] = [
  {
    name: 'sparse raw',
    format: 'raw',
    make: (dir) => {
      const p = path.join(dir, 'sparse.raw');
      fs.writeFileSync(p, '');
      fs.truncateSync(p, 8 * MiB);
      const fd = fs.openSync(p, 'r+');
      fs.writeSync(fd, patternBytes(192 * 1024, 1), 0, 192 * 1024, MiB);
      fs.writeSync(fd, patternBytes(64 * 1024, 2), 0, 64 * 1024, 6 * MiB);
      fs.closeSync(fd);
      return 'sparse.raw';
    },
  },
  {
    name: 'QED with data and zero clusters',
    format: 'qed',
    make: (dir) => {
      q(dir, 'create', '-q', '-f', 'qed', 'plain.qed', '16M');
      io(dir, 'plain.qed', 'qed', ['write -P 1 0 256k', 'write -P 2 3M 64k', 'write -P 3 15M 1M']);
      return 'plain.qed';
    },
  },
  {
    name: 'QED over a raw backing file, larger than it',
    format: 'qed',
    make: (dir) => {
      const base = path.join(dir, 'qbase.raw');
      fs.writeFileSync(base, patternBytes(4 * MiB, 3));
      q(dir, 'create', '-q', '-f', 'qed', '-b', 'qbase.raw', '-F', 'raw', 'over-raw.qed', '8M');
      io(dir, 'over-raw.qed', 'qed', ['write -P 4 1M 128k', 'write -P 5 6M 64k']);
      return 'over-raw.qed';
    },
  },
  {
    name: 'qcow2 with data, zero clusters and compressed clusters',
    format: 'qcow2',
    make: (dir) => {
      q(dir, 'create', '-q', '-f', 'qcow2', 'mixed.qcow2', '16M');
      io(dir, 'mixed.qcow2', 'qcow2', ['write -P 1 0 1M', 'write -z 2M 1M', 'write -c -P 2 4M 64k', 'write -c -P 3 4224k 64k', 'write -P 4 8M 64k']);
      return 'mixed.qcow2';
    },
  },
  {
    name: 'qcow2 chain of three (qcow2 over qcow2 over raw)',
    format: 'qcow2',
    make: (dir) => {
      const base = path.join(dir, 'chain-base.raw');
      fs.writeFileSync(base, patternBytes(2 * MiB, 4));
      q(dir, 'create', '-q', '-f', 'qcow2', '-b', 'chain-base.raw', '-F', 'raw', 'chain-mid.qcow2', '8M');
      io(dir, 'chain-mid.qcow2', 'qcow2', ['write -P 5 1M 2M', 'write -z 5M 64k']);
      q(dir, 'create', '-q', '-f', 'qcow2', '-b', 'chain-mid.qcow2', '-F', 'qcow2', 'chain-top.qcow2', '12M');
      io(dir, 'chain-top.qcow2', 'qcow2', ['write -P 6 1536k 64k', 'write -z 0 64k', 'write -P 7 10M 64k']);
      return 'chain-top.qcow2';
    },
  },
  {
    name: 'qcow2 extended L2 with subclusters over a backing file',
    format: 'qcow2',
    make: (dir) => {
      q(dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', 'ext-base.qcow2', '8M');
      io(dir, 'ext-base.qcow2', 'qcow2', ['write -P 8 0 4M']);
      q(dir, 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'ext-base.qcow2', '-F', 'qcow2', 'ext.qcow2', '8M');
      io(dir, 'ext.qcow2', 'qcow2', ['write -P 9 4k 4k', 'write -P 9 64k 2k', 'write -z 1M 8k', 'write -P 10 5M 64k']);
      return 'ext.qcow2';
    },
  },
  {
    name: 'qcow2 with preallocated metadata (qmount create)',
    format: 'qcow2',
    make: (dir) => {
      const r = qmount(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'prealloc.qcow2', '8M'], dir);
      expect(r.code).toBe(0);
      io(dir, 'prealloc.qcow2', 'qcow2', ['write -P 11 2M 64k']);
      return 'prealloc.qcow2';
    },
  },
];

beforeAll(() => {
  scratch = scratchDir('map');
});
afterAll(() => scratch.cleanup());

describe.each(KINDS)('qmount map: $name', (k) => {
  let file: string;
  beforeAll(() => {
    file = k.make(scratch.dir);
  });

  it('--output json equals qemu-img map --output=json', () => {
    const want = qemuImg('map', '--output=json', '-f', k.format, path.join(scratch.dir, file));
    const got = qmount(['map', '--output', 'json', '--format', k.format, path.join(scratch.dir, file)], scratch.dir);
    expect(got.stderr).toBe('');
    expect(got.code).toBe(0);
    expect(JSON.parse(got.stdout)).toEqual(JSON.parse(want));
    expect(got.stdout).toBe(want);
  });

  it('the human table equals qemu-img map (image named as given)', () => {
    const r = spawnSync('qemu-img', ['map', '-f', k.format, file], { encoding: 'utf8', cwd: scratch.dir });
    if (r.status !== 0) {
      // qemu-img refuses the human table for compressed clusters; qmount lists the rest.
      expect(r.stderr).toMatch(/compressed/);
      return;
    }
    const got = qmount(['map', '--format', k.format, file], scratch.dir);
    expect(got.code).toBe(0);
    // Backing files: qemu-img names them relative to the overlay's directory, qmount by their absolute path.
    const norm = (s: string) => s.split('\n').map((l) => l.replace(/\S*\/(\S+)$/, '$1')).join('\n');
    expect(norm(got.stdout)).toBe(norm(r.stdout));
  });
});
