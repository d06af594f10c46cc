/** QED driver: placeholder until the QED issue lands. */
import { UnsupportedError } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import type { BlockDriver, DriverOpenOptions } from '../driver.js';

export async function openQed(file: ImageFile, _opts: DriverOpenOptions): Promise<BlockDriver> {
  throw new UnsupportedError(`${file.path}: QED is not supported yet`);
}
