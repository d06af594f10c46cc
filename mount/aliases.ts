/**
 * Files of one mount that show the same bytes: a partition file and
 * disk.raw (TreeEntry.viewOf names the shared base and the offset in it).
 * After a change through one of them, the kernel's cached pages of the
 * others over the changed range are stale: ranges() names them.
 */
import type { MountFile } from './tree.js';

/** Another file showing the same bytes. */
interface Alias {
  file: MountFile;
  /** the other file's offset in the shared base */
  baseOffset: number;
}

export class Aliases {
  private readonly byFile = new Map<MountFile, { baseOffset: number; others: Alias[] }>();

  constructor(files: readonly MountFile[]) {
    const groups = new Map<object, Alias[]>();
    for (const f of files) {
      const base = f.viewOf?.base ?? f.source;
      const g = groups.get(base) ?? [];
      g.push({ file: f, baseOffset: f.viewOf?.offset ?? 0 });
      groups.set(base, g);
    }
    for (const g of groups.values()) {
      if (g.length < 2) continue;
      for (const m of g) this.byFile.set(m.file, { baseOffset: m.baseOffset, others: g.filter((o) => o !== m) });
    }
  }

  /** True when some other file shows bytes of `f`. */
  has(f: MountFile): boolean {
    return this.byFile.has(f);
  }

  /** The other files showing bytes of `f`. */
  others(f: MountFile): MountFile[] {
    return this.byFile.get(f)?.others.map((o) => o.file) ?? [];
  }

  /** For a change of f's bytes [pos, pos + length): each other file's overlapping range, in its own offsets. */
  ranges(f: MountFile, pos: number, length: number, each: (file: MountFile, offset: number, length: number) => void): void {
    const a = this.byFile.get(f);
    if (a === undefined || length <= 0) return;
    const lo = a.baseOffset + pos;
    const hi = lo + length;
    for (const o of a.others) {
      const start = Math.max(lo, o.baseOffset);
      const end = Math.min(hi, o.baseOffset + o.file.source.virtualSize);
      if (start < end) each(o.file, start - o.baseOffset, end - start);
    }
  }
}
