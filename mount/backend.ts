/**
 * The small interface between the binding-neutral DiskService and a FUSE
 * binding, and the choice of binding (--fuse-backend):
 *   fuse3        native/fuse3 (libfuse 3 low-level, on the event loop; default)
 *   fuse-native  the fuse-native package (libfuse 2.9, worker threads)
 *   auto         fuse3, or fuse-native when the addon cannot be loaded
 *                (one log line says why)
 *
 * A backend mounts, renders its own libfuse options, calls `onUnmounted` as
 * soon as it learns that the kernel dropped the mount (umount or
 * fusermount -u from outside, or our own), and `release()`s the binding once
 * the session has drained. Unmounting the mount point itself is the
 * session's job (fusermount, the same for both).
 */
import { QmountError } from '../src/errors.js';
import type { Logger } from '../src/log.js';
import type { MountOptions } from './options.js';
import type { DiskService } from './service.js';

export const BACKEND_NAMES = ['auto', 'fuse3', 'fuse-native'] as const;
export type BackendChoice = (typeof BACKEND_NAMES)[number];

export interface BackendContext {
  mountPoint: string;
  service: DiskService;
  mount: MountOptions;
  readOnly: boolean;
  log: Logger;
  /** Called once when the kernel no longer has the mount (reason for the log). */
  onUnmounted: (detail?: string) => void;
}

export interface FuseBackend {
  readonly name: 'fuse3' | 'fuse-native';
  /** The libfuse options as given to the binding (debug log). */
  readonly options: string;
  /** Largest read/write request this mount can get. */
  readonly maxIo: number;
  /** Resolves once the file system is mounted. */
  mount(): Promise<void>;
  /** After the kernel let go (or was told to) and requests drained: free the binding. Idempotent. */
  release(): void;
  /** Binding counters for the close log, if any. */
  stats(): Record<string, number> | undefined;
}

/** The backend for `choice`; `auto` logs one line when it falls back. */
export async function createBackend(choice: BackendChoice, ctx: BackendContext): Promise<FuseBackend> {
  if (choice !== 'fuse-native') {
    const fuse3 = await import('./backend-fuse3.js');
    const loaded = fuse3.loadFuse3();
    if (loaded.addon) return new fuse3.Fuse3Backend(loaded.addon, ctx);
    if (choice === 'fuse3') throw new QmountError('ENOTSUP', `--fuse-backend fuse3: ${loaded.why}`);
    ctx.log.warn({ why: loaded.why }, `fuse3 backend unavailable (${loaded.why}); using fuse-native`);
  }
  const native = await import('./backend-fuse-native.js');
  return new native.FuseNativeBackend(ctx);
}
