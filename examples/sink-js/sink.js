// A sink that POSTs each batch as JSON lines (one change per line) to `url`.
//
// The batch id goes in the `Idempotency-Key` header: a replayed batch (after a crash) has
// the same id, so the receiver can drop what it already has.
import { Fatal, Retryable, Sink, changes, key, log, toJson } from '@dbmazz/sdk';

export class JsonLines extends Sink {
  static prefersEncoded = true;

  static metadata = {
    name: 'sink-js',
    version: '0.1.0',
    description: 'POSTs batches as JSON lines',
    config: [
      key('url', 'text', { required: true, doc: 'where batches are POSTed (http://host:port/path)' }),
      key('only_table', 'text', { doc: "send only this table's changes (schema.table)" }),
    ],
  };

  constructor(config) {
    super(config);
    this.url = config.required('url');
    this.onlyTable = config.get('only_table');
  }

  async write(batch) {
    let body = '';
    for (const c of changes(batch)) {
      if (this.onlyTable === undefined || c.table === this.onlyTable) body += toJson(c) + '\n';
    }
    if (!body) return;
    const headers = { 'content-type': 'application/x-ndjson', 'idempotency-key': String(batch.id) };
    const resp = await fetch(this.url, { method: 'POST', headers, body });
    if (resp.status === 408 || resp.status === 429 || resp.status >= 500) {
      throw new Retryable(`${this.url} answered ${resp.status}`);
    }
    if (!resp.ok) throw new Fatal(`${this.url} answered ${resp.status}: ${(await resp.text()).slice(0, 200)}`);
    log.debug('batch sent', { id: batch.id, bytes: body.length });
  }
}
