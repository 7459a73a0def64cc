// matrix-js-sdk 37.5.0, unchanged, syncing over the stream through
// createSseFetch, against the real bed; beside it the same SDK with its own
// long-poll loop, in the same run.
import { describe, it as test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { logger } from 'matrix-js-sdk/lib/logger.js';
import * as sdk from 'matrix-js-sdk';
import { createSseFetch } from '../src/index.js';
import { startBed, Mxsse, User, sharedRoom, startRelay, waitFor, sleep, exitSoon } from './harness.js';

logger.disableAll();
console.debug = () => {}; // the Rust crypto's tracing

describe('matrix-js-sdk over the stream', () => {
  let bed, mx, bob;
  const clients = [];
  const relays = [];

  before(async () => {
    bed = startBed();
    mx = await new Mxsse(bed.synapseUrl, ['--sse-retry', '500']).start();
    bob = new User(mx.url, bed.register('bob'));
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.stopClient();
    for (const r of relays.splice(0)) r.close();
  });

  after(async () => {
    await mx?.stop();
    bed?.down();
    exitSoon(); // matrix-js-sdk leaves timers and sockets behind after stopClient()
  });

  /** A fetch that counts requests by path and response bytes. */
  function counting(inner) {
    const counts = { sync: 0, other: 0, syncBytes: 0, initialBytes: 0 };
    const f = async (url, init) => {
      const res = await inner(url, init);
      const u = new URL(String(url));
      if (/\/sync$/.test(u.pathname)) {
        counts.sync += 1;
        const initial = !u.searchParams.has('since');
        res.clone().arrayBuffer().then((b) => {
          counts.syncBytes += b.byteLength;
          if (initial) counts.initialBytes += b.byteLength;
        }, () => {});
      } else {
        counts.other += 1;
      }
      return res;
    };
    f.counts = counts;
    return f;
  }

  /**
   * A started matrix-js-sdk client for account; sse: through createSseFetch.
   * Records the room messages, to-device events, sync states and limited
   * timelines it sees.
   */
  async function startClient(account, { sse, baseUrl = mx.url, crypto = false } = {}) {
    const adapter = sse ? createSseFetch({ heartbeatInterval: 1 }) : null;
    const fetchFn = counting(adapter || globalThis.fetch.bind(globalThis));
    const client = sdk.createClient({
      baseUrl, accessToken: account.access_token, userId: account.user_id, deviceId: account.device_id, fetchFn,
    });
    const seen = { messages: {}, toDevice: [], states: [], limited: 0, loggedOut: null };
    client.on(sdk.RoomEvent.Timeline, (ev, room, toStart) => {
      if (toStart || ev.getType() !== 'm.room.message') return;
      (seen.messages[room.roomId] ||= []).push(ev.getContent().body);
    });
    client.on(sdk.MatrixEventEvent.Decrypted, (ev) => {
      if (ev.getType() === 'm.room.message') (seen.messages[ev.getRoomId()] ||= []).push(ev.getContent().body);
    });
    client.on(sdk.ClientEvent.ToDeviceEvent, (ev) => {
      if (ev.getType() === 'org.example.test') seen.toDevice.push(ev.getContent().seq);
    });
    client.on(sdk.RoomEvent.TimelineReset, () => { seen.limited += 1; });
    client.on(sdk.ClientEvent.Sync, (state) => seen.states.push(state));
    client.on(sdk.HttpApiEvent.SessionLoggedOut, (err) => { seen.loggedOut = err; });
    if (crypto) await client.initRustCrypto({ useIndexedDB: false });
    await client.startClient({ initialSyncLimit: 10 });
    await waitFor(() => client.getSyncState() === 'SYNCING', { what: 'SYNCING', timeout: 20000 });
    clients.push(client);
    return { client, seen, fetchFn, adapter };
  }

  async function sendToDevice(from, to, devices, seq, base) {
    const messages = { [to.user_id]: Object.fromEntries(devices.map((d) => [d, { seq }])) };
    await from.request('PUT', `/sendToDevice/org.example.test/t${seq}-${Math.random()}`, { messages }, { base });
  }

  test('messages in order and to-device once, across a silent connection and an mxsse restart; requests against long-polling', async (t) => {
    const alice = bed.register('alice');
    const aliceUser = new User(mx.url, alice);
    const alice2 = await aliceUser.login(); // the long-polling device of the same user
    const room = await sharedRoom(bob, aliceUser);
    const relay = await startRelay(mx.port);
    relays.push(relay);
    const syncsBefore = await mx.totalUpstreamSyncs();
    const sse = await startClient(alice, { sse: true, baseUrl: relay.url });
    const poll = await startClient(alice2, { sse: false });
    const startedAt = Date.now();
    const sent = [];
    const N = 12;
    for (let i = 0; i < N; i++) {
      const body = `message ${i}`;
      const base = i >= 4 && i < 8 ? bed.synapseUrl : mx.url; // mxsse is down for 4-7
      await bob.sendText(room, body, base);
      sent.push(body);
      await sendToDevice(bob, alice, [alice.device_id, alice2.device_id], i, base);
      if (i === 3) {
        assert.equal(await mx.stop(), 0);
      } else if (i === 7) {
        await mx.start();
      } else if (i === 9) {
        relay.freeze(); // the SSE connection goes silent without closing
      }
      await sleep(300);
    }
    const done = (s) => (s.seen.messages[room] || []).length >= N && s.seen.toDevice.length >= N;
    await waitFor(() => done(sse) && done(poll), { what: 'every message on both clients', timeout: 40000 });
    await sleep(1000); // anything delivered twice would come now
    const elapsed = (Date.now() - startedAt) / 1000;
    assert.deepEqual(sse.seen.messages[room], sent, 'room messages over SSE, in order, once');
    assert.deepEqual(poll.seen.messages[room], sent, 'room messages over long-poll');
    assert.deepEqual([...sse.seen.toDevice].sort((a, b) => a - b), [...Array(N).keys()], 'to-device over SSE exactly once');
    assert.deepEqual([...poll.seen.toDevice].sort((a, b) => a - b), [...Array(N).keys()]);
    assert.ok(sse.adapter.streamStats().reconnects >= 2, 'the stream reconnected (restart, silence)');
    assert.equal(sse.client.getSyncState(), 'SYNCING');

    const upstream = (await mx.totalUpstreamSyncs()) - syncsBefore;
    const stream = sse.adapter.streamStats();
    const report = {
      seconds: Math.round(elapsed),
      messages: N,
      sse: {
        sdk_sync_calls: sse.fetchFn.counts.sync,
        // the stream's requests, and the initial sync passed through
        http_requests_for_sync: stream.requests + (sse.fetchFn.counts.sync - sse.adapter.stats.fromStream),
        bytes_received_for_sync: stream.bytes + sse.fetchFn.counts.initialBytes,
        streams_opened: sse.adapter.stats.streamsOpened,
        mxsse_upstream_syncs: upstream,
      },
      longpoll: { http_requests_for_sync: poll.fetchFn.counts.sync, bytes_received_for_sync: poll.fetchFn.counts.syncBytes },
    };
    t.diagnostic(JSON.stringify(report));
    if (process.env.MXSSE_JS_REPORT) fs.writeFileSync(process.env.MXSSE_JS_REPORT, JSON.stringify(report, null, 2));
    assert.ok(report.sse.http_requests_for_sync < report.longpoll.http_requests_for_sync,
      'fewer requests over SSE than long-polling');
  });

  test('a gappy (limited) sync after a pause resets the timeline and keeps going', async () => {
    const alice = bed.register('alice');
    const room = await sharedRoom(bob, new User(mx.url, alice));
    const s = await startClient(alice, { sse: true });
    await bob.sendText(room, 'before the gap');
    await waitFor(() => (s.seen.messages[room] || []).includes('before the gap'));
    s.client.stopClient();
    for (let i = 0; i < 15; i++) await bob.sendText(room, `gap ${i}`);
    await s.client.startClient({ initialSyncLimit: 10 });
    await waitFor(() => (s.seen.messages[room] || []).includes('gap 14'), { what: 'the last message', timeout: 20000 });
    assert.ok(s.seen.limited >= 1, 'the SDK saw a limited timeline');
    const live = s.client.getRoom(room).getLiveTimeline().getEvents()
      .filter((e) => e.getType() === 'm.room.message').map((e) => e.getContent().body);
    assert.ok(!live.includes('gap 0'), 'the gap is not in the live timeline');
    assert.equal(live.at(-1), 'gap 14');
    await bob.sendText(room, 'after the gap');
    await waitFor(() => (s.seen.messages[room] || []).includes('after the gap'));
  });

  test('an encrypted room with the SDK\'s own (Rust) crypto', async () => {
    const alice = bed.register('alice');
    const bobAcc = bed.register('bob-e2e');
    const a = await startClient(alice, { sse: true, crypto: true });
    const b = await startClient(bobAcc, { sse: false, crypto: true });
    const { room_id: room } = await b.client.createRoom({
      invite: [alice.user_id],
      initial_state: [{ type: 'm.room.encryption', state_key: '', content: { algorithm: 'm.megolm.v1.aes-sha2' } }],
    });
    await waitFor(() => a.client.getRoom(room), { what: 'invite over SSE' });
    await a.client.joinRoom(room);
    await waitFor(() => b.client.getRoom(room)?.getJoinedMemberCount() === 2, { what: 'alice joined' });
    await b.client.sendTextMessage(room, 'secret 1');
    await b.client.sendTextMessage(room, 'secret 2');
    await waitFor(() => (a.seen.messages[room] || []).filter((m) => m?.startsWith('secret')).length >= 2,
      { what: 'decrypted messages', timeout: 20000 });
    const events = a.client.getRoom(room).getLiveTimeline().getEvents().filter((e) => e.isEncrypted());
    assert.ok(events.length >= 2, 'the events arrived encrypted');
    assert.deepEqual(events.map((e) => e.getContent().body).filter(Boolean), ['secret 1', 'secret 2']);
  });

  test('logout elsewhere ends the stream and the SDK reports the session logged out', async () => {
    const alice = bed.register('alice');
    const s = await startClient(alice, { sse: true });
    await waitFor(async () => (await mx.metrics()).mxsse_sse_streams_open >= 1, { what: 'stream open' });
    await new User(mx.url, alice).request('POST', '/logout', {});
    await waitFor(() => s.seen.loggedOut, { what: 'SessionLoggedOut', timeout: 10000 });
    assert.equal(s.seen.loggedOut.errcode, 'M_UNKNOWN_TOKEN');
    await waitFor(async () => (await mx.metrics()).mxsse_sse_streams_open === 0, { what: 'stream closed' });
  });

  test('stopClient() closes the stream', async () => {
    const alice = bed.register('alice');
    const s = await startClient(alice, { sse: true });
    await waitFor(async () => (await mx.metrics()).mxsse_sse_streams_open >= 1, { what: 'stream open' });
    s.client.stopClient();
    await waitFor(async () => (await mx.metrics()).mxsse_sse_streams_open === 0, { what: 'stream closed' });
  });
});
