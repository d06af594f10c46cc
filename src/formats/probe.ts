/** Format probing by magic number. */
import type { FormatName } from './driver.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const QED_MAGIC = 0x00444551; // "QED\0" read little-endian

export function probeFormat(head: Buffer): FormatName {
  if (head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC) return 'qcow2';
  if (head.length >= 4 && head.readUInt32LE(0) === QED_MAGIC) return 'qed';
  return 'raw';
}
