// In Debian's headless Chromium (driven by playwright-core, which never
// downloads a browser): the demo page, two users chatting over SSE with
// its cost panel; and matrix-js-sdk 37.5.0 bundled for the browser,
// syncing over the stream through createSseFetch.
//   MXSSE_DEMO_SCREENSHOT=docs/clients-demo.png  also saves the demo's picture
import { describe, it as test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import * as esbuild from 'esbuild';
import { chromium } from 'playwright-core';
import { startBed, Mxsse, User, sharedRoom, waitFor, sleep, exitSoon, ROOT } from './harness.js';
import { startDemo } from '../../demo/server.mjs';

const CHROMIUM = process.env.MXSSE_CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

describe('in Chromium', () => {
  let bed, mx, browser;
  const closers = [];

  before(async () => {
    fs.accessSync(CHROMIUM, fs.constants.X_OK); // missing browser: a failure, not a skip
    bed = startBed();
    mx = await new Mxsse(bed.synapseUrl, ['--sse-retry', '500']).start();
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  });

  after(async () => {
    for (const c of closers.splice(0)) await c();
    await browser?.close();
    await mx?.stop();
    bed?.down();
    exitSoon();
  });

  test('the demo: two users chat live, the panel shows requests, bytes and mxsse\'s /sync calls', async () => {
    const alice = bed.register('alice');
    const bob = bed.register('bob');
    // As scripts/run starts it: with Synapse's replication feed.
    const rmx = await new Mxsse(bed.synapseUrl, ['--replication', `redis://127.0.0.1:${bed.info.ports.redis}`,
      '--server-name', bed.info.server_name]).start();
    closers.push(() => rmx.stop());
    const demo = await startDemo({ mxsse: rmx.url, admin: rmx.adminUrl, alice, bob });
    closers.push(demo.close);
    const context = await browser.newContext({ viewport: { width: 1000, height: 650 } });
    closers.push(() => context.close());
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(demo.url);
    await page.waitForFunction(() => window.demo && ['alice', 'bob'].every((w) => window.demo.streams[w].state === 'open'));
    const lines = [
      ['alice', 'hi bob, this arrives over one SSE stream'],
      ['bob', 'hello! no new /sync request for each message'],
      ['alice', 'and the panel below counts what it costs'],
      ['bob', 'nice: and heartbeats keep it alive'],
    ];
    for (const [who, text] of lines) {
      await page.fill(`#${who} input`, text);
      await page.click(`#${who} button`);
      await sleep(700);
    }
    for (const who of ['alice', 'bob']) {
      await page.waitForFunction((w) => document.querySelectorAll(`#${w} li`).length >= 4, who);
      const shown = await page.$$eval(`#${who} li`, (lis) => lis.map((li) => li.childNodes[1].textContent));
      assert.deepEqual(shown, lines.map((l) => l[1]), `${who}'s pane, in order`);
    }
    await sleep(16500); // one heartbeat (15 s) and a long-poll cycle
    const stats = await page.evaluate(() => ({
      sse: window.demo.streams.alice.stats, lp: window.demo.longPoll.stats,
      hs: document.getElementById('hs-sse').textContent, note: document.getElementById('note').textContent,
    }));
    assert.equal(stats.sse.requests, 2, '/versions and one stream');
    assert.ok(stats.sse.batches >= 5 && stats.sse.heartbeats >= 1, JSON.stringify(stats.sse));
    assert.ok(stats.lp.requests > stats.sse.requests, JSON.stringify(stats.lp));
    assert.match(stats.hs, /^\d+ \(both streams\)$/);
    assert.match(stats.note, /2 streams open/);
    assert.deepEqual(errors, []);
    if (process.env.MXSSE_DEMO_SCREENSHOT) {
      await page.screenshot({ path: path.resolve(ROOT, process.env.MXSSE_DEMO_SCREENSHOT) });
    }

    // The page goes hidden (headless Chromium never hides a tab by itself,
    // so the test sets visibilityState and fires visibilitychange, which
    // is what libraries that close hidden streams listen to): same stream.
    await page.evaluate(() => {
      Object.defineProperty(document, 'visibilityState', { value: 'hidden', configurable: true });
      Object.defineProperty(document, 'hidden', { value: true, configurable: true });
      document.dispatchEvent(new Event('visibilitychange'));
    });
    await sleep(500);
    const bobUser = new User(rmx.url, bob);
    await bobUser.sendText(demo.config.room, 'to a hidden tab');
    await page.waitForFunction(() => [...document.querySelectorAll('#alice li')]
      .some((li) => li.textContent.includes('to a hidden tab')));
    assert.equal(await page.evaluate(() => document.visibilityState), 'hidden');
    assert.equal(await page.evaluate(() => window.demo.streams.alice.stats.requests), 2, 'same stream');
  });

  test('matrix-js-sdk in the browser: messages in order, to-device once across an mxsse restart; requests against its own long-poll loop', async () => {
    // The page: the SDK and the adapter, bundled as the app would.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mxsse-js-page-'));
    closers.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    fs.writeFileSync(path.join(dir, 'entry.js'), `
      import * as sdk from 'matrix-js-sdk';
      import { logger } from 'matrix-js-sdk/lib/logger.js';
      import { createSseFetch } from '${path.resolve(ROOT, 'clients/js/src/index.js')}';
      logger.disableAll();
      window.start = async (opts, sse) => {
        const seen = { messages: [], toDevice: [], requests: 0, syncRequests: 0 };
        const adapter = sse ? createSseFetch({ heartbeatInterval: 5 }) : null;
        const inner = adapter || window.fetch.bind(window);
        const fetchFn = (url, init) => {
          seen.requests++;
          if (new URL(String(url)).pathname.endsWith('/sync')) seen.syncRequests++;
          return inner(url, init);
        };
        const client = sdk.createClient({ ...opts, fetchFn });
        client.on(sdk.RoomEvent.Timeline, (ev, room, toStart) => {
          if (!toStart && ev.getType() === 'm.room.message') seen.messages.push(ev.getContent().body);
        });
        client.on(sdk.ClientEvent.ToDeviceEvent, (ev) => {
          if (ev.getType() === 'org.example.test') seen.toDevice.push(ev.getContent().seq);
        });
        await client.startClient({ initialSyncLimit: 1 });
        return { client, seen, adapter };
      };`);
    await esbuild.build({
      entryPoints: [path.join(dir, 'entry.js')], bundle: true, format: 'esm', platform: 'browser',
      outfile: path.join(dir, 'bundle.js'), logLevel: 'error', nodePaths: [path.resolve(ROOT, 'clients/js/node_modules')],
    });
    const alice = bed.register('alice');
    const aliceUser = new User(mx.url, alice);
    const alice2 = await aliceUser.login();
    const bobUser = new User(mx.url, bed.register('bob'));
    const room = await sharedRoom(bobUser, aliceUser);
    const context = await browser.newContext();
    closers.push(() => context.close());
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    // Served from its own loopback origin (Chromium keeps public origins
    // off loopback): every request to mxsse is cross-origin.
    const server = http.createServer((req, res) => {
      const js = req.url.endsWith('bundle.js');
      res.writeHead(200, { 'Content-Type': js ? 'text/javascript' : 'text/html' });
      res.end(js ? fs.readFileSync(path.join(dir, 'bundle.js'))
        : '<!doctype html><script type="module" src="bundle.js"></script>');
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    closers.push(() => new Promise((r) => { server.closeAllConnections(); server.close(r); }));
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    await page.waitForFunction(() => typeof window.start === 'function');
    const opts = (a) => ({ baseUrl: mx.url, accessToken: a.access_token, userId: a.user_id, deviceId: a.device_id });
    await page.evaluate(async ([o1, o2]) => {
      window.sse = await window.start(o1, true);
      window.poll = await window.start(o2, false);
    }, [opts(alice), opts(alice2)]);
    await page.waitForFunction(() => window.sse.client.getSyncState() === 'SYNCING' && window.poll.client.getSyncState() === 'SYNCING');
    const sent = [];
    for (let i = 0; i < 15; i++) {
      if (i === 8) { // mxsse restarts on the same port
        assert.equal(await mx.stop(), 0);
        await mx.start();
      }
      sent.push(`browser ${i}`);
      await bobUser.sendText(room, sent.at(-1));
      await bobUser.request('PUT', `/sendToDevice/org.example.test/b${i}-${Date.now()}`,
        { messages: { [alice.user_id]: { [alice.device_id]: { seq: i }, [alice2.device_id]: { seq: i } } } });
      await sleep(300);
    }
    await page.waitForFunction((n) => [window.sse.seen, window.poll.seen]
      .every((x) => x.messages.length >= n && x.toDevice.length >= n), sent.length, { timeout: 40000 });
    await sleep(1000);
    const r = await page.evaluate(() => ({
      sse: window.sse.seen.messages, poll: window.poll.seen.messages,
      sseToDevice: window.sse.seen.toDevice, pollToDevice: window.poll.seen.toDevice,
      sseSync: window.sse.seen.syncRequests, pollSync: window.poll.seen.syncRequests,
      stream: window.sse.adapter.streamStats(), fromStream: window.sse.adapter.stats.fromStream,
    }));
    assert.deepEqual(r.sse.filter((m) => m.startsWith('browser')), sent, 'in order, once, over SSE');
    assert.deepEqual(r.poll.filter((m) => m.startsWith('browser')), sent);
    const all = [...sent.keys()];
    assert.deepEqual([...r.sseToDevice].sort((a, b) => a - b), all, 'to-device over SSE exactly once');
    assert.deepEqual([...r.pollToDevice].sort((a, b) => a - b), all);
    const sseHttp = r.stream.requests + (r.sseSync - r.fromStream);
    console.log(`# browser: SDK /sync calls ${r.sseSync} answered with ${sseHttp} HTTP requests over SSE; `
      + `the long-polling SDK made ${r.pollSync}`);
    assert.ok(sseHttp < r.pollSync);
    await page.evaluate(() => { window.sse.client.stopClient(); window.poll.client.stopClient(); });
    await waitFor(async () => (await mx.metrics()).mxsse_sse_streams_open === 0, { what: 'stream closed' });
    assert.deepEqual(errors, []);
  });
});
