/**
 * The dashboard at `/` (SPEC §9): static HTML, CSS and vanilla JS kept as strings so `tsc`
 * carries them into dist with no bundler. The page polls `/api/status` and `/api/activity`,
 * loads nothing from elsewhere (CSP `default-src 'self'`) and writes data only through
 * `textContent`, never as markup.
 *
 * The strings avoid backticks and `${`, so they need no escaping here.
 */

export interface DashboardAsset {
  contentType: string;
  body: string;
}

const INDEX_HTML = String.raw`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>iot-gateway</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/style.css">
<script src="/app.js" defer></script>
</head>
<body>
<header class="top">
  <div class="brand">
    <h1>iot-gateway <span class="gw-id" data-testid="gateway-id">…</span></h1>
    <div class="meta">
      <span data-testid="version"></span>
      <span class="sep">·</span> up <span data-testid="uptime">–</span>
      <span class="sep">·</span> pid <span data-testid="pid">–</span>
    </div>
  </div>
  <div class="top-right">
    <span class="badge" data-testid="readiness">…</span>
    <div class="updated" data-testid="updated"></div>
  </div>
</header>
<div class="banner banner-error" data-testid="conn-error" hidden></div>
<div class="banner banner-warn" data-testid="config-error" hidden>
  <div><strong>Configuration edit refused</strong> <span data-testid="config-error-when"></span>
    — the previous configuration stays in force.</div>
  <div class="banner-detail" data-testid="config-error-message"></div>
  <ul data-testid="config-error-issues"></ul>
</div>
<div class="banner banner-info" data-testid="pending-restart" hidden></div>
<main>
  <section class="cards">
    <div class="card"><div class="label">Devices connected</div><div class="value" data-testid="device-count">–</div></div>
    <div class="card"><div class="label">Messages in</div><div class="value" data-testid="messages-in">–</div></div>
    <div class="card"><div class="label">Queued</div><div class="value" data-testid="queued-total">–</div></div>
    <div class="card"><div class="label">Auth failures</div><div class="value" data-testid="auth-failures">–</div></div>
    <div class="card"><div class="label">Replication lag</div><div class="value" data-testid="replication-lag">–</div></div>
    <div class="card"><div class="label">Store</div><div class="value" data-testid="store-state">–</div></div>
  </section>

  <section class="panel">
    <h2>Integrations</h2>
    <div class="scroll">
      <table data-testid="integrations-table">
        <thead><tr>
          <th>Name</th><th>Type</th><th>State</th><th class="num">Queue</th><th class="num">Bytes</th>
          <th class="num">Oldest</th><th class="num">In flight</th><th class="num">Delivered</th>
          <th class="num">Dropped</th><th class="num">Dead letters</th><th class="num">Last ack</th><th>Last error</th>
        </tr></thead>
        <tbody></tbody>
      </table>
    </div>
    <p class="empty" data-testid="integrations-empty" hidden>No integrations configured.</p>
  </section>

  <div class="columns">
    <section class="panel">
      <h2>Replication</h2>
      <dl class="facts" data-testid="replication"></dl>
    </section>
    <section class="panel">
      <h2>Connected devices</h2>
      <div class="scroll short">
        <table data-testid="devices-table">
          <thead><tr><th>Device</th><th>Address</th><th class="num">Connected</th></tr></thead>
          <tbody></tbody>
        </table>
      </div>
      <p class="empty" data-testid="devices-empty" hidden>No devices connected.</p>
      <p class="more" data-testid="devices-more" hidden></p>
    </section>
  </div>

  <section class="panel">
    <div class="panel-head">
      <h2>Recent activity</h2>
      <div class="filters">
        <label>Integration
          <select data-testid="filter-integration"><option value="">All</option></select>
        </label>
        <label>Status
          <select data-testid="filter-status">
            <option value="">All</option>
            <option value="started">started</option>
            <option value="success">success</option>
            <option value="failed">failed</option>
            <option value="error">error</option>
          </select>
        </label>
      </div>
    </div>
    <div class="scroll">
      <table data-testid="activity-table">
        <thead><tr>
          <th>Time</th><th>Integration</th><th>Activity</th><th>Direction</th><th>Status</th>
          <th class="num">Duration</th><th>Error</th>
        </tr></thead>
        <tbody></tbody>
      </table>
    </div>
    <p class="empty" data-testid="activity-empty" hidden>No activity matches.</p>
  </section>
</main>
<noscript><p class="banner banner-warn">The dashboard needs JavaScript; the same data is at /api/status.</p></noscript>
</body>
</html>
`;

const STYLE_CSS = String.raw`:root {
  --bg: #f4f6f8;
  --panel: #ffffff;
  --text: #1d2630;
  --muted: #637083;
  --line: #e3e7ec;
  --head: #17212b;
  --green: #1f8a4c;
  --green-bg: #e3f4ea;
  --amber: #9a6100;
  --amber-bg: #fdf1d8;
  --red: #b42318;
  --red-bg: #fde8e6;
  --blue: #1d5fb4;
  --blue-bg: #e4eefb;
  --grey: #5b6573;
  --grey-bg: #eceff2;
}
* { box-sizing: border-box; }
html, body { margin: 0; }
body {
  background: var(--bg);
  color: var(--text);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
.top {
  display: flex; justify-content: space-between; align-items: center; gap: 16px;
  padding: 14px 24px; background: var(--head); color: #f2f5f8;
}
.top h1 { margin: 0; font-size: 18px; font-weight: 600; }
.gw-id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-weight: 500; color: #9fd0ff; margin-left: 6px; }
.meta { color: #aeb9c5; font-size: 13px; margin-top: 2px; }
.sep { margin: 0 4px; }
.top-right { text-align: right; }
.updated { color: #aeb9c5; font-size: 12px; margin-top: 4px; }
main { padding: 16px 24px 32px; max-width: 1500px; margin: 0 auto; }
.banner { margin: 12px 24px 0; padding: 10px 14px; border-radius: 6px; border: 1px solid; }
.banner-detail { margin-top: 4px; }
.banner ul { margin: 6px 0 0; padding-left: 20px; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
.banner-error { background: var(--red-bg); color: var(--red); border-color: #f5c2bd; }
.banner-warn { background: var(--amber-bg); color: #6d4500; border-color: #f1d79c; }
.banner-info { background: var(--blue-bg); color: var(--blue); border-color: #bcd3f2; }
[hidden] { display: none !important; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin-bottom: 16px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; margin-top: 4px; font-variant-numeric: tabular-nums; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; margin-bottom: 16px; }
.panel h2 { margin: 0 0 10px; font-size: 15px; font-weight: 600; }
.panel-head { display: flex; justify-content: space-between; align-items: center; flex-wrap: wrap; gap: 8px; margin-bottom: 10px; }
.panel-head h2 { margin: 0; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.columns .panel { margin-bottom: 16px; }
@media (max-width: 900px) { .columns { grid-template-columns: 1fr; } }
.scroll { overflow-x: auto; }
.scroll.short { max-height: 260px; overflow-y: auto; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; white-space: nowrap; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; background: #fafbfc; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { white-space: normal; min-width: 220px; max-width: 520px; word-break: break-word; }
td.mono, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
tbody tr:hover { background: #f7f9fb; }
tr.row-failed { background: var(--red-bg); }
tr.row-failed:hover { background: #fbd9d5; }
tr.row-failed td:first-child { box-shadow: inset 3px 0 0 var(--red); }
.err-code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; color: var(--red); margin-right: 6px; }
.err-text { color: var(--red); }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px; font-weight: 600; line-height: 20px; background: var(--grey-bg); color: var(--grey); }
.badge.state-connected, .badge.status-success, .badge.ready { background: var(--green-bg); color: var(--green); }
.badge.state-degraded { background: var(--amber-bg); color: var(--amber); }
.badge.state-backoff, .badge.state-failed, .badge.status-failed, .badge.status-error, .badge.not-ready { background: var(--red-bg); color: var(--red); }
.badge.state-connecting, .badge.status-started { background: var(--blue-bg); color: var(--blue); }
.top .badge.ready { background: #2c9d5c; color: #fff; }
.top .badge.not-ready { background: #d64534; color: #fff; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 6px 16px; margin: 0; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; font-variant-numeric: tabular-nums; }
.filters { display: flex; gap: 14px; }
.filters label { color: var(--muted); font-size: 13px; display: flex; align-items: center; gap: 6px; }
select { font: inherit; padding: 4px 8px; border: 1px solid #cfd6de; border-radius: 5px; background: #fff; color: var(--text); }
.empty, .more { color: var(--muted); margin: 10px 2px 0; }
`;

const APP_JS = String.raw`(function () {
  'use strict';

  var REFRESH_MS = 5000;
  var MAX_DEVICES_SHOWN = 200;
  var busy = false;
  var again = false;
  var lastStatus = null;

  function byId(id) { return document.querySelector('[data-testid="' + id + '"]'); }

  // Every piece of data goes in through textContent; nothing from the API becomes markup.
  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function setText(id, value) { byId(id).textContent = value === null || value === undefined ? '' : String(value); }
  function cell(text, className) { return el('td', className || '', text); }

  function fmtNumber(n) { return typeof n === 'number' ? n.toLocaleString('en-US') : '–'; }
  function fmtDuration(ms) {
    if (ms === null || ms === undefined) return '–';
    if (ms < 1000) return Math.max(0, Math.round(ms)) + 'ms';
    var s = Math.floor(ms / 1000);
    if (s < 60) return s + 's';
    var m = Math.floor(s / 60);
    if (m < 60) return m + 'm ' + (s % 60) + 's';
    var h = Math.floor(m / 60);
    if (h < 24) return h + 'h ' + (m % 60) + 'm';
    return Math.floor(h / 24) + 'd ' + (h % 24) + 'h';
  }
  function fmtBytes(n) {
    if (typeof n !== 'number') return '–';
    var units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + ' ' + units[i];
  }
  function fmtAgo(at, now) { return at === null || at === undefined ? '–' : fmtDuration(now - at) + ' ago'; }
  function fmtTime(at) {
    var d = new Date(at);
    function p(n) { return (n < 10 ? '0' : '') + n; }
    return d.getFullYear() + '-' + p(d.getMonth() + 1) + '-' + p(d.getDate()) + ' ' +
      p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds());
  }

  function badge(text, className) { return el('span', 'badge ' + className, text); }

  function getJson(path) {
    return fetch(path, { cache: 'no-store', headers: { accept: 'application/json' } }).then(function (res) {
      if (!res.ok) throw new Error(path.split('?')[0] + ' answered HTTP ' + res.status);
      return res.json();
    });
  }

  function activityQuery() {
    var params = new URLSearchParams();
    var integration = byId('filter-integration').value;
    var status = byId('filter-status').value;
    if (integration) params.set('integration', integration);
    if (status) params.set('status', status);
    params.set('limit', '100');
    return params.toString();
  }

  function renderHeader(s) {
    setText('gateway-id', s.gatewayId);
    setText('version', 'v' + s.version);
    setText('uptime', fmtDuration(s.now - s.startedAt));
    setText('pid', s.pid);
    var ready = byId('readiness');
    ready.textContent = s.ready ? 'ready' : 'not ready';
    ready.className = 'badge ' + (s.ready ? 'ready' : 'not-ready');
    setText('updated', 'updated ' + fmtTime(s.now));
  }

  function renderConfig(s) {
    var box = byId('config-error');
    var err = s.config.lastError;
    box.hidden = !err;
    var list = byId('config-error-issues');
    list.replaceChildren();
    if (err) {
      setText('config-error-when', fmtAgo(err.at, s.now));
      setText('config-error-message', err.message);
      (err.issues || []).forEach(function (issue) {
        list.appendChild(el('li', '', issue.path + ': ' + issue.message + (issue.line ? ' (line ' + issue.line + ')' : '')));
      });
    }
    var pending = byId('pending-restart');
    pending.hidden = s.config.pendingRestart.length === 0;
    pending.textContent = 'Changed keys that apply after a restart: ' + s.config.pendingRestart.join(', ');
  }

  function renderCards(s) {
    setText('device-count', fmtNumber(s.broker.connections));
    setText('messages-in', fmtNumber(s.broker.messagesIn));
    var queued = s.integrations.reduce(function (sum, i) { return sum + i.queue.depth; }, 0);
    setText('queued-total', fmtNumber(queued));
    setText('auth-failures', fmtNumber(s.broker.authFailures));
    var r = s.replication;
    setText('replication-lag', r.configured ? fmtDuration(r.oldestPendingAgeMs || 0) : 'off');
    setText('store-state', s.store.writable ? 'writable' : 'NOT writable');
    byId('store-state').className = 'value' + (s.store.writable ? '' : ' err-text');
  }

  function renderIntegrations(s) {
    var body = byId('integrations-table').querySelector('tbody');
    body.replaceChildren();
    s.integrations.forEach(function (i) {
      var tr = el('tr');
      tr.setAttribute('data-testid', 'integration-row');
      tr.setAttribute('data-integration', i.name);
      tr.appendChild(cell(i.name));
      tr.appendChild(cell(i.type, 'muted'));
      var stateCell = el('td');
      var b = badge(i.state, 'state-' + i.state);
      b.setAttribute('data-testid', 'integration-state');
      stateCell.appendChild(b);
      tr.appendChild(stateCell);
      var q = i.queue;
      tr.appendChild(cell(fmtNumber(q.depth), 'num'));
      tr.appendChild(cell(fmtBytes(q.bytes), 'num'));
      tr.appendChild(cell(fmtDuration(q.oldestAgeMs), 'num'));
      tr.appendChild(cell(fmtNumber(i.inflight), 'num'));
      tr.appendChild(cell(fmtNumber(i.delivered), 'num'));
      var dropped = el('td', 'num', fmtNumber(q.dropped + q.expired + q.rejected + q.deadLettered));
      dropped.title = 'dropped ' + q.dropped + ', expired ' + q.expired + ', rejected ' + q.rejected +
        ', dead-lettered ' + q.deadLettered;
      tr.appendChild(dropped);
      tr.appendChild(cell(fmtNumber(q.deadLetters), 'num' + (q.deadLetters > 0 ? ' err-text' : '')));
      tr.appendChild(cell(fmtAgo(i.lastAckAt, s.now), 'num'));
      var errCell = el('td', 'wrap');
      if (i.lastError) {
        errCell.appendChild(el('span', 'err-code', i.lastError.code));
        errCell.appendChild(el('span', 'err-text', i.lastError.message));
        errCell.appendChild(el('span', 'muted', ' · ' + fmtAgo(i.lastError.at, s.now)));
      } else {
        errCell.appendChild(el('span', 'muted', '–'));
      }
      tr.appendChild(errCell);
      body.appendChild(tr);
    });
    byId('integrations-empty').hidden = s.integrations.length > 0;
  }

  function fact(list, term, value) {
    list.appendChild(el('dt', '', term));
    list.appendChild(el('dd', '', value));
  }

  function renderReplication(s) {
    var r = s.replication;
    var list = byId('replication');
    list.replaceChildren();
    if (!r.configured) {
      fact(list, 'State', 'not configured (no central PostgreSQL)');
      fact(list, 'Pending rows', fmtNumber(r.pendingRows));
      return;
    }
    fact(list, 'State', r.state);
    fact(list, 'Pending rows', fmtNumber(r.pendingRows));
    fact(list, 'Lag', fmtDuration(r.oldestPendingAgeMs || 0));
    fact(list, 'Replicated', fmtNumber(r.replicatedRows));
    fact(list, 'Rejected', fmtNumber(r.rejectedRows));
    fact(list, 'Last success', fmtAgo(r.lastSuccessAt, s.now));
    if (r.lastError) fact(list, 'Last error', r.lastError.code + ': ' + r.lastError.message + ' (' + fmtAgo(r.lastError.at, s.now) + ')');
  }

  function renderDevices(s) {
    var devices = s.broker.devices;
    var body = byId('devices-table').querySelector('tbody');
    body.replaceChildren();
    devices.slice(0, MAX_DEVICES_SHOWN).forEach(function (d) {
      var tr = el('tr');
      tr.setAttribute('data-testid', 'device-row');
      tr.appendChild(cell(d.id, 'mono'));
      tr.appendChild(cell(d.remoteAddress || '–', 'muted'));
      tr.appendChild(cell(fmtDuration(s.now - d.connectedAt), 'num'));
      body.appendChild(tr);
    });
    byId('devices-empty').hidden = devices.length > 0;
    var more = byId('devices-more');
    more.hidden = devices.length <= MAX_DEVICES_SHOWN;
    more.textContent = 'and ' + (devices.length - MAX_DEVICES_SHOWN) + ' more';
  }

  function renderIntegrationFilter(s) {
    var select = byId('filter-integration');
    var current = select.value;
    var wanted = s.integrations.map(function (i) { return i.id + '\u0000' + i.name; }).join('\u0001');
    if (select.getAttribute('data-options') === wanted) return;
    select.setAttribute('data-options', wanted);
    select.replaceChildren(el('option', '', 'All'));
    select.firstChild.value = '';
    s.integrations.forEach(function (i) {
      var option = el('option', '', i.name);
      option.value = i.id;
      select.appendChild(option);
    });
    // keep a selection whose integration is gone so its old rows stay reachable
    if (current && !s.integrations.some(function (i) { return i.id === current; })) {
      var stale = el('option', '', current);
      stale.value = current;
      select.appendChild(stale);
    }
    select.value = current;
  }

  function renderActivity(rows, query, s) {
    var names = {};
    s.integrations.forEach(function (i) { names[i.id] = i.name; });
    var table = byId('activity-table');
    var body = table.querySelector('tbody');
    body.replaceChildren();
    rows.forEach(function (row) {
      var failed = row.status === 'failed' || row.status === 'error';
      var tr = el('tr', failed ? 'row-failed' : '');
      tr.setAttribute('data-testid', 'activity-row');
      tr.setAttribute('data-status', row.status);
      tr.appendChild(cell(fmtTime(row.createdAt), 'mono'));
      tr.appendChild(cell(row.integrationId === null ? 'gateway' : names[row.integrationId] || row.integrationId));
      tr.appendChild(cell(row.activityType));
      tr.appendChild(cell(row.direction, 'muted'));
      var statusCell = el('td');
      statusCell.appendChild(badge(row.status, 'status-' + row.status));
      tr.appendChild(statusCell);
      tr.appendChild(cell(row.responseTimeMs === null ? '–' : fmtNumber(row.responseTimeMs) + ' ms', 'num'));
      var errCell = el('td', 'wrap');
      if (row.errorCode) errCell.appendChild(el('span', 'err-code', row.errorCode));
      if (row.errorMessage) errCell.appendChild(el('span', 'err-text', row.errorMessage));
      if (!row.errorCode && !row.errorMessage) errCell.appendChild(el('span', 'muted', '–'));
      tr.appendChild(errCell);
      body.appendChild(tr);
    });
    // tells readers (and tests) which filter the rows on screen answer
    table.setAttribute('data-query', query);
    byId('activity-empty').hidden = rows.length > 0;
  }

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    var query = activityQuery();
    Promise.all([getJson('/api/status'), getJson('/api/activity?' + query)])
      .then(function (results) {
        var s = results[0];
        lastStatus = s;
        renderHeader(s);
        renderConfig(s);
        renderCards(s);
        renderIntegrations(s);
        renderReplication(s);
        renderDevices(s);
        renderIntegrationFilter(s);
        // a filter changed while this request was out: its rows answer an old question
        if (query === activityQuery()) renderActivity(results[1].rows, query, s);
        else again = true;
        byId('conn-error').hidden = true;
      })
      .catch(function (err) {
        var box = byId('conn-error');
        box.textContent = 'Cannot reach the gateway: ' + (err && err.message ? err.message : String(err)) +
          (lastStatus ? ' (showing data from ' + fmtTime(lastStatus.now) + ')' : '');
        box.hidden = false;
      })
      .then(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
  }

  function start() {
    byId('filter-integration').addEventListener('change', refresh);
    byId('filter-status').addEventListener('change', refresh);
    refresh();
    setInterval(function () { if (!document.hidden) refresh(); }, REFRESH_MS);
    document.addEventListener('visibilitychange', function () { if (!document.hidden) refresh(); });
  }

  start();
})();
`;

const FAVICON_SVG = String.raw`<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">
<rect width="32" height="32" rx="7" fill="#17212b"/>
<circle cx="16" cy="16" r="4" fill="#9fd0ff"/>
<circle cx="16" cy="16" r="9" fill="none" stroke="#9fd0ff" stroke-width="2" stroke-dasharray="9 5"/>
</svg>
`;

/** Served paths → assets. */
export const DASHBOARD_ASSETS: Readonly<Record<string, DashboardAsset>> = {
  '/': { contentType: 'text/html; charset=utf-8', body: INDEX_HTML },
  '/app.js': { contentType: 'text/javascript; charset=utf-8', body: APP_JS },
  '/style.css': { contentType: 'text/css; charset=utf-8', body: STYLE_CSS },
  '/favicon.svg': { contentType: 'image/svg+xml', body: FAVICON_SVG },
};
