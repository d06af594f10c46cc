/** Raw images: guest offset == file offset. Serves as backing file and as a format of its own. */
import { QmountError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import { checkRequest, notYet, type BlockDriver, type BlockExtent, type DriverOpenOptions, type ImageInfo } from '../driver.js';

export async function openRaw(file: ImageFile, opts: DriverOpenOptions): Promise<BlockDriver> {
  const size = await file.size();
  return new RawDriver(file, size, opts.readOnly);
}

class RawDriver implements BlockDriver {
  readonly format = 'raw' as const;
  private closed = false;

  constructor(
    private readonly file: ImageFile,
    readonly virtualSize: number,
    readonly readOnly: boolean,
  ) {}

  get filename(): string {
    return this.file.path;
  }

  async read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'read', guestOffset, length, this.closed);
    if (length === 0) return;
    await this.file.readZeroFill(buf, bufOffset, length, guestOffset);
  }

  async write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    checkRequest(this, 'write', guestOffset, length, this.closed);
    if (length === 0) return;
    await this.file.write('data_write', buf, bufOffset, length, guestOffset);
  }

  async flush(): Promise<void> {
    if (this.closed) throw new QmountError('EBADF', `${this.file.path}: flush after close`);
    await this.file.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) await this.file.flush();
    } finally {
      await this.file.close();
    }
  }

  // Placeholders: the sparse-image driver work (issue 13) replaces these.
  blockStatus(_guestOffset: number, _length: number): Promise<BlockExtent[]> {
    return notYet(this, 'blockStatus');
  }

  writeZeroes(_guestOffset: number, _length: number, _opts: { unmap: boolean }): Promise<void> {
    return notYet(this, 'writeZeroes');
  }

  resize(_newSize: number): Promise<void> {
    return notYet(this, 'resize');
  }

  allocatedBytes(): number {
    return this.virtualSize;
  }

  info(): ImageInfo {
    return { format: 'raw', filename: this.file.path, virtualSize: this.virtualSize, features: [] };
  }
}
