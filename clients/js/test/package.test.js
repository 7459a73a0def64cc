// The package as published: its types compile against real usage, and
// `npm pack` holds what an app needs and nothing else.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

test('the types compile against test/types/usage.ts (tsc --strict)', () => {
  execFileSync(process.execPath, [path.join(DIR, 'node_modules/typescript/bin/tsc'), '-p', path.join(DIR, 'tsconfig.json')],
    { stdio: 'pipe' });
});

test('npm pack: name, version, licence, types, README, ES module', () => {
  const [info] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json'], { cwd: DIR, encoding: 'utf8' }));
  const pkg = JSON.parse(fs.readFileSync(path.join(DIR, 'package.json'), 'utf8'));
  assert.equal(info.name, 'mxsse-client');
  assert.match(info.version, /^\d+\.\d+\.\d+$/);
  assert.ok(pkg.license);
  assert.equal(pkg.type, 'module');
  assert.deepEqual(Object.keys(pkg.dependencies), ['eventsource-parser']);
  const files = info.files.map((f) => f.path).sort();
  for (const f of ['README.md', 'package.json', 'src/index.js', 'src/index.d.ts', 'src/stream.js', 'src/sdk.js']) {
    assert.ok(files.includes(f), `${f} in the package`);
  }
  assert.ok(!files.some((f) => f.startsWith('test/') || f.startsWith('node_modules/')), files.join(' '));
  assert.equal(pkg.exports['.'].types, './src/index.d.ts');
});

test('the package imports in Node without a DOM', async () => {
  const m = await import('mxsse-client');
  assert.equal(typeof m.SyncStream, 'function');
  assert.equal(typeof m.createSseFetch, 'function');
  assert.equal(m.SSE_FEATURE, 'org.matrix.msc2108');
});
