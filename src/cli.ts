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
 *      DIR missing / not a directory / not empty / already or stale mounted,
 *      /dev/fuse cannot be used (e.g. as non-root when it is not accessible)
 *   2  the image cannot be opened or mounted (format error, unsupported
 *      feature, the FUSE mount itself failing, or it is locked: a running QEMU or another
 *      qmount uses it in a way this open conflicts with), or closing the
 *      image failed at unmount
 * Exit codes (umount): src/commands/umount.ts.
 * Exit codes (check): see src/commands/check.ts (qemu-img check's).
 * Errors print one line, `qmount: <message>`, never a stack trace;
 * warnings (e.g. --force-share on an image in use) one `qmount: warning: ...` line.
 */
import './jit.js'; // first: sets V8's tiering before any other module is compiled
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { MountSession, checkMountPoint } from '../mount/session.js';
import { partitionFiles } from './commands/partitions.js';
import { FILE_NAME } from '../mount/service.js';
import { parseMountOptions } from '../mount/options.js';
import { BACKEND_NAMES, type BackendChoice } from '../mount/backend-choice.js';
import { registerCreate } from './commands/create.js';
import { registerMap } from './commands/map.js';
import { impliesReadOnly, missingBackingWarnings, openForMount, recoveryConflict, recoveryFiles } from './commands/mount-image.js';
import { ReadyChannel, runDaemonParent } from './daemon.js';
import { registerList } from './commands/list.js';
import { registerUmount } from './commands/umount.js';
import { oneLine } from './errors.js';
import { registerCheck } from './commands/check.js';
import { checkImagePath, CliError, EXIT_FAIL, EXIT_OK, EXIT_USAGE, printError, printWarning, withCode } from './commands/common.js';
import { registerInfo } from './commands/info.js';
import type { FormatName, ImageInfo } from './formats/driver.js';
import { DEFAULT_L2_CACHE_BYTES } from './formats/driver.js';
import { lockForUse } from './formats/image-lock.js';
import { DETECT_ZEROES_MODES, withDetectZeroes, type DetectZeroes } from './formats/zero-detect.js';
import { printable } from './errors.js';
import { ImageFile, ioCounters } from './io/file.js';
import { configureLogging, LOG_FORMATS, logger, type LogFormat, type Logger } from './log.js';
import { ProgressLine } from './progress.js';

const FORMATS = ['qcow2', 'qed', 'raw'] as const;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

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

interface MountFlags {
  foreground?: boolean;
  readOnly?: boolean;
  format?: FormatName;
  l2CacheSize?: number;
  backing: boolean;
  forceShare?: boolean;
  logLevel?: string;
  logFile?: string;
  logFormat?: LogFormat;
  pidFile?: string;
  options: string[];
  fuseBackend?: BackendChoice;
  discard: 'ignore' | 'unmap';
  detectZeroes: DetectZeroes;
  partitions: boolean;
  snapshot?: boolean;
  overlay?: string;
  loadSnapshot?: string;
  salvage?: boolean;
}

async function mountCommand(image: string, dir: string, flags: MountFlags): Promise<number> {
  let mountOpts;
  try {
    mountOpts = parseMountOptions(flags.options);
  } catch (err) {
    throw withCode(err, EXIT_USAGE);
  }
  const conflict = recoveryConflict({ ...flags, readOnly: !!flags.readOnly || mountOpts.readOnly });
  if (conflict) throw new CliError(EXIT_USAGE, conflict);
  const readOnly = !!flags.readOnly || mountOpts.readOnly || impliesReadOnly(flags);
  if (flags.forceShare && !readOnly) throw new CliError(EXIT_USAGE, '--force-share needs a read-only mount (-r)');
  if (!flags.backing && !readOnly) throw new CliError(EXIT_USAGE, '--no-backing needs a read-only mount (-r): writes need the backing file');
  if (flags.detectZeroes === 'unmap' && flags.discard === 'ignore') throw new CliError(EXIT_USAGE, '--detect-zeroes unmap needs --discard unmap (as qemu-nbd)');

  if (!flags.foreground) {
    // Check here too so the common mistakes fail fast; the daemon checks again.
    await checkImagePath(image);
    await checkMountPoint(dir).catch((err: unknown) => Promise.reject(withCode(err, EXIT_USAGE)));
    // The daemon's stderr goes nowhere: the --force-share warning is given here.
    if (flags.forceShare) await warnIfInUse(image);
    if (readOnly && !flags.salvage && flags.backing) {
      // Its open's own log lines stay quiet here: the daemon opens the image again and logs them.
      const quiet = logger('image').child({}, { level: 'silent' });
      for (const w of await missingBackingWarnings(path.resolve(image), { format: flags.format, forceShare: flags.forceShare, log: quiet })) printWarning(w);
    }
    return runDaemonParent(fileURLToPath(import.meta.url), process.argv.slice(2), printError);
  }

  // Long work before the mount is ready (the refcount rebuild of a dirty
  // image) stops at a signal (within one table's work) and shows progress
  // on a terminal.
  const startup = new AbortController();
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => liveSession || startup.abort());
  const progress = ProgressLine.forStream(process.stderr, undefined);
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
      if (liveSession) liveSession.stop(sig);
      else interrupted ??= sig;
    });
  }
  // SIGUSR2 (qmount umount --force): close now even while in use, losing what users still write.
  process.on('SIGUSR2', () => void liveSession?.forceClose('SIGUSR2'));
  // SIGUSR1 logs the request counters (like dd's progress signal); it never ends the mount.
  process.on('SIGUSR1', () => liveSession?.logStats());
  const pidFile = flags.pidFile ? path.resolve(flags.pidFile) : undefined;
  try {
    configureLogging({ level: flags.logLevel, file: flags.logFile ? path.resolve(flags.logFile) : undefined, format: flags.logFormat });
    const log = logger('cli');
    await checkImagePath(image);
    const mountPoint = await checkMountPoint(dir).catch((err: unknown) => Promise.reject(withCode(err, EXIT_USAGE)));
    const opened = await openForMount(path.resolve(image), readOnly, flags, {
      format: flags.format,
      noBacking: !flags.backing,
      forceShare: flags.forceShare,
      onWarning: printWarning,
      l2CacheBytes: flags.l2CacheSize ?? DEFAULT_L2_CACHE_BYTES,
      log: logger('image'),
      hooks: { signal: startup.signal, progress: progress.update },
    })
      .catch((err: unknown) => {
        checkInterrupted();
        return Promise.reject(withCode(err, EXIT_FAIL));
      })
      .finally(() => progress.done());
    const driver = opened.driver;
    logChain(log, driver.info(), flags.backing);
    try {
      checkInterrupted();
      const served = withDetectZeroes(driver, flags.detectZeroes);
      const files = [{ path: FILE_NAME, source: served }, ...(flags.partitions ? await partitionFiles(served, logger('mount')) : []), ...(await recoveryFiles(opened, logger('mount')))];
      session = await MountSession.mount(served, mountPoint, { readOnly, mount: mountOpts, log: logger('mount'), backend: flags.fuseBackend, files, ioCounters, discard: flags.discard });
    } catch (err) {
      await driver.close().catch(() => {});
      throw withCode(err, EXIT_FAIL);
    }
    liveSession = session;
    checkInterrupted();
    if (pidFile) fs.writeFileSync(pidFile, `${process.pid}\n`);
    log.info({ image, mountPoint, pid: process.pid }, 'ready');
    // The foreground says so once, on stderr (a daemon's stderr is /dev/null; its parent returns instead).
    printReady(image, mountPoint, readOnly);
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

function printReady(image: string, mountPoint: string, readOnly: boolean): void {
  process.stderr.write(
    `qmount: ready: ${printable(image)} is mounted at ${printable(path.join(mountPoint, 'disk.raw'))} (${readOnly ? 'read-only' : 'read-write'}); ` +
      `stop with Ctrl-C or qmount umount ${printable(mountPoint)}\n`,
  );
}

/** --force-share in daemon mode: warn (in the parent, which has a terminal) when a writer holds the image. */
async function warnIfInUse(image: string): Promise<void> {
  let file: ImageFile | undefined;
  try {
    file = await ImageFile.open(image, { readOnly: true });
    lockForUse(file, path.resolve(image), image, { readOnly: true, forceShare: true }, { onWarning: printWarning });
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

// ---- command line --------------------------------------------------------

function buildProgram(setResult: (p: Promise<number>) => void): Command {
  const program = new Command('qmount');
  program
    // Options after a subcommand name belong to the subcommand (`info --format`).
    .enablePositionalOptions()
    .exitOverride()
    .configureOutput({ outputError: () => {} }) // errors are printed once, as one line, by main()
    .version(packageVersion(), '-V, --version')
    .allowExcessArguments(false) // `qmount info a b`, `qmount IMG DIR extra`: an error, not silently ignored
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
    .option('-s, --snapshot', 'throwaway writes: they go to a temporary overlay in $TMPDIR; the image is opened read-only and never written')
    .option('--overlay <file>', 'writes go to FILE, a qcow2 overlay of the image (created if missing, reused if present); the image is opened read-only')
    .option('-l, --load-snapshot <name|id>', 'mount internal qcow2 snapshot NAME or ID (ID tried first) read-only')
    .option('--salvage', 'read-only: unreadable ranges of a damaged image read as zeros and are listed in a damage report')
    .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default('warn'))
    .option('--log-file <file>', 'write logs here (a daemon discards them otherwise)')
    .addOption(new Option('--log-format <format>', 'json lines, or human (default: human on a terminal, else json)').choices(LOG_FORMATS))
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

  registerInfo(program, setResult);
  registerCheck(program, setResult);
  registerCreate(program, setResult);
  registerMap(program, setResult);
  registerUmount(program, setResult);
  registerList(program, setResult);
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
