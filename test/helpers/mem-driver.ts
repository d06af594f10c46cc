/**
 * An in-memory BlockDriver with clusters, for mount-side tests that must not
 * depend on a format's engine: clusters are either absent (a hole, reads
 * zeros), zero-flagged (reads zeros, not data) or stored. Follows the
 * driver contract's range and errno rules (checkRequest), resize's shrink
 * rule (EPERM unless nothing is stored at or past the new end) and
 * writeZeroes' unmap (whole clusters dropped, partial ones zeroed in place).
 * `calls` records the sparse calls for assertions.
 */
import { QmountError } from '../../src/errors.js';
import { checkRequest, type BlockDriver, type BlockExtent, type ImageInfo } from '../../src/formats/driver.js';

export class MemDriver implements BlockDriver {
  readonly format = 'raw' as const;
  readonly filename = 'mem';
  readonly clusters = new Map<number, Buffer | 'zero'>();
  readonly calls: string[] = [];
  private closed = false;
  /** Make blockStatus answer ENOTSUP (a source that cannot tell holes). */
  noStatus = false;

  constructor(
    public virtualSize: number,
    readonly clusterSize = 65536,
    readonly readOnly = false,
  ) {}

  async read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    await Promise.resolve();
    let done = 0;
    while (done < length) {
      const at = guestOffset + done;
      const ci = Math.floor(at / this.clusterSize);
      const inC = at - ci * this.clusterSize;
      const n = Math.min(length - done, this.clusterSize - inC);
      const c = this.clusters.get(ci);
      if (c instanceof Buffer) c.copy(buf, bufOffset + done, inC, inC + n);
      else buf.fill(0, bufOffset + done, bufOffset + done + n);
      done += n;
    }
  }

  async write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    await Promise.resolve();
    let done = 0;
    while (done < length) {
      const at = guestOffset + done;
      const ci = Math.floor(at / this.clusterSize);
      const inC = at - ci * this.clusterSize;
      const n = Math.min(length - done, this.clusterSize - inC);
      let c = this.clusters.get(ci);
      if (!(c instanceof Buffer)) {
        c = Buffer.alloc(this.clusterSize);
        this.clusters.set(ci, c);
      }
      buf.copy(c, inC, bufOffset + done, bufOffset + done + n);
      done += n;
    }
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  info(): ImageInfo {
    return { format: 'raw', filename: this.filename, virtualSize: this.virtualSize, features: [] };
  }

  async blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    this.calls.push(`blockStatus ${guestOffset} ${length}`);
    checkRequest(this, 'read', guestOffset, length, this.closed);
    await Promise.resolve();
    if (this.noStatus) throw new QmountError('ENOTSUP', 'no block status');
    const out: BlockExtent[] = [];
    let at = guestOffset;
    const end = guestOffset + length;
    while (at < end) {
      const ci = Math.floor(at / this.clusterSize);
      const n = Math.min(end, (ci + 1) * this.clusterSize) - at;
      const c = this.clusters.get(ci);
      const e: BlockExtent = c instanceof Buffer
        ? { guestOffset: at, length: n, data: true, zero: false, present: true, depth: 0 }
        : { guestOffset: at, length: n, data: false, zero: true, present: c === 'zero', depth: 0 };
      const last = out[out.length - 1];
      if (last && last.data === e.data && last.present === e.present) last.length += n;
      else out.push(e);
      at += n;
    }
    return out;
  }

  async writeZeroes(guestOffset: number, length: number, opts: { unmap: boolean }): Promise<void> {
    this.calls.push(`writeZeroes ${guestOffset} ${length} ${opts.unmap ? 'unmap' : 'keep'}`);
    checkRequest(this, 'write', guestOffset, length, this.closed);
    await Promise.resolve();
    let at = guestOffset;
    const end = guestOffset + length;
    while (at < end) {
      const ci = Math.floor(at / this.clusterSize);
      const cStart = ci * this.clusterSize;
      const n = Math.min(end, cStart + this.clusterSize) - at;
      const c = this.clusters.get(ci);
      if (n === this.clusterSize) {
        if (opts.unmap) this.clusters.delete(ci);
        else this.clusters.set(ci, 'zero');
      } else if (c instanceof Buffer) {
        c.fill(0, at - cStart, at - cStart + n);
      }
      at += n;
    }
  }

  async resize(newSize: number): Promise<void> {
    this.calls.push(`resize ${newSize}`);
    if (this.readOnly) throw new QmountError('EROFS', 'read-only');
    if (!Number.isSafeInteger(newSize) || newSize < 0 || newSize % 512 !== 0) throw new QmountError('EINVAL', `size ${newSize}`);
    await Promise.resolve();
    if (newSize < this.virtualSize) {
      for (const [ci, c] of this.clusters) {
        if (c instanceof Buffer && (ci + 1) * this.clusterSize > newSize) {
          const from = Math.max(0, newSize - ci * this.clusterSize);
          if (c.subarray(from).some((b) => b !== 0)) throw new QmountError('EPERM', `data at or past ${newSize}`);
        }
      }
      for (const ci of [...this.clusters.keys()]) if (ci * this.clusterSize >= newSize) this.clusters.delete(ci);
    }
    this.virtualSize = newSize;
  }

  allocatedBytes(): number {
    let n = 0;
    for (const c of this.clusters.values()) if (c instanceof Buffer) n += this.clusterSize;
    return n;
  }
}
