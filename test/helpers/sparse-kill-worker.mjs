// A process for the engine-level SIGKILL rounds (test/safety/sigkill.test.ts,
// "SIGKILL during discard, write-zeroes and resize"): opens an image
// read-write through the built engine (dist/), resizes it to the size it is
// given, then runs two lanes of writes, writeZeroes (with and without unmap)
// and flushes (then idles) until it is killed. One line per event on stdout, in the order
// they happen (the parent's clock): "I <id>" issued, "D <id>" done, "E <id>"
// failed. Requests are described by the parent (argv[3], JSON); write data is
// patternBytes(length, seed) of test/helpers/qemu.ts, computed the same way here.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const { openImage } = await import(path.join(root, 'dist/src/formats/open.js'));
const pino = (await import('pino')).default;

function patternBytes(length, seed) {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

const [image, format, plan] = process.argv.slice(2);
const { size, lanes } = JSON.parse(plan);
const out = (s) => process.stdout.write(`${s}\n`);
const d = await openImage(image, { readOnly: false, format, log: pino({ level: 'silent' }) });
out('I resize');
await d.resize(size);
out('D resize');
await Promise.all(
  lanes.map(async (ops) => {
    {
      for (const op of ops) {
        out(`I ${op.id}`);
        try {
          if (op.kind === 'flush') await d.flush();
          else if (op.kind === 'zero') await d.writeZeroes(op.offset, op.length, { unmap: op.unmap });
          else {
            const data = patternBytes(op.length, op.seed);
            await d.write(data, 0, data.length, op.offset);
          }
          out(`D ${op.id}`);
        } catch {
          out(`E ${op.id}`);
        }
      }
    }
  }),
);
out('idle');
// Wait for the SIGKILL.
setInterval(() => {}, 1000);
