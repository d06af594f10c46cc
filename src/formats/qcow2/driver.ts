/** qcow2 driver: placeholder, being written. */
import { UnsupportedError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import type { BlockDriver, DriverOpenOptions } from '../driver.js';

export async function openQcow2(file: ImageFile, _opts: DriverOpenOptions): Promise<BlockDriver> {
  throw new UnsupportedError(`${file.path}: qcow2 is not supported yet`);
}
