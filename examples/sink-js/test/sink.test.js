// Unit tests under Node: `npm test` (no wasm, no host, no database).
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { Fatal, Retryable, UNCHANGED_TOAST } from '@dbmazz/sdk';
import { BatchBuilder, config, onHttp, requests, reset } from '@dbmazz/sdk/testing';
import { JsonLines } from '../sink.js';

const batch = () =>
  new BatchBuilder(42)
    .table(1, 'public', 'orders', [['id', 23, true], ['note', 25, false], ['meta', 3802, false]])
    .insert(1, [1, 'first', { k: [1, 2] }])
    .update(1, [1, UNCHANGED_TOAST, null])
    .delete(1, [1, null, null])
    .build();

beforeEach(reset);

test('a batch is one POST of JSON lines keyed by its id', async () => {
  onHttp(() => new Response('', { status: 200 }));
  await new JsonLines(config({ url: 'http://receiver:8080/in' })).write(batch());
  const [req] = requests();
  assert.equal(req.method, 'POST');
  assert.equal(req.url, 'http://receiver:8080/in');
  assert.equal(req.headers['idempotency-key'], '42');
  const lines = req.body.trim().split('\n').map((l) => JSON.parse(l));
  assert.deepEqual(lines.map((l) => l.op), ['insert', 'update', 'delete']);
  assert.deepEqual(lines[0].new, { id: 1, note: 'first', meta: { k: [1, 2] } });
  assert.deepEqual(lines[1].new.note, { unchanged_toast: true });
  assert.equal(lines[2].old.id, 1);
  assert.equal(lines[2].new, null);
});

test('a 5xx is retryable and a 4xx is fatal', async () => {
  onHttp(() => new Response('', { status: 503 }));
  await assert.rejects(new JsonLines(config({ url: 'http://r/' })).write(batch()), Retryable);
  onHttp(() => new Response('bad', { status: 400 }));
  await assert.rejects(new JsonLines(config({ url: 'http://r/' })).write(batch()), (e) => e instanceof Fatal && /answered 400/.test(e.message));
});

test('only_table filters', async () => {
  onHttp(() => new Response('', { status: 200 }));
  await new JsonLines(config({ url: 'http://r/', only_table: 'public.other' })).write(batch());
  assert.deepEqual(requests(), []);
});
