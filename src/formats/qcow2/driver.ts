/**
 * The qcow2 BlockDriver: opens and validates an image, then serves reads
 * (read.ts) and writes (write.ts) over one Qcow2State.
 */
import path from 'node:path';
import { FormatError, QmountError, ReadOnlyError, UnsupportedError } from '../../errors.js';
import { ImageFile } from '../../io/file.js';
import { checkRequest, type BlockDriver, type FdSink, type BlockExtent, type DriverOpenOptions, type FormatName, type ImageInfo } from '../driver.js';
import { lockForUse } from '../image-lock.js';
import { featureList, parseHeader, type Qcow2Header } from './header.js';
import { readGuest, readGuestNow, sendGuestNow } from './read.js';
import { resize } from './resize.js';
import { readSnapshotTable } from './snapshot.js';
import { blockStatus } from './status.js';
import { Qcow2State } from './state.js';
import { Qcow2Writer } from './write.js';
import { writeZeroes } from './zero.js';
import { geometryOf, hasBit, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, HDR, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V2_HEADER_BYTES, V3_HEADER_BYTES } from './spec.js';

const KNOWN_BACKING_FORMATS: Record<string, FormatName> = { qcow2: 'qcow2', raw: 'raw', qed: 'qed', file: 'raw' };

export async function openQcow2(file: ImageFile, opts: DriverOpenOptions): Promise<BlockDriver> {
  const state = await loadQcow2(file, opts, false);
  try {
    const driver = new Qcow2Driver(state, opts);
    if (!opts.readOnly) await driver.writer!.openForWrite();
    return driver;
  } catch (err) {
    await state.backing?.close().catch(() => {});
    await state.dataFile?.close().catch(() => {});
    throw err;
  }
}

/**
 * Read and validate everything an open needs: header, L1, snapshots, data
 * file, backing chain. `forCheck` lets a repairing check open an image whose
 * corrupt bit is set.
 */
export async function loadQcow2(file: ImageFile, opts: DriverOpenOptions, forCheck: boolean): Promise<Qcow2State> {
  const fileSize = await file.size();
  const first = Buffer.alloc(Math.min(fileSize, V3_HEADER_BYTES));
  await file.read(first, 0, first.length, 0);
  if (first.length < V2_HEADER_BYTES) throw new FormatError('file too short for a qcow2 header');
  // The header cluster (where extensions and the backing file name live); parseHeader validates cluster_bits.
  const clusterBits = first.readUInt32BE(HDR.clusterBits);
  const headLen = Math.min(fileSize, clusterBits >= MIN_CLUSTER_BITS && clusterBits <= MAX_CLUSTER_BITS ? 2 ** clusterBits : V3_HEADER_BYTES);
  const head = Buffer.alloc(headLen);
  await file.read(head, 0, headLen, 0);
  const header = parseHeader(head, fileSize);
  const g = geometryOf(header);

  if (hasBit(header.incompatible, INCOMPAT_CORRUPT) && !opts.readOnly && !forCheck) {
    throw new QmountError('EROFS', 'image is marked corrupt; mount it read-only (-r) to recover data, or repair it with qemu-img check -r all');
  }

  let dataFile: ImageFile | null = null;
  const closeOnError: ImageFile[] = [];
  try {
    if (hasBit(header.incompatible, INCOMPAT_DATA_FILE)) {
      const name = header.dataFile!;
      const resolved = path.isAbsolute(name) ? name : path.join(path.dirname(file.path), name);
      try {
        dataFile = await ImageFile.open(resolved, { readOnly: opts.readOnly });
      } catch (err) {
        throw new QmountError('ENOENT', `external data file ${resolved} cannot be opened: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
      }
      closeOnError.push(dataFile);
      lockForUse(dataFile, resolved, name, { readOnly: opts.readOnly, dataFile: true }); // like QEMU locks a data file (../image-lock.ts)
    }
    const l1 = Buffer.alloc(header.l1Size * 8);
    if (header.l1Size > 0) await file.read(l1, 0, l1.length, header.l1TableOffset);
    const snaps = await readSnapshotTable(file, header.snapshotsOffset, header.nbSnapshots, fileSize, g.clusterSize);

    let backing: BlockDriver | null = null;
    if (header.backingFile !== undefined && opts.openBacking) {
      let fmt: FormatName | undefined;
      if (header.backingFormat !== undefined) {
        fmt = KNOWN_BACKING_FORMATS[header.backingFormat];
        if (!fmt) throw new UnsupportedError(`backing format "${header.backingFormat}" is not supported`);
      }
      backing = await opts.openBacking(header.backingFile, fmt);
    }

    const state = new Qcow2State(file, dataFile, header, g, l1, snaps.snapshots, backing, fileSize, opts.l2CacheBytes, opts.log);
    state.snapshotTableBytes = snaps.byteLength;
    if (dataFile) state.dataFileSize = await dataFile.size();
    return state;
  } catch (err) {
    for (const f of closeOnError) await f.close().catch(() => {});
    throw err;
  }
}

class Qcow2Driver implements BlockDriver {
  readonly format = 'qcow2' as const;
  readonly readOnly: boolean;
  readonly writer: Qcow2Writer | null;
  private closed = false;

  constructor(
    readonly s: Qcow2State,
    opts: DriverOpenOptions,
  ) {
    this.readOnly = opts.readOnly;
    this.writer = opts.readOnly ? null : new Qcow2Writer(s, opts);
  }

  get filename(): string {
    return this.s.file.path;
  }

  get virtualSize(): number {
    return this.s.virtualSize;
  }

  read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    try {
      checkRequest(this, 'read', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.writer) return this.writer.read(buf, bufOffset, length, guestOffset);
    return readGuest(this.s, buf, bufOffset, length, guestOffset);
  }

  readNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    return readGuestNow(this.s, buf, bufOffset, length, guestOffset);
  }

  sendNow(length: number, guestOffset: number, sink: FdSink): boolean {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    return sendGuestNow(this.s, length, guestOffset, sink);
  }

  writeNow(buf: Buffer, bufOffset: number, length: number, guestOffset: number): boolean {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    return this.writer!.writeNow(buf, bufOffset, length, guestOffset);
  }

  write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    try {
      checkRequest(this, 'write', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.writer!.write(buf, bufOffset, length, guestOffset);
  }

  async flush(): Promise<void> {
    if (this.closed) throw new QmountError('EBADF', `${this.filename}: flush after close`);
    if (this.writer) await this.writer.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (this.writer) await this.writer.close();
    } finally {
      await this.s.backing?.close().catch(() => {});
      await this.s.dataFile?.close().catch(() => {});
      await this.s.file.close();
    }
  }

  blockStatus(guestOffset: number, length: number): Promise<BlockExtent[]> {
    try {
      checkRequest(this, 'read', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err);
    }
    return blockStatus(this.s, guestOffset, length);
  }

  writeZeroes(guestOffset: number, length: number, opts: { unmap: boolean }): Promise<void> {
    try {
      checkRequest(this, 'write', guestOffset, length, this.closed);
    } catch (err) {
      return Promise.reject(err);
    }
    return writeZeroes(this.writer!, guestOffset, length, opts.unmap);
  }

  async resize(newSize: number): Promise<void> {
    if (this.closed) throw new QmountError('EBADF', `${this.filename}: resize after close`);
    if (!this.writer) throw new ReadOnlyError();
    await resize(this.writer, newSize);
  }

  /**
   * Guest bytes of data in the chain (st_blocks): this image's data
   * clusters (state.ts, DataBytes: exact at cluster or subcluster
   * granularity once its one-time scan is done, the image file's size
   * before) plus what the backing chain reports, capped at the disk size. A
   * range stored in two layers counts twice (up to the cap): an estimate
   * that never reads metadata on the call.
   */
  allocatedBytes(): number {
    const below = this.s.backing ? this.s.backing.allocatedBytes() : 0;
    return Math.min(this.virtualSize, this.s.dataBytes.value() + below);
  }

  info(): ImageInfo {
    const h: Qcow2Header = this.s.header;
    return {
      format: 'qcow2',
      filename: this.s.file.path,
      virtualSize: h.size,
      actualSize: this.s.fileSize,
      clusterSize: this.s.g.clusterSize,
      version: h.version,
      backingFile: h.backingFile,
      backingPath: this.s.backing?.filename,
      backingFormat: h.backingFormat,
      features: featureList(h),
      snapshots: this.s.snapshots.map(({ id, name, vmStateSize, dateSec, dateNsec, guestSize, vmClockSec, vmClockNsec, icount }) => ({
        id, name, vmStateSize, dateSec, dateNsec, guestSize, vmClockSec, vmClockNsec, icount,
      })),
      refcountBits: 2 ** h.refcountOrder,
      compressionType: h.compressionType === 1 ? 'zstd' : 'zlib',
      dataFile: h.dataFile,
      extendedL2: this.s.g.extL2,
      backing: this.s.backing?.info(),
    };
  }
}
