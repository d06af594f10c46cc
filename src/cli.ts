#!/usr/bin/env node
/**
 * qmount: the composition root. Parses the command line, configures
 * logging, opens the image and mounts it, or shows `info` / runs `check`.
 *
 *   qmount [options] IMAGE DIR        mount IMAGE as DIR/disk.raw
 *   qmount info [options] IMAGE       like qemu-img info
 *   qmount check [options] IMAGE      like qemu-img check
 *
 * Exit codes (mount and info):
 *   0  success (for a mount: it was mounted and later closed cleanly)
 *   1  usage or bad input: unknown option, bad value, IMAGE missing,
 *      DIR missing / not a directory / not empty / already or stale mounted
 *   2  the image cannot be opened or mounted (format error, unsupported
 *      feature, FUSE failure, or it is locked: a running QEMU or another
 *      qmount uses it in a way this open conflicts with), or closing the
 *      image failed at unmount
 * Exit codes (check), as qemu-img check:
 *   0  no errors            1  the check could not complete
 *   2  corruptions remain   3  only leaked clusters remain
 *   63 the format has nothing to check (raw)
 * Errors print one line, `qmount: <message>`, never a stack trace;
 * warnings (e.g. --force-share on an image in use) one `qmount: warning: ...` line.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { MountSession, checkMountPoint } from '../mount/session.js';
import { partitionFiles } from '../mount/partitions.js';
import { FILE_NAME } from '../mount/service.js';
import { parseMountOptions } from '../mount/options.js';
import { BACKEND_NAMES, type BackendChoice } from '../mount/backend.js';
import { ReadyChannel, runDaemonParent } from './daemon.js';
import { oneLine } from './errors.js';
import { checkImage, NothingToCheckError, type CheckReport, type RepairMode } from './formats/check.js';
import type { FormatName, ImageInfo } from './formats/driver.js';
import { DEFAULT_L2_CACHE_BYTES, openImage, printable } from './formats/open.js';
import { DETECT_ZEROES_MODES, withDetectZeroes, type DetectZeroes } from './formats/zero-detect.js';
import { ImageFile } from './io/file.js';
import { lockImageFile } from './io/lock.js';
import { configureLogging, logger, type Logger } from './log.js';

const EXIT_OK = 0;
const EXIT_USAGE = 1;
const EXIT_FAIL = 2;
const EXIT_CHECK_INCOMPLETE = 1;
const EXIT_CHECK_CORRUPT = 2;
const EXIT_CHECK_LEAKS = 3;
const EXIT_CHECK_UNSUPPORTED = 63;

/** An error with the exit code it ends the program with. */
class CliError extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
  ) {
    super(message);
  }
}

const FORMATS = ['qcow2', 'qed', 'raw'] as const;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

// Messages may quote names read from an image (untrusted): printable() keeps them one line, free of terminal escapes.
function printError(msg: string): void {
  process.stderr.write(`qmount: ${printable(msg)}\n`);
}

function printWarning(msg: string): void {
  process.stderr.write(`qmount: warning: ${printable(msg)}\n`);
}

/** "32M", "1G", "512k", "1048576", "64MiB" -> bytes (binary units). */
function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  const mult: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };
  const n = m ? Math.round(parseFloat(m[1]!) * mult[m[2]!.toLowerCase()]!) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new InvalidArgumentError(`"${text}" is not a size (examples: 1048576, 512K, 32M, 1G)`);
  }
  return n;
}

function packageVersion(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'qmount' && pkg.version) return pkg.version;
    } catch {
      // not here; look further up
    }
    dir = path.dirname(dir);
  }
  return 'unknown';
}

/** IMAGE must exist and be a regular file or block device (exit 1 otherwise). */
async function checkImagePath(image: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(image);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new CliError(EXIT_USAGE, code === 'ENOENT' ? `${image}: no such image file` : `${image}: cannot access: ${code ?? oneLine(err)}`);
  }
  if (!st.isFile() && !st.isBlockDevice()) throw new CliError(EXIT_USAGE, `${image}: not a regular file`);
}

/** Turn a thrown value into a CliError with `code` unless it already carries one. */
function withCode(err: unknown, code: number): CliError {
  return err instanceof CliError ? err : new CliError(code, oneLine(err));
}

interface MountFlags {
  foreground?: boolean;
  readOnly?: boolean;
  format?: FormatName;
  l2CacheSize?: number;
  backing: boolean;
  forceShare?: boolean;
  logLevel?: string;
  logFile?: string;
  pidFile?: string;
  options: string[];
  fuseBackend?: BackendChoice;
  discard: 'ignore' | 'unmap';
  detectZeroes: DetectZeroes;
  partitions: boolean;
}

async function mountCommand(image: string, dir: string, flags: MountFlags): Promise<number> {
  let mountOpts;
  try {
    mountOpts = parseMountOptions(flags.options);
  } catch (err) {
    throw withCode(err, EXIT_USAGE);
  }
  const readOnly = !!flags.readOnly || mountOpts.readOnly;
  if (flags.forceShare && !readOnly) throw new CliError(EXIT_USAGE, '--force-share needs a read-only mount (-r)');
  if (!flags.backing && !readOnly) throw new CliError(EXIT_USAGE, '--no-backing needs a read-only mount (-r): writes need the backing file');
  if (flags.detectZeroes === 'unmap' && flags.discard === 'ignore') throw new CliError(EXIT_USAGE, '--detect-zeroes unmap needs --discard unmap (as qemu-nbd)');

  if (!flags.foreground) {
    // Check here too so the common mistakes fail fast; the daemon checks again.
    await checkImagePath(image);
    await checkMountPoint(dir).catch((err: unknown) => Promise.reject(withCode(err, EXIT_USAGE)));
    // The daemon's stderr goes nowhere: the --force-share warning is given here.
    if (flags.forceShare) await warnIfInUse(image);
    return runDaemonParent(fileURLToPath(import.meta.url), process.argv.slice(2), printError);
  }

  const ready = ReadyChannel.fromEnv();
  let session: MountSession | undefined;
  // Signals are caught from the start: before the mount is ready one only
  // aborts the start-up (at the next step), afterwards it closes the mount.
  let interrupted: string | undefined;
  const checkInterrupted = (): void => {
    if (interrupted) throw new CliError(EXIT_FAIL, `interrupted by ${interrupted} before the mount was ready`);
  };
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      if (liveSession) void liveSession.close(sig);
      else interrupted ??= sig;
    });
  }
  // SIGUSR1 logs the request counters (like dd's progress signal); it never ends the mount.
  process.on('SIGUSR1', () => liveSession?.logStats());
  const pidFile = flags.pidFile ? path.resolve(flags.pidFile) : undefined;
  try {
    configureLogging({ level: flags.logLevel, file: flags.logFile ? path.resolve(flags.logFile) : undefined });
    const log = logger('cli');
    await checkImagePath(image);
    const mountPoint = await checkMountPoint(dir).catch((err: unknown) => Promise.reject(withCode(err, EXIT_USAGE)));
    const driver = await openImage(path.resolve(image), {
      readOnly,
      format: flags.format,
      noBacking: !flags.backing,
      forceShare: flags.forceShare,
      onWarning: printWarning,
      l2CacheBytes: flags.l2CacheSize ?? DEFAULT_L2_CACHE_BYTES,
      log: logger('image'),
    }).catch((err: unknown) => Promise.reject(withCode(err, EXIT_FAIL)));
    logChain(log, driver.info(), flags.backing);
    try {
      checkInterrupted();
      const served = withDetectZeroes(driver, flags.detectZeroes);
      const files = [{ path: FILE_NAME, source: served }, ...(flags.partitions ? await partitionFiles(served, logger('mount')) : [])];
      session = await MountSession.mount(served, mountPoint, { readOnly, mount: mountOpts, log: logger('mount'), backend: flags.fuseBackend, files, discard: flags.discard });
    } catch (err) {
      await driver.close().catch(() => {});
      throw withCode(err, EXIT_FAIL);
    }
    liveSession = session;
    checkInterrupted();
    if (pidFile) fs.writeFileSync(pidFile, `${process.pid}\n`);
    log.info({ image, mountPoint, pid: process.pid }, 'ready');
  } catch (err) {
    if (session) await session.close('start-up failed');
    const e = withCode(err, EXIT_FAIL);
    ready?.fail(e.exitCode, e.message);
    throw e;
  }
  if (ready) process.chdir('/'); // a daemon must not keep its start directory busy
  ready?.ready();
  const code = await session.done;
  if (pidFile) fs.rmSync(pidFile, { force: true });
  return code;
}

/** --force-share in daemon mode: warn (in the parent, which has a terminal) when a writer holds the image. */
async function warnIfInUse(image: string): Promise<void> {
  let file: ImageFile | undefined;
  try {
    file = await ImageFile.open(image, { readOnly: true });
    const lock = lockImageFile(file.descriptor, path.resolve(image), image, 'shared-read');
    if (lock.inUseBy) printWarning(`${image} is being written by ${lock.inUseBy}; --force-share: the mount may see inconsistent data`);
  } catch {
    // the daemon opens the image again and reports what is wrong
  } finally {
    await file?.close().catch(() => {});
  }
}

/**
 * The backing chain as opened, at info level: backing file names come from
 * the image (untrusted data), so the log shows where they led.
 */
function logChain(log: Logger, top: ImageInfo, backing: boolean): void {
  const chain: Array<{ image: string; format: string; backingName?: string }> = [];
  for (let i: ImageInfo | undefined = top; i; i = i.backing) {
    chain.push({ image: i.filename, format: i.format, backingName: i.backingFile });
  }
  log.info({ chain }, 'backing chain');
  const last = chain[chain.length - 1]!;
  if (!backing && last.backingName !== undefined) {
    log.info({ image: last.image, backingName: last.backingName }, 'backing file not opened (--no-backing): unallocated clusters read as zeros');
  }
}

// ---- info ----------------------------------------------------------------

function humanSize(n: number): string {
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

/** qemu-img's JSON layout for one image, the backing chain nested under "backing-image". */
function infoJson(info: ImageInfo, name = info.filename): Record<string, unknown> {
  const out: Record<string, unknown> = {
    filename: name,
    format: info.format,
    'virtual-size': info.virtualSize,
    'actual-size': diskSize(info),
    'cluster-size': info.clusterSize,
    'dirty-flag': isDirty(info),
    'backing-filename': info.backingFile,
    'full-backing-filename': info.backingPath,
    'backing-filename-format': info.backingFormat,
    features: info.features,
  };
  if (info.snapshots) {
    out.snapshots = info.snapshots.map((s) => ({
      id: s.id,
      name: s.name,
      'vm-state-size': s.vmStateSize,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': s.vmClockSec,
      'vm-clock-nsec': s.vmClockNsec,
      'guest-size': s.guestSize,
    }));
  }
  if (info.format === 'qcow2') {
    out['format-specific'] = {
      type: 'qcow2',
      data: {
        compat: info.version === 2 ? '0.10' : '1.1',
        'compression-type': info.compressionType,
        'lazy-refcounts': info.features.includes('lazy_refcounts'),
        'refcount-bits': info.refcountBits,
        corrupt: info.features.includes('corrupt'),
        'extended-l2': info.extendedL2 ?? false,
        'data-file': info.dataFile,
      },
    };
  }
  if (info.backing) out['backing-image'] = infoJson(info.backing);
  return out;
}

function pad2(n: number): string {
  return String(n).padStart(2, '0');
}

function infoHuman(info: ImageInfo, name = info.filename): string {
  const lines = [`image: ${name}`, `file format: ${info.format}`];
  lines.push(`virtual size: ${humanSize(info.virtualSize)} (${info.virtualSize} bytes)`);
  const disk = diskSize(info);
  if (disk !== undefined) lines.push(`disk size: ${humanSize(disk)}`);
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  if (info.backingFile) {
    lines.push(`backing file: ${info.backingFile}${info.backingPath ? ` (actual path: ${info.backingPath})` : ''}`);
    if (info.backingFormat) lines.push(`backing file format: ${info.backingFormat}`);
  }
  if (info.snapshots && info.snapshots.length > 0) {
    lines.push('Snapshot list:', 'ID        TAG               VM SIZE                DATE     VM CLOCK');
    for (const s of info.snapshots) {
      const d = new Date(s.dateSec * 1000);
      const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
      const sec = s.vmClockSec;
      const clock = `${pad2(Math.floor(sec / 3600))}:${pad2(Math.floor(sec / 60) % 60)}:${pad2(sec % 60)}.${String(Math.floor(s.vmClockNsec / 1e6)).padStart(3, '0')}`;
      lines.push(`${s.id.padEnd(10)}${s.name.padEnd(18)}${humanSize(s.vmStateSize).padStart(7)} ${date} ${clock}`);
    }
  }
  if (info.format === 'qcow2') {
    lines.push('Format specific information:');
    lines.push(`    compat: ${info.version === 2 ? '0.10' : '1.1'}`);
    if (info.compressionType) lines.push(`    compression type: ${info.compressionType}`);
    lines.push(`    lazy refcounts: ${info.features.includes('lazy_refcounts')}`);
    if (info.refcountBits !== undefined) lines.push(`    refcount bits: ${info.refcountBits}`);
    lines.push(`    corrupt: ${info.features.includes('corrupt')}`);
    if (info.dataFile) lines.push(`    data file: ${info.dataFile}`);
    lines.push(`    extended l2: ${info.extendedL2 ?? false}`);
  }
  if (info.features.length > 0) lines.push(`features: ${info.features.join(', ')}`);
  if (isDirty(info)) lines.push('dirty: the image was not closed cleanly');
  // Backing and data file names, snapshot names come from the image: shown with control characters escaped.
  const text = lines.map(printable).join('\n');
  return info.backing ? `${text}\n\n${infoHuman(info.backing)}` : text;
}

interface InfoFlags {
  output: string;
  format?: FormatName;
  backing: boolean;
  forceShare?: boolean;
}

async function infoCommand(image: string, flags: InfoFlags): Promise<number> {
  configureLogging({ level: process.env.QMOUNT_LOG_LEVEL ?? 'error' });
  await checkImagePath(image);
  const driver = await openImage(image, {
    readOnly: true,
    format: flags.format,
    noBacking: !flags.backing,
    forceShare: flags.forceShare,
    log: logger('image'),
  })
    .catch((err: unknown) => Promise.reject(withCode(err, EXIT_FAIL)));
  let info: ImageInfo;
  try {
    info = driver.info();
  } finally {
    await driver.close().catch(() => {});
  }
  process.stdout.write(flags.output === 'json' ? `${JSON.stringify(infoJson(info, image), null, 4)}\n` : `${infoHuman(info, image)}\n`);
  return EXIT_OK;
}

// ---- check ---------------------------------------------------------------

function checkExitCode(r: CheckReport): number {
  if (r.corruptions > 0) return EXIT_CHECK_CORRUPT;
  if (r.leaks > 0) return EXIT_CHECK_LEAKS;
  return EXIT_OK;
}

function checkHuman(image: string, r: CheckReport): string {
  const lines = [...r.messages];
  if (r.fixedCorruptions > 0 || r.fixedLeaks > 0) {
    lines.push('The following inconsistencies were found and repaired:', '', `    ${r.fixedLeaks} leaked clusters`, `    ${r.fixedCorruptions} corruptions`, '');
  }
  if (r.corruptions === 0 && r.leaks === 0) lines.push(`No errors were found on the image (${image}).`);
  if (r.corruptions > 0) {
    lines.push(`${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  }
  if (r.leaks > 0) {
    if (r.corruptions > 0) lines.push('');
    lines.push(`${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  }
  if (r.imageEndOffset !== undefined) lines.push(`Image end offset: ${r.imageEndOffset}`);
  return lines.join('\n');
}

async function checkCommand(image: string, flags: { output: string; repair?: 'leaks' | 'all' }): Promise<number> {
  configureLogging({ level: process.env.QMOUNT_LOG_LEVEL ?? 'error' });
  await checkImagePath(image).catch((err: unknown) => Promise.reject(withCode(err, EXIT_CHECK_INCOMPLETE)));
  const repair: RepairMode = flags.repair ?? 'none';
  let report: CheckReport;
  try {
    report = await checkImage(image, { repair, log: logger('check') });
  } catch (err) {
    throw new CliError(err instanceof NothingToCheckError ? EXIT_CHECK_UNSUPPORTED : EXIT_CHECK_INCOMPLETE, oneLine(err));
  }
  if (flags.output === 'json') {
    const out = {
      filename: image,
      format: report.format,
      'check-errors': 0,
      corruptions: report.corruptions,
      leaks: report.leaks,
      'corruptions-fixed': report.fixedCorruptions,
      'leaks-fixed': report.fixedLeaks,
      'image-end-offset': report.imageEndOffset,
      messages: report.messages,
    };
    process.stdout.write(`${JSON.stringify(out, null, 4)}\n`);
  } else {
    process.stdout.write(`${checkHuman(image, report)}\n`);
  }
  return checkExitCode(report);
}

// ---- command line --------------------------------------------------------

function buildProgram(setResult: (p: Promise<number>) => void): Command {
  const program = new Command('qmount');
  program
    // Options after a subcommand name belong to the subcommand (`info --format`).
    .enablePositionalOptions()
    .exitOverride()
    .configureOutput({ outputError: () => {} }) // errors are printed once, as one line, by main()
    .version(packageVersion(), '-V, --version')
    .description('Mount a qcow2, QED or raw disk image through FUSE as DIR/disk.raw')
    .usage('[options] IMAGE DIR')
    .argument('<IMAGE>', 'disk image (qcow2, QED or raw)')
    .argument('<DIR>', 'existing empty directory to mount on')
    .option('-f, --foreground', 'stay in the foreground (default: daemonize once the mount is ready)')
    .option('-r, --read-only', 'mount read-only; the image is never written')
    .addOption(new Option('--format <format>', 'image format (default: probe)').choices(FORMATS))
    .option('--l2-cache-size <size>', `L2 table cache size, e.g. 32M, 1G, bytes (default: ${DEFAULT_L2_CACHE_BYTES / 1048576}M)`, parseSize)
    .option('--no-backing', 'do not open backing files: unallocated clusters read as zeros')
    .option('--no-partitions', 'do not show DIR/p1.raw, p2.raw, ... for the partitions of a GPT or MBR disk')
    .option('-U, --force-share', 'with -r: mount even if another process (QEMU, qmount) is writing the image; reads may then be inconsistent')
    .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default('warn'))
    .option('--log-file <file>', 'write logs here (a daemon discards them otherwise)')
    .option('--pid-file <file>', 'write the mount process id here while mounted')
    .addOption(new Option('--discard <mode>', 'discard (fstrim, fallocate --punch-hole) on disk.raw: unmap frees the clusters, ignore only zeros them').choices(['ignore', 'unmap']).default('unmap'))
    .addOption(new Option('--detect-zeroes <mode>', 'writes of zeros: off; on: allocate nothing for them; unmap: also free the clusters they cover').choices(DETECT_ZEROES_MODES).default('on'))
    .addOption(new Option('--fuse-backend <backend>', 'FUSE binding: fuse3 (libfuse 3 addon), fuse-native (libfuse 2), auto: fuse3, else fuse-native').choices(BACKEND_NAMES).default('auto'))
    .option(
      '-o, --options <opt[,opt...]>',
      'FUSE options: allow_other, allow_root, default_permissions, ro, rw, direct_io, max_read=N, max_write=N, uid=N, gid=N, umask=OCTAL',
      (v: string, prev: string[]) => [...prev, v],
      [] as string[],
    )
    .action((image: string, dir: string, flags: MountFlags) => setResult(mountCommand(image, dir, flags)));

  program
    .command('info')
    .description('show image information (like qemu-img info)')
    .argument('<IMAGE>')
    .addOption(new Option('--output <format>', 'output format').choices(['human', 'json']).default('human'))
    .addOption(new Option('--format <format>', 'image format (default: probe)').choices(FORMATS))
    .option('--no-backing', 'do not open backing files')
    .option('-U, --force-share', 'open the image even if another process is writing it')
    .action((image: string, flags: InfoFlags) => setResult(infoCommand(image, flags)));

  program
    .command('check')
    .description('check image consistency (like qemu-img check); exit 0 clean, 1 incomplete, 2 corrupt, 3 leaks')
    .argument('<IMAGE>')
    .addOption(new Option('--repair <what>', 'repair leaks or all errors').choices(['leaks', 'all']))
    .addOption(new Option('--output <format>', 'output format').choices(['human', 'json']).default('human'))
    .action((image: string, flags: { output: string; repair?: 'leaks' | 'all' }) => setResult(checkCommand(image, flags)));
  return program;
}

/** The running mount (once ready), for signals and the last-resort handlers below. */
let liveSession: MountSession | undefined;

function fatal(err: unknown): void {
  try {
    logger('cli').fatal({ err: oneLine(err) }, 'internal error');
  } catch {
    // logging itself failed
  }
  printError(`internal error: ${oneLine(err)}`);
  liveSession?.emergencyDetach();
  process.exit(EXIT_FAIL);
}

async function main(argv: string[]): Promise<number> {
  let result: Promise<number> = Promise.resolve(EXIT_OK);
  const program = buildProgram((p) => {
    result = p;
  });
  try {
    program.parse(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.exitCode === 0) return EXIT_OK; // --help, --version
      printError(`${err.message.replace(/^error: /, '')} (see qmount --help)`);
      return EXIT_USAGE;
    }
    throw err;
  }
  try {
    return await result;
  } catch (err) {
    const e = withCode(err, EXIT_FAIL);
    printError(e.message);
    return e.exitCode;
  }
}

process.on('uncaughtException', fatal);
process.on('unhandledRejection', fatal);
// fuse-native (and a stray handle) may keep the event loop alive after an unmount, so leave explicitly.
main(process.argv).then((code) => process.exit(code), fatal);
