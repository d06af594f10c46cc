/**
 * The import graph of the product code (src/, mount/, cache/), type-only
 * imports included: no cycles, and every layer imports only downward
 *   composition root (src/cli.ts, src/daemon.ts, src/commands/)
 *     -> mount/ -> src/formats/ -> cache/ -> src/io/ -> src/errors.ts, src/log.ts
 * with mount/ seeing the engine only through the driver contract.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(import.meta.dirname, '../..');
const DIRS = ['src', 'mount', 'cache'];

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(path.join(ROOT, dir), { withFileTypes: true })) {
    const rel = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...sourceFiles(rel));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(rel);
  }
  return out;
}

/** Relative imports of one file, as repo-relative .ts paths (import, import type, export ... from, import()). */
function importsOf(file: string): string[] {
  const text = fs.readFileSync(path.join(ROOT, file), 'utf8');
  const specs = new Set<string>();
  for (const m of text.matchAll(/(?:^|\n)\s*(?:import|export)\s[^;]*?from\s+'([^']+)'/g)) specs.add(m[1]!);
  for (const m of text.matchAll(/import\(\s*'([^']+)'\s*\)/g)) specs.add(m[1]!);
  const out: string[] = [];
  for (const s of specs) {
    if (!s.startsWith('.')) continue;
    out.push(path.normalize(path.join(path.dirname(file), s)).replace(/\.js$/, '.ts'));
  }
  return out;
}

const files = DIRS.flatMap(sourceFiles).sort();
const graph = new Map(files.map((f) => [f, importsOf(f)]));

function layerOf(file: string): string {
  if (file === 'src/cli.ts' || file === 'src/daemon.ts' || file.startsWith('src/commands/')) return 'root';
  if (file.startsWith('mount/')) return 'mount';
  if (file.startsWith('src/formats/') || file.startsWith('src/partition/')) return 'formats';
  if (file.startsWith('cache/')) return 'cache';
  if (file.startsWith('src/io/')) return 'io';
  return 'base'; // src/errors.ts, src/log.ts and other leaves
}

/** What each layer may import (besides itself). */
const ALLOWED: Record<string, string[]> = {
  root: ['mount', 'formats', 'cache', 'io', 'base'],
  mount: ['base'],
  formats: ['cache', 'io', 'base'],
  cache: ['base'],
  io: ['base'],
  base: [],
};
/** mount/ sees the engine only through the driver contract (types and checkRequest-free helpers). */
const MOUNT_MAY_IMPORT = new Set(['src/formats/driver.ts']);

describe('import graph', () => {
  it('every relative import resolves to a source file', () => {
    const missing: string[] = [];
    for (const [f, deps] of graph) for (const d of deps) if (!graph.has(d)) missing.push(`${f} -> ${d}`);
    expect(missing).toEqual([]);
  });

  it('has no cycles (type-only imports included)', () => {
    const state = new Map<string, 'open' | 'done'>();
    const cycles: string[] = [];
    const stack: string[] = [];
    const visit = (f: string): void => {
      state.set(f, 'open');
      stack.push(f);
      for (const d of graph.get(f) ?? []) {
        if (state.get(d) === 'open') cycles.push([...stack.slice(stack.indexOf(d)), d].join(' -> '));
        else if (!state.has(d)) visit(d);
      }
      stack.pop();
      state.set(f, 'done');
    };
    for (const f of files) if (!state.has(f)) visit(f);
    expect(cycles).toEqual([]);
  });

  it('imports only downward', () => {
    const bad: string[] = [];
    for (const [f, deps] of graph) {
      const from = layerOf(f);
      for (const d of deps) {
        const to = layerOf(d);
        if (to === from) continue;
        if (from === 'mount' && MOUNT_MAY_IMPORT.has(d)) continue;
        if (!ALLOWED[from]!.includes(to)) bad.push(`${f} (${from}) -> ${d} (${to})`);
      }
    }
    expect(bad).toEqual([]);
  });
});
