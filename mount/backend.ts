/**
 * The small interface between the binding-neutral DiskService and a FUSE
 * binding (which binding: mount/backend-choice.ts). A backend mounts,
 * renders its own libfuse options, calls `onUnmounted` as soon as it learns that the kernel dropped the mount (umount or
 * fusermount -u from outside, or our own), and `release()`s the binding once
 * the session has drained. Unmounting the mount point itself is the
 * session's job (fusermount, the same for both).
 */
import type { Logger } from '../src/log.js';
import type { MountOptions } from './options.js';
import type { DiskService } from './service.js';

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
