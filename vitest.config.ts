import { defineConfig } from 'vitest/config';

// Tests mount real FUSE filesystems and run qemu-img; on a 2-core machine they
// run one file at a time so timings stay sane and mounts never collide.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    reporters: ['default'],
  },
});
