// A fetch() for matrix-js-sdk's createClient({fetchFn}) that answers the
// SDK's long-poll `GET /sync?since=X` from an MSC2108 stream (the event
// that follows id X) and passes every other request through unchanged.
//
// What the SDK does and how this answers it:
// - Its first sync has no `since` and an inline JSON filter; later ones
//   carry the uploaded filter's id. The first is passed through (a plain
//   /sync), so the stream opens once, with the later parameters, resuming
//   from the first batch's next_batch.
// - Its requests are strictly one at a time and `since` is always the last
//   next_batch served, so the stream's position advances only when the SDK
//   asks for the next batch (a reconnect resumes from what the SDK has).
// - It sends timeout=0 until it thinks it has caught up; MSC2108 sends no
//   event for an empty batch, so a request that gets nothing within its
//   timeout is answered with an empty batch, as /sync would.
// - stopClient() aborts the pending request through its signal: the stream
//   is closed then.
import { SyncStream, detectSse } from './stream.js';

const SYNC_RE = /^(.*)\/_matrix\/client\/(?:v3|r0)\/sync$/;
/** Query parameters that do not select what the stream returns. */
const PER_REQUEST = new Set(['since', 'timeout', '_cacheBuster', 'full_state', 'access_token']);

function headerValue(headers, name) {
  if (!headers) return undefined;
  if (typeof headers.get === 'function') return headers.get(name) ?? undefined;
  const want = name.toLowerCase();
  for (const [k, v] of Array.isArray(headers) ? headers : Object.entries(headers)) {
    if (k.toLowerCase() === want) return v;
  }
  return undefined;
}

function jsonResponse(status, body) {
  return new Response(JSON.stringify(body), {
    status, headers: { 'Content-Type': 'application/json' },
  });
}

function abortError() {
  return new DOMException('The operation was aborted.', 'AbortError');
}

/** The stream behind one (token, parameters) pair. */
class Session {
  constructor(key, opts) {
    this.key = key;
    this.served = opts.since; // the last next_batch handed to the SDK
    this.batches = []; // [{sync, id, taken}] received, not yet served
    this.waiter = null;
    this.stream = new SyncStream({
      ...opts,
      transport: 'sse',
      onSync: (sync, id) => new Promise((taken) => {
        this.batches.push({ sync, id, taken });
        this.wake();
      }),
      onError: () => this.wake(),
    });
    this.stream.start();
  }

  wake() {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  /** Answers /sync?since=... within timeoutMs. */
  async take(timeoutMs, signal) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (signal?.aborted) throw abortError();
      const b = this.batches.shift();
      if (b) {
        this.served = b.id;
        b.taken();
        return jsonResponse(200, b.sync);
      }
      const err = this.stream.error;
      if (err) {
        if (err.status) return jsonResponse(err.status, err.data);
        throw new TypeError(`sync stream failed: ${err.message}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        // A stream that lost its connection makes the SDK's request fail,
        // so the app shows it is offline; otherwise nothing happened.
        if (this.stream.state === 'waiting') throw new TypeError('sync stream reconnecting');
        return jsonResponse(200, { next_batch: this.served });
      }
      await new Promise((resolve) => {
        const t = setTimeout(done, left);
        signal?.addEventListener('abort', done, { once: true });
        this.waiter = done;
        function done() {
          clearTimeout(t);
          signal?.removeEventListener('abort', done);
          resolve();
        }
      });
    }
  }

  close() {
    this.stream.stop();
    for (const b of this.batches) b.taken();
    this.batches = [];
  }
}

/**
 * Returns a fetch function for createClient({fetchFn}).
 * Options: fetch (the underlying fetch), heartbeatInterval (s),
 * transport ('auto' asks /versions; 'sse' forces the stream; 'longpoll'
 * passes everything through), deadFactor, minRetry, maxRetry.
 */
export function createSseFetch(options = {}) {
  const baseFetch = options.fetch || globalThis.fetch.bind(globalThis);
  const support = new Map(); // base URL -> Promise<boolean>
  let session = null;
  const closed = { requests: 0, bytes: 0, batches: 0, heartbeats: 0, reconnects: 0 };
  const stats = { syncRequests: 0, fromStream: 0, passedThrough: 0, streamsOpened: 0 };

  function supported(base) {
    if (options.transport === 'sse') return Promise.resolve(true);
    if (options.transport === 'longpoll') return Promise.resolve(false);
    if (!support.has(base)) {
      const p = detectSse(base, { fetch: baseFetch }).catch(() => {
        support.delete(base); // unknown: ask again next time
        return false;
      });
      support.set(base, p);
    }
    return support.get(base);
  }

  async function fetchFn(resource, init = {}) {
    const method = (init.method || (resource instanceof Request ? resource.method : 'GET')).toUpperCase();
    const url = new URL(resource instanceof Request ? resource.url : String(resource));
    const m = method === 'GET' && SYNC_RE.exec(url.pathname);
    const since = url.searchParams.get('since');
    if (!m || !since) {
      stats.passedThrough += 1;
      return baseFetch(resource, init);
    }
    const base = url.origin + m[1];
    if (!(await supported(base))) {
      stats.passedThrough += 1;
      return baseFetch(resource, init);
    }
    stats.syncRequests += 1;
    const auth = headerValue(init.headers, 'authorization');
    const token = auth?.replace(/^Bearer\s+/i, '') || url.searchParams.get('access_token');
    const params = {};
    for (const [k, v] of url.searchParams) if (!PER_REQUEST.has(k)) params[k] = v;
    const key = JSON.stringify([base, token, Object.entries(params).sort()]);
    if (!session || session.key !== key || session.served !== since || session.stream.state === 'stopped') {
      closeSession();
      stats.streamsOpened += 1;
      session = new Session(key, {
        baseUrl: base, accessToken: token, since, params,
        heartbeatInterval: options.heartbeatInterval ?? 30,
        deadFactor: options.deadFactor, minRetry: options.minRetry, maxRetry: options.maxRetry,
        fetch: baseFetch,
      });
    }
    const s = session;
    const onAbort = () => { if (session === s) closeSession(); };
    init.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const res = await s.take(Number(url.searchParams.get('timeout') || 0), init.signal);
      stats.fromStream += 1;
      return res;
    } finally {
      init.signal?.removeEventListener('abort', onAbort);
    }
  }

  function closeSession() {
    if (!session) return;
    for (const k of Object.keys(closed)) closed[k] += session.stream.stats[k];
    session.close();
    session = null;
  }

  fetchFn.stats = stats;
  /** The streams' own counters (requests, bytes, batches, ...), all streams so far. */
  fetchFn.streamStats = () => {
    const out = { ...closed };
    if (session) for (const k of Object.keys(out)) out[k] += session.stream.stats[k];
    return out;
  };
  /** Closes the stream, if one is open. */
  fetchFn.close = closeSession;
  return fetchFn;
}
