// The Ferry appliance's web console: reads the control API (/api/v1) with an admin token.
//
// Rules this file keeps (web.rs tests some of them):
// - every value from the API goes into the page with textContent, never as HTML;
// - the token lives in sessionStorage (this tab only) and travels only in the
//   Authorization header: never in a URL, never in storage that outlives the tab;
// - no inline script or style, nothing loaded from elsewhere (a strict CSP, offline use).
'use strict';

const API = '/api/v1';
const TOKEN_KEY = 'ferry.adminToken';
const REFRESH_MS = 10000;

const $ = (id) => document.getElementById(id);

// An API error (`{code, message}`) or a failure to reach the appliance.
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function savedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// GET `path` (a fixed path under /api/v1), with the admin token when `auth` is set.
async function api(path, auth) {
  const headers = { Accept: 'application/json' };
  if (auth) {
    const token = savedToken();
    if (!token) throw new ApiError(401, 'unauthorized', 'no admin token');
    headers.Authorization = 'Bearer ' + token;
  }
  let r;
  try {
    r = await fetch(API + path, {
      headers, cache: 'no-store', credentials: 'omit', redirect: 'error', referrerPolicy: 'no-referrer',
    });
  } catch (e) {
    throw new ApiError(0, 'unreachable', 'the appliance did not answer (' + e.message + ')');
  }
  let body = null;
  try {
    body = await r.json();
  } catch (e) {
    body = null;
  }
  if (!r.ok) {
    const message = body && typeof body.message === 'string' ? body.message : 'HTTP ' + r.status;
    throw new ApiError(r.status, body && body.code, message);
  }
  return body;
}

// Small formatting helpers: each returns a string (or a node) for a cell.
const text = (v) => (v === null || v === undefined || v === '' ? '—' : String(v));
const when = (v) => (typeof v === 'string' ? v.replace('T', ' ').replace(/\.\d+Z$/, 'Z') : text(v));
const list = (v) => (Array.isArray(v) && v.length ? v.join(', ') : '—');
const bytes = (n) => {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
};
const disks = (d) => (Array.isArray(d) && d.length ? d.map((x) => x.name + ' ' + bytes(x.size_bytes)).join(', ') : '—');

function badge(state) {
  const s = document.createElement('span');
  s.className = /^[a-z-]+$/.test(state) ? 'state state-' + state : 'state';
  s.textContent = text(state);
  return s;
}

// Each table: its endpoint, and its columns as [heading, cell of a row].
const TABLES = [
  { id: 'items', path: '/items?limit=500', noun: 'item', columns: [
    ['Name', (r) => r.name], ['State', (r) => badge(r.state)], ['Direction', (r) => r.direction],
    ['Policy', (r) => r.policy], ['Vault', (r) => r.vault], ['Disks', (r) => disks(r.disks)],
    ['Active job', (r) => r.active_job], ['Updated', (r) => when(r.updated)],
  ] },
  { id: 'jobs', path: '/jobs?limit=50', noun: 'job', newestFirst: true, columns: [
    ['Created', (r) => when(r.created)], ['Job', (r) => r.id], ['Kind', (r) => r.kind],
    ['Item', (r) => r.item], ['State', (r) => badge(r.state)], ['Ended', (r) => when(r.ended)],
    ['Error', (r) => r.error],
  ] },
  { id: 'agents', path: '/agents?limit=500', noun: 'agent', columns: [
    ['Name', (r) => r.name], ['State', (r) => badge(r.state)], ['Items', (r) => list(r.items)],
    ['Host', (r) => r.hostname], ['Version', (r) => r.agent_version], ['Last seen', (r) => when(r.last_seen)],
    ['Certificate expires', (r) => when(r.certificate && r.certificate.expires)],
  ] },
  { id: 'groups', path: '/groups?limit=500', noun: 'group', columns: [
    ['Name', (r) => r.name], ['Items', (r) => list(r.items)], ['Description', (r) => r.description],
    ['Updated', (r) => when(r.updated)],
  ] },
  { id: 'policies', path: '/policies?limit=500', noun: 'policy', columns: [
    ['Name', (r) => r.name], ['RPO threshold (min)', (r) => r.rpo_threshold_minutes],
    ['Cycle (s)', (r) => r.cycle_interval_seconds], ['Compression', (r) => r.compression_level],
    ['Description', (r) => r.description], ['Updated', (r) => when(r.updated)],
  ] },
  { id: 'vaults', path: '/vaults?limit=500', noun: 'vault', columns: [
    ['Name', (r) => r.name], ['Location', (r) => r.url], ['Created', (r) => when(r.created)],
  ] },
];

function cell(tag, value) {
  const c = document.createElement(tag);
  if (value instanceof Node) c.appendChild(value);
  else c.textContent = text(value);
  return c;
}

function showError(el, message) {
  el.textContent = message || '';
  el.hidden = !message;
}

function render(t, page) {
  const table = $(t.id);
  const section = table.parentElement;
  showError(section.querySelector('.error'), '');
  const rows = Array.isArray(page.items) ? page.items.slice() : [];
  if (t.newestFirst) rows.sort((a, b) => String(b.created).localeCompare(String(a.created)));
  const head = document.createElement('tr');
  for (const [name] of t.columns) head.appendChild(cell('th', name));
  const thead = document.createElement('thead');
  thead.appendChild(head);
  const tbody = document.createElement('tbody');
  for (const r of rows) {
    const tr = document.createElement('tr');
    for (const [, get] of t.columns) tr.appendChild(cell('td', get(r)));
    tbody.appendChild(tr);
  }
  if (!rows.length) {
    const tr = document.createElement('tr');
    const td = cell('td', 'none yet');
    td.colSpan = t.columns.length;
    td.className = 'muted';
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
  table.replaceChildren(thead, tbody);
  const more = section.querySelector('.more');
  more.textContent = page.next_cursor ? 'Only the first ' + rows.length + ' are shown; `ferry ' + t.noun + ' list` shows them all.' : '';
  more.hidden = !page.next_cursor;
}

async function refreshHealth() {
  const el = $('health');
  try {
    const h = await api('/health', false);
    const roles = Array.isArray(h.roles) && h.roles.length ? ' · roles: ' + h.roles.join(', ') : '';
    el.textContent = 'Appliance ' + text(h.status) + ' · ferryd ' + text(h.version) + roles;
    el.className = 'ok';
  } catch (e) {
    el.textContent = 'Appliance: ' + e.message;
    el.className = 'error';
  }
}

async function refreshTables() {
  const results = await Promise.allSettled(TABLES.map((t) => api(t.path, true)));
  if (!savedToken()) return; // forgotten meanwhile
  const refused = results.find((r) => r.status === 'rejected' && r.reason.status === 401);
  if (refused) {
    signOut('The token was refused: ' + refused.reason.message);
    return;
  }
  results.forEach((r, i) => {
    const t = TABLES[i];
    if (r.status === 'fulfilled') render(t, r.value);
    else showError($(t.id).parentElement.querySelector('.error'), r.reason.message);
  });
  $('updated').textContent = 'Updated ' + new Date().toLocaleTimeString();
}

let busy = false;

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    await refreshHealth();
    if (savedToken()) await refreshTables();
  } finally {
    busy = false;
  }
}

function showSignedIn(signedIn) {
  $('login').hidden = signedIn;
  $('console').hidden = !signedIn;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const t of TABLES) $(t.id).replaceChildren();
  showError($('login-error'), message);
  showSignedIn(false);
  $('token').focus();
}

function signIn(event) {
  event.preventDefault();
  const input = $('token');
  const token = input.value.trim();
  input.value = '';
  // A header value is printable ASCII; anything else cannot be a token.
  if (!/^[\x21-\x7e]+$/.test(token)) {
    showError($('login-error'), 'That is not an admin token.');
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  showError($('login-error'), '');
  showSignedIn(true);
  refresh();
}

function start() {
  for (const el of document.querySelectorAll('.origin')) el.textContent = location.origin;
  $('login-form').addEventListener('submit', signIn);
  $('forget').addEventListener('click', () => signOut(''));
  $('refresh').addEventListener('click', refresh);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') refresh();
  });
  setInterval(() => {
    if (document.visibilityState === 'visible') refresh();
  }, REFRESH_MS);
  showSignedIn(Boolean(savedToken()));
  refresh();
}

start();
