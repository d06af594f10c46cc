/**
 * Decompression of compressed clusters: raw deflate (compression_type 0,
 * "zlib" in QEMU, no zlib header) and zstd (type 1, via fzstd).
 *
 * The stored data may be followed by unrelated bytes up to the end of its
 * last 512-byte sector (the next compressed cluster may start there), so
 * both decoders stop when the stream ends or a whole cluster is produced.
 * Output shorter than a cluster is corruption.
 */
import zlib from 'node:zlib';
import { decompress as zstdDecompress } from 'fzstd';
import { CorruptionError } from '../../errors.js';

function inflateRaw(input: Buffer, clusterSize: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    zlib.inflateRaw(
      input,
      { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize * 2 + 65536 },
      (err, out) => (err ? reject(err) : resolve(out)),
    );
  });
}

/** Length of the first zstd frame in `buf`, found by walking its block headers. */
export function zstdFrameLength(buf: Uint8Array): number {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (buf.length < 6 || dv.getUint32(0, true) !== 0xfd2fb528) throw new Error('no zstd frame magic');
  const fhd = buf[4];
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictIdFlag = fhd & 3;
  let pos = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictIdFlag] + [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag];
  for (;;) {
    if (pos + 3 > buf.length) throw new Error('zstd frame truncated');
    const bh = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16);
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    pos += 3 + (type === 1 ? 1 : size);
    if (type === 3) throw new Error('reserved zstd block type');
    if (last) break;
  }
  pos += checksum ? 4 : 0;
  if (pos > buf.length) throw new Error('zstd frame truncated');
  return pos;
}

export async function decompressCluster(type: number, input: Buffer, clusterSize: number): Promise<Buffer> {
  let out: Uint8Array;
  try {
    if (type === 0) {
      out = await inflateRaw(input, clusterSize);
    } else {
      const frame = input.subarray(0, zstdFrameLength(input));
      out = zstdDecompress(frame, new Uint8Array(clusterSize));
    }
  } catch (err) {
    throw new CorruptionError(`compressed cluster cannot be decompressed: ${(err as Error).message}`);
  }
  if (out.length < clusterSize) {
    throw new CorruptionError(`compressed cluster decompresses to ${out.length} bytes, not ${clusterSize}`);
  }
  return Buffer.from(out.buffer, out.byteOffset, clusterSize);
}
