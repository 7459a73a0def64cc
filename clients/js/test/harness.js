// The real test bed for the package's tests: Synapse + PostgreSQL + Redis
// from interop/testbed, and the mxsse binary in front (MXSSE_BIN, else
// build/mxsse of this checkout). Everything started here is stopped when
// the test file ends, also on SIGINT/SIGTERM and on a crash.
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const TESTBED = path.join(ROOT, 'interop/testbed');
const cleanups = [];

function cleanupAll() {
  while (cleanups.length) {
    try { cleanups.pop()(); } catch { /* keep going */ }
  }
}
process.on('exit', cleanupAll);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => { cleanupAll(); process.exit(128 + os.constants.signals[sig]); });
}

export function mxsseBin() {
  const bin = process.env.MXSSE_BIN || path.join(process.env.MXSSE_BUILD_DIR || path.join(ROOT, 'build'), 'mxsse');
  fs.accessSync(bin, fs.constants.X_OK); // missing binary: the test fails
  return path.resolve(bin);
}

/**
 * Ends the process a little after the last test, if something the code
 * under test left behind (matrix-js-sdk's timers) would keep it alive.
 */
export function exitSoon(ms = 3000) {
  setTimeout(() => { cleanupAll(); process.exit(process.exitCode ?? 0); }, ms).unref();
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(cond, { timeout = 10000, interval = 25, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(interval);
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

/** A Matrix user speaking the client-server API with fetch. */
export class User {
  constructor(baseUrl, account) {
    Object.assign(this, account);
    this.baseUrl = baseUrl;
    this.userId = account.user_id;
    this.token = account.access_token;
    this.deviceId = account.device_id;
  }

  async request(method, p, body, { expect = 200, base = this.baseUrl, token = this.token } = {}) {
    const res = await fetch(`${base}/_matrix/client/v3${p}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    if (res.status !== expect) throw new Error(`${method} ${p} -> ${res.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  async sendText(room, text, base = this.baseUrl) {
    const txn = Math.random().toString(36).slice(2);
    return (await this.request('PUT', `/rooms/${encodeURIComponent(room)}/send/m.room.message/${txn}`,
      { msgtype: 'm.text', body: text }, { base })).event_id;
  }

  /** A second device of the same user (POST /login). */
  async login() {
    const r = await this.request('POST', '/login', {
      type: 'm.login.password', identifier: { type: 'm.id.user', user: this.userId }, password: this.password,
    }, { token: '' });
    return new User(this.baseUrl, { ...r, password: this.password });
  }
}

/** A private room created by a, joined by b. */
export async function sharedRoom(a, b, extra = {}) {
  const room = (await a.request('POST', '/createRoom', { preset: 'private_chat', invite: [b.userId], ...extra })).room_id;
  await b.request('POST', `/join/${encodeURIComponent(room)}`, {});
  return room;
}

/** interop/testbed up in a fresh directory; stopped and purged at exit. */
export function startBed() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mxsse-js-bed-'));
  cleanups.push(() => spawnSync(TESTBED, ['down', '--dir', dir, '--purge'], { stdio: 'ignore' }));
  const info = JSON.parse(execFileSync(TESTBED, ['up', '--dir', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }));
  let n = 0;
  return {
    dir,
    info,
    synapseUrl: info.synapse_url,
    /** A new user on the bed: {user_id, access_token, device_id, password}. */
    register(name) {
      const local = `${name}-${process.pid}-${++n}`;
      return JSON.parse(execFileSync(TESTBED, ['register', '--dir', dir, local], { encoding: 'utf8' }));
    },
    down() { spawnSync(TESTBED, ['down', '--dir', dir, '--purge'], { stdio: 'ignore' }); },
  };
}

/** One mxsse process in front of upstream; restartable on the same ports. */
export class Mxsse {
  constructor(upstream, extra = []) {
    this.upstream = upstream;
    this.extra = extra;
    this.proc = null;
    this.logPath = null;
  }

  async start() {
    if (!this.port) {
      this.port = await freePort();
      this.adminPort = await freePort();
      this.url = `http://127.0.0.1:${this.port}`;
      this.adminUrl = `http://127.0.0.1:${this.adminPort}`;
      this.logPath = path.join(os.tmpdir(), `mxsse-js-${process.pid}-${this.port}.log`);
      const logPath = this.logPath;
      // Kept when a test failed (exit code) or MXSSE_KEEP_BED is set.
      cleanups.unshift(() => {
        if (!process.exitCode && !process.env.MXSSE_KEEP_BED) fs.rmSync(logPath, { force: true });
        else process.stderr.write(`mxsse log kept: ${logPath}\n`);
      });
    }
    const log = fs.openSync(this.logPath, 'a');
    this.proc = spawn(mxsseBin(), ['--upstream', this.upstream, '--listen', `127.0.0.1:${this.port}`,
      '--admin-listen', `127.0.0.1:${this.adminPort}`, '--proxy-prefix', '/_synapse/admin',
      '--heartbeat-min', '1', '--access-log', ...(process.env.MXSSE_JS_DEBUG ? ['--log-level', 'debug'] : []), ...this.extra], { stdio: ['ignore', log, log] });
    fs.closeSync(log);
    const proc = this.proc;
    cleanups.push(() => { if (proc.exitCode === null) proc.kill('SIGKILL'); });
    await waitFor(async () => {
      if (proc.exitCode !== null) throw new Error(`mxsse exited ${proc.exitCode}: ${this.log().slice(-2000)}`);
      try { return (await fetch(`${this.adminUrl}/readyz`)).status === 200; } catch { return false; }
    }, { what: 'mxsse ready' });
    return this;
  }

  log() {
    try { return fs.readFileSync(this.logPath, 'utf8'); } catch { return ''; }
  }

  /** SIGTERM, wait for the exit; returns the exit code. */
  async stop(sig = 'SIGTERM') {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode) return proc?.exitCode;
    // Counters restart with the process: keep what this one counted.
    this.syncsOfEarlierRuns = (this.syncsOfEarlierRuns || 0) + await this.upstreamSyncs().catch(() => 0);
    const exited = new Promise((r) => proc.once('exit', (code) => r(code)));
    proc.kill(sig);
    return exited;
  }

  /** Prometheus /metrics as {"name{labels}": value}. */
  async metrics() {
    const text = await (await fetch(`${this.adminUrl}/metrics`)).text();
    const out = {};
    for (const line of text.split('\n')) {
      if (!line || line.startsWith('#')) continue;
      const i = line.lastIndexOf(' ');
      out[line.slice(0, i)] = Number(line.slice(i + 1));
    }
    return out;
  }

  /** /sync requests to the homeserver by every run of this mxsse so far. */
  async totalUpstreamSyncs() {
    return (this.syncsOfEarlierRuns || 0) + await this.upstreamSyncs();
  }

  /** Sum of mxsse_sync_requests_total over every reason (this run). */
  async upstreamSyncs() {
    const m = await this.metrics();
    return Object.entries(m).filter(([k]) => k.startsWith('mxsse_sync_requests_total')).reduce((a, [, v]) => a + v, 0);
  }
}

/**
 * A TCP relay in front of a port that records each connection's request
 * request heads and can stop forwarding (a connection that went silent without
 * closing, as behind a dead NAT entry).
 */
export async function startRelay(targetPort) {
  const conns = [];
  const requests = []; // request heads, in arrival order (GETs: no bodies)
  const times = []; // when each arrived
  const reqConn = []; // on which connection
  const ended = []; // when the server side of a connection ended
  const server = net.createServer((client) => {
    const up = net.connect(targetPort, '127.0.0.1');
    const c = { client, up, head: '', frozen: false };
    conns.push(c);
    client.on('data', (d) => {
      c.head += d.toString('latin1');
      for (let i; (i = c.head.indexOf('\r\n\r\n')) >= 0;) {
        requests.push(c.head.slice(0, i));
        times.push(Date.now());
        reqConn.push(c);
        c.head = c.head.slice(i + 4);
      }
      if (!c.frozen) up.write(d);
    });
    up.on('data', (d) => { if (!c.frozen) client.write(d); });
    up.on('end', () => { c.endedAt = Date.now(); ended.push(c.endedAt); });
    const end = () => { client.destroy(); up.destroy(); };
    client.on('error', end); up.on('error', end); client.on('close', end); up.on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const relay = {
    port: server.address().port,
    url: `http://127.0.0.1:${server.address().port}`,
    conns,
    /** Request heads of the SSE requests, in the order connections opened. */
    sseRequests() {
      return requests.filter((h) => /^GET \S*\/sync\/sse/.test(h));
    },
    /** Arrival times of the SSE requests. */
    sseTimes() {
      return times.filter((_, i) => /^GET \S*\/sync\/sse/.test(requests[i]));
    },
    /** Times at which the server ended a connection (FIN). */
    ended,
    /** When the server ended the connection that carried SSE request i. */
    sseEndedAt(i) {
      return reqConn.filter((_, j) => /^GET \S*\/sync\/sse/.test(requests[j]))[i]?.endedAt;
    },
    /** Stops forwarding on every open connection (new ones still work). */
    freeze() { for (const c of conns) c.frozen = true; },
    close() { for (const c of conns) { c.client.destroy(); c.up.destroy(); } server.close(); },
  };
  cleanups.push(() => relay.close());
  return relay;
}

/** The value of header `name` in a raw HTTP/1.1 request head. */
export function headerOf(head, name) {
  const m = new RegExp(`^${name}:\\s*(.*?)\\r?$`, 'im').exec(head);
  return m ? m[1] : null;
}
