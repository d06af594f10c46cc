/**
 * The choice of FUSE binding (--fuse-backend):
 *   fuse3        native/fuse3 (libfuse 3 low-level, on the event loop; default)
 *   fuse-native  the fuse-native package (libfuse 2.9, worker threads)
 *   auto         fuse3, or fuse-native when the addon cannot be loaded
 *                (one log line says why)
 * Apart from mount/backend.ts (the interface) so that the backends, which
 * implement it, and this module, which loads them, form no import cycle.
 */
import { QmountError } from '../src/errors.js';
import type { BackendContext, FuseBackend } from './backend.js';

export const BACKEND_NAMES = ['auto', 'fuse3', 'fuse-native'] as const;
export type BackendChoice = (typeof BACKEND_NAMES)[number];

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
