/** qcow2 write path: being written. */
import { ReadOnlyError } from '../../errors.js';
import type { DriverOpenOptions } from '../driver.js';
import { readGuest } from './read.js';
import type { Qcow2State } from './state.js';

export class Qcow2Writer {
  constructor(
    private readonly s: Qcow2State,
    _opts: DriverOpenOptions,
  ) {}

  async openForWrite(): Promise<void> {}

  read(buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> {
    return readGuest(this.s, buf, bufOffset, length, guestOffset);
  }

  async write(_buf: Buffer, _bufOffset: number, _length: number, _guestOffset: number): Promise<void> {
    throw new ReadOnlyError('qcow2 writes are not implemented yet');
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}
}
