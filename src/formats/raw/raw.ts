/** Raw images: guest offset == file offset. Serves as backing file and as a format of its own. */
import { ReadOnlyError, FormatError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import type { BlockDriver, DriverOpenOptions, ImageInfo } from '../driver.js';

export async function openRaw(file: ImageFile, opts: DriverOpenOptions): Promise<BlockDriver> {
  const size = await file.size();
  return new RawDriver(file, size, opts.readOnly);
}

class RawDriver implements BlockDriver {
  readonly format = 'raw' as const;
  constructor(
    private readonly file: ImageFile,
    readonly virtualSize: number,
    readonly readOnly: boolean,
  ) {}

  get filename(): string {
    return this.file.path;
  }

  async read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    await this.file.readZeroFill(buf, bufOffset, length, guestOffset);
  }

  async write(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError();
    if (guestOffset + length > this.virtualSize) throw new FormatError('write past the end of the disk', 'ENOSPC');
    await this.file.write('data_write', buf, bufOffset, length, guestOffset);
  }

  flush(): Promise<void> {
    return this.file.flush();
  }

  async close(): Promise<void> {
    if (!this.readOnly) await this.file.flush();
    await this.file.close();
  }

  info(): ImageInfo {
    return { format: 'raw', filename: this.file.path, virtualSize: this.virtualSize, features: [] };
  }
}
