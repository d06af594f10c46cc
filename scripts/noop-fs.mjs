#!/usr/bin/env node
/**
 * The benchmark's ceilings: a file system showing one file, DIR/disk.raw of
 * SIZE bytes, that answers every read and write at once without doing
 * anything (read buffers are left as FUSE hands them over). Whatever it
 * reaches is the most the binding allows; qmount cannot beat it.
 *
 *   node scripts/noop-fs.mjs DIR SIZE [--read-only] [--backend fuse3|fuse-native]
 *
 * Comparable with qmount: it mounts through qmount's own backend code with
 * qmount's default options (imported from dist/mount/): fuse-native through
 * QmountFuse with big_writes, max_read/max_write, kernel_cache,
 * fsname/subtype and the same operations DiskService answers; fuse3
 * (default) through native/fuse3 with the same option list, attributes and
 * buffer pool, answering data requests in the handler, in the same tick.
 * It runs as its own Node process like `qmount -f`. Prints "ready <pid>" on
 * stdout once mounted. SIGINT/SIGTERM unmount and exit 0; so does an unmount
 * from outside (fusermount -u).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

function fail(msg) {
  process.stderr.write(`noop-fs: ${msg}\n`);
  process.exit(1);
}

const args = process.argv.slice(2);
const readOnly = args.includes('--read-only');
const bi = args.indexOf('--backend');
const backend = bi >= 0 ? args.splice(bi, 2)[1] : 'fuse3';
const [dirArg, sizeArg] = args.filter((a) => !a.startsWith('--'));
if (!dirArg || !sizeArg || !/^\d+$/.test(sizeArg) || !['fuse3', 'fuse-native'].includes(backend)) {
  fail('usage: noop-fs.mjs DIR SIZE [--read-only] [--backend fuse3|fuse-native]');
}
const size = Number(sizeArg);
const dir = fs.realpathSync(dirArg);

let native;
let fuse3;
let options;
let mountinfo;
try {
  native = await import(path.join(ROOT, 'dist/mount/backend-fuse-native.js'));
  fuse3 = await import(path.join(ROOT, 'dist/mount/backend-fuse3.js'));
  options = await import(path.join(ROOT, 'dist/mount/options.js'));
  mountinfo = await import(path.join(ROOT, 'dist/mount/mountinfo.js'));
} catch (err) {
  fail(`cannot load dist/mount (build first: npx tsc -p .): ${err.message}`);
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => close(0));
let closing = false;
let close = (code) => process.exit(code);

if (backend === 'fuse3') {
  const { addon, why } = fuse3.loadFuse3();
  if (!addon) fail(why);
  const { OP } = fuse3;
  const o = options.defaultMountOptions();
  const { maxRead, maxWrite } = options.ioSizes(o, options.MAX_IO_FUSE3);
  // The addon's node table (mount/backend-fuse3.ts Fuse3Node): the root, then disk.raw as inode 2.
  const nodes = [
    { parent: 1, name: '', dir: true, mode: 0o040700, nlink: 2, size: 4096, blocks: 0, readOnly: true, keepCache: true },
    { parent: 1, name: 'disk.raw', dir: false, mode: 0o100600, nlink: 1, size, blocks: Math.ceil(size / 512), readOnly, keepCache: true },
  ];
  const attrs = { nodes, dirMode: 0o040700, uid: process.getuid(), gid: process.getgid(), readOnly, directIo: false, maxRead, maxWrite };
  let m;
  const handler = (op, slot, off, len) => {
    if (op === OP.UNMOUNTED) {
      addon.close(m.handle);
      process.exit(0);
    }
    if (op === OP.READ) addon.reply(m.handle, slot, off >= size ? 0 : Math.min(len, size - off));
    else if (op === OP.WRITE) addon.reply(m.handle, slot, len);
    else if (op === OP.LSEEK) addon.reply(m.handle, slot, -38);
    else if (op === OP.FALLOCATE) addon.reply(m.handle, slot, -95);
    else addon.reply(m.handle, slot, 0);
  };
  try {
    m = addon.mount(dir, options.fuse3OptionList(o, readOnly).join(','), attrs, fuse3.DEFAULT_BUFFERS, handler);
  } catch (err) {
    fail(`cannot mount ${dir}: ${err.message}`);
  }
  close = (code) => {
    if (closing) return;
    closing = true;
    // Not spawnSync: the event loop must keep serving the mount while it goes.
    spawn('fusermount', ['-u', dir], { stdio: 'ignore' }).on('exit', () => process.exit(code));
    setTimeout(() => process.exit(code), 5000).unref();
  };
  process.stdout.write(`ready ${process.pid}\n`);
} else {

const FILE = '/disk.raw';
const ENOENT = -2;
const now = Date.now();
const fileStat = { mode: 0o100600, uid: process.getuid(), gid: process.getgid(), size, nlink: 1, blksize: 65536, blocks: Math.ceil(size / 512), atime: now, mtime: now, ctime: now };
const dirStat = { mode: 0o040700, uid: process.getuid(), gid: process.getgid(), size: 4096, nlink: 2, atime: now, mtime: now, ctime: now };

// The same operations DiskService answers (mount/service.ts), each answered at once.
const ops = {
  getattr: (p, cb) => (p === '/' ? cb(0, dirStat) : p === FILE ? cb(0, fileStat) : cb(ENOENT)),
  fgetattr: (p, _fd, cb) => (p === FILE ? cb(0, fileStat) : cb(0, dirStat)),
  readdir: (p, cb) => (p === '/' ? cb(0, ['.', '..', 'disk.raw']) : cb(ENOENT)),
  statfs: (_p, cb) => cb(0, { bsize: 4096, frsize: 4096, blocks: Math.ceil(size / 4096), bfree: 0, bavail: 0, files: 2, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255 }),
  open: (_p, _flags, cb) => cb(0, 0),
  release: (_p, _fd, cb) => cb(0),
  flush: (_p, _fd, cb) => cb(0),
  read: (_p, _fd, _buf, len, pos, cb) => cb(pos >= size ? 0 : Math.min(len, size - pos)),
  write: (_p, _fd, _buf, len, _pos, cb) => cb(len),
  fsync: (_p, _ds, _fd, cb) => cb(0),
  truncate: (_p, _size, cb) => cb(0),
  ftruncate: (_p, _fd, _size, cb) => cb(0),
  utimens: (_p, _a, _m, cb) => cb(0),
  chmod: (_p, _m, cb) => cb(-95),
  chown: (_p, _u, _g, cb) => cb(-95),
};

const fuse = new native.QmountFuse(dir, ops, options.fuseOptionList(options.defaultMountOptions(), readOnly));

close = (code) => {
  if (closing) return;
  closing = true;
  fuse.unmount(() => process.exit(code));
  setTimeout(() => process.exit(code), 5000).unref();
};

fuse.mount((err) => {
  if (err) fail(`cannot mount ${dir}: ${err.message}`);
  process.stdout.write(`ready ${process.pid}\n`);
  // Like qmount's session: notice an unmount from outside and leave.
  setInterval(() => {
    const mounted = mountinfo.findMount(mountinfo.readMountsSync(), dir) !== undefined;
    if (!mounted) {
      closing = true;
      process.exit(0);
    }
  }, 500);
});
}
