// The demo page's server: static files, the page's configuration, and
// mxsse's /metrics relayed from its admin listener (so the page reads them
// same-origin). mxsse itself stays a proxy; the page talks to it directly.
//
//   node clients/demo/server.mjs --port 8090 --mxsse http://127.0.0.1:8008 \
//        --admin http://127.0.0.1:9090 --alice alice.json --bob bob.json
//
// alice.json and bob.json are `interop/testbed register` outputs. At start
// bob creates a room and alice joins it; alice also logs in a second device
// that the page long-polls with, to show what long-polling costs.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PKG = path.resolve(HERE, '../js');
const FILES = {
  '/': [path.join(HERE, 'index.html'), 'text/html; charset=utf-8'],
  '/app.js': [path.join(HERE, 'app.js'), 'text/javascript'],
  '/pkg/index.js': [path.join(PKG, 'src/index.js'), 'text/javascript'],
  '/pkg/stream.js': [path.join(PKG, 'src/stream.js'), 'text/javascript'],
  '/pkg/sdk.js': [path.join(PKG, 'src/sdk.js'), 'text/javascript'],
  '/vendor/eventsource-parser.js': [path.join(PKG, 'node_modules/eventsource-parser/dist/index.js'), 'text/javascript'],
};

async function api(base, token, method, p, body) {
  const res = await fetch(`${base}/_matrix/client/v3${p}`, {
    method,
    headers: { 'Content-Type': 'application/json', ...(token ? { Authorization: `Bearer ${token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

/** Prepares the room and the second device; returns the page's config. */
export async function prepare({ mxsse, alice, bob }) {
  const room = (await api(mxsse, bob.access_token, 'POST', '/createRoom',
    { preset: 'private_chat', name: 'SSE demo', invite: [alice.user_id] })).room_id;
  await api(mxsse, alice.access_token, 'POST', `/join/${encodeURIComponent(room)}`, {});
  const second = await api(mxsse, null, 'POST', '/login', {
    type: 'm.login.password', identifier: { type: 'm.id.user', user: alice.user_id },
    password: alice.password, initial_device_display_name: 'long-poll comparison',
  });
  const user = (u, token = u.access_token) => ({ user_id: u.user_id, access_token: token });
  return { mxsse, room, alice: user(alice), bob: user(bob), alice_longpoll: user(alice, second.access_token) };
}

/** Starts the server; resolves to {url, close()}. */
export async function startDemo({ port = 0, host = '127.0.0.1', mxsse, admin, alice, bob }) {
  const config = await prepare({ mxsse, alice, bob });
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    try {
      if (url.pathname === '/config.json') {
        res.writeHead(200, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
        return res.end(JSON.stringify(config));
      }
      if (url.pathname === '/metrics') {
        const m = await fetch(`${admin}/metrics`);
        res.writeHead(m.status, { 'Content-Type': 'text/plain; charset=utf-8', 'Cache-Control': 'no-store' });
        return res.end(await m.text());
      }
      const f = FILES[url.pathname];
      if (!f) {
        res.writeHead(404, { 'Content-Type': 'text/plain' });
        return res.end('not found');
      }
      res.writeHead(200, { 'Content-Type': f[1], 'Cache-Control': 'no-cache' });
      fs.createReadStream(f[0]).pipe(res);
    } catch (err) {
      res.writeHead(502, { 'Content-Type': 'text/plain' });
      res.end(String(err));
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const { port: bound } = server.address();
  return {
    url: `http://${host}:${bound}/`,
    config,
    close: () => new Promise((r) => { server.closeAllConnections?.(); server.close(r); }),
  };
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = {};
  for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
  const read = (p) => JSON.parse(fs.readFileSync(p, 'utf8'));
  const demo = await startDemo({
    port: Number(args.port || 8090), mxsse: args.mxsse, admin: args.admin,
    alice: read(args.alice), bob: read(args.bob),
  });
  process.stderr.write(`demo: ${demo.url}\n`);
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => demo.close().then(() => process.exit(0)));
}
