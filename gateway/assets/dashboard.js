// vendgate operator dashboard: polls /dashboard/api/* every 2 s and turns
// cumulative counters into rates from successive samples; #machine/{no}
// shows one machine's page instead of the overview. Plain DOM, no
// framework, no build step; every value is set with textContent (machine
// supplied text such as error strings is never parsed as HTML).
'use strict';

const POLL_MS = 2000;
// Samples kept: two minutes at the poll interval, enough for sparklines and a
// one-minute order rate.
const HISTORY = 60;
const ORDER_WINDOW_S = 60;

const state = {
  samples: [], // {t: seconds, s: summary}
  page: 1,
  pageSize: 50,
  q: '',
  filter: 'all',
  total: 0,
};

const $ = (id) => document.getElementById(id);

function el(tag, props, children) {
  const e = document.createElement(tag);
  if (props) {
    for (const [k, v] of Object.entries(props)) {
      if (k === 'text') e.textContent = v;
      else if (k === 'class') e.className = v;
      else e.setAttribute(k, v);
    }
  }
  for (const c of children || []) e.appendChild(c);
  return e;
}

function td(text, cls) {
  return el('td', { text: text == null ? '' : String(text), class: cls || '' });
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

async function getJSON(path, method) {
  // Resolve against the origin, not the page URL: a page opened as
  // http://user:pass@host/dashboard would otherwise pass its credentials on,
  // which fetch refuses. The session cookie set at sign-in authenticates.
  const url = location.origin + path;
  const r = await fetch(url, { method: method || 'GET', credentials: 'same-origin', cache: 'no-store' });
  if (r.status === 401) throw new Error('not signed in: reload the page');
  if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
  return r.json();
}

function fmtRate(v) {
  if (v == null || !isFinite(v)) return '–';
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function fmtBytes(v) {
  if (v == null || !isFinite(v)) return '–';
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return v.toFixed(v >= 10 || i === 0 ? 0 : 1) + ' ' + units[i];
}

function fmtDuration(s) {
  s = Math.max(0, Math.floor(s));
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
  if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
  return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
}

function fmtTime(iso) {
  if (!iso) return 'never';
  const d = new Date(iso);
  const ago = (Date.now() - d.getTime()) / 1000;
  return d.toLocaleTimeString() + (ago > 1 ? ' (' + fmtDuration(ago) + ' ago)' : '');
}

// Rate per second of `pick(summary)` between samples a and b.
function perSecond(a, b, pick) {
  const dt = b.t - a.t;
  if (dt <= 0) return null;
  return Math.max(0, pick(b.s) - pick(a.s)) / dt;
}

function topicAt(s, pattern) {
  return s.topics.find((x) => x.pattern === pattern) || { in_messages: 0, out_messages: 0, in_bytes: 0, out_bytes: 0 };
}

function orderTotal(s, outcome) {
  const o = s.orders.find((x) => x.outcome === outcome);
  return o ? o.total : 0;
}

function sparkline(values) {
  const w = 120, h = 22;
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('width', w);
  svg.setAttribute('height', h);
  svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h);
  if (values.length > 1) {
    const max = Math.max(...values, 1e-9);
    const step = w / (HISTORY - 1);
    const x0 = w - step * (values.length - 1);
    const pts = values.map((v, i) => (x0 + i * step).toFixed(1) + ',' + (h - 1 - (v / max) * (h - 2)).toFixed(1));
    const line = document.createElementNS(NS, 'polyline');
    line.setAttribute('points', pts.join(' '));
    svg.appendChild(line);
  }
  return svg;
}

function renderSummary() {
  const n = state.samples.length;
  const cur = state.samples[n - 1];
  const prev = n > 1 ? state.samples[n - 2] : null;
  const s = cur.s;

  $('online-count').textContent = s.machines.online;
  $('offline-count').textContent = s.machines.offline;
  $('flapping-count').textContent = s.machines.flapping;
  $('provisioned-count').textContent = s.machines.provisioned;
  $('queue-depth').textContent = s.queue_depth;
  $('webhook-backlog').textContent = s.webhooks.backlog;
  $('webhook-oldest').textContent = s.webhooks.backlog > 0 ? fmtDuration(s.webhooks.oldest_age_seconds) : '–';
  $('version').textContent = s.version;
  $('uptime').textContent = fmtDuration(s.uptime_seconds);
  $('updated').textContent = new Date().toLocaleTimeString();
  const ready = $('ready');
  ready.textContent = s.ready ? 'ready' : 'not ready: ' + JSON.stringify(s.readiness.checks);
  ready.className = 'badge ' + (s.ready ? 'ready' : 'not-ready');

  // Topic rates and sparklines (messages in + out per second).
  const rows = s.topics.map((t) => {
    const p = t.pattern;
    const inRate = prev ? perSecond(prev, cur, (x) => topicAt(x, p).in_messages) : null;
    const outRate = prev ? perSecond(prev, cur, (x) => topicAt(x, p).out_messages) : null;
    const byteRate = prev ? perSecond(prev, cur, (x) => topicAt(x, p).in_bytes + topicAt(x, p).out_bytes) : null;
    const series = [];
    for (let i = 1; i < n; i++) {
      const a = state.samples[i - 1], b = state.samples[i];
      series.push(perSecond(a, b, (x) => topicAt(x, p).in_messages + topicAt(x, p).out_messages) || 0);
    }
    const spark = el('td');
    spark.appendChild(sparkline(series));
    return el('tr', { 'data-pattern': p }, [
      td(p, 'mono'), td(fmtRate(inRate), 'num'), td(fmtRate(outRate), 'num'), td(fmtBytes(byteRate) + (byteRate == null ? '' : '/s'), 'num'),
      td(t.in_messages + t.out_messages, 'num'), spark,
    ]);
  });
  replaceRows($('topics'), rows);

  // Orders per minute over the last minute of samples.
  let base = cur;
  for (const smp of state.samples) {
    if (cur.t - smp.t <= ORDER_WINDOW_S) { base = smp; break; }
  }
  const orderRows = s.orders.map(({ outcome, total }) => {
    const perMin = base !== cur ? perSecond(base, cur, (x) => orderTotal(x, outcome)) * 60 : null;
    return el('tr', { 'data-outcome': outcome }, [
      td(outcome, 'status-' + outcome), td(fmtRate(perMin), 'num'), td(total, 'num'),
    ]);
  });
  replaceRows($('orders'), orderRows);

  const answers = s.order_requests.map((a) => el('tr', { 'data-code': String(a.code) }, [
    td(a.code, 'mono'), el('td', { text: a.name, title: a.message }), td(a.total, 'num'),
  ]));
  if (answers.length === 0) answers.push(el('tr', {}, [el('td', { text: 'none yet', class: 'offline', colspan: '3' })]));
  replaceRows($('order-requests'), answers);

  const failed = s.recent_failed.map((o) => {
    const link = el('a', { href: '#order/' + o.order_id, class: 'order-link', text: String(o.order_id) });
    const cell = el('td', { class: 'mono' }, [link]);
    return el('tr', {}, [cell, td(o.machine_no, 'mono'), td(o.status, 'status-' + o.status), td(o.error || ''), td(fmtTime(o.at))]);
  });
  if (failed.length === 0) failed.push(el('tr', {}, [el('td', { text: 'none', class: 'offline', colspan: '5' })]));
  replaceRows($('recent-failed'), failed);
}

async function pollSummary() {
  const s = await getJSON('/dashboard/api/summary');
  state.samples.push({ t: performance.now() / 1000, s });
  if (state.samples.length > HISTORY) state.samples.shift();
  renderSummary();
}

async function pollMachines() {
  const params = new URLSearchParams({ page: state.page, page_size: state.pageSize, filter: state.filter });
  if (state.q) params.set('q', state.q);
  const m = await getJSON('/dashboard/api/machines?' + params.toString());
  state.total = m.total;
  const pages = Math.max(1, Math.ceil(m.total / m.page_size));
  if (state.page > pages) { state.page = pages; }
  $('machines-total').textContent = m.total;
  $('page-info').textContent = 'page ' + m.page + ' of ' + pages;
  $('prev').disabled = m.page <= 1;
  $('next').disabled = m.page >= pages;
  const rows = m.machines.map((x) => el('tr', { 'data-machine': x.machine_no }, [
    el('td', { class: 'mono' }, [el('a', { href: '#machine/' + x.machine_no, class: 'machine-link', text: x.machine_no })]),
    td(x.online ? 'online' : 'offline', x.online ? 'online' : 'offline'),
    td(fmtTime(x.last_seen)),
    td(x.flaps, 'num'),
    td(x.firmware || ''),
    td(x.last_rtt_ms == null ? '' : x.last_rtt_ms, 'num'),
    td(x.last_offline_reason || ''),
  ]));
  replaceRows($('machines'), rows);
}

// ---- A machine's page (#machine/{machine_no}) ----

function machineNoInHash() {
  const m = /^#machine\/(\d{8})$/.exec(location.hash);
  return m ? m[1] : null;
}

function orderLink(id) {
  return el('td', { class: 'mono' }, [el('a', { href: '#order/' + id, class: 'order-link', text: String(id) })]);
}

function fmtItems(items, showDispensed) {
  return items.map((i) => 'product ' + i.product_id + ' × ' + i.quantity +
    (showDispensed ? ' (dispensed ' + i.dispensed + ')' : '')).join(', ');
}

function fmtRefund(o) {
  switch (o.refund_status) {
    case 'pending': return 'owed ' + o.refund_amount + ', not recorded';
    case 'refunded': return 'refunded ' + o.refunded_amount;
    case 'mismatch': return 'owed ' + o.refund_amount + ', recorded ' + o.refunded_amount;
    default: return '';
  }
}

function renderMachine(x) {
  $('machine-no').textContent = x.machine_no;
  const st = $('machine-state');
  st.textContent = x.online ? 'online' : 'offline';
  st.className = x.online ? 'online' : 'offline';
  $('machine-summary').textContent = [
    'merchant ' + x.merchant,
    'last seen ' + fmtTime(x.last_seen),
    'firmware ' + (x.firmware || '–'),
    'last rtt ' + (x.last_rtt_ms == null ? '–' : x.last_rtt_ms + ' ms'),
    'flaps/h ' + x.flaps,
    'queued ' + x.queued_orders,
  ].join(' · ');

  const pending = x.pending.map((o) => el('tr', { 'data-order': String(o.order_id) }, [
    orderLink(o.order_id), td(o.status, 'status-' + o.status), td(fmtTime(o.since)), td(fmtItems(o.items, false)),
  ]));
  if (pending.length === 0) pending.push(el('tr', {}, [el('td', { text: 'none', class: 'offline', colspan: '4' })]));
  replaceRows($('machine-pending'), pending);

  const recent = x.recent.map((o) => el('tr', { 'data-order': String(o.order_id) }, [
    orderLink(o.order_id), td(fmtTime(o.created_at)), td(o.status, 'status-' + o.status),
    td(o.error || '', 'error-text'), el('td', { class: 'num', text: o.dispensed + ' / ' + o.ordered, title: fmtItems(o.items, true) }),
    td(o.amount, 'num'), td(fmtRefund(o)),
  ]));
  if (recent.length === 0) recent.push(el('tr', {}, [el('td', { text: 'no orders yet', class: 'offline', colspan: '7' })]));
  replaceRows($('machine-orders'), recent);
  $('machine-orders-shown').textContent = x.recent.length;
  $('machine-orders-total').textContent = x.orders_total;
}

async function pollMachine() {
  const no = machineNoInHash();
  if (!no) return;
  const x = await getJSON('/dashboard/api/machines/' + no);
  if (machineNoInHash() === no) renderMachine(x);
}

async function ping() {
  const no = machineNoInHash();
  if (!no) return;
  const out = $('ping-result');
  const button = $('ping');
  button.disabled = true;
  out.className = '';
  out.textContent = 'pinging…';
  try {
    const r = await getJSON('/dashboard/api/machines/' + no + '/ping', 'POST');
    const shown = { ok: 'rtt ' + r.rtt_ms + ' ms', offline: 'offline', no_answer: 'no answer (2 s)', busy: 'busy: connection cannot take a command' };
    out.textContent = shown[r.result] || r.result;
    out.className = r.result === 'ok' ? 'ok' : 'bad';
    // The round trip is now the machine's last_rtt_ms: show it there too.
    pollMachine().catch(showError);
  } catch (e) {
    out.textContent = String(e.message || e);
    out.className = 'bad';
  } finally {
    button.disabled = false;
  }
}

// Which page the hash asks for: a machine's, or the overview (with an
// order's timeline open for #order/{id}).
function route() {
  const no = machineNoInHash();
  $('machine-page').hidden = !no;
  $('overview').hidden = !!no;
  if (no && $('machine-no').textContent !== no) {
    $('machine-no').textContent = no;
    $('ping-result').textContent = '';
    replaceRows($('machine-pending'), []);
    replaceRows($('machine-orders'), []);
  }
  if (no) pollMachine().catch(showError);
  showTimeline();
}

async function showTimeline() {
  const m = /^#order\/(\d{1,20})$/.exec(location.hash);
  const panel = $('timeline');
  if (!m) { panel.hidden = true; return; }
  panel.hidden = false;
  $('timeline-id').textContent = m[1];
  try {
    const o = await getJSON('/dashboard/api/orders/' + m[1]);
    $('timeline-summary').textContent = 'machine ' + o.machine_no + ' · status ' + o.status +
      (o.error ? ' · error ' + o.error : '') + ' · amount ' + o.amount + (o.refund_amount ? ' · refund ' + o.refund_amount : '');
    $('timeline-summary').className = 'status-' + o.status;
    replaceRows($('timeline-events'), o.events.map((e) => el('tr', { class: 'event' }, [
      td(fmtTime(e.at)), td(e.type, 'mono'), td(JSON.stringify(e.detail), 'detail'),
    ])));
  } catch (e) {
    $('timeline-summary').textContent = String(e.message || e);
    replaceRows($('timeline-events'), []);
  }
}

function showError(e) {
  const box = $('error');
  if (e) { box.hidden = false; box.textContent = String(e.message || e); } else { box.hidden = true; }
}

async function tick() {
  try {
    await Promise.all([pollSummary(), machineNoInHash() ? pollMachine() : pollMachines()]);
    showError(null);
  } catch (e) {
    showError(e);
  }
  setTimeout(tick, POLL_MS);
}

let searchTimer = null;
$('search').addEventListener('input', (ev) => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    state.q = ev.target.value.trim();
    state.page = 1;
    pollMachines().catch(showError);
  }, 250);
});
$('filter').addEventListener('change', (ev) => {
  state.filter = ev.target.value;
  state.page = 1;
  pollMachines().catch(showError);
});
$('prev').addEventListener('click', () => { if (state.page > 1) { state.page--; pollMachines().catch(showError); } });
$('next').addEventListener('click', () => { state.page++; pollMachines().catch(showError); });
$('timeline-close').addEventListener('click', (ev) => { ev.preventDefault(); history.replaceState(null, '', location.pathname); showTimeline(); });
$('machine-back').addEventListener('click', (ev) => { ev.preventDefault(); history.pushState(null, '', location.pathname); route(); });
$('ping').addEventListener('click', ping);
window.addEventListener('hashchange', route);

route();
tick();
