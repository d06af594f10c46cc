/**
 * Random write workloads against a plain raw model file. The same writes go
 * to the image under test (through a real mount's disk.raw, or the engine)
 * and to the model; read-backs in between must match the model.
 */
import fs from 'node:fs';
import { patternBytes } from './qemu.js';

export interface WorkloadOptions {
  count: number;
  /** largest write in bytes */
  maxLength: number;
  seed: number;
  /** fraction of writes that are all zeros */
  zeroFraction?: number;
  /** read back and compare a random range every this many writes */
  verifyEvery?: number;
  /** restrict offsets to [0, limit) */
  limit?: number;
}

export interface Target {
  size: number;
  write(buf: Buffer, offset: number): Promise<void> | void;
  read(buf: Buffer, offset: number): Promise<void> | void;
}

/** mulberry32: a deterministic PRNG with another sequence than rng(), for picking offsets and mutations. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/** A file target (disk.raw of a mount) using positional syscalls. */
export function fileTarget(path: string, size: number): Target & { close(): void; fsync(): void } {
  const fd = fs.openSync(path, 'r+');
  return {
    size,
    write: (buf, off) => {
      fs.writeSync(fd, buf, 0, buf.length, off);
    },
    read: (buf, off) => {
      let done = 0;
      while (done < buf.length) {
        const n = fs.readSync(fd, buf, done, buf.length - done, off + done);
        if (n === 0) throw new Error(`short read at ${off + done}`);
        done += n;
      }
    },
    close: () => fs.closeSync(fd),
    fsync: () => fs.fsyncSync(fd),
  };
}

/**
 * Run the workload. Sizes are skewed small (1 byte .. maxLength, cubic),
 * offsets unaligned, some writes all-zero. Returns the number of mismatching
 * read-backs (0 expected) and throws on the first with its offset.
 */
export async function randomWrites(target: Target, modelPath: string, o: WorkloadOptions): Promise<void> {
  const r = rng(o.seed);
  const model = fs.openSync(modelPath, 'r+');
  const limit = o.limit ?? target.size;
  try {
    for (let i = 0; i < o.count; i++) {
      const len = Math.max(1, Math.min(limit, Math.floor(r() ** 3 * o.maxLength) + 1));
      // Bias some writes to cluster-ish boundaries, most anywhere.
      let off = Math.floor(r() * (limit - len + 1));
      if (r() < 0.2) off -= off % 65536;
      const buf = r() < (o.zeroFraction ?? 0.1) ? Buffer.alloc(len) : patternBytes(len, o.seed * 100003 + i);
      await target.write(buf, off);
      fs.writeSync(model, buf, 0, len, off);
      if (o.verifyEvery && i % o.verifyEvery === o.verifyEvery - 1) {
        const vlen = Math.min(limit, 1 + Math.floor(r() * 3 * 1024 * 1024));
        const voff = Math.floor(r() * (limit - vlen + 1));
        await compareRange(target, model, voff, vlen);
      }
    }
  } finally {
    fs.closeSync(model);
  }
}

export async function compareRange(target: Target, modelFd: number, off: number, len: number): Promise<void> {
  const got = Buffer.alloc(len);
  const want = Buffer.alloc(len);
  await target.read(got, off);
  fs.readSync(modelFd, want, 0, len, off);
  if (!got.equals(want)) {
    let i = 0;
    while (got[i] === want[i]) i++;
    throw new Error(`read-back differs from the model at guest offset ${off + i}`);
  }
}

/** Compare the whole target with the model in 4 MiB chunks. */
export async function compareAll(target: Target, modelPath: string): Promise<void> {
  const fd = fs.openSync(modelPath, 'r');
  try {
    const chunk = 4 * 1024 * 1024;
    for (let off = 0; off < target.size; off += chunk) {
      await compareRange(target, fd, off, Math.min(chunk, target.size - off));
    }
  } finally {
    fs.closeSync(fd);
  }
}
