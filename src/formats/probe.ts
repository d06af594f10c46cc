/**
 * Format probing by magic number, and the formats qmount knows but does not
 * implement: those are refused with a message naming them, so that a VMDK
 * or VHDX file is never mounted (read-write) as if its bytes were the disk.
 * `--format raw` skips probing and takes any file as raw bytes.
 *
 * The magics are QEMU's block drivers' probes (first sector only); QEMU
 * would open these files with their own driver, never as raw.
 */
import { UnsupportedError } from '../errors.js';
import type { FormatName } from './driver.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const QED_MAGIC = 0x00444551; // "QED\0" read little-endian
/** Bytes probeFormat looks at (QEMU probes one sector too); a raw image's guard (open.ts) watches writes to them. */
export const PROBE_BYTES = 512;

const KNOWN: Array<{ name: string; at: number; magic: Buffer }> = [
  { name: 'VMDK', at: 0, magic: Buffer.from('KDMV') }, // hosted sparse extent
  { name: 'VMDK', at: 0, magic: Buffer.from('COWD') }, // ESX sparse extent
  { name: 'VMDK', at: 0, magic: Buffer.from('# Disk DescriptorFile') },
  { name: 'VHD (VPC)', at: 0, magic: Buffer.from('conectix') },
  { name: 'VHDX', at: 0, magic: Buffer.from('vhdxfile') },
  { name: 'VDI', at: 0x40, magic: Buffer.from([0x7f, 0x10, 0xda, 0xbe]) },
  { name: 'Parallels', at: 0, magic: Buffer.from('WithoutFreeSpace') },
  { name: 'Parallels', at: 0, magic: Buffer.from('WithouFreSpacExt') },
  { name: 'Bochs', at: 0, magic: Buffer.from('Bochs Virtual HD Image') },
  { name: 'cloop', at: 0, magic: Buffer.from('#!/bin/sh\n#V2.0 Format\nmodprobe cloop') },
  { name: 'LUKS', at: 0, magic: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) },
];

/** The name of a known format qmount does not implement whose magic `head` carries, else undefined. */
export function foreignFormat(head: Buffer): string | undefined {
  if (head.length >= 8 && head.readUInt32BE(0) === QCOW2_MAGIC && head.readUInt32BE(4) === 1) return 'QCOW (version 1)';
  for (const k of KNOWN) {
    if (head.length >= k.at + k.magic.length && head.subarray(k.at, k.at + k.magic.length).equals(k.magic)) return k.name;
  }
  return undefined;
}

/** What a probe of `head` (the file's first bytes) finds: qcow2, QED, else raw. */
export function probeFormat(head: Buffer): FormatName {
  if (head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC) return 'qcow2';
  if (head.length >= 4 && head.readUInt32LE(0) === QED_MAGIC) return 'qed';
  return 'raw';
}

/** probeFormat, refusing the known formats qmount does not implement (ENOTSUP). */
export function probeOrRefuse(head: Buffer): FormatName {
  const foreign = foreignFormat(head);
  if (foreign) {
    throw new UnsupportedError(`this is a ${foreign} image, a format qmount does not support (qcow2, QED, raw); convert it with qemu-img convert -O qcow2, or give --format raw to use the file's bytes as the disk`);
  }
  return probeFormat(head);
}
