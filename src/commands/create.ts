/**
 * `qmount create`: make a new qcow2 or QED image, with qemu-img create's
 * option names and meanings:
 *
 *   qmount create -f qcow2|qed [-b BACKING -F FMT] [-o opt=val,...] FILE [SIZE]
 *
 * qcow2 options: compat=0.10|1.1 (v2|v3), cluster_size, lazy_refcounts,
 * extended_l2, refcount_bits, preallocation=off|metadata; QED: cluster_size,
 * table_size. backing_file / backing_fmt may be given as -o options too.
 * -b needs -F (as qemu-img since 6.1); SIZE defaults to the backing file's
 * size. Unlike qemu-img, an existing FILE is never overwritten (EEXIST):
 * qmount is used next to evidence images.
 *
 * Exit codes: 0 created, 1 usage (bad option or value), 2 the image could
 * not be created (backing file unusable, I/O error, FILE exists).
 */
import path from 'node:path';
import { Command, Option } from 'commander';
import { oneLine } from '../errors.js';
import type { FormatName } from '../formats/driver.js';
import { openImage } from '../formats/open.js';
import { printable } from '../errors.js';
import { createQcow2, planQcow2, type Qcow2CreateOptions } from '../formats/qcow2/create.js';
import { createQed, planQed, type QedCreateOptions } from '../formats/qed/create.js';
import { configureLogging, logger } from '../log.js';
import { ProgressLine } from '../progress.js';

const EXIT_OK = 0;
const EXIT_USAGE = 1;
const EXIT_FAIL = 2;

class UsageError extends Error {}

/** "1G", "512K", "1048576", "64M" -> bytes; qemu-img's suffixes (k, M, G, T, P, E; binary). 0 is allowed. */
export function parseImageSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)([bkmgtpe]?)$/i.exec(text.trim());
  const mult: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };
  const n = m ? Math.round(parseFloat(m[1]!) * mult[m[2]!.toLowerCase()]!) : NaN;
  if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`"${text}" is not a valid size (examples: 1048576, 512K, 32M, 1G)`);
  return n;
}

/** Option validation (the plan functions) failing is a usage error. */
function usage(check: () => unknown): void {
  try {
    check();
  } catch (err) {
    throw new UsageError(oneLine(err));
  }
}

function onOff(key: string, v: string): boolean {
  if (v === 'on' || v === 'true') return true;
  if (v === 'off' || v === 'false') return false;
  throw new UsageError(`option ${key}: "${v}" is not on or off`);
}

interface CreateFlags {
  format: 'qcow2' | 'qed';
  backing?: string;
  backingFormat?: string;
  options: string[];
  quiet?: boolean;
  progress?: boolean;
}

const BACKING_FORMATS: FormatName[] = ['qcow2', 'qed', 'raw'];

/** -o key=value[,key=value] lists -> one map (later keys win, as in qemu-img). */
function parseOptions(list: string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const item of list) {
    for (const part of item.split(',')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      if (eq <= 0) throw new UsageError(`option "${part}" needs a value (key=value)`);
      out.set(part.slice(0, eq), part.slice(eq + 1));
    }
  }
  return out;
}

async function createCommand(file: string, sizeText: string | undefined, flags: CreateFlags): Promise<number> {
  configureLogging({ level: process.env.QMOUNT_LOG_LEVEL ?? 'error' });
  const opts = parseOptions(flags.options);
  const backingFile = flags.backing ?? opts.get('backing_file');
  const backingFormat = flags.backingFormat ?? opts.get('backing_fmt');
  opts.delete('backing_file');
  opts.delete('backing_fmt');
  if (backingFile !== undefined && backingFormat === undefined) {
    throw new UsageError('a backing file needs its format: -F qcow2|qed|raw (as qemu-img requires since 6.1)');
  }
  if (backingFormat !== undefined && !BACKING_FORMATS.includes(backingFormat as FormatName)) {
    throw new UsageError(`backing format "${backingFormat}" is not one qmount reads (qcow2, qed, raw)`);
  }
  let size = sizeText === undefined ? undefined : parseImageSize(sizeText);
  if (backingFile !== undefined) {
    // Opened like the new image will open it: relative to the new image's directory.
    const resolved = path.isAbsolute(backingFile) ? backingFile : path.join(path.dirname(path.resolve(file)), backingFile);
    const backing = await openImage(resolved, { readOnly: true, format: backingFormat as FormatName, forceShare: true, log: logger('create') });
    const backingSize = backing.virtualSize;
    await backing.close().catch(() => {});
    size ??= backingSize;
  }
  if (size === undefined) throw new UsageError('SIZE is needed unless a backing file gives it (-b)');

  if (flags.format === 'qcow2') {
    const o: Qcow2CreateOptions = { size, backingFile, backingFormat };
    for (const [k, v] of opts) {
      switch (k) {
        case 'compat':
          if (v === '0.10' || v === 'v2') o.version = 2;
          else if (v === '1.1' || v === 'v3') o.version = 3;
          else throw new UsageError(`compat "${v}" is not 0.10 or 1.1`);
          break;
        case 'cluster_size':
          o.clusterSize = parseImageSize(v);
          break;
        case 'lazy_refcounts':
          o.lazyRefcounts = onOff(k, v);
          break;
        case 'extended_l2':
          o.extendedL2 = onOff(k, v);
          break;
        case 'refcount_bits':
          o.refcountBits = Number(v);
          break;
        case 'preallocation':
          if (v !== 'off' && v !== 'metadata') throw new UsageError(`preallocation "${v}" is not supported (off, metadata)`);
          o.preallocation = v;
          break;
        case 'compression_type':
          if (v !== 'zlib') throw new UsageError('compression_type: qmount creates zlib images only');
          break;
        default:
          throw new UsageError(`qcow2 does not support option "${k}" (compat, cluster_size, lazy_refcounts, extended_l2, refcount_bits, preallocation)`);
      }
    }
    usage(() => planQcow2(o));
    const progress = ProgressLine.forStream(process.stderr, flags.progress);
    let plan;
    try {
      plan = await createQcow2(file, o, { progress: progress.update });
    } finally {
      progress.done();
    }
    const h = plan.header;
    if (!flags.quiet) {
      const parts = [`Formatting '${file}', fmt=qcow2 cluster_size=${plan.clusterSize} extended_l2=${o.extendedL2 ? 'on' : 'off'}`];
      if (h.version === 2) parts.push('compat=0.10');
      if (o.preallocation === 'metadata') parts.push('preallocation=metadata');
      parts.push('compression_type=zlib', `size=${h.size}`);
      if (backingFile !== undefined) parts.push(`backing_file=${backingFile}`, `backing_fmt=${backingFormat}`);
      parts.push(`lazy_refcounts=${o.lazyRefcounts ? 'on' : 'off'}`, `refcount_bits=${o.refcountBits ?? 16}`);
      process.stdout.write(`${printable(parts.join(' '))}\n`);
    }
  } else {
    const o: QedCreateOptions = { size, backingFile, backingFormat };
    for (const [k, v] of opts) {
      if (k === 'cluster_size') o.clusterSize = parseImageSize(v);
      else if (k === 'table_size') o.tableSize = Number(v);
      else throw new UsageError(`qed does not support option "${k}" (cluster_size, table_size)`);
    }
    usage(() => planQed(o));
    const h = await createQed(file, o);
    if (!flags.quiet) {
      const parts = [`Formatting '${file}', fmt=qed size=${h.imageSize}`];
      if (backingFile !== undefined) parts.push(`backing_file=${backingFile}`, `backing_fmt=${backingFormat}`);
      parts.push(`cluster_size=${h.clusterSize}`, `table_size=${h.tableSize}`);
      process.stdout.write(`${printable(parts.join(' '))}\n`);
    }
  }
  return EXIT_OK;
}

/** Registers `create` on the program (one line in cli.ts). Errors print one line; see the exit codes above. */
export function registerCreate(program: Command, setResult: (p: Promise<number>) => void): void {
  program
    .command('create')
    .description('create a qcow2 or QED image (like qemu-img create; never overwrites FILE)')
    .argument('<FILE>')
    .argument('[SIZE]', 'virtual size, e.g. 10G (default with -b: the backing file\'s size)')
    .addOption(new Option('-f, --format <format>', 'image format').choices(['qcow2', 'qed']).makeOptionMandatory())
    .option('-b, --backing <file>', 'backing file (a relative name resolves against FILE\'s directory)')
    .option('-F, --backing-format <format>', 'backing file format: qcow2, qed or raw (required with -b)')
    .option('-o, --options <opt=val[,...]>', 'qcow2: compat, cluster_size, lazy_refcounts, extended_l2, refcount_bits, preallocation; qed: cluster_size, table_size',
      (v: string, prev: string[]) => [...prev, v], [] as string[])
    .option('-q, --quiet', 'print nothing on success')
    .option('-p, --progress', 'show progress (default: when stderr is a terminal)')
    .option('--no-progress', 'never show progress')
    .action((file: string, size: string | undefined, flags: CreateFlags) => {
      setResult(
        createCommand(file, size, flags).catch((err: unknown) => {
          process.stderr.write(`qmount: ${printable(oneLine(err))}\n`);
          return err instanceof UsageError ? EXIT_USAGE : EXIT_FAIL;
        }),
      );
    });
}
