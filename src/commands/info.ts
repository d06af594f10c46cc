/**
 * `qmount info [--output human|json] [--backing-chain] [--format F] [-U] IMAGE`:
 * the layout and field names of `qemu-img info` (QEMU 7.2), human and JSON.
 *
 * Differences kept on purpose: `full-backing-filename` is the path the
 * backing file was actually opened at (realpath), not qemu-img's
 * unnormalised join; `disk size` / `actual-size` are the file's allocated
 * blocks, as qemu-img reports them.
 *
 * A backing chain that cannot be followed (a file missing or unreadable, a
 * loop, a protocol) is not an error for plain `info`, as qemu-img info does
 * not open backing files: the image is shown, its backing file named, and
 * one warning says why the chain stops there (exit 0). With --backing-chain
 * it is an error (exit 2), as with qemu-img. Exit 1: usage, IMAGE missing;
 * exit 2: IMAGE itself cannot be opened.
 */
import fs from 'node:fs';
import { Command, Option } from 'commander';
import { oneLine } from '../errors.js';
import type { FormatName, ImageInfo } from '../formats/driver.js';
import { openImage } from '../formats/open.js';
import { printable } from '../errors.js';
import { configureLogging, logger } from '../log.js';
import { damageHuman, salvageScan } from './mount-image.js';
import { checkImagePath, EXIT_FAIL, EXIT_OK, printWarning, runCommand, withCode } from './common.js';

const FORMATS = ['qcow2', 'qed', 'raw'] as const;

export function humanSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v >= 1000 ? Math.round(v) : Number(v.toPrecision(3))} ${units[i]}`;
}

/** Bytes the image file occupies on its file system (qemu-img's "disk size": allocated blocks). */
function diskSize(info: ImageInfo): number | undefined {
  try {
    return fs.statSync(info.filename).blocks * 512;
  } catch {
    return info.actualSize;
  }
}

function isDirty(info: ImageInfo): boolean {
  return info.features.includes('dirty') || info.features.includes('need_check');
}

/** qcow2's "Format specific information", in qemu-img's order: [json key, human label, value]. */
function qcow2Specific(info: ImageInfo): Array<[string, string, unknown]> {
  const v3 = info.version !== 2;
  const rows: Array<[string, string, unknown]> = [
    ['compat', 'compat', v3 ? '1.1' : '0.10'],
    ['compression-type', 'compression type', info.compressionType ?? 'zlib'],
  ];
  if (v3) rows.push(['lazy-refcounts', 'lazy refcounts', info.features.includes('lazy_refcounts')]);
  rows.push(['refcount-bits', 'refcount bits', info.refcountBits]);
  if (v3 && info.dataFile !== undefined) {
    rows.push(['data-file', 'data file', info.dataFile], ['data-file-raw', 'data file raw', info.features.includes('data_file_raw')]);
  }
  if (v3) rows.push(['corrupt', 'corrupt', info.features.includes('corrupt')], ['extended-l2', 'extended l2', info.extendedL2 ?? false]);
  return rows;
}

/** One image as qemu-img info --output=json shows it (without its backing chain). */
export function infoJson(info: ImageInfo, name = info.filename): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (info.snapshots && info.snapshots.length > 0) {
    out.snapshots = info.snapshots.map((s) => ({
      ...(s.icount !== undefined ? { icount: s.icount } : {}),
      'vm-clock-nsec': s.vmClockNsec,
      name: s.name,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': s.vmClockSec,
      id: s.id,
      'vm-state-size': s.vmStateSize,
    }));
  }
  if (info.backingFormat !== undefined) out['backing-filename-format'] = info.backingFormat;
  out['virtual-size'] = info.virtualSize;
  out.filename = name;
  if (info.clusterSize !== undefined) out['cluster-size'] = info.clusterSize;
  out.format = info.format;
  out['actual-size'] = diskSize(info);
  if (info.format === 'qcow2') {
    out['format-specific'] = { type: 'qcow2', data: Object.fromEntries(qcow2Specific(info).map(([k, , v]) => [k, v])) };
  }
  if (info.backingFile !== undefined) {
    out['full-backing-filename'] = info.backingPath ?? info.backingFile;
    out['backing-filename'] = info.backingFile;
  }
  out['dirty-flag'] = isDirty(info);
  return out;
}

function pad2(n: number): string {
  return String(n).padStart(2, '0');
}

/** One image as qemu-img info shows it. */
export function infoHuman(info: ImageInfo, name = info.filename): string {
  const lines = [`image: ${name}`, `file format: ${info.format}`];
  lines.push(`virtual size: ${humanSize(info.virtualSize)} (${info.virtualSize} bytes)`);
  const disk = diskSize(info);
  if (disk !== undefined) lines.push(`disk size: ${humanSize(disk)}`);
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  if (info.backingFile !== undefined) {
    const actual = info.backingPath ?? info.backingFile;
    lines.push(`backing file: ${info.backingFile}${actual !== info.backingFile ? ` (actual path: ${actual})` : ''}`);
    if (info.backingFormat) lines.push(`backing file format: ${info.backingFormat}`);
  }
  if (isDirty(info)) lines.push('dirty: the image was not closed cleanly');
  if (info.snapshots && info.snapshots.length > 0) {
    // qemu's bdrv_snapshot_dump: "%-10s%-17s%8s%20s%13s%11s" for the heading, "%-9s %-16s %8s%20s%13s%11s" per row.
    lines.push('Snapshot list:', `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`);
    for (const s of info.snapshots) {
      const d = new Date(s.dateSec * 1000);
      const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
      const sec = s.vmClockSec;
      const clock = `${pad2(Math.floor(sec / 3600))}:${pad2(Math.floor(sec / 60) % 60)}:${pad2(sec % 60)}.${String(Math.floor(s.vmClockNsec / 1e6)).padStart(3, '0')}`;
      const icount = s.icount !== undefined ? String(s.icount) : '';
      lines.push(`${s.id.padEnd(9)} ${s.name.padEnd(16)} ${humanSize(s.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`);
    }
  }
  if (info.format === 'qcow2') {
    lines.push('Format specific information:');
    for (const [, label, v] of qcow2Specific(info)) lines.push(`    ${label}: ${String(v)}`);
  }
  // Backing and data file names, snapshot names come from the image: shown with control characters escaped.
  return lines.map(printable).join('\n');
}

interface InfoFlags {
  output: string;
  format?: FormatName;
  backing: boolean;
  backingChain?: boolean;
  forceShare?: boolean;
  salvage?: boolean;
}

async function openInfo(image: string, flags: InfoFlags, noBacking: boolean): Promise<ImageInfo> {
  const driver = await openImage(image, { readOnly: true, format: flags.format, noBacking, forceShare: flags.forceShare, log: logger('image') });
  try {
    return driver.info();
  } finally {
    await driver.close().catch(() => {});
  }
}

async function infoCommand(image: string, flags: InfoFlags): Promise<number> {
  configureLogging({ level: process.env.QMOUNT_LOG_LEVEL ?? 'error' });
  await checkImagePath(image);
  if (flags.salvage) {
    const base = { format: flags.format, noBacking: !flags.backing, forceShare: flags.forceShare, log: logger('image') };
    const { info, damage } = await salvageScan(image, base).catch((err: unknown) => Promise.reject(withCode(err, EXIT_FAIL)));
    const out = flags.output === 'json' ? JSON.stringify({ ...infoJson(info, image), damage: damage.toJSON(image) }, null, 4) : `${infoHuman(info, image)}\n${damageHuman(damage)}`;
    process.stdout.write(`${out}\n`);
    return EXIT_OK;
  }
  let info: ImageInfo;
  try {
    info = await openInfo(image, flags, !flags.backing);
  } catch (err) {
    // The image itself may be fine and only its backing chain broken: show the image, warn about the chain.
    let top: ImageInfo | undefined;
    if (flags.backing && !flags.backingChain) top = await openInfo(image, flags, true).catch(() => undefined);
    if (top?.backingFile === undefined) throw withCode(err, EXIT_FAIL);
    printWarning(`the backing chain cannot be followed: ${oneLine(err)}`);
    info = top;
  }
  const chain: ImageInfo[] = [];
  for (let i: ImageInfo | undefined = info; i; i = flags.backingChain ? i.backing : undefined) chain.push(i);
  if (flags.output === 'json') {
    const objs = chain.map((i, n) => infoJson(i, n === 0 ? image : i.filename));
    process.stdout.write(`${JSON.stringify(flags.backingChain ? objs : objs[0], null, 4)}\n`);
  } else {
    process.stdout.write(`${chain.map((i, n) => infoHuman(i, n === 0 ? image : i.filename)).join('\n\n')}\n`);
  }
  return EXIT_OK;
}

export function registerInfo(program: Command, setResult: (p: Promise<number>) => void): void {
  program
    .command('info')
    .description('show image information (like qemu-img info)')
    .argument('<IMAGE>')
    .addOption(new Option('--output <format>', 'output format').choices(['human', 'json']).default('human'))
    .addOption(new Option('-f, --format <format>', 'image format (default: probe)').choices(FORMATS))
    .option('--backing-chain', 'show every image of the backing chain (JSON: a list)')
    .option('--no-backing', 'do not open backing files')
    .option('-U, --force-share', 'open the image even if another process is writing it')
    .option('--salvage', 'also list the damaged ranges a --salvage mount reads as zeros (qcow2: from its tables; other formats: by reading everything)')
    .action((image: string, flags: InfoFlags) => setResult(runCommand(() => infoCommand(image, flags))));
}
