// The demo: two users chatting over MSC2108 streams read with mxsse-client,
// and what it costs next to a long-polling client of the same user.
import { SyncStream } from '/pkg/index.js';

const cfg = await (await fetch('/config.json')).json();
const HEARTBEAT = 15;
const filter = {
  room: { rooms: [cfg.room], timeline: { limit: 20 }, state: { lazy_load_members: true } },
  presence: { not_types: ['*'] }, account_data: { not_types: ['*'] },
};
const startedAt = Date.now();
const $ = (id) => document.getElementById(id);
$('where').textContent = `page → ${cfg.mxsse} (mxsse) → Synapse`;

function name(userId) { return userId.slice(1).split(/[-:]/)[0]; }

function addMessage(list, ev) {
  const li = document.createElement('li');
  const who = document.createElement('span');
  who.className = `who ${name(ev.sender)}`;
  who.textContent = name(ev.sender);
  const t = document.createElement('time');
  t.textContent = new Date(ev.origin_server_ts).toLocaleTimeString();
  li.append(who, document.createTextNode(ev.content.body), t);
  list.append(li);
  list.scrollTop = list.scrollHeight;
}

const streams = {};
for (const who of ['alice', 'bob']) {
  const pane = $(who);
  const list = pane.querySelector('ol');
  const state = pane.querySelector('.state');
  const user = cfg[who];
  const s = new SyncStream({
    baseUrl: cfg.mxsse, accessToken: user.access_token, heartbeatInterval: HEARTBEAT,
    params: { filter, set_presence: 'offline' },
    onSync(sync) {
      for (const ev of sync.rooms?.join?.[cfg.room]?.timeline?.events || []) {
        if (ev.type === 'm.room.message') addMessage(list, ev);
      }
    },
    onState(st) { state.className = `state ${st}`; state.textContent = `${s.transport || '…'} · ${st}`; },
    onError(err) { state.textContent = `stopped: ${err.errcode || err.message}`; },
  });
  s.start();
  streams[who] = s;
  pane.querySelector('form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const input = pane.querySelector('input');
    const body = input.value.trim();
    if (!body) return;
    input.value = '';
    const txn = `${Date.now()}-${Math.random().toString(36).slice(2)}`;
    await fetch(`${cfg.mxsse}/_matrix/client/v3/rooms/${encodeURIComponent(cfg.room)}/send/m.room.message/${txn}`, {
      method: 'PUT',
      headers: { Authorization: `Bearer ${user.access_token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ msgtype: 'm.text', body }),
    });
  });
}

// The comparison: the same user, a second device, plain long-polling.
const longPoll = new SyncStream({
  baseUrl: cfg.mxsse, accessToken: cfg.alice_longpoll.access_token, transport: 'longpoll',
  params: { filter, set_presence: 'offline' }, longPollTimeout: 30000,
});
longPoll.start();

function fmt(n) { return n.toLocaleString('en'); }

async function metrics() {
  const text = await (await fetch('/metrics')).text();
  const m = {};
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    m[line.slice(0, i)] = Number(line.slice(i + 1));
  }
  return m;
}

let base = null; // mxsse's counters when the page opened
async function refresh() {
  const a = streams.alice.stats, l = longPoll.stats;
  $('sse-req').textContent = fmt(a.requests);
  $('lp-req').textContent = fmt(l.requests);
  $('sse-bytes').textContent = fmt(a.bytes);
  $('lp-bytes').textContent = fmt(l.bytes);
  $('sse-batches').textContent = `${fmt(a.batches)} / ${fmt(a.heartbeats)}`;
  $('lp-batches').textContent = `${fmt(l.batches)} / –`;
  $('hs-lp').textContent = fmt(l.requests - 1); // less its /versions
  $('since').textContent = `over the last ${Math.round((Date.now() - startedAt) / 1000)} s`;
  try {
    const m = await metrics();
    const syncs = Object.entries(m).filter(([k]) => k.startsWith('mxsse_sync_requests_total'))
      .reduce((sum, [, v]) => sum + v, 0);
    base ??= { syncs };
    $('hs-sse').textContent = `${fmt(syncs - base.syncs)} (both streams)`;
    $('note').textContent = `mxsse (its /metrics): ${m.mxsse_sse_streams_open} streams open, `
      + `${fmt(m.mxsse_sse_events_total)} events and ${fmt(m.mxsse_sse_heartbeats_total)} heartbeats sent, `
      + `${fmt(syncs)} homeserver /sync calls since it started. Heartbeat every ${HEARTBEAT} s; `
      + 'the long-poll client asks with timeout=30000.';
  } catch (err) {
    $('note').textContent = `metrics unavailable: ${err.message}`;
  }
}
refresh();
setInterval(refresh, 1000);
window.demo = { streams, longPoll, cfg };
