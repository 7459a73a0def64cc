// A Matrix sync stream: MSC2108's GET /sync/sse read with fetch(), or
// long-polling /sync when the server does not offer it. Every batch is a
// /sync answer; the position is the id (next_batch) of the last batch the
// application finished processing.
import { createParser } from 'eventsource-parser';

export const SSE_FEATURE = 'org.matrix.msc2108';
const SSE_PATH = '/_matrix/client/v3/sync/sse';
const SYNC_PATH = '/_matrix/client/v3/sync';
const VERSIONS_PATH = '/_matrix/client/versions';

/** A Matrix error answer ({errcode, error, ...}) with its HTTP status. */
export class MatrixError extends Error {
  constructor(status, body) {
    const b = body && typeof body === 'object' ? body : {};
    super(`${b.errcode || 'M_UNKNOWN'}: ${b.error || `HTTP ${status}`}`);
    this.name = 'MatrixError';
    this.status = status;
    this.errcode = b.errcode || 'M_UNKNOWN';
    this.data = b;
  }
}

function abortError() {
  return new DOMException('The operation was aborted.', 'AbortError');
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortError());
    const t = setTimeout(() => { signal?.removeEventListener('abort', onAbort); resolve(); }, ms);
    function onAbort() { clearTimeout(t); reject(abortError()); }
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

async function readJson(res) {
  const text = await res.text();
  try { return JSON.parse(text); } catch { return { error: text.slice(0, 200) }; }
}

function trimSlash(url) {
  return String(url).replace(/\/+$/, '');
}

/**
 * Asks the server's /versions whether it serves MSC2108.
 * Resolves true or false; rejects when the server cannot be reached.
 */
export async function detectSse(baseUrl, { fetch: fetchFn = globalThis.fetch, signal } = {}) {
  const res = await fetchFn(trimSlash(baseUrl) + VERSIONS_PATH, { signal });
  if (!res.ok) {
    await res.body?.cancel();
    return false;
  }
  const doc = await readJson(res);
  return doc?.unstable_features?.[SSE_FEATURE] === true;
}

/** Delay before reconnect attempt n (1, 2, ...): exponential with jitter. */
export function backoffDelay(attempt, base, max, random = Math.random) {
  const cap = Math.min(max, base * 2 ** Math.max(0, attempt - 1));
  return Math.round(cap / 2 + random() * (cap / 2));
}

const FATAL_STATUS = new Set([400, 401, 403]);

/**
 * One sync stream. Options (see index.d.ts for the types):
 *   baseUrl, accessToken, since, params, heartbeatInterval, transport,
 *   longPollTimeout, minRetry, maxRetry, deadFactor, fetch,
 *   onSync(sync, id), onError(err), onState(state)
 */
export class SyncStream {
  constructor(opts) {
    if (!opts?.baseUrl || !opts.accessToken) throw new TypeError('baseUrl and accessToken are required');
    this.baseUrl = trimSlash(opts.baseUrl);
    this.accessToken = opts.accessToken;
    this.position = opts.since || null;
    this.params = { ...(opts.params || {}) };
    this.heartbeatInterval = opts.heartbeatInterval ?? 30;
    this.transportOption = opts.transport || 'auto';
    this.longPollTimeout = opts.longPollTimeout ?? 30000;
    this.minRetry = opts.minRetry ?? 1000;
    this.maxRetry = opts.maxRetry ?? 30000;
    this.deadFactor = opts.deadFactor ?? 2.5;
    this.fetch = opts.fetch || globalThis.fetch.bind(globalThis);
    this.onSync = opts.onSync || (() => {});
    this.onError = opts.onError || (() => {});
    this.onState = opts.onState || (() => {});
    this.random = opts.random || Math.random;
    /** 'sse' or 'longpoll' once known. */
    this.transport = null;
    /** 'idle' | 'connecting' | 'open' | 'waiting' | 'stopped' */
    this.state = 'idle';
    /** The fatal error that stopped the stream, if any. */
    this.error = null;
    /** The server's retry: value, in ms. */
    this.retry = null;
    this.stats = { requests: 0, bytes: 0, batches: 0, heartbeats: 0, reconnects: 0 };
    this._controller = null;
    this._done = null;
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    try { this.onState(state); } catch { /* the application's problem */ }
  }

  /** Starts the stream; resolves when it has stopped (stop() or a fatal error). */
  start() {
    if (this._done) return this._done;
    this._controller = new AbortController();
    this._done = this._run(this._controller.signal).finally(() => this.setState('stopped'));
    return this._done;
  }

  /** Stops for good; resolves when everything is closed. */
  async stop() {
    this._controller?.abort();
    await this._done?.catch(() => {});
  }

  async _run(signal) {
    let attempt = 0;
    try {
      this.transport = await this._chooseTransport(signal);
      while (!signal.aborted) {
        let outcome;
        try {
          outcome = this.transport === 'sse' ? await this._sse(signal) : await this._longPoll(signal);
        } catch (err) {
          if (signal.aborted) break;
          if (err instanceof MatrixError && FATAL_STATUS.has(err.status)) {
            this.error = err;
            this.onError(err);
            break;
          }
          outcome = { progressed: false, error: err };
        }
        if (outcome.fallback) { this.transport = 'longpoll'; continue; }
        if (outcome.progressed) attempt = 0;
        attempt += 1;
        this.stats.reconnects += 1;
        this.setState('waiting');
        // A clean end (server restart) waits what the server asked for
        // (mxsse jitters it per connection); failures back off from there.
        const base = Math.max(100, this.retry ?? this.minRetry);
        let delay = outcome.clean && attempt === 1 ? base : backoffDelay(attempt, base, this.maxRetry, this.random);
        if (outcome.error?.retryAfterMs) delay = Math.max(delay, outcome.error.retryAfterMs);
        await sleep(delay, signal);
      }
    } catch (err) {
      if (!signal.aborted) { this.error = err; this.onError(err); }
    }
  }

  async _chooseTransport(signal) {
    if (this.transportOption !== 'auto') return this.transportOption;
    for (let attempt = 1; ; attempt++) {
      try {
        this.stats.requests += 1;
        return (await detectSse(this.baseUrl, { fetch: this.fetch, signal })) ? 'sse' : 'longpoll';
      } catch (err) {
        if (signal.aborted) throw err;
        this.setState('waiting');
        await sleep(backoffDelay(attempt, this.minRetry, this.maxRetry, this.random), signal);
      }
    }
  }

  _query(extra) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(this.params)) {
      if (v === undefined || v === null) continue;
      q.set(k, typeof v === 'object' ? JSON.stringify(v) : String(v));
    }
    for (const [k, v] of Object.entries(extra)) if (v !== undefined && v !== null) q.set(k, String(v));
    return q.toString();
  }

  async _deliver(sync, id) {
    await this.onSync(sync, id);
    this.position = id;
    this.stats.batches += 1;
  }

  async _errorFrom(res) {
    const body = await readJson(res);
    const err = new MatrixError(res.status, body);
    const ra = body?.retry_after_ms ?? (Number(res.headers.get('retry-after')) * 1000 || 0);
    if (ra) err.retryAfterMs = ra;
    return err;
  }

  /** One SSE connection, until it ends. */
  async _sse(outer) {
    const ctl = new AbortController();
    const onOuterAbort = () => ctl.abort();
    outer.addEventListener('abort', onOuterAbort, { once: true });
    const headers = { Authorization: `Bearer ${this.accessToken}`, Accept: 'text/event-stream' };
    if (this.position) headers['Last-Event-ID'] = this.position;
    const url = `${this.baseUrl}${SSE_PATH}?${this._query({ heartbeat_interval: this.heartbeatInterval })}`;
    let progressed = false;
    let lastByte = Date.now();
    let dead = false;
    let watchdog = null;
    const deadAfter = this.heartbeatInterval * 1000 * this.deadFactor;
    // Checked when it fires: a timer that a hidden tab throttled fires
    // late, never early, and data arrival keeps lastByte fresh.
    let headed = false;
    const arm = (ms) => {
      watchdog = setTimeout(() => {
        const idle = Date.now() - lastByte;
        if (!headed || idle >= deadAfter) { dead = true; ctl.abort(); } else arm(deadAfter - idle);
      }, ms);
    };
    try {
      this.setState('connecting');
      this.stats.requests += 1;
      // The head comes with the first batch: quickly on a resume, but an
      // initial sync can take minutes (a retry reuses Synapse's cached
      // work). A request that gets no head went out on a dead connection.
      arm(this.position ? deadAfter : Math.max(deadAfter, 90000));
      const res = await this.fetch(url, { headers, signal: ctl.signal, cache: 'no-store' });
      lastByte = Date.now();
      headed = true;
      clearTimeout(watchdog);
      arm(deadAfter);
      if (res.status === 404 || res.status === 405) {
        await res.body?.cancel();
        return { fallback: true };
      }
      if (!res.ok) throw await this._errorFrom(res);
      if (!(res.headers.get('content-type') || '').startsWith('text/event-stream')) {
        await res.body?.cancel();
        throw new Error(`not an event stream: ${res.headers.get('content-type')}`);
      }
      this.setState('open');
      const queue = [];
      let fatal = null;
      const parser = createParser({
        onEvent: (ev) => {
          if (ev.event === 'error') {
            let body;
            try { body = JSON.parse(ev.data); } catch { body = { error: ev.data }; }
            fatal = new MatrixError(body.errcode === 'M_FORBIDDEN' ? 403 : 401, body);
          } else if (!ev.event || ev.event === 'message' || ev.event === 'sync') {
            queue.push(ev);
          }
        },
        onRetry: (ms) => { this.retry = ms; },
        onComment: () => { this.stats.heartbeats += 1; },
      });
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        lastByte = Date.now();
        this.stats.bytes += value.byteLength;
        parser.feed(decoder.decode(value, { stream: true }));
        // Batches are applied one by one; the stream is not read while the
        // application works (TCP pushes back on the server).
        while (queue.length) {
          const ev = queue.shift();
          const sync = JSON.parse(ev.data);
          await this._deliver(sync, ev.id || sync.next_batch);
          progressed = true;
        }
        if (fatal) {
          reader.cancel().catch(() => {});
          throw fatal;
        }
      }
      return { progressed, clean: true };
    } catch (err) {
      if (outer.aborted) throw err;
      if (err instanceof MatrixError) throw err;
      if (dead) return { progressed, error: new Error('no heartbeat') };
      return { progressed, error: err };
    } finally {
      clearTimeout(watchdog);
      ctl.abort();
      outer.removeEventListener('abort', onOuterAbort);
    }
  }

  /** Long-polls /sync until a request fails. */
  async _longPoll(signal) {
    let progressed = false;
    for (;;) {
      this.setState(this.position ? 'open' : 'connecting');
      const q = this._query(this.position
        ? { since: this.position, timeout: this.longPollTimeout }
        : { timeout: 0 });
      this.stats.requests += 1;
      // A request that outlives its timeout by far went through a dead
      // connection (as matrix-js-sdk's 80 s buffer).
      const ctl = new AbortController();
      const onAbort = () => ctl.abort();
      signal.addEventListener('abort', onAbort, { once: true });
      const limit = setTimeout(() => ctl.abort(), (this.position ? this.longPollTimeout : 0) + 80000);
      let res, text;
      try {
        res = await this.fetch(`${this.baseUrl}${SYNC_PATH}?${q}`, {
          headers: { Authorization: `Bearer ${this.accessToken}` }, signal: ctl.signal, cache: 'no-store',
        });
        if (!res.ok) {
          const err = await this._errorFrom(res);
          if (FATAL_STATUS.has(err.status)) throw err;
          return { progressed, error: err };
        }
        text = await res.text();
      } catch (err) {
        if (signal.aborted || err instanceof MatrixError) throw err;
        return { progressed, error: err };
      } finally {
        clearTimeout(limit);
        signal.removeEventListener('abort', onAbort);
      }
      this.stats.bytes += new TextEncoder().encode(text).byteLength;
      const sync = JSON.parse(text);
      if (sync.next_batch && sync.next_batch !== this.position) {
        await this._deliver(sync, sync.next_batch);
        progressed = true;
      }
    }
  }
}
