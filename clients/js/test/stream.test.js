// SyncStream against the real bed: Synapse behind mxsse.
import { describe, it as test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { SyncStream, MatrixError, detectSse, backoffDelay } from '../src/index.js';
import { startBed, Mxsse, User, sharedRoom, startRelay, headerOf, waitFor, sleep } from './harness.js';

describe('SyncStream', () => {
  let bed, mx, alice, bob, room;

  before(async () => {
    bed = startBed();
    mx = await new Mxsse(bed.synapseUrl, ['--sse-retry', '500']).start();
    alice = new User(mx.url, bed.register('alice'));
    bob = new User(mx.url, bed.register('bob'));
    room = await sharedRoom(bob, alice);
  });

  const open = []; // every stream and relay a test started, closed after it
  afterEach(async () => {
    for (const x of open.splice(0)) await (x.stop ? x.stop() : x.close());
  });

  after(async () => {
    await mx?.stop();
    bed?.down();
  });

  /** Bodies of bob's m.room.message events in a batch, in order. */
  function texts(sync) {
    const events = sync.rooms?.join?.[room]?.timeline?.events || [];
    return events.filter((e) => e.type === 'm.room.message').map((e) => e.content.body);
  }

  function collector(extra = {}) {
    const got = { batches: [], texts: [], errors: [], states: [] };
    const s = new SyncStream({
      baseUrl: mx.url, accessToken: alice.token, heartbeatInterval: 1,
      onSync: (sync, id) => { got.batches.push({ sync, id }); got.texts.push(...texts(sync)); },
      onError: (e) => got.errors.push(e),
      onState: (st) => got.states.push(st),
      ...extra,
    });
    open.push(s);
    return { s, got };
  }

  test('detects MSC2108 through mxsse and not on Synapse itself', async () => {
    assert.equal(await detectSse(mx.url), true);
    assert.equal(await detectSse(bed.synapseUrl), false);
  });

  test('messages arrive in order, each id is the batch next_batch', async () => {
    const { s, got } = collector();
    s.start();
    await waitFor(() => got.batches.length >= 1, { what: 'initial sync' });
    assert.equal(s.transport, 'sse');
    for (let i = 0; i < 5; i++) await bob.sendText(room, `order ${i}`);
    await waitFor(() => got.texts.length >= 5, { what: '5 messages' });
    assert.deepEqual(got.texts, [0, 1, 2, 3, 4].map((i) => `order ${i}`));
    for (const b of got.batches) assert.equal(b.id, b.sync.next_batch);
    assert.equal(s.position, got.batches.at(-1).id);
    await waitFor(() => s.stats.heartbeats >= 1, { what: 'a heartbeat (interval 1 s)', timeout: 3000 });
    await s.stop();
    assert.equal(s.state, 'stopped');
  });

  test('a stored position is sent as Last-Event-ID on the first request', async () => {
    const relay = await startRelay(mx.port);
    open.push(relay);
    // A device of its own: Synapse answers a device's initial syncs from a
    // 2-minute cache, which would start this test at an older position.
    const device = await alice.login();
    const first = collector({ accessToken: device.access_token });
    first.s.start();
    await waitFor(() => first.got.batches.length >= 1);
    await first.s.stop();
    const pos = first.s.position;
    await bob.sendText(room, 'while away');
    const { s, got } = collector({ baseUrl: relay.url, since: pos, accessToken: device.access_token });
    s.start();
    await waitFor(() => got.texts.includes('while away'), { what: 'message sent while away' });
    assert.equal(relay.sseRequests().length, 1);
    assert.equal(headerOf(relay.sseRequests()[0], 'Last-Event-ID'), pos);
    assert.deepEqual(got.texts, ['while away'], 'no initial sync, nothing twice');
    await s.stop();
    relay.close();
  });

  test('an mxsse restart: reconnect after retry:, resume, nothing lost or repeated', async (t) => {
    const relay = await startRelay(mx.port);
    open.push(relay);
    const { s, got } = collector({ baseUrl: relay.url });
    s.start();
    await waitFor(() => got.batches.length >= 1);
    await bob.sendText(room, 'before restart');
    await waitFor(() => got.texts.includes('before restart'));
    assert.ok(s.retry >= 500 && s.retry < 1000, `retry: ${s.retry} from --sse-retry 500`);
    assert.equal(await mx.stop(), 0); // ends the stream cleanly
    // The retry: in force when it ended: the next stream brings its own
    // (jittered per connection), maybe before the checks below run.
    const retry = s.retry;
    // The position the reconnect must resume from (read now: once back, the
    // stream may deliver the next batch before the checks below run).
    const lastBefore = got.batches.at(-1).id;
    await bob.sendText(room, 'during restart', bed.synapseUrl); // mxsse is down
    await mx.start();
    await waitFor(() => relay.sseTimes().length >= 2, { what: 'a reconnect' });
    // The stream ended cleanly (FIN from mxsse); the client waited retry:.
    const again = relay.sseTimes()[1];
    const gap = again - relay.sseEndedAt(0);
    t.diagnostic(`reconnected ${gap} ms after the end, retry: ${retry}`);
    assert.ok(gap >= retry - 15 && gap < retry + 300, `reconnected ${gap} ms after the end, retry: ${retry}`);
    assert.equal(headerOf(relay.sseRequests()[1], 'Last-Event-ID'), lastBefore);
    await bob.sendText(room, 'after restart');
    await waitFor(() => got.texts.includes('after restart'), { what: 'message after restart', timeout: 15000 });
    const counts = {};
    for (const t of got.texts) counts[t] = (counts[t] || 0) + 1;
    assert.equal(counts['before restart'], 1);
    assert.equal(counts['during restart'], 1);
    assert.equal(counts['after restart'], 1);
    assert.ok(s.stats.reconnects >= 1);
  });

  test('a silent connection (no heartbeat for 2.5 intervals) is dropped and resumed', async (t) => {
    const relay = await startRelay(mx.port);
    open.push(relay);
    const { s, got } = collector({ baseUrl: relay.url, heartbeatInterval: 1 });
    s.start();
    await waitFor(() => got.batches.length >= 1);
    relay.freeze();
    const frozenAt = Date.now();
    assert.equal(headerOf(relay.sseRequests()[0], 'Last-Event-ID'), null, 'no position on the first request');
    await waitFor(() => relay.sseRequests().length >= 2, { what: 'a second connection', timeout: 10000 });
    const took = Date.now() - frozenAt;
    const pos = got.batches.at(-1).id; // nothing new is sent meanwhile
    t.diagnostic(`reconnected ${took} ms after the connection went silent (heartbeat 1 s, retry: ${s.retry})`);
    // 2.5 s without bytes, then the reconnect delay (retry: 500-1000 ms, jittered).
    assert.ok(took >= 2400 && took < 6000, `reconnected ${took} ms after the connection went silent`);
    assert.equal(headerOf(relay.sseRequests()[1], 'Last-Event-ID'), pos, relay.sseRequests().join('\n--\n'));
    await bob.sendText(room, 'after silence');
    await waitFor(() => got.texts.includes('after silence'));
    await s.stop();
    relay.close();
  });

  test('401 stops for good and hands over the Matrix error', async () => {
    const relay = await startRelay(mx.port);
    open.push(relay);
    const { s, got } = collector({ baseUrl: relay.url, accessToken: 'not-a-token' });
    await s.start(); // resolves once stopped
    assert.equal(got.errors.length, 1);
    assert.ok(got.errors[0] instanceof MatrixError);
    assert.equal(got.errors[0].status, 401);
    assert.equal(got.errors[0].errcode, 'M_UNKNOWN_TOKEN');
    await sleep(1500);
    // /versions, then the stream: no retry.
    assert.equal(relay.sseRequests().length, 1);
    relay.close();
  });

  test('logout ends the stream with the homeserver error', async () => {
    const carol = await alice.login();
    const got = { errors: [], batches: 0 };
    const s = new SyncStream({
      baseUrl: mx.url, accessToken: carol.access_token, heartbeatInterval: 1,
      onSync: () => { got.batches++; }, onError: (e) => got.errors.push(e),
    });
    open.push(s);
    const done = s.start();
    await waitFor(() => got.batches >= 1);
    await carol.request('POST', '/logout', {});
    await done;
    assert.equal(got.errors.length, 1);
    assert.equal(got.errors[0].errcode, 'M_UNKNOWN_TOKEN');
    await waitFor(async () => (await mx.metrics()).mxsse_sse_streams_open === 0, { what: 'stream closed in mxsse' });
  });

  test('falls back to long-polling /sync where MSC2108 is not served', async () => {
    const { s, got } = collector({ baseUrl: bed.synapseUrl, longPollTimeout: 5000 });
    s.start();
    await waitFor(() => got.batches.length >= 1);
    assert.equal(s.transport, 'longpoll');
    await bob.sendText(room, 'over long-poll');
    await waitFor(() => got.texts.includes('over long-poll'));
    await s.stop();
  });

  test('reconnect delays grow, jittered, up to the cap', () => {
    assert.equal(backoffDelay(1, 1000, 30000, () => 0), 500);
    assert.equal(backoffDelay(1, 1000, 30000, () => 1), 1000);
    assert.equal(backoffDelay(3, 1000, 30000, () => 1), 4000);
    assert.equal(backoffDelay(10, 1000, 30000, () => 1), 30000);
    const seen = new Set(Array.from({ length: 20 }, () => backoffDelay(2, 1000, 30000)));
    assert.ok(seen.size > 1, 'jittered');
    for (const d of seen) assert.ok(d >= 1000 && d <= 2000);
  });
});
