/**
 * V8 tiering for a short-lived, request-driven process.
 *
 * A mount serves a burst of requests from a fresh process, and until V8's
 * optimizing tier takes over its hot functions run in the bytecode
 * interpreter: in `mkfs.ext4 + tar x + umount` through a loop device the
 * umount's write-back is a serial chain of small requests, so every
 * interpreted microsecond is latency. `--always-sparkplug` compiles each
 * function to baseline machine code on its first call instead (cheap, no
 * optimization, no deoptimization; hot functions still reach the optimizing
 * tier). Measured on that job, same runs (scripts/bench.mjs --variant and
 * --baseline, 6-8 rounds each, 2026-12-03, 2 cores): 7-12% less CPU in
 * each of three runs (1.4 against 1.6, 1.3 against 1.4, 1.4 against 1.5
 * CPU seconds); the speed 1.15x, 1.03x and 1.01x of without it, within
 * this job's round-to-round spread (±20%), so shown only as CPU. Peak RSS
 * about 4 MiB higher.
 *
 * This module is cli.ts's first import, so the flag is set before any other
 * module of qmount is evaluated and every function of ours is compiled under
 * it. A node started with its own --always-sparkplug or --no-always-sparkplug
 * (a benchmark variant) keeps that choice.
 */
import v8 from 'node:v8';

if (!process.execArgv.some((a) => /^--(no-)?always[-_]sparkplug$/.test(a))) v8.setFlagsFromString('--always-sparkplug');
