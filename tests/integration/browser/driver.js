// Drives Debian's headless Chromium with playwright-core for
// tests/integration/test_browser.py.
//
//   NODE_PATH=$MXSSE_CACHE/node/node_modules node driver.js [EXTRA_CHROMIUM_ARG]...
//
// Reads one JSON command per line on stdin and answers each with one JSON
// line on stdout: {"id": N, "ok": true, "value": ...} or
// {"id": N, "ok": false, "error": "..."}. Commands ("op"):
//   launch                        -> {version}
//   open {url}                    -> {page}: a fresh context (own cache,
//                                    own connections) and page; the page's
//                                    network traffic is recorded over CDP
//   eval {page, expr}             -> value of the expression in the page
//   wait {page, expr, timeout}    -> waits until the expression is truthy
//   network {page}                -> [{url, method, sentAt, protocol,
//                                    status, headers, responseHeaders,
//                                    pieces: [[decoded, wire], ...]}]
//                                    requests seen so far
//   screenshot {page, path, selector?}  the page, or just that element
//   close {page}
//   quit
// Nothing here downloads a browser: executablePath is the system chromium.
'use strict';

const readline = require('readline');
const { chromium } = require('playwright-core');

const EXECUTABLE = process.env.MXSSE_CHROMIUM || '/usr/bin/chromium';
const ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
  '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync',
  ...process.argv.slice(2),
];

let browser = null;
const pages = new Map(); // id -> {context, page, requests}
let nextPage = 1;

async function open(url) {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true, // the test certificate is self-signed
    viewport: { width: 760, height: 420 },
  });
  const page = await context.newPage();
  const requests = []; // in the order the browser sent them
  const current = new Map(); // CDP requestId -> its latest entry
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  const entry = (id) => {
    if (!current.has(id)) {
      const r = { url: null, method: null, protocol: null, status: null, headers: {} };
      current.set(id, r);
      requests.push(r);
    }
    return current.get(id);
  };
  cdp.on('Network.requestWillBeSent', (e) => {
    if (current.has(e.requestId) && current.get(e.requestId).url) current.delete(e.requestId);
    const r = entry(e.requestId);
    r.url = e.request.url;
    r.method = e.request.method;
    r.sentAt = e.wallTime * 1000; // ms since the epoch, like Date.now()
    Object.assign(r.headers, e.request.headers);
  });
  cdp.on('Network.requestWillBeSentExtraInfo', (e) => {
    Object.assign(entry(e.requestId).headers, e.headers);
  });
  cdp.on('Network.responseReceived', (e) => {
    const r = entry(e.requestId);
    r.protocol = e.response.protocol;
    r.status = e.response.status;
    r.responseHeaders = e.response.headers;
  });
  // Body pieces as the network stack hands them to the page: decoded and
  // wire lengths (a compressed stream is decoded piece by piece).
  cdp.on('Network.dataReceived', (e) => {
    const r = entry(e.requestId);
    (r.pieces = r.pieces || []).push([e.dataLength, e.encodedDataLength]);
  });
  cdp.on('Network.loadingFailed', (e) => {
    const r = entry(e.requestId);
    r.failed = e.errorText + (e.corsErrorStatus ? ' cors=' + e.corsErrorStatus.corsError : '');
  });
  page.on('console', (m) => process.stderr.write(`page console: ${m.text()}\n`));
  await page.goto(url);
  const id = nextPage++;
  pages.set(id, { context, page, requests });
  return id;
}

function pageOf(cmd) {
  const p = pages.get(cmd.page);
  if (!p) throw new Error(`no page ${cmd.page}`);
  return p;
}

async function handle(cmd) {
  switch (cmd.op) {
    case 'launch':
      browser = await chromium.launch({ executablePath: EXECUTABLE, args: ARGS });
      return { version: browser.version() };
    case 'open':
      return { page: await open(cmd.url) };
    case 'eval':
      return await pageOf(cmd).page.evaluate(cmd.expr);
    case 'wait':
      await pageOf(cmd).page.waitForFunction(cmd.expr, null,
        { timeout: cmd.timeout || 10000, polling: 50 });
      return true;
    case 'network':
      return pageOf(cmd).requests.filter((r) => r.url);
    case 'screenshot':
      if (cmd.selector) await pageOf(cmd).page.locator(cmd.selector).screenshot({ path: cmd.path });
      else await pageOf(cmd).page.screenshot({ path: cmd.path });
      return true;
    case 'close': {
      const p = pageOf(cmd);
      pages.delete(cmd.page);
      await p.context.close();
      return true;
    }
    case 'quit':
      if (browser) await browser.close();
      browser = null;
      return true;
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

// One command at a time, in order.
let chain = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  chain = chain.then(async () => {
    let cmd;
    try {
      cmd = JSON.parse(line);
      const value = await handle(cmd);
      process.stdout.write(JSON.stringify({ id: cmd.id, ok: true, value }) + '\n');
      if (cmd.op === 'quit') process.exit(0);
    } catch (err) {
      const id = cmd ? cmd.id : null;
      process.stdout.write(JSON.stringify({ id, ok: false, error: String(err && err.stack || err) }) + '\n');
    }
  });
});
rl.on('close', () => {
  chain.then(async () => {
    if (browser) await browser.close().catch(() => {});
    process.exit(0);
  });
});
