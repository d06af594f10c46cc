/**
 * The memory conditions the benchmarks hold fixed (scripts/bench.mjs and
 * scripts/bench-sparse.mjs), so that a job measures the servers and not
 * the VM's host.
 *
 * In a VM whose host backs guest memory on first touch (Firecracker, here),
 * the first write to a guest page the host has not backed is a host page
 * fault: touching 4 GiB took 1.5 s warm and 5-7 s cold, measured here. The
 * guest's free page reporting (virtio-balloon, `page_reporting`) hands free
 * blocks of order >= page_reporting_order back to the host, so memory freed
 * by one job (a 4 GiB page cache at an unmount) can be cold again for the
 * next. How much is handed back, and when, changed from minute to minute
 * (the reported total grew by GBs in some runs and by MBs in others). By
 * hand, a buffered dd of the 4 GiB disk through qmount took 1.2-1.3 s in
 * every run after the first with reporting held off, and 1.3-10.7 s with it
 * on, also varying with which CPUs the server and dd ran on; its time went
 * to the kernel's copy into the reader's page cache. qemu-storage-daemon's
 * took 2.3-3.3 s either way. Why qemu's copies suffered less is not
 * established: both mounts' page cache was order-0 pages (traced), and
 * qemu's freeing and refaulting its bounce buffers each request was not it
 * (with glibc told to keep them, MALLOC_MMAP_THRESHOLD_, 1.3 s).
 * So, as root, the benchmarks raise page_reporting_order above the largest
 * order (nothing is reported) for the run and put the old value back at
 * exit, then touch a few GiB once so that every system finds backed pages.
 * `--keep-page-reporting` leaves reporting as it is.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const ORDER_FILE = '/sys/module/page_reporting/parameters/page_reporting_order';
/** Above MAX_PAGE_ORDER (10 on x86-64): no free block is that large, so none is reported. */
const NO_REPORTING_ORDER = 11;

let restoreOrder = null;

function readOrder() {
  return Number(fs.readFileSync(ORDER_FILE, 'utf8').trim());
}

function writeOrder(v) {
  fs.writeFileSync(ORDER_FILE, `${v}\n`);
}

/**
 * Hold free page reporting off until exit. Returns what was done, for the
 * report: { order, held } (order: the value found; null where the kernel
 * has no page reporting or we may not change it).
 */
export function holdPageReporting(keep) {
  let order;
  try {
    order = readOrder();
  } catch {
    return { order: null, held: false };
  }
  if (keep || order >= NO_REPORTING_ORDER) return { order, held: false };
  try {
    writeOrder(NO_REPORTING_ORDER);
  } catch (e) {
    process.stderr.write(`bench: warning: free page reporting stays on (${e.code ?? e.message}): buffered jobs will measure host page faults\n`);
    return { order, held: false };
  }
  if (restoreOrder === null) {
    restoreOrder = order;
    process.on('exit', () => {
      try {
        writeOrder(restoreOrder);
      } catch {
        // nothing more to do at exit
      }
    });
  }
  return { order, held: true };
}

/** Before each job: something else on the machine may have set the order back. */
export function reassertPageReporting() {
  if (restoreOrder === null) return;
  try {
    if (readOrder() < NO_REPORTING_ORDER) writeOrder(NO_REPORTING_ORDER);
  } catch {
    // held at the start; a failure now shows in the numbers, not worth stopping for
  }
}

/** The report's line about it. */
export function pageReportingLine(p) {
  if (p.order === null) return 'free page reporting: none';
  if (p.held) return `free page reporting: held off for the run (page_reporting_order ${p.order} -> ${NO_REPORTING_ORDER}, put back at exit)`;
  return `free page reporting: left on (page_reporting_order ${p.order})`;
}

/**
 * Touch a few GiB of memory once, in a child that then exits, so the free
 * lists hold pages the host has backed (with reporting held off they stay
 * backed). A child that fails stops the benchmark, as before this module.
 */
export function warmMemory() {
  const avail = Number(/^MemAvailable:\s+(\d+)/m.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0) * 1024;
  const bytes = Math.min(8 * GiB, Math.floor((avail * 0.4) / (256 * MiB)) * 256 * MiB);
  if (bytes <= 0) return;
  const t0 = Date.now();
  const r = spawnSync(process.execPath, ['-e', `const a=[];for(let i=0;i<${bytes / (256 * MiB)};i++)a.push(Buffer.alloc(${256 * MiB},1));`], { stdio: 'ignore' });
  if (r.error) throw new Error(`touching memory: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`touching memory failed (exit ${r.status ?? r.signal})`);
  process.stderr.write(`bench: touched ${Math.round(bytes / GiB)} GiB of memory first (${Date.now() - t0} ms; --no-warm skips it)\n`);
}
