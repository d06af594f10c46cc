/**
 * `qmount map [--output human|json] IMAGE`: the allocation map, with the
 * extents and fields of `qemu-img map` (start, length, depth, present,
 * zero, data, offset), from the drivers' blockStatus (src/formats/driver.ts).
 *
 * Presentation rules taken from qemu-img (7.2):
 *  - adjacent extents are merged when every field agrees and the host
 *    offsets continue (or neither has one);
 *  - a raw layer maps guest offset = host offset, so its extents carry an
 *    offset also where they are holes (zero, not data);
 *  - compressed data has no offset;
 *  - data whose host bytes are a hole in the image file is zero too
 *    (splitByHostHoles);
 *  - human output lists data that is not zero and has an offset, as
 *    "Offset Length Mapped to File" in qemu-img's column layout (qemu-img
 *    refuses the table for an image with compressed clusters; qmount lists
 *    the rest).
 */
import { Command, Option } from 'commander';
import { oneLine } from '../errors.js';
import type { BlockExtent, FormatName, ImageInfo } from '../formats/driver.js';
import { openImage } from '../formats/open.js';
import { printable } from '../errors.js';
import { ImageFile } from '../io/file.js';
import { configureLogging, logger } from '../log.js';

const EXIT_OK = 0;
const EXIT_USAGE = 1;
const EXIT_FAIL = 2;

/** Guest bytes asked of blockStatus at a time (bounds the extent list in memory). */
const CHUNK_BYTES = 1024 ** 3;

export interface MapExtent {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** the file of the layer at `depth` (human output) */
  file: string;
}

function layers(info: ImageInfo): ImageInfo[] {
  const out: ImageInfo[] = [];
  for (let i: ImageInfo | undefined = info; i; i = i.backing) out.push(i);
  return out;
}

/** `image`: the name given on the command line, shown for depth 0 (backing files by the path they were opened by). */
function toMapExtent(e: BlockExtent, chain: ImageInfo[], image: string): MapExtent {
  const layer = chain[Math.min(e.depth, chain.length - 1)]!;
  const file = e.depth === 0 ? image : layer.filename;
  const out: MapExtent = { start: e.guestOffset, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data, file };
  if (e.hostOffset !== undefined && !e.compressed) out.offset = e.hostOffset;
  else if (layer.format === 'raw' && e.present && !e.compressed) out.offset = e.guestOffset;
  return out;
}

function mergeable(a: MapExtent, b: MapExtent): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data || a.file !== b.file) return false;
  if (a.offset === undefined || b.offset === undefined) return a.offset === b.offset;
  return a.offset + a.length === b.offset;
}

/**
 * qemu-img map asks the layer's file too (the block layer's want_zero
 * recursion): a data extent whose host bytes are a hole in the image file
 * (preallocation=metadata, clusters zeroed by punching) or lie past its end
 * is `zero: true` there, still `data: true`, and the extent is cut where the
 * file's holes begin and end. Raw layers already answer from the file's
 * holes; a layer with an external data file is left as its driver says.
 * Without native/fileops (no SEEK_HOLE) nothing is split.
 */
async function splitByHostHoles(e: MapExtent, file: ImageFile): Promise<MapExtent[]> {
  const out: MapExtent[] = [];
  let guest = e.start;
  let host = e.offset!;
  let left = e.length;
  while (left > 0) {
    const hole = await file.seekHole(host);
    let run: number;
    let inHole: boolean;
    if (hole === null) {
      run = left; // at or past the end of the file: reads as zeros
      inHole = true;
    } else if (hole > host) {
      run = Math.min(left, hole - host);
      inHole = false;
    } else {
      const data = await file.seekData(host);
      run = data === null ? left : Math.min(left, data - host);
      inHole = true;
    }
    out.push({ ...e, start: guest, length: run, offset: host, zero: e.zero || inHole });
    guest += run;
    host += run;
    left -= run;
  }
  return out;
}

export async function mapExtents(image: string, format: FormatName | undefined, forceShare: boolean): Promise<MapExtent[]> {
  const d = await openImage(image, { readOnly: true, format, forceShare, log: logger('map') });
  const files = new Map<number, ImageFile | null>();
  try {
    const chain = layers(d.info());
    // The image file of each non-raw layer without a data file, for splitByHostHoles (null: not split).
    const fileOf = async (depth: number): Promise<ImageFile | null> => {
      if (!files.has(depth)) {
        const layer = chain[depth];
        let f: ImageFile | null = null;
        if (layer && layer.format !== 'raw' && !layer.dataFile) {
          f = await ImageFile.open(layer.filename, { readOnly: true }).catch(() => null);
          if (f && !(await f.seekHole(0).then(() => true, () => false))) {
            await f.close();
            f = null;
          }
        }
        files.set(depth, f);
      }
      return files.get(depth)!;
    };
    const out: MapExtent[] = [];
    const push = (m: MapExtent): void => {
      const last = out[out.length - 1];
      if (last && mergeable(last, m)) last.length += m.length;
      else out.push(m);
    };
    for (let pos = 0; pos < d.virtualSize; pos += CHUNK_BYTES) {
      const len = Math.min(CHUNK_BYTES, d.virtualSize - pos);
      for (const e of await d.blockStatus(pos, len)) {
        const m = toMapExtent(e, chain, image);
        const f = m.data && m.offset !== undefined ? await fileOf(m.depth) : null;
        if (f) for (const part of await splitByHostHoles(m, f)) push(part);
        else push(m);
      }
    }
    return out;
  } finally {
    for (const f of files.values()) await f?.close().catch(() => {});
    await d.close().catch(() => {});
  }
}

/** qemu-img map --output=json, byte for byte: one object per line, fields in qemu-img's order. */
export function mapJson(extents: MapExtent[]): string {
  const lines = extents.map((e) => {
    const offset = e.offset === undefined ? '' : `, "offset": ${e.offset}`;
    return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
  });
  return `[${lines.join(',\n')}]\n`;
}

/** C's printf("%#-16" PRIx64): 0x-prefixed hex (plain "0" for zero), left-aligned in 16 columns. */
function hex16(v: number): string {
  return (v === 0 ? '0' : `0x${v.toString(16)}`).padEnd(16);
}

export function mapHuman(extents: MapExtent[]): string {
  const lines = ['Offset          Length          Mapped to       File'];
  for (const e of extents) {
    if (!e.data || e.zero || e.offset === undefined) continue;
    lines.push(`${hex16(e.start)}${hex16(e.length)}${hex16(e.offset)}${printable(e.file)}`);
  }
  return `${lines.join('\n')}\n`;
}

interface MapFlags {
  output: 'human' | 'json';
  format?: FormatName;
  forceShare?: boolean;
}

export function registerMap(program: Command, setResult: (p: Promise<number>) => void): void {
  program
    .command('map')
    .description('show the allocation map (like qemu-img map)')
    .argument('<IMAGE>')
    .addOption(new Option('--output <format>', 'output format').choices(['human', 'json']).default('human'))
    .addOption(new Option('--format <format>', 'image format (default: probe)').choices(['qcow2', 'qed', 'raw']))
    .option('-U, --force-share', 'open the image even if another process is writing it')
    .action((image: string, flags: MapFlags) => {
      setResult(
        (async () => {
          configureLogging({ level: process.env.QMOUNT_LOG_LEVEL ?? 'error' });
          const extents = await mapExtents(image, flags.format, !!flags.forceShare);
          process.stdout.write(flags.output === 'json' ? mapJson(extents) : mapHuman(extents));
          return EXIT_OK;
        })().catch((err: unknown) => {
          process.stderr.write(`qmount: ${printable(oneLine(err))}\n`);
          return (err as { code?: string }).code === 'commander.invalidArgument' ? EXIT_USAGE : EXIT_FAIL;
        }),
      );
    });
}
