/**
 * The probed-raw guard. A raw image opened without `--format raw` was
 * recognised only by the absence of a known magic; if a guest wrote a qcow2
 * or QED header (or any known one) into its first sector, the next open
 * would probe it as that format and read host files the header names
 * (backing file, data file). QEMU refuses such writes on probed raw images
 * (block/raw-format.c) with EPERM; so does this wrapper.
 *
 * Rule, kept only here: a write touching the first PROBE_BYTES of a probed
 * raw image is refused, before anything is written, when the first sector
 * as it would be after the write probes as anything but plain raw.
 */
import { QmountError } from '../errors.js';
import type { BlockDriver } from './driver.js';
import { foreignFormat, PROBE_BYTES, probeFormat } from './probe.js';

/** The driver, with writes into sector 0 checked (every other member passes through, but writeNow: none). */
export function guardProbedRaw(driver: BlockDriver): BlockDriver {
  const write = async (buf: Buffer, bufOffset: number, length: number, guestOffset: number): Promise<void> => {
    if (length > 0 && guestOffset < PROBE_BYTES && Number.isSafeInteger(guestOffset) && guestOffset >= 0) {
      const sector = Buffer.alloc(Math.min(PROBE_BYTES, driver.virtualSize));
      const covered = guestOffset === 0 && length >= sector.length;
      if (!covered) await driver.read(sector, 0, sector.length, 0);
      buf.copy(sector, guestOffset, bufOffset, bufOffset + Math.min(length, sector.length - guestOffset));
      const looksLike = probeFormat(sector) !== 'raw' ? probeFormat(sector) : foreignFormat(sector);
      if (looksLike) {
        throw new QmountError(
          'EPERM',
          `write to sector 0 refused: it would make this probed raw image look like a ${looksLike} image; mount it with --format raw to allow such writes`,
        );
      }
    }
    return driver.write(buf, bufOffset, length, guestOffset);
  };
  // A Proxy, not a class: every member the driver has (now or later) passes through, getters and methods run on the driver.
  return new Proxy(driver, {
    get(target, prop) {
      if (prop === 'write') return write;
      if (prop === 'writeNow') return undefined; // every write goes through the check above
      const v: unknown = Reflect.get(target, prop, target);
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}
