/**
 * `qmount check [--repair leaks|all] [--output human|json] [-f F] [-U] [-p] IMAGE`:
 * qemu-img check's output (QEMU 7.2) and exit codes:
 *   0  no errors            1  the check could not complete (or was interrupted)
 *   2  corruptions remain   3  only leaked clusters remain
 *   63 the format has nothing to check (raw, or a format qmount does not implement)
 * The per-problem messages come first on stdout (qemu-img prints them on
 * stderr); JSON carries them under "messages" (qmount's addition).
 *
 * Progress: one updating line on stderr when it is a terminal (or with -p);
 * Ctrl-C stops the check (or repair) between two tables, exit 1.
 */
import { Command, Option } from 'commander';
import { oneLine } from '../errors.js';
import { checkImage, NothingToCheckError, type CheckReport, type RepairMode } from '../formats/check.js';
import type { FormatName } from '../formats/driver.js';
import { printable } from '../errors.js';
import { configureLogging, logger } from '../log.js';
import { ProgressLine } from '../progress.js';
import { checkImagePath, CliError, EXIT_OK, EXIT_USAGE, runCommand, withCode } from './common.js';

const EXIT_CHECK_INCOMPLETE = 1;
const EXIT_CHECK_CORRUPT = 2;
const EXIT_CHECK_LEAKS = 3;
const EXIT_CHECK_UNSUPPORTED = 63;

function checkExitCode(r: CheckReport): number {
  if (r.corruptions > 0) return EXIT_CHECK_CORRUPT;
  if (r.leaks > 0) return EXIT_CHECK_LEAKS;
  return EXIT_OK;
}

/** printf("%0.2f", n * 100.0 / of) as qemu-img prints it: C rounds an exact tie to even (3.125 -> 3.12), toFixed away from zero. */
export function pct(n: number, of: number): string {
  const x = (n * 100) / of;
  const exact = x.toFixed(20); // the double's exact decimal digits (enough for these values)
  const tail = exact.slice(exact.indexOf('.') + 3);
  if (!/^50*$/.test(tail)) return x.toFixed(2);
  const down = exact.slice(0, exact.indexOf('.') + 3);
  const lastDigit = Number(down[down.length - 1]);
  return lastDigit % 2 === 0 ? down : x.toFixed(2);
}

/** The image end offset as qemu-img reports it: QEMU's QED check does not compute one (qmount's is for --repair). */
function endOffset(r: CheckReport): number | undefined {
  return r.format === 'qed' ? undefined : r.imageEndOffset;
}

/** qemu-img's dump_human_image_check. */
export function checkHuman(r: CheckReport): string {
  // Messages quote offsets and names from the image: one escaped line each.
  const lines: string[] = r.messages.map(printable);
  if (r.fixedCorruptions > 0 || r.fixedLeaks > 0) {
    lines.push('The following inconsistencies were found and repaired:', '', `    ${r.fixedLeaks} leaked clusters`, `    ${r.fixedCorruptions} corruptions`, '');
  }
  if (r.corruptions === 0 && r.leaks === 0) lines.push('No errors were found on the image.');
  if (r.corruptions > 0) {
    lines.push('', `${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  }
  if (r.leaks > 0) {
    lines.push('', `${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  }
  const f = r.frag;
  if (f && f.totalClusters > 0 && f.allocatedClusters > 0) {
    lines.push(
      `${f.allocatedClusters}/${f.totalClusters} = ${pct(f.allocatedClusters, f.totalClusters)}% allocated, ` +
        `${pct(f.fragmentedClusters, f.allocatedClusters)}% fragmented, ${pct(f.compressedClusters, f.allocatedClusters)}% compressed clusters`,
    );
  }
  if (endOffset(r)) lines.push(`Image end offset: ${endOffset(r)}`);
  return lines.join('\n');
}

/** qemu-img's check JSON: counts that are 0 are left out, as qemu-img leaves them out. */
export function checkJson(image: string, r: CheckReport): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const opt = (k: string, v: number | undefined): void => {
    if (v) out[k] = v;
  };
  opt('image-end-offset', endOffset(r));
  opt('total-clusters', r.frag?.totalClusters);
  out['check-errors'] = 0;
  opt('leaks', r.leaks);
  opt('leaks-fixed', r.fixedLeaks);
  opt('corruptions', r.corruptions);
  opt('corruptions-fixed', r.fixedCorruptions);
  opt('allocated-clusters', r.frag?.allocatedClusters);
  opt('fragmented-clusters', r.frag?.fragmentedClusters);
  opt('compressed-clusters', r.frag?.compressedClusters);
  out.filename = image;
  out.format = r.format;
  out.messages = r.messages;
  return out;
}

interface CheckFlags {
  output: string;
  repair?: 'leaks' | 'all';
  format?: FormatName;
  forceShare?: boolean;
  progress?: boolean;
}

async function checkCommand(image: string, flags: CheckFlags): Promise<number> {
  configureLogging({ level: process.env.QMOUNT_LOG_LEVEL ?? 'error' });
  if (flags.forceShare && flags.repair) throw new CliError(EXIT_USAGE, '--force-share (-U) cannot be used with --repair: a repair writes the image');
  await checkImagePath(image).catch((err: unknown) => Promise.reject(withCode(err, EXIT_CHECK_INCOMPLETE)));
  const repair: RepairMode = flags.repair ?? 'none';
  const progress = ProgressLine.forStream(process.stderr, flags.progress);
  const stop = new AbortController();
  const onSignal = (): void => stop.abort();
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal);
  let report: CheckReport;
  try {
    report = await checkImage(image, {
      repair,
      format: flags.format,
      forceShare: flags.forceShare,
      log: logger('check'),
      hooks: { signal: stop.signal, progress: progress.update },
    });
  } catch (err) {
    throw new CliError(err instanceof NothingToCheckError ? EXIT_CHECK_UNSUPPORTED : EXIT_CHECK_INCOMPLETE, oneLine(err));
  } finally {
    progress.done();
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.off(sig, onSignal);
  }
  if (flags.output === 'json') {
    process.stdout.write(`${JSON.stringify(checkJson(image, report), null, 4)}\n`);
  } else {
    process.stdout.write(`${checkHuman(report)}\n`);
  }
  return checkExitCode(report);
}

export function registerCheck(program: Command, setResult: (p: Promise<number>) => void): void {
  program
    .command('check')
    .description('check image consistency (like qemu-img check); exit 0 clean, 1 incomplete, 2 corrupt, 3 leaks, 63 nothing to check')
    .argument('<IMAGE>')
    .addOption(new Option('-r, --repair <what>', 'repair leaks or all errors').choices(['leaks', 'all']))
    .addOption(new Option('--output <format>', 'output format').choices(['human', 'json']).default('human'))
    .addOption(new Option('-f, --format <format>', 'image format (default: probe)').choices(['qcow2', 'qed', 'raw']))
    .option('-U, --force-share', 'check an image another process is writing (results may be inconsistent)')
    .option('-p, --progress', 'show progress (default: when stderr is a terminal)')
    .option('--no-progress', 'never show progress')
    .action((image: string, flags: CheckFlags) => setResult(runCommand(() => checkCommand(image, flags), EXIT_CHECK_INCOMPLETE)));
}
