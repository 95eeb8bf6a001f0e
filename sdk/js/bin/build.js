#!/usr/bin/env node
// dbmazz-plugin-build sink|transform ENTRY.js -o OUT.wasm
//
// Bundles ENTRY.js and what it imports (esbuild; the SDK under its `dbmazz-component`
// condition, the host's `dbmazz:*`/`wasi:*` interfaces left as imports) and makes a
// component of contract dbmazz:plugin@0.3.0 with ComponentizeJS (the WIT packaged with this
// SDK). ENTRY exports `sinkPlugin = exportSink(MySink)` or `transformPlugin = ...`.

import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { build } from 'esbuild';
import { componentize } from '@bytecodealliance/componentize-js';

const WIT = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'wit');
const usage = 'usage: dbmazz-plugin-build sink|transform ENTRY.js -o OUT.wasm';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { output: { type: 'string', short: 'o' }, help: { type: 'boolean', short: 'h' } },
});
if (values.help) {
  console.log(usage);
  process.exit(0);
}
const [world, entry] = positionals;
if (!['sink', 'transform'].includes(world) || !entry || !values.output || positionals.length > 2) {
  console.error(usage);
  process.exit(2);
}

const started = Date.now();
const dir = await mkdtemp(join(tmpdir(), 'dbmazz-plugin-'));
try {
  const bundle = join(dir, 'plugin.js');
  await build({
    entryPoints: [resolve(entry)],
    outfile: bundle,
    bundle: true,
    format: 'esm',
    platform: 'neutral',
    target: 'es2022',
    conditions: ['dbmazz-component'],
    external: ['dbmazz:*', 'wasi:*'],
    logLevel: 'warning',
  });
  const { component } = await componentize({
    sourcePath: bundle,
    witPath: WIT,
    worldName: world,
    // a transform gets no wasi:http from the host (only sinks may reach the network):
    // without this, ComponentizeJS imports it for `fetch` and the host refuses the file
    disableFeatures: world === 'transform' ? ['http', 'fetch-event'] : [],
  });
  await writeFile(values.output, component);
  const mb = (component.length / 1048576).toFixed(1);
  console.log(`built ${values.output} (${world}, ${mb} MiB) in ${((Date.now() - started) / 1000).toFixed(1)} s`);
} catch (e) {
  console.error(`dbmazz-plugin-build: ${e?.message ?? e}`);
  process.exitCode = 1;
} finally {
  await rm(dir, { recursive: true, force: true });
}
